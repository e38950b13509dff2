"""Griffe extension for the API pages: what static analysis of ``peft_hcp`` cannot know by itself.

* ``adapters/`` installs as ``peft_hcp.adapters`` (``package-dir`` in ``pyproject.toml``), so it is not a
  folder under ``peft_hcp/``: it is visited here and attached as that subpackage, before the star import of
  ``peft_hcp/__init__.py`` is expanded.
* Docstrings cite with Sphinx roles (``:func:`feed```, ``:mod:`.stock```). Each becomes an optional
  cross-reference: a link where the target is rendered on some page, plain code elsewhere, never a warning.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe


ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`(?P<tilde>~?)(?P<target>[\w.]+)`")


class PeftHcpDocs(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.path != "peft_hcp":
            return
        adapters_dir = Path(pkg.filepath).parents[1] / "adapters"
        adapters = _visit(loader, "adapters", adapters_dir / "__init__.py", pkg)
        for path in sorted(adapters_dir.glob("*.py")):
            if path.stem != "__init__":
                adapters.set_member(path.stem, _visit(loader, path.stem, path, adapters))
        pkg.set_member("adapters", adapters)
        loader.expand_exports(pkg)
        loader.expand_wildcards(pkg, external=False)
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda match, obj=obj: _cross_ref(obj, match), obj.docstring.value)


def _visit(loader: griffe.GriffeLoader, name: str, path: Path, parent: griffe.Module) -> griffe.Module:
    code = path.read_text(encoding="utf-8")
    loader.lines_collection[path] = code.splitlines()
    return griffe.visit(
        name,
        filepath=path,
        code=code,
        extensions=loader.extensions,
        parent=parent,
        docstring_parser=loader.docstring_parser,
        docstring_options=loader.docstring_options,
        lines_collection=loader.lines_collection,
        modules_collection=loader.modules_collection,
    )


def _objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _cross_ref(obj: griffe.Object, match: re.Match) -> str:
    target = match["target"]
    title = target.rsplit(".", 1)[-1] if match["tilde"] else target.lstrip(".")
    identifier = _resolve(obj, target)
    if identifier is None:
        return f"`{title}`"
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """The canonical path ``target`` names from ``obj``'s docstring, as Sphinx reads it; None if it names nothing."""
    if target.startswith("."):
        package = obj.module if obj.module.is_init_module else obj.module.parent
        candidates = [package.path + target]
    else:
        head, _, rest = target.partition(".")
        try:
            candidates = [obj.resolve(head) + (f".{rest}" if rest else ""), target]
        except griffe.NameResolutionError:
            candidates = [target]
    for candidate in candidates:
        try:
            return obj.modules_collection.get_member(candidate).canonical_path
        except (KeyError, griffe.AliasResolutionError):
            continue
    return None
