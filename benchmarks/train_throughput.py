"""Training throughput of the embedded default: peft-hcp's LoRA vs PEFT's ``LoraConfig`` on the same layers.

    python -m benchmarks.train_throughput [--steps 60] [--batch-size 4]

Both runs use the same trainer, data, batch size and host layers (the layers configs/lora.yaml selects);
only the adapter implementation differs. Prints it/s of each and the ratio hcp / peft from one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from peft import LoraConfig

import peft_hcp  # noqa: F401
from peft_hcp.train import Trainer, load_settings, parse_section


CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "lora.yaml")


def measure(entries_for, steps: int, batch_size: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"output_dir={out}",
            f"steps={steps}",
            f"batch_size={batch_size}",
            "save_every=0",
            "sample.steps=1",
            "sample.seeds=[0]",
            "sample.prompts=[a]",
            "log_every=0",
        ]
        settings = load_settings(CONFIG, overrides)
        trainer = Trainer(settings, entries_for(settings))
        hosts = sum(len(g["params"]) for g in trainer.groups) // 2
        return trainer.run().it_per_s, hosts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    hcp_entries = {}

    def hcp(settings):
        hcp_entries["list"] = parse_section("plugin_unet", settings.plugin_unet)
        return hcp_entries["list"]

    hcp_rate, hcp_hosts = measure(hcp, args.steps, args.batch_size)
    (entry,) = hcp_entries["list"]

    def peft(settings):
        from peft_hcp.embedded import tiny_unet
        from peft_hcp.single.model import find_hosts

        names = find_hosts(tiny_unet(), entry.config, peft_hcp.LoraBlock)
        config = LoraConfig(r=entry.config.r, lora_alpha=entry.config.alpha, target_modules=names)
        return [type(entry)(entry.section, entry.name, config, entry.lr)]

    peft_rate, peft_hosts = measure(peft, args.steps, args.batch_size)
    assert hcp_hosts == peft_hosts, (hcp_hosts, peft_hosts)
    print(f"layers adapted: {hcp_hosts} (both); {args.steps} steps, batch {args.batch_size}")
    print(f"HcpLora   {hcp_rate:7.2f} it/s")
    print(f"PEFT LoRA {peft_rate:7.2f} it/s")
    print(f"ratio hcp/peft: {hcp_rate / peft_rate:.3f}")


if __name__ == "__main__":
    main()
