"""``peft-hcp push | export | import``: the publishing functions of :mod:`peft_hcp.hub` on the command line.

* ``push DIR REPO_ID`` uploads a saved adapter set (or PEFT adapter folder) with a model card.
* ``export DIR --format kohya|comfyui|diffusers --out PATH`` loads the set onto the base pipeline and writes its
  low-rank adapters as one kohya/webui file, one file in the layout ComfyUI reads for the pipeline's family
  (``--component transformer_2``: Wan 2.2's second transformer, a file of its own), or a diffusers LoRA folder.
* ``import FILE --out DIR`` reads a kohya/webui/LyCORIS file or an HCP-Diffusion LoRA plugin checkpoint onto the
  base pipeline and saves it as an adapter set (``--alpha-is-scale`` for HCP's webui exports; ``--component
  transformer_2`` for Wan 2.2's second transformer, or the component of an HCP checkpoint of one bare model).

The base pipeline is ``--pretrained-model``, a local diffusers folder of the family the set was made on (Flux,
SD3, Wan, Qwen-Image …, as its ``model_index.json`` says; components it lists as absent stay absent), else the
embedded tiny one.
"""

from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers) -> None:
    push = subparsers.add_parser("push", help="upload an adapter set to the Hub with a model card")
    push.add_argument("adapter", help="saved adapter set / PEFT adapter folder")
    push.add_argument("repo_id")
    push.add_argument("--token", default=None)
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None)
    push.add_argument("--base-model", default=None, help="Hub id of the base model, for the card")
    push.add_argument("--license", default=None)
    push.add_argument("--training", default=None, help="JSON object summarising the training, for the card")
    push.add_argument("--sample-image", default=None, help="sample grid to show in the card")
    push.set_defaults(func=_push)

    export = subparsers.add_parser(
        "export", help="write low-rank adapters as a kohya file, a ComfyUI file or a diffusers LoRA"
    )
    export.add_argument("adapter", help="saved adapter set folder or Hub repo id")
    export.add_argument("--format", choices=("kohya", "comfyui", "diffusers"), required=True)
    export.add_argument("--out", required=True, help="kohya, comfyui: a .safetensors file; diffusers: a folder")
    export.add_argument("--pretrained-model", default=None)
    export.add_argument(
        "--component",
        default=None,
        help="comfyui: transformer_2 writes the file of Wan 2.2's second transformer (ComfyUI loads each on its own)",
    )
    export.set_defaults(func=_export)

    imp = subparsers.add_parser("import", help="read a kohya/webui/LyCORIS or HCP-Diffusion file into an adapter set")
    imp.add_argument("file", help="kohya/webui/LyCORIS .safetensors file, or an HCP-Diffusion plugin checkpoint")
    imp.add_argument(
        "--alpha-is-scale",
        action="store_true",
        help="the file's alpha is the layer's scale, not alpha/rank (HCP-Diffusion's webui export)",
    )
    imp.add_argument(
        "--component",
        default=None,
        help="transformer_2: put the file on Wan 2.2's second transformer (diffusers' load_into_transformer_2); "
        "for an HCP checkpoint without denoiser./TE. roots, the component it is for (unet, text_encoder ...)",
    )
    imp.add_argument("--out", required=True, help="folder for the adapter set")
    imp.add_argument("--adapter-name", default="default")
    imp.add_argument("--pretrained-model", default=None)
    imp.set_defaults(func=_import)


def _push(args: argparse.Namespace) -> int:
    from peft_hcp.hub.push import push_folder

    commit = push_folder(
        args.adapter,
        args.repo_id,
        token=args.token,
        private=args.private or None,
        revision=args.revision,
        base_model=args.base_model,
        license=args.license,
        training=json.loads(args.training) if args.training else None,
        sample_image=args.sample_image,
    )
    print(commit.commit_url)
    return 0


def _pipeline(pretrained_model):
    from peft_hcp.adapters import register_bundled
    from peft_hcp.embedded.pipeline import load_pipeline

    register_bundled()
    index = os.path.join(pretrained_model or "", "model_index.json")
    if pretrained_model is None or not os.path.isfile(index):
        return load_pipeline(pretrained_model)
    with open(index, encoding="utf-8") as handle:
        entries = json.load(handle)
    if entries.get("_class_name") == "StableDiffusionPipeline":
        return load_pipeline(pretrained_model)
    return _diffusers_pipeline(pretrained_model, index, entries)


def _diffusers_pipeline(folder: str, index: str, entries: dict):
    """A pipeline of diffusers' own classes from a local folder; a ``model_index.json`` naming code elsewhere (a
    custom pipeline, a component from another library) is refused before anything is imported."""
    import diffusers

    from peft_hcp.errors import CheckpointError

    name = entries.get("_class_name")
    if not (isinstance(name, str) and isinstance(getattr(diffusers, name, None), type)):
        raise CheckpointError(f"{index}: _class_name {name!r} is not a diffusers pipeline.")
    for component, value in entries.items():
        library = value[0] if isinstance(value, list) and len(value) == 2 else "diffusers"
        if not component.startswith("_") and library not in (None, "diffusers", "transformers"):
            raise CheckpointError(f"{index}: {component} comes from {library!r}; only diffusers and transformers load.")
    absent = {c: None for c, value in entries.items() if isinstance(value, list) and value[0] is None}
    return diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, **absent)


def _export(args: argparse.Namespace) -> int:
    from peft_hcp.adapter_set import load_adapter
    from peft_hcp.hub.interchange import export_comfyui, export_diffusers, export_kohya

    if args.component is not None and args.format != "comfyui":
        raise ValueError(f"--component is for --format comfyui; a {args.format} export writes every component.")
    pipe = _pipeline(args.pretrained_model)
    load_adapter(pipe, args.adapter)
    if args.format == "comfyui":
        export_comfyui(pipe, args.out, component=args.component)
        print(args.out)
    elif args.format == "kohya":
        export_kohya(pipe, args.out)
        print(args.out)
    else:
        print(export_diffusers(pipe, args.out))
    return 0


def _import(args: argparse.Namespace) -> int:
    from peft_hcp.adapter_set import save_adapter
    from peft_hcp.base.files import read_safetensors
    from peft_hcp.hub.interchange import import_hcp, import_kohya
    from peft_hcp.hub.interchange.hcp import is_hcp_checkpoint

    pipe = _pipeline(args.pretrained_model)
    if is_hcp_checkpoint(read_safetensors(args.file)):
        import_hcp(pipe, args.file, adapter_name=args.adapter_name, component=args.component)
    else:
        import_kohya(
            pipe,
            args.file,
            adapter_name=args.adapter_name,
            alpha_is_scale=args.alpha_is_scale,
            component=args.component,
        )
    save_adapter(pipe, args.out, [args.adapter_name])
    print(args.out)
    return 0
