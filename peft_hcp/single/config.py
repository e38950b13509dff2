"""``HcpSingleConfig``: the fields every single-layer plugin config has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from peft_hcp.base.config import HcpConfig
from peft_hcp.wrap import check_exclude_key, normalize_exclude_classes


@dataclass
class HcpSingleConfig(HcpConfig):
    """Base config of a single-layer plugin; subclass it with the plugin's own fields.

    ``target_modules`` takes the selector grammar of :mod:`peft_hcp.selectors` (``re:``, exact names,
    ``''`` for the whole model) as well as PEFT's forms (suffixes, one regex string, ``"all-linear"``).
    A selected container attaches the plugin to every layer of its ``wrapable_classes`` inside it,
    minus ``exclude_key`` / ``exclude_classes`` subtrees (see :mod:`peft_hcp.wrap`).
    """

    prehook_refusal: ClassVar[str] = (
        "a single-layer plugin acts on its host's output or parameters; 'prehook:' applies to cross-layer plugins only."
    )

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Layer selectors: 're:PATTERN' (full match), exact names, '' for the whole model."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Selectors of layers to leave alone, in the same grammar."}
    )
    exclude_key: Optional[str] = field(
        default=None, metadata={"help": "Regex searched in layer names; a match skips the layer and its children."}
    )
    exclude_classes: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Class names (or qualified names) whose modules, children included, are skipped."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_exclude_key(self.exclude_key)
        self.exclude_classes = normalize_exclude_classes(self.exclude_classes)
        for name in ("target_modules", "exclude_modules"):  # one string stays PEFT's regex form
            self._selector_list(name, one_string_is_list=False)

    def _check_selector(self, field_name: str, selector) -> None:
        if selector.prehook:
            raise ValueError(f"Selector {selector.text!r}: {self.prehook_refusal}")
