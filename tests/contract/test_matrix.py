"""The contract every registered peft-hcp type keeps, one row per case of :mod:`tests.contract.cases`:

refused attaches change nothing, save -> load in a fresh process gives the same outputs, disable / delete /
unload give the base back exactly, merge equals the unmerged output (or is refused without change), fed
inputs reach the plugins, and ``torch.compile`` traces the adapted model without a graph break in training
(dropout on, gradients on) and in inference.

The rows come from the registry: a type registered anywhere (the GainBlock below, registered here as a
user would) is in the matrix without a line of this file changing.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

import peft_hcp
from peft_hcp import (
    HcpMultiPluginConfig,
    HcpSingleConfig,
    MergeNotSupportedError,
    SinglePluginBlock,
    register_single_plugin,
)
from peft_hcp.adapter_set import attach as attach_in_place
from peft_hcp.base.blocks import BlockLayer
from peft_hcp.base.feed import fed_plugins
from peft_hcp.embedded import tiny_unet
from peft_hcp.registry import registered_types
from tests.contract.cases import ATTENTION, UNET, Case, Host, cases, cases_of, matrix_types, uncovered
from tests.helpers import assert_model_unchanged, hook_count, model_snapshot, run_python


class GainBlock(SinglePluginBlock):
    """The README's user plugin: scales a Linear layer's output per channel."""

    wrapable_classes = (nn.Linear,)

    def __init__(self, host: nn.Module, config: GainConfig) -> None:
        super().__init__(host, config)
        self.gain = nn.Parameter(torch.full((host.out_features,), config.start))
        if not config.init_weights:
            nn.init.normal_(self.gain, std=0.1)

    def forward(self, fea_in: tuple[torch.Tensor, ...], fea_out: torch.Tensor) -> torch.Tensor:
        return fea_out * (1 + self.gain)


@register_single_plugin("hcp_contract_gain", GainBlock)
@dataclass
class GainConfig(HcpSingleConfig):
    start: float = 0.0


CASES = cases()
#: merged vs unmerged in fp32: the weight sums in another order than the adapter path beside the host (seen:
#: at most 1.3e-6 on outputs of size ~1; the parameter-route kinds LoHa and LoKr merge bit-exactly)
MERGE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
#: PEFT's warning when a second adapter is injected into a model in place, as these tests mean to
SECOND_ADAPTER_IN_PLACE = "ignore:Already found a `peft_config` attribute"


def by(predicate) -> pytest.MarkDecorator:
    """Parametrize over the cases ``predicate`` picks."""
    chosen = [case for case in CASES if predicate(case)]
    return pytest.mark.parametrize("case", chosen, ids=lambda case: case.id)


every_case = by(lambda case: True)
#: host -> the cases made for it
HOSTED = {host: [case for case in CASES if case.host is host] for host in dict.fromkeys(case.host for case in CASES)}


# -- the table ------------------------------------------------------------------------------------


def test_every_registered_type_has_a_case():
    assert not uncovered(), f"registered types without a contract case: {uncovered()}"
    names = {case.type_name for case in CASES}
    assert names == set(matrix_types())
    bundled = {getattr(peft_hcp, name).type_name for name in peft_hcp.adapters.__all__ if name.endswith("Config")}
    assert bundled <= names


def test_a_type_no_rule_covers_is_named_with_what_to_do():
    found, reason = cases_of("hcp_unlisted_controlnet", HcpMultiPluginConfig)
    assert found == [] and "add its case to CASES" in reason


def test_a_type_registered_by_a_user_is_in_the_matrix():
    assert registered_types()["hcp_contract_gain"] is GainConfig
    (case,) = [case for case in CASES if case.type_name == "hcp_contract_gain"]
    assert case.host is UNET and case.fields == {"target_modules": ATTENTION}  # derived from its kind
    assert not case.mergeable and not case.input_keys


# -- refused attaches ---------------------------------------------------------------------------


def _routes(case: Case) -> list[str]:
    routes = ["get_peft_model", "PeftModel.add_adapter", "inject_adapter_in_model", "adapter_set.attach"]
    return [*routes, "model.add_adapter"] if case.host.has_add_adapter else routes


def _attach_route(route: str, case: Case):
    """``(model, attach, adapters)``: the model a route attaches to, ``attach(config, adapter_name)`` returning
    the adapted model, and the adapters that model holds before."""
    host = case.host.build_refusing()
    if route == "get_peft_model":
        return host, lambda config, name: get_peft_model(host, config, adapter_name=name), []
    if route == "PeftModel.add_adapter":
        model = get_peft_model(host, case.config())
        return model, lambda config, name: model.add_adapter(name, config) or model, ["default"]
    if route == "inject_adapter_in_model":
        inject_adapter_in_model(case.config(), host)
        return host, lambda config, name: inject_adapter_in_model(config, host, name), ["default"]
    if route == "adapter_set.attach":
        attach_in_place(host, case.config(), "default")
        return host, lambda config, name: attach_in_place(host, config, name) or host, ["default"]
    return host, lambda config, name: host.add_adapter(config, name) or host, []  # diffusers' own


@pytest.mark.filterwarnings(SECOND_ADAPTER_IN_PLACE)
@pytest.mark.parametrize(
    "case, route", [(case, route) for case in CASES for route in _routes(case)], ids=lambda v: getattr(v, "id", v)
)
def test_a_refused_attach_leaves_the_model_as_it_was(case, route):
    """On the UNet the low-rank kinds refuse the grouped conv_out, last in model order, after wrapping every
    other selected layer; diffusers' add_adapter marks the model adapted before injecting."""
    model, attach, adapters = _attach_route(route, case)
    before = model_snapshot(model, case.run)
    with pytest.raises((ValueError, TypeError)):
        attach(case.refused_config(), "refused")
    assert_model_unchanged(before, model)
    assert list(attach(case.config(), "fixed").peft_config) == [*adapters, "fixed"]  # it takes a corrected one


