"""The measured pairs. Each is a small function ``(workload) -> Pair``: peft-hcp against a reference.

A pair whose peft-hcp module is not installed (a plugin kind still being written) raises
:class:`Skip`, and the run lists it as skipped. Some pairs carry anchors too (HCP-Diffusion, LyCORIS:
see :mod:`benchmarks.anchors`), measured as further reference columns, or skipped one by one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from benchmarks import anchors
from benchmarks.anchors import Skip, need
from benchmarks.measure import plain_parts
from benchmarks.workload import TRAIN_TARGETS, Workload
from peft_hcp import HcpLohaConfig, HcpLoraConfig


RANK = 8
#: HCP-Diffusion's default LoRA dropout; PEFT's ``lora_dropout`` is set to the same
DROPOUT = 0.1


@dataclass
class Pair:
    """``hcp`` and ``ref`` are the timed calls; with ``fresh`` they make a new one-shot call each time.

    ``reference`` names what ``ref`` is; ``info`` holds facts checked while building the pair.
    ``anchors`` are further references by name, ``skipped_anchors`` the reasons of those that cannot run.
    """

    reference: str
    hcp: Callable[[], object]
    ref: Callable[[], object]
    fresh: bool = False
    info: dict = field(default_factory=dict)
    anchors: dict[str, Callable[[], object]] = field(default_factory=dict)
    skipped_anchors: dict[str, str] = field(default_factory=dict)

    def sides(self) -> dict[str, Callable[[], object]]:
        """Every call to measure: ``hcp``, ``ref`` and the anchors."""
        return {"hcp": self.hcp, "ref": self.ref, **self.anchors}

    def maker(self, side: str) -> Callable[[], Callable[[], object]]:
        """A factory of the call to time for ``side`` (``"hcp"``, ``"ref"`` or an anchor's name)."""
        call = self.sides()[side]
        return call if self.fresh else (lambda: call)

    def anchor(self, name: str, build: Callable[[], Callable[[], object]]) -> None:
        """Add the anchor ``build()`` makes, or record why it cannot be built."""
        try:
            self.anchors[name] = build()
        except Skip as exc:
            self.skipped_anchors[name] = str(exc)


def _adapted_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and not n.endswith("base_layer")]


def _targeted(ref: PeftModel) -> list[str]:
    """The names (in the base model) of the layers the PEFT reference adapts: where anchors go too."""
    return list(ref.base_model.targeted_module_names)


def _same_targets(hcp: nn.Module, ref: nn.Module) -> int:
    ours, theirs = _adapted_names(hcp), _adapted_names(ref)
    if ours != theirs:
        raise AssertionError(f"the two sides adapt different layers: {len(ours)} vs {len(theirs)}")
    return len(ours)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _lora_pair(w: Workload, init_weights: bool, hcp_base: nn.Module) -> tuple[PeftModel, PeftModel]:
    hcp = get_peft_model(
        hcp_base, HcpLoraConfig(target_modules=["re:" + TRAIN_TARGETS], r=RANK, alpha=RANK, init_weights=init_weights)
    )
    ref = get_peft_model(
        w.twin(), LoraConfig(target_modules=TRAIN_TARGETS, r=RANK, lora_alpha=RANK, init_lora_weights=init_weights)
    )
    return hcp, ref


