"""Benchmarks of peft-hcp against PEFT and plain PyTorch: ``python -m benchmarks.run --help``."""