# -- save, then load in a fresh process -----------------------------------------------------------

_LOAD_EVERY_CASE = """
    import json, os, sys, traceback
    from peft import PeftModel
    from safetensors.torch import save_file
    from tests.contract.test_matrix import CASES  # registers the plugin defined there, as a user's import would
    folder, outputs, report = sys.argv[1], {}, {}
    for case in CASES:
        try:
            model = PeftModel.from_pretrained(case.host.build(), os.path.join(folder, case.id))
            outputs[case.id] = case.run(model)
            report[case.id] = type(model.peft_config["default"]).__qualname__
        except Exception:
            report[case.id] = traceback.format_exc()
    save_file(outputs, os.path.join(folder, "loaded.safetensors"))
    print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def loaded_in_a_fresh_process(tmp_path_factory) -> dict:
    """Every case saved here and loaded back in ONE fresh process: ``{case id: (saved, loaded, files, report)}``."""
    folder = tmp_path_factory.mktemp("saved")
    saved = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: set up before the per-test one_thread fixture
    try:
        for case in CASES:
            model = get_peft_model(case.host.build(), case.config())
            saved[case.id] = case.run(model)
            model.save_pretrained(folder / case.id)
    finally:
        torch.set_num_threads(threads)
    report = json.loads(run_python(_LOAD_EVERY_CASE, str(folder), timeout=240).stdout.splitlines()[-1])
    loaded = load_file(folder / "loaded.safetensors")
    files = {case.id: sorted(p.name for p in (folder / case.id).iterdir()) for case in CASES}
    return {case.id: (saved[case.id], loaded.get(case.id), files[case.id], report[case.id]) for case in CASES}


@every_case
def test_save_then_load_in_a_fresh_process_gives_the_same_outputs(case, loaded_in_a_fresh_process):
    saved, loaded, files, report = loaded_in_a_fresh_process[case.id]
    assert report == case.config_cls.__qualname__, report  # else the child's traceback
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # safetensors only
    assert torch.equal(loaded, saved)


# -- disable, delete, unload ------------------------------------------------------------------------


@dataclass
class BaseRecord:
    """What removing every adapter must give back: the same module objects, weights, hooks and output."""

    modules: dict[str, nn.Module]
    state: dict[str, torch.Tensor]
    hooks: int
    output: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, case: Case) -> BaseRecord:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return cls(dict(model.named_modules()), state, hook_count(model), case.run(model))

    def assert_restored(self, model: nn.Module, case: Case) -> None:
        modules = dict(model.named_modules())
        assert modules.keys() == self.modules.keys()
        assert all(modules[name] is module for name, module in self.modules.items())  # hosts put back
        state = model.state_dict()
        assert state.keys() == self.state.keys()
        for key, value in self.state.items():
            assert torch.equal(state[key], value), key
        assert hook_count(model) == self.hooks
        assert torch.equal(case.run(model), self.output)


@every_case
def test_disable_gives_the_base_output_and_delete_the_base_model(case):
    host = case.host.build()
    base = BaseRecord.of(host, case)
    model = get_peft_model(host, case.config())
    adapted = case.run(model)
    assert not torch.allclose(adapted, base.output, atol=1e-4), "with init_weights=False the adapter must act"
    with model.disable_adapter():
        assert torch.equal(case.run(model), base.output)
    assert torch.equal(case.run(model), adapted)
    model.delete_adapter("default")
    assert not model.peft_config
    base.assert_restored(host, case)


@every_case
def test_unload_restores_the_base_bit_for_bit(case):
    host = case.host.build()
    base = BaseRecord.of(host, case)
    model = get_peft_model(host, case.config())
    base.assert_restored(model.unload(), case)


# -- merge ----------------------------------------------------------------------------------------


@by(lambda case: case.mergeable)
def test_merge_equals_the_unmerged_output(case):
    host = case.host.build()
    keys = host.state_dict().keys()
    model = get_peft_model(host, case.config())
    adapted = case.run(model)
    model.merge_adapter()
    torch.testing.assert_close(case.run(model), adapted, **MERGE_TOLERANCE)
    model.unmerge_adapter()
    assert torch.equal(case.run(model), adapted)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules()) and merged.state_dict().keys() == keys
    torch.testing.assert_close(case.run(merged), adapted, **MERGE_TOLERANCE)


@by(lambda case: not case.mergeable)
def test_merge_is_refused_and_changes_nothing(case):
    model = get_peft_model(case.host.build(), case.config())
    before = model_snapshot(model, case.run)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(
            MergeNotSupportedError, match=rf"{case.config_cls.plugin_cls.__name__}\b.* cannot be merged"
        ):
            merge()
        assert_model_unchanged(before, model)


@cache
def peft_broken_adapter_message() -> str:
    """PEFT's own error for a safe merge of a LoRA with a NaN weight."""
    model = get_peft_model(tiny_unet(), LoraConfig(target_modules=["conv_out"], init_lora_weights=False))
    with torch.no_grad():
        model.get_base_model().conv_out.lora_A["default"].weight.view(-1)[0] = float("nan")
    with pytest.raises(ValueError) as info:
        model.merge_adapter(safe_merge=True)
    return str(info.value)


