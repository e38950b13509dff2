"""Publishing an adapter set to the Hub, with a model card, in one commit."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional, Union

from huggingface_hub import CommitInfo, HfApi

from peft_hcp.adapter_set import DIFFUSERS_LORA_NAME, MANIFEST_NAME, read_set, save_adapter
from peft_hcp.hub.card import render_card


SAMPLE_IMAGE = "samples.png"
CARD_NAME = "README.md"


def push_adapter(target, repo_id: str, *, adapter_names: Optional[list[str]] = None, **kwargs) -> CommitInfo:
    """Save the adapter set of a pipeline or model and push it with :func:`push_folder`."""
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(target, folder, adapter_names)
        return push_folder(folder, repo_id, **kwargs)


def push_folder(
    folder: str,
    repo_id: str,
    *,
    token: Union[str, bool, None] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload peft-hcp adapter set",
    sample_image: Optional[str] = None,
    endpoint: Optional[str] = None,
    **card: Any,
) -> CommitInfo:
    """Upload a saved adapter set (configs, safetensors, manifest) and its model card to ``repo_id``.

    The repo is created if needed; an existing one is updated, the new set replacing the old files. The
    card is written into ``folder`` as ``README.md`` (as PEFT's ``save_pretrained`` does) from ``card``
    (``base_model``, ``license``, ``training``, ``tags``, ``title``, ``description``: see
    :func:`~peft_hcp.hub.card.render_card`); ``sample_image`` (a sample grid) is copied in as
    ``samples.png`` and shown in it. Only the set's own files are uploaded, with the diffusers LoRA file
    :func:`~peft_hcp.adapter_set.save_adapter` writes beside a set stock ``load_lora_weights`` can load.
    """
    entries = read_set(folder)
    if sample_image is not None:
        shutil.copyfile(sample_image, os.path.join(folder, SAMPLE_IMAGE))
    render_card(folder, entries, repo_id, sample_image=SAMPLE_IMAGE if sample_image else None, **card).save(
        os.path.join(folder, CARD_NAME)
    )
    files = [MANIFEST_NAME, CARD_NAME] + ([SAMPLE_IMAGE] if sample_image else [])
    if os.path.isfile(os.path.join(folder, DIFFUSERS_LORA_NAME)):  # for stock diffusers' load_lora_weights
        files.append(DIFFUSERS_LORA_NAME)
    for entry in entries:
        files += [f"{entry.subfolder}/adapter_config.json", f"{entry.subfolder}/adapter_model.safetensors"]
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=commit_message,
        allow_patterns=[f.lstrip("/") for f in files],
        delete_patterns=["*.safetensors", "*.json"],  # files of a previous set do not linger
    )
