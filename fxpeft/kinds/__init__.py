"""Adapter kinds: the registry (``registry``), one file per kind, and ``builtin``, which
registers the kinds fxpeft ships in pass order. See ``passes/README.md``, "Writing a new adapter
kind"."""
