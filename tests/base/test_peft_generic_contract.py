"""The parts of PEFT's generic custom-model contract peft-hcp's single-layer kinds must keep, on a small
Linear + Conv2d model (PEFT's own matrix, run against HcpLoraConfig / HcpLohaConfig, is described in the README)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_hcp import HcpLohaConfig, HcpLoraConfig
from tests.helpers import assert_model_unchanged, model_snapshot


KINDS = [HcpLoraConfig, HcpLohaConfig]


class ConvMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lin0 = nn.Linear(8 * 4 * 4, 16)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(self.conv(x).flatten(1))))


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def adapted(config_cls, **kw) -> PeftModel:
    return get_peft_model(ConvMLP(), config_cls(target_modules=["conv", "lin0"], init_weights=False, **kw))


@pytest.mark.parametrize("config_cls", KINDS)
def test_deleting_a_merged_adapter_is_refused_without_change(config_cls):
    model = adapted(config_cls)
    model.merge_adapter()
    before = model_snapshot(model, run)
    with pytest.raises(ValueError, match="while they are merged"):
        model.delete_adapter("default")
    assert_model_unchanged(before, model)
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


@pytest.mark.parametrize("config_cls", KINDS)
def test_merging_twice_warns_and_changes_nothing(config_cls):
    model = adapted(config_cls)
    unmerged = run(model)
    model.merge_adapter()
    merged = run(model)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert torch.equal(run(model), merged)


@pytest.mark.parametrize("config_cls", KINDS)
def test_low_cpu_mem_usage_load_equals_a_normal_load(config_cls, tmp_path):
    adapted(config_cls).save_pretrained(tmp_path)
    outputs = [run(PeftModel.from_pretrained(ConvMLP(), tmp_path, low_cpu_mem_usage=low)) for low in (False, True)]
    assert torch.equal(*outputs)


@pytest.mark.parametrize("config_cls", KINDS)
def test_two_active_adapters_saving_the_same_module_are_refused(config_cls):
    model = adapted(config_cls, modules_to_save=["lin1"])
    model.add_adapter("other", config_cls(target_modules=["lin0"], modules_to_save=["lin1"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        model.base_model.set_adapter(["default", "other"])


@pytest.mark.parametrize("config_cls", KINDS)
def test_only_adapter_and_saved_module_parameters_train(config_cls):
    model = adapted(config_cls, modules_to_save=["lin1"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f"{config_cls.type_name}_blocks" in n or "modules_to_save" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X).square().mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
