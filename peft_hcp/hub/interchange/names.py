"""Exact names of the kohya/webui LoRA format, for writing (import places layers with :mod:`.stock`).

kohya (sd-scripts) names a layer ``<prefix>_<module path with '.' replaced by '_'>``, e.g.
``lora_unet_down_blocks_0_resnets_0_time_emb_proj``. The replacement is not reversible by string
rules (module names contain ``_`` themselves: HCP's converter turns ``time_emb_proj`` into
``time.emb.proj``); the table is built from the model's own module names and refuses a model whose
names would collide.

transformers 5 dropped the ``text_model.`` level from ``CLIPTextModel``'s module names; kohya files
(and every older checkpoint) keep it (``lora_te_text_model_encoder_layers_0_mlp_fc1``), so the table
puts it back for CLIP text encoders that lack it.
"""

from __future__ import annotations

from torch import nn

from peft_hcp.base.unwrap import base_module
from peft_hcp.selectors import selectable_modules


#: kohya's prefix for each pipeline component (SD1.x: one text encoder is ``lora_te``).
KOHYA_PREFIXES = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_te"}
SDXL_TEXT_PREFIXES = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
_CLIP_TEXT_ROOTS = ("embeddings", "encoder", "final_layer_norm")


def kohya_prefixes(components: dict[str, nn.Module]) -> dict[str, str]:
    """kohya's prefix for each component (named as diffusers names them) that kohya names; others are left out."""
    table = dict(KOHYA_PREFIXES)
    if "text_encoder_2" in components:
        table.update(SDXL_TEXT_PREFIXES)
    return {name: table[name] for name in components if name in table}


def kohya_name(prefix: str, module_name: str) -> str:
    return f"{prefix}_{module_name.replace('.', '_')}"


def kohya_name_table(model: nn.Module, prefix: str) -> dict[str, str]:
    """``{kohya layer name: module name}`` for every ``Linear``/``Conv2d`` of ``model``.

    Adapter internals are skipped and adapter wrappers looked through: a wrapped host keeps its name.
    """
    table: dict[str, str] = {}
    legacy_clip = type(model).__name__.startswith("CLIPTextModel") and not hasattr(model, "text_model")
    for name, module in selectable_modules(model):
        if not isinstance(base_module(module), (nn.Linear, nn.Conv2d)):
            continue
        legacy = f"text_model.{name}" if legacy_clip and name.split(".")[0] in _CLIP_TEXT_ROOTS else name
        key = kohya_name(prefix, legacy)
        if table.setdefault(key, name) != name:
            raise ValueError(f"Module names {table[key]!r} and {name!r} both map to the kohya name {key!r}.")
    return table