def _copy_lora_weights(src: PeftModel, dst: PeftModel) -> None:
    """Give ``dst`` (HcpLora) the LoRA weights of ``src`` (PEFT LoRA), so both compute the same."""
    theirs = dict(src.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in dst.base_model.model.named_modules():
            if isinstance(layer, BaseTunerLayer) and name in theirs:
                block = layer.blocks["default"]
                block.lora_down.weight.copy_(theirs[name].lora_A["default"].weight)
                block.lora_up.weight.copy_(theirs[name].lora_B["default"].weight)


def _as_large_as(anchor: nn.Module, ref: nn.Module) -> nn.Module:
    """``anchor``, checked to train as many parameters as ``ref``: the same layers, rank and factor shapes."""
    if _trainable(anchor) != _trainable(ref):
        raise AssertionError(f"the anchor trains {_trainable(anchor)} parameters, the reference {_trainable(ref)}")
    return anchor


def _hcpdiff(w: Workload, ref: PeftModel, dropout: float) -> nn.Module:
    return _as_large_as(anchors.hcpdiff_lora(w.twin(), _targeted(ref), RANK, dropout).to(w.device, w.dtype), ref)


def train_lora(w: Workload) -> Pair:
    hcp, ref = _lora_pair(w, init_weights=True, hcp_base=w.twin())
    info = {"layers": _same_targets(hcp, ref), "trainable": [_trainable(hcp), _trainable(ref)]}
    pair = Pair("PEFT LoraConfig", w.train(hcp), w.train(ref), info=info)
    pair.anchor("HCP-Diffusion LoRA", lambda: w.train(_hcpdiff(w, ref, dropout=0.0)))
    return pair


def train_lora_dropout(w: Workload) -> Pair:
    """LoRA with dropout 0.1 on its input: peft-hcp keeps the input and a 1-bit mask for backward."""
    hcp = get_peft_model(
        w.twin(), HcpLoraConfig(target_modules=["re:" + TRAIN_TARGETS], r=RANK, alpha=RANK, dropout=DROPOUT)
    )
    ref_config = LoraConfig(target_modules=TRAIN_TARGETS, r=RANK, lora_alpha=RANK, lora_dropout=DROPOUT)
    ref = get_peft_model(w.twin(), ref_config)
    info = {"layers": _same_targets(hcp, ref), "trainable": [_trainable(hcp), _trainable(ref)], "dropout": DROPOUT}
    pair = Pair(f"PEFT LoraConfig, lora_dropout={DROPOUT}", w.train(hcp), w.train(ref), info=info)
    pair.anchor("HCP-Diffusion LoRA (dropout on the output)", lambda: w.train(_hcpdiff(w, ref, DROPOUT)))
    return pair


def infer_unmerged(w: Workload) -> Pair:
    hcp, ref = _lora_pair(w, init_weights=False, hcp_base=w.twin())
    _copy_lora_weights(ref, hcp)
    hcp_step, ref_step = w.infer(hcp), w.infer(ref)
    info = {"layers": _same_targets(hcp, ref), "max_abs_diff": (hcp_step() - ref_step()).abs().max().item()}
    pair = Pair("PEFT LoRA, unmerged", hcp_step, ref_step, info=info)
    pair.anchor("HCP-Diffusion LoRA", lambda: w.infer(_hcpdiff(w, ref, dropout=0.0).eval()))
    return pair


def infer_merged(w: Workload) -> Pair:
    """``merge_and_unload()``: what a user deploys; it must cost exactly what the base model costs."""
    hcp = get_peft_model(w.copy(), HcpLoraConfig(target_modules=["re:" + TRAIN_TARGETS], r=RANK, init_weights=False))
    unmerged = w.infer(hcp)()
    merged = hcp.merge_and_unload()
    step = w.infer(merged)
    info = {"merged_vs_unmerged_max_abs_diff": (step() - unmerged).abs().max().item()}
    return Pair("bare base model", step, w.infer(w.base), info=info)


def infer_merged_in_place(w: Workload) -> Pair:
    """``merge_adapter()``: merged weights behind the still-present tuner layers (PEFT's merged mode)."""
    hcp = get_peft_model(w.copy(), HcpLoraConfig(target_modules=["re:" + TRAIN_TARGETS], r=RANK, init_weights=False))
    hcp.merge_adapter()
    return Pair("bare base model", w.infer(hcp), w.infer(w.base))


def _loha_train(w: Workload) -> tuple[PeftModel, PeftModel]:
    hcp = get_peft_model(w.twin(), HcpLohaConfig(target_modules=["re:" + TRAIN_TARGETS], r=RANK, alpha=RANK))
    ref = get_peft_model(w.twin(), LoHaConfig(target_modules=TRAIN_TARGETS, r=RANK, alpha=RANK))
    return hcp, ref


def _lycoris(w: Workload, ref: PeftModel, algo: str) -> tuple[nn.Module, nn.ModuleList]:
    """A UNet twin whose ``ref``-adapted layers run LyCORIS's ``algo``, and the LyCORIS modules."""
    unet = w.twin()
    modules = anchors.lycoris(unet, _targeted(ref), algo, RANK).to(w.device, w.dtype)
    return unet, _as_large_as(modules, ref) if algo == "loha" else modules


def _lycoris_train(w: Workload, ref: PeftModel, algo: str) -> Callable[[], object]:
    unet, modules = _lycoris(w, ref, algo)
    sample, timestep, text = w.inputs
    return w.train(modules, lambda: unet(sample, timestep, encoder_hidden_states=text).sample)


def train_loha(w: Workload) -> Pair:
    hcp, ref = _loha_train(w)
    info = {"layers": _same_targets(hcp, ref), "trainable": [_trainable(hcp), _trainable(ref)]}
    pair = Pair("PEFT LoHaConfig", w.train(hcp), w.train(ref), info=info)
    pair.anchor("LyCORIS LoHa", lambda: _lycoris_train(w, ref, "loha"))
    pair.anchor("LyCORIS LoKr (another factorisation)", lambda: _lycoris_train(w, ref, "lokr"))
    return pair


def infer_loha(w: Workload) -> Pair:
    hcp, ref = _loha_train(w)
    pair = Pair("PEFT LoHa, unmerged", w.infer(hcp), w.infer(ref), info={"layers": _same_targets(hcp, ref)})
    pair.anchor("LyCORIS LoHa", lambda: w.infer(_lycoris(w, ref, "loha")[0]))
    return pair


def attach(w: Workload) -> Pair:
    """``get_peft_model`` on every Linear/Conv2d, both sides given the same explicit list of names."""
    names = w.linear_and_conv_names()

    def side(config_fn):
        def make():
            model = w.twin()
            return lambda: get_peft_model(model, config_fn())

        return make

    return Pair(
        "PEFT LoraConfig",
        side(lambda: HcpLoraConfig(target_modules=names, r=RANK)),
        side(lambda: LoraConfig(target_modules=names, r=RANK)),
        fresh=True,
        info={"layers": len(names)},
    )


def load(w: Workload) -> Pair:
    """``PeftModel.from_pretrained`` of an adapter on every Linear/Conv2d (safetensors, from disk)."""
    names = w.linear_and_conv_names()
    root = tempfile.mkdtemp(prefix="peft-hcp-bench-")
    for sub, config in (
        ("hcp", HcpLoraConfig(target_modules=names, r=RANK)),
        ("ref", LoraConfig(target_modules=names, r=RANK)),
    ):
        get_peft_model(w.twin(), config).save_pretrained(f"{root}/{sub}")

    def side(sub):
        def make():
            model = w.twin()
            return lambda: PeftModel.from_pretrained(model, f"{root}/{sub}")

        return make

    return Pair("PEFT LoRA from_pretrained", side("hcp"), side("ref"), fresh=True, info={"layers": len(names)})


def _fed(model: nn.Module, forward: Callable[[], torch.Tensor], **inputs) -> Callable[[], torch.Tensor]:
    feed = need("peft_hcp.hooked").feed

    def call() -> torch.Tensor:
        with feed(model, **inputs):
            return forward()

    return call


def train_controlnet(w: Workload) -> Pair:
    """The ControlNet plugin against diffusers' ``ControlNetModel`` feeding the UNet's residual inputs."""
    config_cls = need("peft_hcp.adapters.controlnet").HcpControlNetConfig
    from diffusers import ControlNetModel

    sample, timestep, text = w.inputs
    config = config_cls()
    scale = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    cond = torch.randn(w.batch, 3, w.resolution * scale, w.resolution * scale).to(sample)
    hcp = get_peft_model(w.twin(), config)
    unet = w.twin()
    controlnet = ControlNetModel.from_unet(
        w.base, conditioning_embedding_out_channels=tuple(config.conditioning_embedding_out_channels)
    ).to(w.device, w.dtype)

    def by_hand() -> torch.Tensor:
        down, mid = controlnet(sample, timestep, text, controlnet_cond=cond, return_dict=False)
        return unet(
            sample, timestep, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample

    hcp_forward = _fed(hcp, lambda: hcp(sample, timestep, encoder_hidden_states=text).sample, cond=cond)
    info = {"trainable": [_trainable(hcp), _trainable(controlnet)]}
    return Pair("diffusers ControlNetModel", w.train(hcp, hcp_forward), w.train(controlnet, by_hand), info=info)


class _HandSkips(nn.Module):
    """The skip plugin written by hand: a 1x1 conv from each ``proj_in`` input to its ``proj_out`` input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        blocks = [m for m in model.modules() if hasattr(m, "proj_in") and hasattr(m, "proj_out")]
        self.convs = nn.ModuleList(nn.Conv2d(b.proj_in.in_channels, b.proj_out.in_channels, 1) for b in blocks)
        for block, conv in zip(blocks, self.convs):
            cache: dict = {}
            block.proj_in.register_forward_pre_hook(lambda _, args, cache=cache: cache.update(x=args[0]))
            block.proj_out.register_forward_pre_hook(
                lambda _, args, cache=cache, conv=conv: (args[0] + conv(cache["x"]), *args[1:])
            )


def train_skip(w: Workload) -> Pair:
    config_cls = need("peft_hcp.adapters.skip").HcpSkipConfig
    if not isinstance(w.base.down_blocks[0].attentions[0].proj_in, nn.Conv2d):
        raise Skip("the hand-written skips assume convolutional proj_in / proj_out (SD1.5 layout)")
    config = config_cls(from_layer=["re:.*proj_in"], to_layer=["prehook:re:.*proj_out"], init_weights=False)
    hcp = get_peft_model(w.twin(), config)
    ref = w.twin()
    skips = _HandSkips(ref).to(w.device, w.dtype)
    info = {"trainable": [_trainable(hcp), _trainable(skips)]}
    sample, timestep, text = w.inputs
    ref_forward = lambda: ref(sample, timestep, encoder_hidden_states=text).sample  # noqa: E731
    return Pair("forward hooks by hand", w.train(hcp), w.train(skips, ref_forward), info=info)


def train_prelu(w: Workload) -> Pair:
    config_cls = need("peft_hcp.adapters.prelu").HcpPReLUConfig
    hcp = get_peft_model(w.twin(), config_cls(target_modules=["re:.*nonlinearity"]))
    ref = w.twin()
    for module in list(ref.modules()):
        if isinstance(getattr(module, "nonlinearity", None), nn.SiLU):
            module.nonlinearity = nn.PReLU(1, init=0.2).to(w.device, w.dtype)
    info = {"trainable": [_trainable(hcp), _trainable(ref)]}
    return Pair("SiLU replaced by nn.PReLU by hand", w.train(hcp), w.train(ref), info=info)


def compile_lora(w: Workload) -> Pair:
    """``torch.compile`` of a LoRA-adapted tiny UNet (compiling the SD1.5 one takes many minutes on CPU)."""
    tiny = Workload(w.device, w.dtype, resolution=16, batch=w.batch, model="tiny")
    hcp, ref = _lora_pair(tiny, init_weights=False, hcp_base=tiny.twin())
    _copy_lora_weights(ref, hcp)
    eager = tiny.infer(hcp)()
    hcp_step = tiny.infer(torch.compile(hcp.get_base_model()))
    ref_step = tiny.infer(torch.compile(ref.get_base_model()))
    info = {"compiled_vs_eager_max_abs_diff": (hcp_step() - eager).abs().max().item(), "model": "tiny"}
    ref_step()
    return Pair("PEFT LoRA, both compiled", hcp_step, ref_step, info=info)


def compile_kinds(w: Workload) -> Pair:
    """LoRA, LoHa, a skip and the PReLU patch in place on one tiny UNet: ``torch.compile`` against the same
    model eager (every kind traces without a graph break; ``tests/base/test_compile.py``)."""
    tiny = Workload(w.device, w.dtype, resolution=16, batch=w.batch, model="tiny")
    hcp = need("peft_hcp")
    attach = need("peft_hcp.adapter_set").attach
    model = tiny.twin()
    configs = {
        "lora": hcp.HcpLoraConfig(target_modules=["re:.*attn1$"], init_weights=False),
        "loha": hcp.HcpLohaConfig(target_modules=["re:.*attn2$"], init_weights=False),
        "skip": hcp.HcpSkipConfig(from_layer=["re:.*proj_in"], to_layer=["prehook:re:.*proj_out"], init_weights=False),
        "prelu": hcp.HcpPReLUConfig(target_modules=["re:.*nonlinearity"]),
    }
    for name, config in configs.items():
        attach(model, config, name)
    eager = tiny.infer(model)
    compiled = tiny.infer(torch.compile(model))
    info = {"compiled_vs_eager_max_abs_diff": (compiled() - eager()).abs().max().item(), "model": "tiny"}
    return Pair("the same model, eager", compiled, eager, info=info)


def hotswap(w: Workload) -> Pair:
    """Serving another LoRA on a compiled tiny UNet: a hot-swap into a model prepared once (target rank 8) against
    unloading, loading and recompiling. Every call serves an adapter not seen before (ranks 4 and 8 in turn, a new
    alpha each time, as new adapters come) and ends with its first output."""
    hcp = need("peft_hcp")
    tiny = Workload(w.device, w.dtype, resolution=16, batch=w.batch, model="tiny")
    backend = "inductor" if w.device.type == "cuda" else "aot_eager"  # inductor's C++ build takes minutes on CPU
    root = tempfile.mkdtemp(prefix="hotswap-")
    made = [0]

    def new_adapter() -> str:
        made[0] += 1
        rank = (4, 8)[made[0] % 2]
        torch.manual_seed(made[0])
        config = HcpLoraConfig(target_modules=["re:" + TRAIN_TARGETS], r=rank, alpha=float(made[0]), init_weights=False)
        folder = f"{root}/adapter{made[0]}"
        get_peft_model(tiny.twin(), config).save_pretrained(folder)
        return folder

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1000)  # the reference's
    first = new_adapter()
    served = PeftModel.from_pretrained(tiny.twin(), first)
    hcp.prepare_model_for_compiled_hotswap(served, target_rank=8)
    served_step = tiny.infer(torch.compile(served.get_base_model(), backend=backend))
    served_step()
    reloaded = {"model": PeftModel.from_pretrained(tiny.twin(), first)}

    def swap() -> Callable[[], object]:
        folder = new_adapter()
        return lambda: (hcp.hotswap_adapter(served, folder, "default"), served_step())

    def reload() -> Callable[[], object]:
        folder = new_adapter()

        def call() -> torch.Tensor:
            base = reloaded["model"].unload()
            reloaded["model"] = PeftModel.from_pretrained(base, folder)
            return tiny.infer(torch.compile(reloaded["model"].get_base_model(), backend=backend))()

        return call

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    check = swap()
    swapped = check()[1]
    eager = tiny.infer(PeftModel.from_pretrained(tiny.twin(), f"{root}/adapter{made[0]}"))()
    info = {
        "backend": backend,
        "model": "tiny",
        "recompiles_of_a_swap": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
        "swapped_vs_eager_max_abs_diff": (swapped - eager).abs().max().item(),
    }
    return Pair("unload + load + recompile", swap, reload, fresh=True, info=info)


def _quantized(w: Workload, scheme: str) -> nn.Module:
    """A twin of the base whose Linear layers are quantized with ``scheme`` (:func:`peft_hcp.quant.quantize_model`);
    PEFT picks its bnb 4-bit LoRA layer only on a model flagged as loaded in 4 bit, as transformers flags one."""
    model = w.twin()
    need("peft_hcp.quant").quantize_model(model, scheme)
    model.is_loaded_in_4bit = scheme in ("nf4", "fp4")
    return model


def _bytes(model: nn.Module, names: Optional[list[str]] = None) -> int:
    """Bytes of the state (weights, biases, quantization state) of the layers ``names`` of ``model``, or of all."""
    modules = [model] if names is None else [model.get_submodule(name) for name in names]
    tensors = [t for module in modules for t in module.state_dict().values()]
    return sum(part.numel() * part.element_size() for t in tensors for part in plain_parts(t))


def _host_info(w: Workload, scheme: str) -> dict:
    """How many layers ``scheme`` quantizes and their bytes, and the whole UNet's, against the fp32 base."""
    host = _quantized(w, scheme)
    quantization_of = need("peft_hcp.quant").quantization_of
    quantized = [n for n, m in host.named_modules() if isinstance(m, nn.Linear) and quantization_of(m) is not None]
    return {
        "quantized_layers": len(quantized),
        "quantized_vs_fp32_bytes": _bytes(host, quantized) / _bytes(w.base, quantized),
        "model_vs_fp32_bytes": _bytes(host) / _bytes(w.base),
    }


def _quantized_lora(w: Workload, scheme: str, reference: str) -> Pair:
    """HcpLora (dropout 0.1) against PEFT's LoRA layer for the quantized host, both on a ``scheme`` base; the
    HcpLora on the fp32 base is an anchor (what quantizing costs in time and peak memory)."""
    hcp_config = HcpLoraConfig(target_modules=["re:" + TRAIN_TARGETS], r=RANK, alpha=RANK, dropout=DROPOUT)
    hcp = get_peft_model(_quantized(w, scheme), hcp_config)
    ref_config = LoraConfig(target_modules=TRAIN_TARGETS, r=RANK, lora_alpha=RANK, lora_dropout=DROPOUT)
    ref = get_peft_model(_quantized(w, scheme), ref_config)
    ref_layers = sorted(
        {type(m).__module__ + "." + type(m).__name__ for m in ref.modules() if isinstance(m, BaseTunerLayer)}
    )
    if not any(name.endswith(reference) for name in ref_layers):
        raise AssertionError(f"PEFT did not dispatch its {reference} layer: {ref_layers}")
    info = {"layers": _same_targets(hcp, ref), "ref_layers": ref_layers, "dropout": DROPOUT, **_host_info(w, scheme)}
    pair = Pair(f"PEFT {reference}, lora_dropout={DROPOUT}", w.train(hcp), w.train(ref), info=info)
    pair.anchor("HcpLora on the fp32 base", lambda: w.train(get_peft_model(w.twin(), hcp_config)))
    return pair


def train_lora_nf4(w: Workload) -> Pair:
    """On bnb nf4 ``Linear4bit`` layers, against ``peft.tuners.lora.bnb.Linear4bit``."""
    return _quantized_lora(w, "nf4", "bnb.Linear4bit")


def train_lora_int8(w: Workload) -> Pair:
    """On torchao int8 weight-only layers, against ``peft.tuners.lora.torchao.TorchaoLoraLinear``."""
    return _quantized_lora(w, "int8-torchao", "TorchaoLoraLinear")


def train_loha_nf4(w: Workload) -> Pair:
    """HcpLoha against LyCORIS's LoHa (its bypass mode for quantized layers) on the same bnb nf4 base; PEFT's LoHa
    cannot be the reference: it sizes ΔW from the packed 4-bit storage. HcpLoha on the fp32 base is an anchor."""
    config = HcpLohaConfig(target_modules=["re:" + TRAIN_TARGETS], r=RANK, alpha=RANK)
    hcp = get_peft_model(_quantized(w, "nf4"), config)
    unet = _quantized(w, "nf4")
    targets = [name.removeprefix("base_model.model.") for name in _adapted_names(hcp)]
    modules = _as_large_as(anchors.lycoris(unet, targets, "loha", RANK).to(w.device, w.dtype), hcp)
    bypassed = sum(bool(getattr(m, "bypass_mode", False)) for m in modules)
    sample, timestep, text = w.inputs
    ref = w.train(modules, lambda: unet(sample, timestep, encoder_hidden_states=text).sample)
    info = {"layers": len(targets), "lycoris_bypass_layers": bypassed, **_host_info(w, "nf4")}
    pair = Pair("LyCORIS LoHa on the nf4 base", w.train(hcp), ref, info=info)
    pair.anchor("HcpLoha on the fp32 base", lambda: w.train(get_peft_model(w.twin(), config)))
    return pair


PAIRS: dict[str, Callable[[Workload], Pair]] = {
    "train_lora": train_lora,
    "train_lora_dropout": train_lora_dropout,
    "infer_unmerged": infer_unmerged,
    "infer_merged": infer_merged,
    "infer_merged_in_place": infer_merged_in_place,
    "train_loha": train_loha,
    "infer_loha": infer_loha,
    "attach": attach,
    "load": load,
    "train_controlnet": train_controlnet,
    "train_skip": train_skip,
    "train_prelu": train_prelu,
    "compile_lora": compile_lora,
    "compile_kinds": compile_kinds,
    "hotswap": hotswap,
    "train_lora_nf4": train_lora_nf4,
    "train_lora_int8": train_lora_int8,
    "train_loha_nf4": train_loha_nf4,
}
