"""Registers the adapter kinds fxpeft ships. Their order is the order the passes run in.

>>> from fxpeft import registry
>>> [k.name for k in registry.all_kinds()] == list(BUILTIN)
True
"""

from __future__ import annotations

import importlib

from fxpeft.registry import register

BUILTIN = ("lora", "ia3", "adaption_prompt", "modules_to_save", "dora", "adalora", "prompt_tuning",
           "vera", "loha", "bottleneck", "oft", "boft", "p_tuning", "lokr",
           "prefix_tuning", "alora", "trainable_tokens")

for _name in BUILTIN:
    register(importlib.import_module(f"fxpeft.kinds.{_name}").KIND)
