"""Hot-swapping adapters in place under ``torch.compile``: ranks 4 and 8 of every low-rank kind with other alphas
swap in with 0 recompiles and the outputs of eager models; an adapter set (LoRA + ControlNet) swaps through
``load_adapter(..., hotswap=True)``; a swap that cannot happen in place is refused and changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

import peft_hcp
from peft_hcp.embedded import tiny_unet
from peft_hcp.errors import CheckpointError
from tests.helpers import assert_model_unchanged, model_snapshot


class Net(nn.Module):
    """A conv and two linear hosts, large enough that LoKr decomposes ``w2`` at ranks 4 and 8 alike."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 64, 3, padding=1)
        self.lin1 = nn.Linear(64, 256)
        self.lin2 = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.silu(self.lin1(F.silu(self.conv(x)).mean((2, 3)))))


ALL = ["conv", "lin1", "lin2"]
KINDS = {
    "lora": lambda r, alpha, layers=ALL: peft_hcp.HcpLoraConfig(target_modules=layers, r=r, alpha=alpha),
    "dora": lambda r, alpha, layers=ALL: peft_hcp.HcpLoraConfig(target_modules=layers, r=r, alpha=alpha, use_dora=True),
    "loha": lambda r, alpha, layers=ALL: peft_hcp.HcpLohaConfig(target_modules=layers, r=r, alpha=alpha),
    "lokr": lambda r, alpha, layers=ALL[1:]: peft_hcp.HcpLokrConfig(
        target_modules=layers, r=r, alpha=alpha, decompose_factor=4
    ),
}
X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def saved(folder, kind: str, r: int, alpha: float, seed: int, **kw) -> tuple[str, torch.Tensor]:
    """A trained-looking adapter (random weights) saved to ``folder``, and its eager output on ``X``."""
    torch.manual_seed(seed)
    model = get_peft_model(Net(), KINDS[kind](r, alpha, **kw))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.2)
        out = model(X)
    model.save_pretrained(folder)
    return str(folder), out


@pytest.mark.parametrize("kind", KINDS)
def test_swapping_ranks_4_and_8_with_other_alphas_under_compile_does_not_recompile(kind, tmp_path):
    rank4, out4 = saved(tmp_path / "r4", kind, 4, 2.0, seed=1)
    rank8, out8 = saved(tmp_path / "r8", kind, 8, 5.0, seed=2)
    assert not torch.allclose(out4, out8, atol=1e-3)
    model = PeftModel.from_pretrained(Net(), rank4)
    peft_hcp.prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    block = next(m for m in model.modules() if isinstance(m, peft_hcp.LowRankBlock))
    assert block.rank == 8 and "scaling" in block._buffers  # padded, and the scale a buffer (not saved)
    assert not any("scaling" in key for key in model.state_dict())
    assert (model.peft_config["default"].r, model.peft_config["default"].alpha) == (8, 4.0)  # the same scale
    compiled = torch.compile(model, backend="aot_eager")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), out4, atol=1e-6, rtol=1e-6)  # padding changes nothing
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for folder, expected in ((rank8, out8), (rank4, out4), (rank8, out8)):
            peft_hcp.hotswap_adapter(compiled, folder, "default")
            torch.testing.assert_close(compiled(X), expected, atol=1e-6, rtol=1e-6)


