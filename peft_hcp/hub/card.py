"""Model cards for adapter sets, rendered from the templates in ``hub_cards/`` (installed as ``peft_hcp.hub_cards``)."""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData

from peft_hcp.adapter_set import DIFFUSERS_LORA_NAME, SetEntry
from peft_hcp.base.components import DENOISERS


TEMPLATE = "adapter_card.md"
_SELECTOR_FIELDS = ("target_modules", "from_layer", "to_layer", "from_layers", "to_layers", "layers")


def template_path(name: str = TEMPLATE) -> str:
    return str(resources.files("peft_hcp.hub_cards").joinpath(name))


def render_card(
    folder: str,
    entries: list[SetEntry],
    repo_id: str,
    *,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    training: Optional[dict[str, Any]] = None,
    sample_image: Optional[str] = None,
    tags: Optional[list[str]] = None,
    title: Optional[str] = None,
    description: str = "",
) -> ModelCard:
    """The card of the adapter set saved in ``folder`` (its configs give kinds, selectors and ranks)."""
    adapters = [_describe(folder, entry) for entry in entries]
    kinds = sorted({a["kind"] for a in adapters})
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        license=license,
        tags=["peft-hcp", *kinds, "diffusers", *(tags or [])],
        pipeline_tag="text-to-image" if any(e.component in DENOISERS for e in entries) else None,
    )
    components = {e.component for e in entries}
    single = next(iter(components)) if len(entries) == len(components) == 1 and entries[0].subfolder else None
    return ModelCard.from_template(
        card_data,
        template_path=template_path(),
        title=title or f"{repo_id.split('/')[-1]} (peft-hcp: {', '.join(kinds)})",
        description=description,
        adapters=adapters,
        base_model=base_model,
        training=training or {},
        sample_image=sample_image,
        repo_id=repo_id,
        single_folder=single,
        stock_diffusers=os.path.isfile(os.path.join(folder, DIFFUSERS_LORA_NAME)),
    )


def _describe(folder: str, entry: SetEntry) -> dict[str, str]:
    with open(os.path.join(folder, entry.subfolder, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    selectors = "; ".join(
        f"{field}: "
        + ", ".join(f"`{s}`" for s in (config[field] if isinstance(config[field], list) else [config[field]]))
        for field in _SELECTOR_FIELDS
        if config.get(field)
    )
    rank = config.get("r")
    return {
        "component": entry.component,
        "name": entry.name,
        "kind": entry.peft_type.lower(),
        "selectors": selectors.replace("|", "\\|") or "-",
        "rank": "-" if rank is None else str(rank),
    }
