"""Adapter kinds: one file per kind, and ``builtin``, which registers the kinds fxpeft ships in
pass order with the registry (``fxpeft.registry``, a leaf below the rules). See
``passes/README.md``, "Writing a new adapter kind"."""