def test_a_float_scale_recompiles_where_the_buffer_does_not(tmp_path):
    """Why the scale moves into a buffer: swapping another alpha into an unprepared compiled model recompiles."""
    first, _ = saved(tmp_path / "a", "lora", 4, 2.0, seed=1)
    other, expected = saved(tmp_path / "b", "lora", 4, 5.0, seed=2)
    model = PeftModel.from_pretrained(Net(), first)
    compiled = torch.compile(model, backend="aot_eager")
    torch._dynamo.reset()
    with torch.no_grad():
        compiled(X)
    peft_hcp.hotswap_adapter(model, other, "default")  # same rank: swaps in place, but the float scale changed
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad(), pytest.raises(Exception, match="scal"):
        compiled(X)
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda tmp: saved(tmp, "loha", 4, 2.0, seed=3)[0], "same kind"),
        (lambda tmp: saved(tmp, "lora", 4, 2.0, seed=3, layers=["lin1"])[0], "other layers"),
        (lambda tmp: saved(tmp, "lora", 16, 2.0, seed=3)[0], "do not fit"),
        (lambda tmp: saved(tmp, "dora", 4, 2.0, seed=3)[0], "use_dora"),
    ],
    ids=["another kind", "other layers", "rank above target", "computes differently"],
)
def test_a_swap_that_cannot_happen_in_place_is_refused_and_changes_nothing(other, message, tmp_path):
    model = PeftModel.from_pretrained(Net(), saved(tmp_path / "a", "lora", 4, 2.0, seed=1)[0])
    peft_hcp.prepare_model_for_compiled_hotswap(model, target_rank=8)
    folder = other(tmp_path / "b")
    before = model_snapshot(model, lambda m: m(X).detach())
    with pytest.raises((ValueError, CheckpointError), match=message):
        peft_hcp.hotswap_adapter(model, folder, "default")
    assert_model_unchanged(before, model)


def test_prepare_refuses_a_target_below_a_rank_and_changes_nothing(tmp_path):
    model = PeftModel.from_pretrained(Net(), saved(tmp_path, "loha", 8, 2.0, seed=1)[0])
    before = model_snapshot(model, lambda m: m(X).detach())
    with pytest.raises(ValueError, match="below the rank"):
        peft_hcp.prepare_model_for_compiled_hotswap(model, target_rank=4)
    assert_model_unchanged(before, model)
    with pytest.raises(ValueError, match="No peft-hcp adapter"):
        peft_hcp.prepare_model_for_compiled_hotswap(Net(), target_rank=4)


def adapter_set(folder, r: int, alpha: float, seed: int) -> str:
    """A tiny UNet carrying a LoRA and a ControlNet in place (random weights), saved as an adapter set."""
    torch.manual_seed(seed)
    unet = tiny_unet()
    unet.add_adapter(peft_hcp.HcpLoraConfig(target_modules=[r"re:.*attn\d\.to_[qkv]"], r=r, alpha=alpha), "style")
    unet.add_adapter(peft_hcp.HcpControlNetConfig(conditioning_embedding_out_channels=[8, 16]), "control")
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name or "zero_conv" in name:
                param.normal_(0, 0.05)
    peft_hcp.save_adapter(unet, str(folder))
    return str(folder)


def unet_out(model, batch, cond):
    with peft_hcp.feed(model, cond=cond), torch.no_grad():
        return model(*batch).sample


def test_load_adapter_hotswaps_a_set_with_a_controlnet_into_a_compiled_unet(unet_batch, tmp_path):
    first, second = adapter_set(tmp_path / "a", 4, 2.0, seed=1), adapter_set(tmp_path / "b", 8, 6.0, seed=2)
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eager = tiny_unet()
    peft_hcp.load_adapter(eager, second)
    expected = unet_out(eager, unet_batch, cond)
    unet = tiny_unet()
    peft_hcp.load_adapter(unet, first)
    before = unet_out(unet, unet_batch, cond)
    peft_hcp.prepare_model_for_compiled_hotswap(unet, target_rank=8)
    compiled = torch.compile(unet, backend="aot_eager")
    torch._dynamo.reset()
    for _ in range(2):  # the second call compiles once more: it finds the activation cache of the first filled
        torch.testing.assert_close(unet_out(compiled, unet_batch, cond), before, atol=1e-5, rtol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        peft_hcp.load_adapter(unet, second, hotswap=True)
        torch.testing.assert_close(unet_out(compiled, unet_batch, cond), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, expected, atol=1e-3)
