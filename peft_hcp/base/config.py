"""``HcpConfig``: the base of every peft-hcp config, with the fields all plugin kinds share."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import ClassVar, Optional

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftConfig
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from peft_hcp.base.files import check_adapter_folder, check_safetensors_file
from peft_hcp.errors import CheckpointError
from peft_hcp.registry import peft_type_for
from peft_hcp.selectors import parse_selectors


#: The installed peft-hcp version, recorded in every saved config and exported file.
PEFT_HCP_VERSION = version("peft-hcp")


@dataclass
class HcpConfig(PeftConfig):
    """Fields and loading rules shared by all peft-hcp adapter configs.

    A concrete config is bound to its tuner type by registration (``type_name``, ``plugin_cls``); its
    ``peft_type`` is set from that and cannot be chosen by the caller or by a loaded file.
    """

    type_name: ClassVar[str]
    plugin_cls: ClassVar[type]

    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the plugins to train and save in full (PEFT semantics)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: start as a no-op (the plugin's identity init). False: random init, for tests."},
    )
    peft_hcp_version: Optional[str] = field(
        default=None, metadata={"help": "peft-hcp version that wrote the config; `import peft_hcp` to load it."}
    )
    checkpoint_file: Optional[str] = field(
        default=None,
        init=False,
        repr=False,
        compare=False,
        metadata={
            "help": "Set by from_pretrained, never saved: the weights file beside the config. An adapter attached "
            "with this config has that file checked against it as it attaches (see peft_hcp.base.tuner)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        name = getattr(type(self), "type_name", None)
        if name is None:
            raise TypeError(f"{type(self).__name__} is not registered as a peft-hcp type; register it before use.")
        self.peft_type = peft_type_for(name)
        if self.peft_hcp_version is None:
            self.peft_hcp_version = PEFT_HCP_VERSION

    def for_layer(self, name: str) -> HcpConfig:
        """The config the plugin at layer ``name`` is built with: this one, unless per-layer patterns change it
        (the low-rank configs' ``rank_pattern`` …, see :class:`~peft_hcp.single.lowrank.LowRankConfig`)."""
        return self

    def _selector_list(self, name: str, one_string_is_list: bool = True) -> None:
        """Normalise the selector field ``name`` to a list and parse it, so a malformed selector fails here."""
        value = getattr(self, name)
        if isinstance(value, (set, tuple)) or (one_string_is_list and isinstance(value, str)):
            value = [value] if isinstance(value, str) else list(value)
            setattr(self, name, value)
        for selector in parse_selectors(value):
            self._check_selector(name, selector)

    def _check_selector(self, field_name: str, selector) -> None:
        """Refuse a selector this kind cannot act on (overridden per kind)."""

    def to_dict(self) -> dict:
        values = super().to_dict()
        del values["checkpoint_file"]  # where this process read it from: not part of the config
        return values

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's loader, after checking that the weights beside the config are whole safetensors; the
        config's ``checkpoint_file`` names them, and what it builds is checked against that file before it is
        attached (:mod:`peft_hcp.base.preflight`). A config file whose values do not make a config is a
        ``CheckpointError``."""
        weights = _check_weights_source(pretrained_model_name_or_path, subfolder, cls._split_kwargs(kwargs)[0])
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except CheckpointError:
            raise
        except (TypeError, ValueError) as exc:
            where = os.path.join(pretrained_model_name_or_path, subfolder or "", CONFIG_NAME)
            raise CheckpointError(f"{where}: cannot be read as a {cls.__name__}: {exc}") from exc
        config.checkpoint_file = weights
        return config


def _check_weights_source(source: str, subfolder: Optional[str], hub_kwargs: dict) -> Optional[str]:
    """The safetensors weights file of an adapter folder or Hub repo, checked whole; ``None`` when there is none
    (PEFT's loader then says so in its own words)."""
    folder = os.path.join(source, subfolder) if subfolder else source
    if os.path.isdir(folder):
        check_adapter_folder(folder)
        path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        return path if os.path.isfile(path) else None
    filename = f"{subfolder}/{SAFETENSORS_WEIGHTS_NAME}" if subfolder else SAFETENSORS_WEIGHTS_NAME
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k != "subfolder"}
    try:
        path = hf_hub_download(source, filename, **hub_kwargs)
    except EntryNotFoundError as exc:
        raise CheckpointError(
            f"{source} has no {filename}; peft-hcp loads adapter weights from safetensors only."
        ) from exc
    except Exception:  # noqa: BLE001 - not a repo we can reach: PEFT reports it in its own words
        return None
    check_safetensors_file(path)
    return path
