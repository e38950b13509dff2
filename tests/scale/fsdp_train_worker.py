"""Under ``accelerate launch --num_processes 2`` on CPU (``--use_fsdp --fsdp_version 2``, or ``--multi_gpu`` for the
DDP reference): train 2 steps with a checkpoint after each, write this rank's report as JSON.

Under FSDP the run is then resumed in the same processes from the step-1 checkpoint (the step-2 one moved aside as
``uninterrupted``), so the test can compare the resumed step 2 with the uninterrupted one. Used by
``tests/scale/test_fsdp_train.py``; argv: CONFIG OUTPUT_DIR.
"""

import json
import os
import shutil
import sys

import peft_hcp  # noqa: F401
from peft_hcp.fsdp import held_bytes
from peft_hcp.train import Trainer, load_settings
from peft_hcp.train.checkpoint import checkpoint_dir


OVERRIDES = ["steps=2", "save_every=1", "batch_size=2", "sample.steps=1", "sample.seeds=[0]", "sample.prompts=[a]"]


def main() -> None:
    config, output_dir = sys.argv[1:3]
    settings = load_settings(config, [f"output_dir={output_dir}", *OVERRIDES])
    trainer = Trainer(settings)
    rank = trainer.accelerator.process_index
    result = trainer.run()
    held, whole = held_bytes(trainer.pipe.unet, trainable=False)
    report = {
        "processes": trainer.accelerator.num_processes,
        "unet": type(trainer.unet).__name__,
        "frozen_held": held,
        "frozen_whole": whole,
        "end_step": result.end_step,
        "samples": result.samples,
    }
    if trainer.fsdp is not None:
        if rank == 0:
            shutil.move(checkpoint_dir(output_dir, 2), os.path.join(output_dir, "uninterrupted"))
        trainer.accelerator.wait_for_everyone()
        resumed = Trainer(settings).run()
        report["resumed_from"] = resumed.start_step
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main()
