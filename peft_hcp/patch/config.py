"""``HcpPatchConfig``: the fields every patch plugin config has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peft_hcp.single import HcpSingleConfig


@dataclass
class HcpPatchConfig(HcpSingleConfig):
    """Base config of a patch plugin; subclass it with the patch's own fields.

    The layer fields are those of a single-layer plugin: ``target_modules`` takes the selector grammar
    of :mod:`peft_hcp.selectors`, and a selected container (``''`` = the whole model) patches every
    module of the patch's ``wrapable_classes`` inside it, minus ``exclude_modules`` (selectors),
    ``exclude_key`` and ``exclude_classes`` (see :mod:`peft_hcp.wrap`).
    """

    prehook_refusal: ClassVar[str] = (
        "a patch replaces its module; use pre_forward() to act on its input. 'prehook:' applies to "
        "cross-layer plugins only."
    )
