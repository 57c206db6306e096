"""The adapted GraphModule: a ``torch.fx.GraphModule`` whose train/eval switch is data.

Every dropout in it goes through the shared modules of ``fxpeft.dropout`` (the emit step puts
them there), so ``gm.train()`` / ``gm.eval()`` only flip ``training`` flags: the code is never
regenerated, and under ``torch.compile`` each mode compiles once, later switches hit the cache.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.fx

from fxpeft import adapt, adapter_set, gates


class AdaptedModule(torch.fx.GraphModule):
    """What ``fxpeft.rewrite`` returns. ``train()`` / ``eval()`` switch every dropout in the graph.

    >>> gm = AdaptedModule(torch.nn.Module(), torch.fx.Graph())
    >>> gm.eval().training
    False
    """

    capture_info: Any = None  # fxpeft.program.CaptureInfo, set by the emit step

    # Several named adapters (fxpeft.gates): switching fills gate buffers, so it never re-traces
    # and never recompiles under torch.compile.

    @property
    def adapter_names(self) -> list[str]:
        return gates.adapter_names(self)

    @property
    def active_adapters(self) -> list[str]:
        return gates.active_adapters(self)

    def set_adapter(self, names: "str | list[str]", inference_mode: bool = False) -> None:
        """Activate ``names`` (one adapter, or several that add up) and make them trainable
        (frozen with ``inference_mode``); the others go off and are frozen, as PEFT does."""
        adapter_set.activate(self, names, inference_mode)

    def disable_adapters(self) -> Iterator[None]:
        """``with gm.disable_adapters(): ...`` runs the base model."""
        return gates.disable_adapters(self)

    def add_adapter(self, adapter: str, rules: Any, **kwargs: Any) -> "AdaptedModule":
        """Splice another named adapter (inactive) into this graph; see ``fxpeft.add_adapter``."""
        return adapt.add_adapter(self, adapter, rules, **kwargs)

    def delete_adapter(self, adapter: str) -> None:
        adapter_set.delete_adapter(self, adapter)
