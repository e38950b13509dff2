"""Publishing an adapter set to the Hub, with a model card, in one commit."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional, Union

from huggingface_hub import CommitInfo, HfApi

from peft_hcp.adapter_set import read_set, save_adapter
from peft_hcp.hub.card import render_card

SAMPLE_IMAGE = "samples.png"


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
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    training: Optional[dict[str, Any]] = None,
    sample_image: Optional[str] = None,
    tags: Optional[list[str]] = None,
    endpoint: Optional[str] = None,
) -> CommitInfo:
    """Upload a saved adapter set (configs, safetensors, manifest) and its model card to ``repo_id``.

    The repo is created if needed; an existing one is updated, the new set replacing the old files.
    ``sample_image`` (a sample grid) is uploaded as ``samples.png`` and shown in the card.
    """
    entries = read_set(folder)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory() as staging:
        for entry in entries:
            source = os.path.join(folder, entry.subfolder)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                os.makedirs(os.path.join(staging, entry.subfolder), exist_ok=True)
                shutil.copyfile(os.path.join(source, name), os.path.join(staging, entry.subfolder, name))
        if os.path.isfile(os.path.join(folder, "adapter_set.json")):
            shutil.copyfile(os.path.join(folder, "adapter_set.json"), os.path.join(staging, "adapter_set.json"))
        if sample_image is not None:
            shutil.copyfile(sample_image, os.path.join(staging, SAMPLE_IMAGE))
        card = render_card(
            staging, entries, repo_id, base_model=base_model, license=license, training=training,
            sample_image=SAMPLE_IMAGE if sample_image else None, tags=tags,
        )
        card.save(os.path.join(staging, "README.md"))
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=staging, revision=revision, commit_message=commit_message,
            delete_patterns=["*.safetensors", "*.json"],  # files of a previous set do not linger
        )
