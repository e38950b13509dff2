"""Exception types raised by peft-hcp.

Each derives from :class:`PeftHcpError` and from the built-in type PEFT and diffusers users already catch
(``ValueError``, ``TypeError``, ``NotImplementedError``), so code written against PEFT keeps working.
"""

from peft.utils.error import NoMatchingPeftModuleError


class PeftHcpError(Exception):
    """Base of every error peft-hcp raises about its input (the ``peft-hcp`` command reports these in one line)."""


class SelectorSyntaxError(PeftHcpError, ValueError):
    """A layer selector is malformed: an unknown flag, a bad regular expression, an empty pattern."""


class SelectorMatchError(PeftHcpError, NoMatchingPeftModuleError):
    """A layer selector matched no module of the model."""


class UnsupportedLayerError(PeftHcpError, TypeError):
    """A selected layer is of a type the plugin cannot attach to."""


class MergeNotSupportedError(PeftHcpError, NotImplementedError):
    """The plugin's effect cannot be folded into the host's weights."""


class QuantizerMissingError(PeftHcpError, ImportError):
    """A quantized host or quantization scheme needs a package that is not installed (the ``quant`` extra)."""


class CheckpointError(PeftHcpError, ValueError):
    """An adapter checkpoint is corrupted, pickled, or made for a model of another shape."""


#: every error type above: what a refused load of a downloaded adapter file raises (see docs/untrusted.md)
PEFT_HCP_ERRORS = (
    CheckpointError,
    SelectorSyntaxError,
    SelectorMatchError,
    UnsupportedLayerError,
    MergeNotSupportedError,
)


def few(items: list[str], limit: int = 5) -> str:
    """``items`` for an error message: the first ``limit``, then how many more."""
    if not items:
        return "none"
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
