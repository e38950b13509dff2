"""FSDP2 as a library, 2 processes on CPU (gloo): train a tiny UNet's adapter sharded, save it, compare.

argv: KIND OUTPUT_DIR. KIND is ``lora`` (a ``PeftModel``, ``save_pretrained``), ``loha`` (an adapter set in
place, ``peft_hcp.save_adapter``) or ``controlnet`` (a ``PeftModel`` whose plugin copy is sharded too). The
parent process trains the same adapter on the whole global batch (the reference); two forked ranks train on
one half each, sharded per block with :func:`peft_hcp.fsdp.shard_model`, and save collectively. The parent then
loads the saved adapter into a plain model in this process and prints one JSON line of measurements.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_hcp
from peft_hcp.embedded import tiny_unet, unet_inputs
from peft_hcp.fsdp import held_bytes, shard_model


STEPS = 2
GLOBAL_BATCH = 4
CONFIGS = {
    "lora": lambda: peft_hcp.HcpLoraConfig(target_modules=[r"re:.*attn\d\.to_[qkv]"], r=4, alpha=4.0),
    "loha": lambda: peft_hcp.HcpLohaConfig(target_modules=[r"re:.*attn\d\.to_(q|out\.0)"], r=4),
    "controlnet": lambda: peft_hcp.HcpControlNetConfig(conditioning_embedding_out_channels=[8, 16]),
}


def build(kind: str) -> torch.nn.Module:
    """The tiny UNet with the ``kind`` adapter, initialised the same in every process."""
    torch.manual_seed(0)
    unet = tiny_unet()
    if kind == "loha":  # an adapter set in place
        unet.add_adapter(CONFIGS[kind](), "style")
        with torch.no_grad():  # a non-zero start, so that every factor takes gradients
            for name, param in unet.named_parameters():
                if "hada_w2_b" in name:
                    param.normal_(0, 0.1)
        return unet
    return get_peft_model(unet, CONFIGS[kind]())


def inputs(rank: int, world: int):
    """This rank's slice of the global batch (the whole batch in one process) and its regression target."""
    sample, timestep, text = unet_inputs(batch=GLOBAL_BATCH)
    g = torch.Generator().manual_seed(3)
    cond = torch.rand(GLOBAL_BATCH, 3, 32, 32, generator=g)
    target = torch.randn(sample.shape, generator=g)
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    return (sample[part], timestep[part], text[part]), cond[part], target[part]


def fed(model: torch.nn.Module, cond: torch.Tensor):
    """``peft_hcp.feed`` of the condition image where a plugin takes it (the ControlNet)."""
    takes = any(getattr(m, "input_keys", ()) for m in model.modules())
    return peft_hcp.feed(model, cond=cond) if takes else contextlib.nullcontext()


def train(model: torch.nn.Module, rank: int, world: int) -> float:
    """``STEPS`` AdamW steps (eps 1e-4: Adam's 1e-8 magnifies rounding noise on near-zero gradients)."""
    batch, cond, target = inputs(rank, world)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-4)
    began = time.perf_counter()
    for _ in range(STEPS):
        with fed(model, cond):
            loss = (model(*batch).sample - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - began) / STEPS


def save(model: torch.nn.Module, kind: str, folder: str, rank: int) -> None:
    if kind == "loha":
        peft_hcp.save_adapter(model, folder)  # the main process is found from the process group
    else:
        model.save_pretrained(folder, is_main_process=rank == 0)


def rank_main(rank: int, world: int, port: int, kind: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    model = build(kind)
    frozen_whole = held_bytes(model, trainable=False)[1]
    shard_model(model, init_device_mesh("cpu", (world,)))
    report = {"step_s": train(model, rank, world)}
    report["frozen_held"], report["frozen_whole"] = held_bytes(model, trainable=False)
    report["frozen_before"] = frozen_whole
    if kind == "controlnet":
        copy = model.base_model.model.hcp_controlnet.hcp_controlnet_blocks["default"]
        report["copy_blocks_sharded"] = all(isinstance(m, FSDPModule) for m in copy.down_blocks[0].resnets)
    save(model, kind, os.path.join(out, "saved"), rank)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


def load(kind: str, folder: str) -> torch.nn.Module:
    unet = tiny_unet()
    if kind == "loha":
        peft_hcp.load_adapter(unet, folder)
        return unet
    return PeftModel.from_pretrained(unet, folder)


def output(model: torch.nn.Module) -> torch.Tensor:
    batch, cond, _ = inputs(0, 1)
    with fed(model, cond), torch.no_grad():
        return model(*batch).sample


def main() -> None:
    kind, out = sys.argv[1:3]
    context = torch.multiprocessing.get_context("fork")  # the ranks share this process's imports
    port = 29500 + os.getpid() % 1000
    ranks = [context.Process(target=rank_main, args=(r, 2, port, kind, out)) for r in range(2)]
    for process in ranks:
        process.start()
    reference = build(kind)
    reference_step_s = train(reference, 0, 1)
    for process in ranks:
        process.join(240)
    codes = [process.exitcode for process in ranks]
    if codes != [0, 0]:
        raise SystemExit(f"ranks exited with {codes}")
    saved = os.path.join(out, "saved")
    trained = {k: v for k, v in reference.state_dict().items() if any(t in k for t in ("hcp_", "lora", "hada"))}
    loaded = load(kind, saved)
    loaded_state = loaded.state_dict()
    weight_diff = max((loaded_state[k] - v).abs().max().item() for k, v in trained.items())
    initial = build(kind).state_dict()
    moved = max((v - initial[k]).abs().max().item() for k, v in trained.items())
    files = sorted(os.path.relpath(os.path.join(r, f), saved) for r, _, fs in os.walk(saved) for f in fs)
    weights = next(os.path.join(saved, f) for f in files if f.endswith(".safetensors"))
    print(
        json.dumps(
            {
                "ranks": [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)],
                "reference_step_s": reference_step_s,
                "weight_diff": weight_diff,
                "moved": moved,
                "output_diff": (output(loaded) - output(reference)).abs().max().item(),
                "files": files,
                "saved_keys": sorted(load_file(weights)),
                "adapter_keys": len(trained),
            }
        )
    )


if __name__ == "__main__":
    main()