@by(lambda case: case.mergeable)
def test_safe_merge_of_a_broken_adapter_merges_nothing_in_peft_words(case):
    model = get_peft_model(case.host.build(), case.config())
    last = [p for p in model.parameters() if p.requires_grad][-1]  # the last layer: a partial merge would show
    with torch.no_grad():
        last.view(-1)[0] = float("nan")
    before = model_snapshot(model, case.run)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError) as info:
            merge(safe_merge=True)
        assert str(info.value) == peft_broken_adapter_message()
        assert_model_unchanged(before, model)


# -- fed inputs -----------------------------------------------------------------------------------


@by(lambda case: case.input_keys)
def test_fed_inputs_reach_the_plugin_and_are_checked(case):
    model = get_peft_model(case.host.build(), case.config())
    assert not torch.equal(case.run(model, seed=1), case.run(model, seed=2))
    key = case.input_keys[0]
    with pytest.raises(ValueError, match=rf"needs the input '{key}'.*peft_hcp\.feed"), torch.no_grad():
        case.host.call(model)
    with (
        pytest.raises(ValueError, match=r"no plugin takes \['unknown'\]"),
        peft_hcp.feed(model, **case.inputs(), unknown=1),
    ):
        pass


@by(lambda case: not case.input_keys)
def test_feeding_a_type_that_takes_no_input_is_refused(case):
    model = get_peft_model(case.host.build(), case.config())
    with pytest.raises(ValueError, match="no plugin inside PeftModel takes inputs"), peft_hcp.feed(model, cond=1):
        pass


