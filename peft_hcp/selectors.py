"""The layer-selector grammar shared by every plugin kind.

A selector is a string that picks modules of a model by their dotted name (``model.named_modules()``):

``name``
    PEFT's rule for a name in ``target_modules``: the module with exactly this name *and* every module
    whose name ends with ``.name`` (``"proj_out"`` picks the top-level ``proj_out`` and every block's), so
    a PEFT list selects here what it selects in PEFT. ``''`` is the root model. For one module only (an
    HCP config's exact name that also ends other names), write ``re:name`` (a full match).
``re:PATTERN``
    Every module whose full name matches ``PATTERN`` *completely* (``re.fullmatch``). HCP-Diffusion used
    ``re.match``, which anchors at the start only, so ``re:.*attn1`` also picked ``attn1.to_q`` there;
    here it does not. A trailing ``$`` is harmless.
``prehook:``
    Act on the layer's *input* instead of its output (``pre_hook:`` is accepted as well). Flags combine
    in any order: ``prehook:re:.*proj_out$`` and ``re:prehook:.*proj_out$`` are the same selector.

PEFT's other ``target_modules`` forms are accepted wherever a list of selectors is: a single string
that is not a flagged selector is a PEFT regular expression (full match), and ``"all-linear"`` picks
every ``nn.Linear``.

Resolution returns the matches in model order (the order of ``named_modules()``), without duplicates.
Modules inside adapter machinery (the wrapped ``base_layer`` of a PEFT tuner layer, plugin blocks) are
never selectable. A selector that matches nothing raises :class:`SelectorMatchError` naming it and
suggesting near names; a malformed one raises :class:`SelectorSyntaxError`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_hcp.errors import SelectorMatchError, SelectorSyntaxError


ALL_LINEAR = "all-linear"
_REGEX_FLAG = "re"
_PREHOOK_FLAGS = ("prehook", "pre_hook")
_FLAG_RE = re.compile(r"^([A-Za-z_]+):")


@dataclass(frozen=True)
class Selector:
    """One parsed selector. ``text`` is what the user wrote, kept for messages and for saving."""

    text: str
    pattern: str
    is_regex: bool = False
    prehook: bool = False
    all_linear: bool = False

    def __post_init__(self) -> None:
        if self.is_regex:
            try:
                object.__setattr__(self, "_compiled", re.compile(self.pattern))
            except re.error as exc:
                raise SelectorSyntaxError(f"Selector {self.text!r}: bad regular expression: {exc}") from exc

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether this selector picks ``module`` (named ``name``)."""
        if self.all_linear:
            return isinstance(module, nn.Linear)
        if self.is_regex:
            return self._compiled.fullmatch(name) is not None  # type: ignore[attr-defined]
        if not self.pattern:
            return name == ""
        return name == self.pattern or name.endswith("." + self.pattern)


def parse_selector(text: str) -> Selector:
    """Parse one selector string (see the module docstring for the grammar)."""
    if not isinstance(text, str):
        raise SelectorSyntaxError(f"A selector must be a string, got {type(text).__name__}: {text!r}")
    rest, is_regex, prehook = text, False, False
    while (flag := _FLAG_RE.match(rest)) is not None:
        name = flag.group(1)
        if name == _REGEX_FLAG:
            is_regex = True
        elif name in _PREHOOK_FLAGS:
            prehook = True
        else:
            raise SelectorSyntaxError(
                f"Selector {text!r}: unknown flag {name + ':'!r}; known flags are 're:', 'prehook:' (or 'pre_hook:')."
            )
        rest = rest[flag.end() :]
    if is_regex and not rest:
        raise SelectorSyntaxError(f"Selector {text!r}: 're:' needs a pattern after it.")
    if not is_regex and rest == ALL_LINEAR:
        return Selector(text=text, pattern=rest, prehook=prehook, all_linear=True)
    return Selector(text=text, pattern=rest, is_regex=is_regex, prehook=prehook)


def parse_selectors(spec: str | Sequence[str] | None) -> list[Selector]:
    """Parse a ``target_modules``-style value: a list of selectors, or PEFT's single-string forms."""
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec == ALL_LINEAR or _FLAG_RE.match(spec):
            return [parse_selector(spec)]
        return [Selector(text=spec, pattern=spec, is_regex=True)]  # PEFT: a lone string is a regex
    return [parse_selector(item) for item in spec]


@dataclass(frozen=True)
class Target:
    """A module picked by a selector: ``prehook`` says whether to act on its input."""

    name: str
    module: nn.Module
    prehook: bool


def selectable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` without the internals of adapters (tuner-layer children, plugin blocks)."""
    visible: list[tuple[str, nn.Module]] = []
    hidden_prefix: str | None = None  # named_modules() is depth-first: a subtree's names are contiguous
    for name, module in model.named_modules():
        if hidden_prefix is not None and name.startswith(hidden_prefix):
            continue
        hidden_prefix = None
        visible.append((name, module))
        if name and (isinstance(module, BaseTunerLayer) or getattr(module, "_hcp_internal", False)):
            hidden_prefix = name + "."
    return visible


def resolve(
    model: nn.Module,
    selectors: Iterable[Selector],
    *,
    modules: list[tuple[str, nn.Module]] | None = None,
) -> list[Target]:
    """Resolve ``selectors`` against ``model``; every selector must match at least one module.

    The result is in model order and holds each (module, prehook) pair once.
    """
    modules = selectable_modules(model) if modules is None else modules
    order = {name: index for index, (name, _) in enumerate(modules)}
    picked: dict[tuple[str, bool], Target] = {}
    for targets in resolve_each(model, selectors, modules=modules):
        for target in targets:
            picked.setdefault((target.name, target.prehook), target)
    return sorted(picked.values(), key=lambda target: (order[target.name], target.prehook))


def resolve_each(
    model: nn.Module,
    selectors: Iterable[Selector],
    *,
    modules: list[tuple[str, nn.Module]] | None = None,
) -> list[list[Target]]:
    """The targets of each selector separately, in model order; one that matches nothing raises.

    Plain names are looked up by their last component, so many of them cost one pass over the model.
    """
    modules = selectable_modules(model) if modules is None else modules
    by_tail: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in modules:
        by_tail.setdefault(name.rsplit(".", 1)[-1], []).append((name, module))
    result = []
    for selector in selectors:
        plain = not selector.is_regex and not selector.all_linear
        candidates = by_tail.get(selector.pattern.rsplit(".", 1)[-1], []) if plain else modules
        hits = [(name, module) for name, module in candidates if selector.matches(name, module)]
        if not hits:
            raise SelectorMatchError(_no_match_message(model, selector, [name for name, _ in modules]))
        result.append([Target(name, module, selector.prehook) for name, module in hits])
    return result


def _no_match_message(model: nn.Module, selector: Selector, names: list[str]) -> str:
    near = difflib.get_close_matches(selector.pattern, [n for n in names if n], n=3, cutoff=0.5)
    if not near:  # compare the last name component too: 'to_qq' -> '...attn1.to_q'
        tails = {n.rsplit(".", 1)[-1]: n for n in names if n}
        near = [tails[t] for t in difflib.get_close_matches(selector.pattern.split(".")[-1], list(tails), n=3)]
    hint = f" Did you mean: {', '.join(repr(n) for n in near)}?" if near else ""
    return (
        f"Selector {selector.text!r} matched no module of {type(model).__name__} "
        f"(target modules not found in the base model).{hint}"
    )
