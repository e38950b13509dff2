"""The models of a pipeline that may carry plugins, by the names diffusers gives its components."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from torch import nn


#: Pipeline components that may carry plugins, in the order they are saved (Wan 2.2 has a second transformer,
#: ``transformer_2``, for the low-noise steps).
PLUGIN_COMPONENTS = ("unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2")
#: The components that denoise (the rest encode text).
DENOISERS = ("unet", "transformer", "transformer_2")


def pipeline_components(target: Any, names: Optional[Sequence[str]] = PLUGIN_COMPONENTS) -> dict[str, nn.Module]:
    """``{component: model}`` of ``target``: a diffusers pipeline's models among ``names`` that it has (``None``:
    every torch module it holds), or ``{"": target}`` for a torch module (a model, ``PeftModel``, DDP wrapper)."""
    if isinstance(target, nn.Module):
        return {"": target}
    components = getattr(target, "components", None)
    if not isinstance(components, dict):
        raise TypeError(
            f"Expected a torch module (a model, PeftModel or DDP wrapper) or a diffusers pipeline, "
            f"got {type(target).__name__}."
        )
    return {name: components[name] for name in names or components if isinstance(components.get(name), nn.Module)}