# -- torch.compile --------------------------------------------------------------------------------


def activate(model: nn.Module, names: list[str]) -> None:
    """Make ``names`` the active adapters of every tuner layer holding one of them (an adapter of a type added
    in place deactivates the earlier ones of that type where they share a layer)."""
    layers = [m for m in model.modules() if isinstance(m, BlockLayer)]
    for layer in layers:
        layer.set_adapter([name for name in names if name in layer.blocks])
    assert {name for layer in layers for name in layer.active_adapters} == set(names)


def stacked(host: Host) -> nn.Module:
    """``host`` with every case made for it attached in place, each as its own adapter named by its case, all
    active: a single-layer adapter may wrap a layer another's hooks read (ControlNet and LoKr on conv_in)."""
    model = host.build()
    for case in HOSTED[host]:
        inject_adapter_in_model(case.config(), model, adapter_name=case.id)
    activate(model, [case.id for case in HOSTED[host]])
    return model


def run_stacked(model: nn.Module, host: Host) -> torch.Tensor:
    feeding = (
        peft_hcp.feed(model, **{key: value(1) for key, value in host.feeds.items()})
        if fed_plugins(model)
        else nullcontext()
    )
    with torch.no_grad(), feeding:
        return host.call(model.eval())


@pytest.mark.filterwarnings(SECOND_ADAPTER_IN_PLACE)
@pytest.mark.parametrize("host", HOSTED, ids=lambda host: host.name)
def test_every_case_of_a_host_acts_when_stacked_on_it(host):
    model = stacked(host)
    names = [case.id for case in HOSTED[host]]
    together = run_stacked(model, host)
    for name in names:
        activate(model, [other for other in names if other != name])
        assert not torch.allclose(run_stacked(model, host), together, atol=1e-5), f"{name} does not act"
    activate(model, names)
    assert torch.equal(run_stacked(model, host), together)


@pytest.mark.filterwarnings(SECOND_ADAPTER_IN_PLACE)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("host", HOSTED, ids=lambda host: host.name)
def test_compiles_without_a_graph_break(host, training):
    """Dynamo traces the adapted model in one graph, in training (dropout active, gradients on) and in
    inference, called inside ``feed`` as an eager model is. One trace per host, with every case made for it
    stacked on it: tracing the host is most of the time of a trace. A break names its file and line."""
    model = stacked(host).train(training)
    feeding = (
        peft_hcp.feed(model, **{key: value(1) for key, value in host.feeds.items()})
        if fed_plugins(model)
        else nullcontext()
    )
    torch._dynamo.reset()
    with torch.set_grad_enabled(training), feeding:
        report = torch._dynamo.explain(host.call)(model)
    torch._dynamo.reset()
    breaks = {  # each distinct reason once, with the last frames of user code that met it
        f"{r.reason}"[:400] + "".join(f"\n  {frame.filename}:{frame.lineno}" for frame in r.user_stack[-3:])
        for r in report.break_reasons
    }
    assert report.graph_break_count == 0, "\n".join(sorted(breaks))
    assert report.graph_count == 1
