"""The mechanics every plugin kind shares, once: config base, block bookkeeping, host wrapping, the tuner
base (key translation, strict loading, delete/unload), the checks on adapter files, the one strict check of
weights against the model taking them (:mod:`.fit`) and the all-or-nothing scope every route that changes a
model runs in (:mod:`.snapshot`)."""
