"""Training and sampling: seed-syntax configs -> adapters, the training loop, the embedded default pipeline."""

from peft_hcp.embedded.pipeline import embedded_pipeline, load_pipeline, tokenizer_path
from peft_hcp.train.plugins import (
    PluginConfigError,
    PluginEntry,
    attach_plugins,
    parse_section,
    registered_targets,
)
from peft_hcp.train.settings import SettingsError, load_settings
from peft_hcp.train.trainer import Trainer, TrainResult, train


__all__ = [
    "PluginConfigError",
    "PluginEntry",
    "SettingsError",
    "TrainResult",
    "Trainer",
    "attach_plugins",
    "embedded_pipeline",
    "load_pipeline",
    "load_settings",
    "parse_section",
    "registered_targets",
    "tokenizer_path",
    "train",
]
