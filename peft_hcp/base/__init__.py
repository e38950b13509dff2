"""The mechanics every plugin kind shares, once: config base, block bookkeeping, host wrapping, the tuner
base (key translation, strict loading, delete/unload), and the checks on adapter files."""
