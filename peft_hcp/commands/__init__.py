"""The subcommands of ``peft-hcp``, one module each: ``add_parser(subparsers)`` registers the subcommand and
sets ``func`` (called with the parsed arguments; returns an exit code, raises on bad input).

These modules import neither torch nor PEFT: a command imports its work when it runs, so ``--help`` and a
mistyped option answer at once.
"""
