"""Under ``accelerate launch --multi_gpu --num_processes 2`` on CPU: train one step, dump this rank's plugin weights.

Used by ``tests/train/test_train.py::test_ddp_two_processes``; argv: CONFIG OUTPUT_DIR.
"""

import os
import sys

from safetensors.torch import save_file

import peft_hcp  # noqa: F401
from peft_hcp.train import Trainer, load_settings


def _plugin_weights(trainer) -> dict:
    return {k: p.detach().clone().contiguous() for k, p in trainer.pipe.unet.named_parameters() if p.requires_grad}


def main() -> None:
    config, output_dir = sys.argv[1:3]
    overrides = ["steps=1", "save_every=0", "batch_size=2", "sample.steps=1", "sample.seeds=[0]", "sample.prompts=[a]"]
    trainer = Trainer(load_settings(config, [f"output_dir={output_dir}", *overrides]))
    rank = trainer.accelerator.process_index
    first = trainer.batches.draw(1, 0)["caption"]
    save_file(_plugin_weights(trainer), os.path.join(output_dir, f"init{rank}.safetensors"))
    result = trainer.run()
    save_file(_plugin_weights(trainer), os.path.join(output_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(output_dir, f"rank{rank}.txt"), "w") as handle:
        handle.write(f"{trainer.accelerator.num_processes} {type(trainer.unet).__name__} {result.end_step}\n")
        handle.write("\n".join(first))


if __name__ == "__main__":
    main()
