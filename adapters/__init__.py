"""Concrete plugins built on peft-hcp: the worked examples to copy when writing your own."""
