"""The many -> many plugin kind (MultiPluginBlock) with the ControlNet example and the input feeder."""

import asyncio
import contextvars
import copy
import threading

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from peft import PeftModel, get_peft_model, inject_adapter_in_model

import peft_hcp
from peft_hcp import (
    HcpControlNetConfig,
    HcpLoraConfig,
    SelectorMatchError,
    UnsupportedLayerError,
)
from peft_hcp.embedded import tiny_unet, unet_inputs
from tests.helpers import hook_count, run_python, unet_out


HEAD = [8, 16]  # a small condition head: the image is twice the latent size


def cn_config(**kw):
    return HcpControlNetConfig(**{"conditioning_embedding_out_channels": HEAD, "init_weights": False, **kw})


def cond_image(batch=2, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fed_out(model, batch, cond):
    with peft_hcp.feed(model, cond=cond), torch.no_grad():
        return model(*batch).sample


def test_zero_init_leaves_the_host_unchanged(unet, unet_batch):
    base = unet_out(unet, unet_batch)
    model = get_peft_model(unet, cn_config(init_weights=True))
    assert torch.equal(fed_out(model, unet_batch, cond_image()), base)


def test_residuals_match_diffusers_additional_residuals(unet, unet_batch):
    bare = copy.deepcopy(unet)
    model = get_peft_model(unet, cn_config())
    plugin = unet.hcp_controlnet.blocks["default"]
    sample, timestep, text = unet_batch
    cond = cond_image()
    with peft_hcp.feed(model, cond=cond), torch.no_grad():
        out = model(sample=sample, timestep=timestep, encoder_hidden_states=text).sample  # keywords, as diffusers calls
        stem, down, mid = plugin.residuals(sample, {"timestep": timestep, "encoder_hidden_states": text}, cond)
        expected = bare(
            sample,
            timestep,
            text,
            down_block_additional_residuals=(stem, *[r for block in down for r in block]),
            mid_block_additional_residual=mid,
        ).sample
    assert not torch.equal(out, unet_out(bare, unet_batch))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_copies_the_encoder_of_any_layout(unet_batch):
    torch.manual_seed(0)
    host = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 24, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    base = unet_out(host, unet_batch)
    model = get_peft_model(host, cn_config(init_weights=True))
    plugin = host.hcp_controlnet.blocks["default"]
    assert plugin.to_names == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.2.resnets.2"]
    for name, tensor in host.down_blocks.state_dict().items():
        assert torch.equal(plugin.down_blocks.state_dict()[name], tensor)
    assert torch.equal(fed_out(model, unet_batch, cond_image()), base)
    plugin.zero_conv_in.weight.data.normal_()  # the stem residual reaches the last up resnet
    assert not torch.equal(fed_out(model, unet_batch, cond_image()), base)


def test_trains_only_the_plugin(unet, unet_batch):
    model = get_peft_model(unet, cn_config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hcp_controlnet_blocks.default." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with peft_hcp.feed(model, cond=cond_image()):
        model(*unet_batch).sample.square().mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("zero_convs_down" in n for n in changed) and any("down_blocks" in n and "zero" not in n for n in changed)


def test_deepcopy_rebinds_hooks_and_feeder(unet, unet_batch):
    model = get_peft_model(unet, cn_config())
    cond = cond_image()
    out = fed_out(model, unet_batch, cond)
    clone = copy.deepcopy(model)
    assert torch.equal(fed_out(clone, unet_batch, cond), out)
    with torch.no_grad():
        clone.get_base_model().hcp_controlnet.blocks["default"].zero_conv_mid.weight.mul_(5)
    assert not torch.equal(fed_out(clone, unet_batch, cond), out)
    assert torch.equal(fed_out(model, unet_batch, cond), out)


def test_gradient_checkpointing_gives_the_same_gradients(unet_batch):
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        model = get_peft_model(unet, cn_config())
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        with peft_hcp.feed(model, cond=cond_image()):
            model(*unet_batch).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_runs_inside_autocast(unet, unet_batch):
    model = get_peft_model(unet, cn_config())
    dtypes = []
    unet.hcp_controlnet.blocks["default"].zero_conv_mid.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    with peft_hcp.feed(model, cond=cond_image()), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(*unet_batch)
    assert dtypes == [torch.bfloat16]


def test_loads_under_another_name(unet, unet_batch, tmp_path):
    model = get_peft_model(unet, cn_config())
    expected = fed_out(model, unet_batch, cond_image())
    model.save_pretrained(tmp_path / "cn")  # loaded in a fresh process: tests/contract/test_matrix.py
    other = PeftModel.from_pretrained(tiny_unet(), tmp_path / "cn", adapter_name="again")
    assert torch.equal(fed_out(other, unet_batch, cond_image()), expected)


def test_reload_restores_the_trained_copy_exactly(unet, unet_batch, tmp_path):
    model = get_peft_model(unet, cn_config())
    with torch.no_grad():
        unet.hcp_controlnet.blocks["default"].down_blocks[0].resnets[0].conv1.weight.add_(1.0)  # "trained"
    expected = fed_out(model, unet_batch, cond_image())
    model.save_pretrained(tmp_path / "cn")
    loaded = PeftModel.from_pretrained(tiny_unet(), tmp_path / "cn")  # not copied again from the host
    assert torch.equal(fed_out(loaded, unet_batch, cond_image()), expected)


def test_bad_inputs_are_clear_errors(unet, unet_batch, text_encoder):
    with pytest.raises(UnsupportedLayerError, match="has no down blocks"):
        get_peft_model(text_encoder, cn_config())
    with pytest.raises(SelectorMatchError, match="needs 2 from-layers.*4 to-layers"):
        get_peft_model(tiny_unet(), cn_config(to_layers=["mid_block"]))
    model = get_peft_model(unet, cn_config())
    with (
        pytest.raises(ValueError, match=r"no plugin takes \['image'\]; the plugins here take \['cond'\]"),
        peft_hcp.feed(model, image=cond_image()),
    ):
        pass
    with pytest.raises(ValueError, match=r"needs \['cond'\]"), peft_hcp.feed(model):
        pass
    with pytest.raises(ValueError, match=r"needs the input 'cond'.*peft_hcp.feed"):
        model(*unet_batch)
    with (
        pytest.raises(ValueError, match="needs \\(64, 64\\)|this UNet call needs"),
        peft_hcp.feed(model, cond=cond_image(size=16)),
    ):
        model(*unet_batch)
    with pytest.raises(ValueError, match="no plugin inside"), peft_hcp.feed(tiny_unet(), cond=cond_image()):
        pass
    with pytest.raises(TypeError, match="diffusers pipeline"), peft_hcp.feed(object(), cond=cond_image()):
        pass


class TinyPipeline(DiffusionPipeline):
    """A real DiffusionPipeline that runs classifier-free guidance on the UNet (doubling its batch)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, text, steps=2):
        latents = torch.randn(text.shape[0], 4, 16, 16, generator=torch.Generator().manual_seed(0))
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            pred = self.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([text * 0, text])).sample
            uncond, cond = pred.chunk(2)
            latents = self.scheduler.step(uncond + 2.0 * (cond - uncond), t, latents).prev_sample
        return latents


def test_feed_reaches_the_plugin_through_a_pipeline_call(unet):
    text = unet_inputs()[2]
    base = TinyPipeline(copy.deepcopy(unet), DDIMScheduler())(text)
    inject_adapter_in_model(cn_config(), unet)
    pipe = TinyPipeline(unet, DDIMScheduler())
    with peft_hcp.feed(pipe, cond=cond_image()):
        controlled = pipe(text)
    assert not torch.equal(controlled, base)
    with pytest.raises(ValueError, match="needs the input 'cond'"):
        pipe(text)


def test_feed_reaches_the_plugin_through_ddp(tmp_path):
    # a process group lives in a child process with a timeout: its teardown once hung the suite for 19 minutes
    result = run_python(
        """
        import torch.distributed as dist
        from peft import get_peft_model
        from torch.nn.parallel import DistributedDataParallel
        import peft_hcp
        from peft_hcp.embedded import tiny_unet, unet_inputs
        from tests.hooked.test_multi_plugin import cn_config, cond_image, fed_out

        model = get_peft_model(tiny_unet(), cn_config())
        expected = fed_out(model, unet_inputs(), cond_image())
        dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
        ddp = DistributedDataParallel(model)
        with peft_hcp.feed(ddp, cond=cond_image()):
            out = ddp(*unet_inputs()).sample
            out.square().mean().backward()
        assert torch.equal(out.detach(), expected)
        assert model.base_model.model.hcp_controlnet.blocks["default"].zero_conv_mid.weight.grad is not None
        print("OK", flush=True)
        dist.destroy_process_group()
        """,
        str(tmp_path / "rendezvous"),
        timeout=120,
    )
    assert "OK" in result.stdout


def test_in_place_next_to_a_lora_and_set_adapters_scale(unet, unet_batch):
    base = unet_out(unet, unet_batch)
    unet.add_adapter(HcpLoraConfig(target_modules=[r"re:.*attn.?\.to_q"], init_weights=False), adapter_name="lora")
    unet.add_adapter(cn_config(), adapter_name="cn")
    assert unet.hcp_controlnet.active_adapters == ["cn"]  # diffusers' add_adapter activates the new one only
    unet.set_adapters(["lora", "cn"])
    cond = cond_image()
    both = fed_out(unet, unet_batch, cond)
    unet.set_adapters(["lora", "cn"], [1.0, 0.0])  # conditioning scale 0: LoRA only
    lora_only = fed_out(unet, unet_batch, cond)
    assert not torch.equal(both, lora_only) and not torch.equal(lora_only, base)
    unet.set_adapters(["lora", "cn"], [1.0, 1.0])
    assert torch.equal(fed_out(unet, unet_batch, cond), both)
    unet.delete_adapters("cn")
    torch.testing.assert_close(unet_out(unet, unet_batch), lora_only, rtol=0, atol=1e-6)
    assert hook_count(unet) == 0


def test_feed_is_per_call_across_threads(unet, unet_batch):
    """Four threads feed different conditions through one model at once: each gets its own output."""
    model = get_peft_model(unet, cn_config())
    conds = [cond_image(seed=seed) for seed in range(4)]
    references = [fed_out(model, unet_batch, cond) for cond in conds]
    start = threading.Barrier(len(conds))
    results: dict[int, list[torch.Tensor]] = {}

    def worker(index: int) -> None:
        torch.set_num_threads(1)
        start.wait()
        results[index] = [fed_out(model, unet_batch, conds[index]) for _ in range(3)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(conds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for index, reference in enumerate(references):
        assert all(torch.equal(out, reference) for out in results[index]), f"thread {index} got another call's values"


def test_feed_is_per_task_across_interleaved_asyncio_tasks(unet, unet_batch):
    """Each task enters its feed, yields to the others, then calls: each still gets its own condition."""
    model = get_peft_model(unet, cn_config())
    conds = [cond_image(seed=seed) for seed in range(3)]
    references = [fed_out(model, unet_batch, cond) for cond in conds]

    async def call(cond: torch.Tensor) -> torch.Tensor:
        with peft_hcp.feed(model, cond=cond):
            await asyncio.sleep(0)  # the other tasks enter their feeds now
            with torch.no_grad():
                return model(*unet_batch).sample

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(call(cond) for cond in conds))

    for out, reference in zip(asyncio.run(main()), references):
        assert torch.equal(out, reference)


def test_fed_values_reach_an_autograd_worker_thread(unet):
    """CUDA backward (checkpoint recomputation) runs on torch's worker threads, which get the launching
    thread's context only as the stashed copy torch puts in their thread-local state: simulate one."""
    model = get_peft_model(unet, cn_config())
    block = model.get_base_model().hcp_controlnet.blocks["default"]
    cond = cond_image()
    seen = []

    def worker(context) -> None:
        seen.append("cond" in block.inputs)  # a plain thread: no feed
        torch._C._stash_obj_in_tls("context", context)
        try:
            seen.append(block.inputs["cond"] is cond)
        finally:
            torch._C._remove_obj_from_tls("context")

    with peft_hcp.feed(model, cond=cond):
        thread = threading.Thread(target=worker, args=(contextvars.copy_context(),))
        thread.start()
        thread.join(timeout=60)
    assert seen == [False, True]
