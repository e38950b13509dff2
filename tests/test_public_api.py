"""The public API the README documented (before it moved into ``docs/``) is a promise: every import path and
name listed here keeps importing, every documented function and class stays callable, and every documented
command line still parses. The list is written out by hand on purpose: removing an entry is an API change."""

import importlib

import pytest

from benchmarks import run as benchmark_run
from peft_hcp.cli import build_parser


DOCUMENTED = {
    "peft_hcp": [
        # plugin configs
        "HcpLoraConfig",
        "HcpLohaConfig",
        "HcpLokrConfig",
        "HcpSkipConfig",
        "HcpControlNetConfig",
        "HcpSD3ControlNetConfig",
        "HcpFluxControlNetConfig",
        "HcpPReLUConfig",
        # writing a plugin
        "HcpSingleConfig",
        "HcpPatchConfig",
        "SinglePluginBlock",
        "LowRankBlock",
        "LowRankConfig",
        "PatchPluginBlock",
        "PatchPluginContainer",
        "ReplacePatchContainer",
        "register_single_plugin",
        "register_plugin",
        "register_multi_plugin",
        "register_patch_plugin",
        # using plugins
        "feed",
        "wrap_model",
        "save_adapter",
        "load_adapter",
        "push_adapter",
        # errors
        "SelectorMatchError",
        "SelectorSyntaxError",
        "MergeNotSupportedError",
        "CheckpointError",
        "UnsupportedLayerError",
    ],
    "peft_hcp.adapters": [],
    "peft_hcp.adapters.lora": ["LoraBlock"],
    "peft_hcp.adapters.controlnet_bridge": [
        "export_controlnet",
        "import_controlnet",
        "controlnet_config",
        "load_controlnet",
    ],
    "peft_hcp.hooked": ["PluginBlock", "MultiPluginBlock"],
    "peft_hcp.hooked.block": ["element", "with_element"],
    "peft_hcp.hub": ["attach"],
    "peft_hcp.hub.interchange": ["import_kohya", "export_kohya", "export_diffusers", "import_hcp"],
    "peft_hcp.single": ["HcpSingleModel", "SinglePluginLayer"],
    "peft_hcp.single.lowrank": ["LowRankBlock", "LowRankConfig"],
    "peft_hcp.single.model": ["find_hosts"],
    # the architecture table: where the shared machinery lives
    "peft_hcp.base.config": ["HcpConfig"],
    "peft_hcp.base.blocks": ["WeightedBlock", "BlockLayer"],
    "peft_hcp.base.feed": ["feed"],
    "peft_hcp.base.host_layer": ["HostLayer"],
    "peft_hcp.base.tuner": ["HcpTuner"],
    "peft_hcp.train.concept": [],
    "peft_hcp.embedded.pretrain": [],
    "peft_hcp.cli": ["main"],
}

COMMAND_LINES = [
    ["train", "configs/lora.yaml"],
    ["train", "configs/lora.yaml", "steps=300", "plugin_unet.lora1.lr=1e-3"],
    ["sample", "--adapter", "runs/lora/checkpoints/step-000150", "prompt=a red circle", "seeds=[0,1,2]"],
    ["pretrain-base"],
    ["push", "out/set", "me/my-set"],
    ["export", "out/set", "--format", "kohya", "--out", "lora.safetensors"],
    ["export", "out/set", "--format", "diffusers", "--out", "out/diffusers"],
    ["import", "lora.safetensors", "--out", "out/set", "--alpha-is-scale"],
]

BENCHMARK_PAIRS = [
    "train_lora",
    "train_lora_dropout",
    "infer_unmerged",
    "infer_merged",
    "infer_merged_in_place",
    "train_loha",
    "infer_loha",
    "attach",
    "load",
    "train_controlnet",
    "train_skip",
    "train_prelu",
    "compile_lora",
    "compile_kinds",
]


@pytest.mark.parametrize(
    ("module", "name"), [(module, name) for module, names in DOCUMENTED.items() for name in names or [None]]
)
def test_documented_name_imports(module, name):
    imported = importlib.import_module(module)
    if name is not None:
        assert callable(getattr(imported, name)), f"{module}.{name} is not callable"


def test_top_level_names_are_exported():
    import peft_hcp

    missing = sorted(set(DOCUMENTED["peft_hcp"]) - set(peft_hcp.__all__))
    assert not missing, f"documented but not in peft_hcp.__all__: {missing}"


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=lambda argv: " ".join(argv[:2]))
def test_documented_command_line_parses(argv):
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]
    assert callable(args.func)


def test_benchmark_options_and_pairs():
    argv = "--device cpu --dtype fp32 --resolution 16 --batch 1 --repeats 2 --warmup 0 --threads 1 --model tiny"
    args = benchmark_run.parse_args([*argv.split(), "--only", *BENCHMARK_PAIRS, "--json", "out.json"])
    assert args.only == BENCHMARK_PAIRS and args.model == "tiny" and args.json == "out.json"
