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
from fxpeft.errors import FxpeftError
from fxpeft.kinds import adalora


class AdaptedModule(torch.fx.GraphModule):
    """What ``fxpeft.rewrite`` returns. ``train()`` / ``eval()`` switch every dropout in the graph.

    >>> gm = AdaptedModule(torch.nn.Module(), torch.fx.Graph())
    >>> gm.eval().training
    False
    """

    capture_info: Any = None  # fxpeft.program.CaptureInfo, set by the emit step

    # Export bakes the capture dtype into the graph (RoPE's ``cos.to(x.dtype)`` became a float32
    # constant, next to deliberate float32 upcasts it cannot be told from), so converting the
    # parameters afterwards would fail deep inside torch: refuse it here instead.

    def _refuse_dtype(self, dtype: "torch.dtype | None") -> None:
        current = next((p.dtype for p in self.parameters() if p.is_floating_point()), dtype)
        if dtype is not None and dtype != current:
            raise FxpeftError(f"{type(self).__name__} was captured in {current}; its graph has that "
                              f"dtype built in, so it cannot be converted to {dtype}. Convert the "
                              f"model first, then rewrite it: fxpeft.rewrite(model.to({dtype}), ...)")

    def to(self, *args: Any, **kwargs: Any) -> "AdaptedModule":
        self._refuse_dtype(torch._C._nn._parse_to(*args, **kwargs)[1])
        return super().to(*args, **kwargs)


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

    def update_and_allocate(self, step: int) -> None:
        """AdaLoRA's rank allocation for ``step`` (PEFT's ``update_and_allocate``), for adapters
        whose rules say ``auto_allocate = false``: call it after each ``optimizer.step()``,
        before ``zero_grad()``, numbering steps from 0 (others allocate by themselves).

        >>> import torch, fxpeft
        >>> from fxpeft.kinds.adalora import AdaLoraParams
        >>> rule = fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"]),
        ...                          params=AdaLoraParams(total_step=4, auto_allocate=False))
        >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 4)), rule)
        >>> gm(torch.randn(2, 4)).sum().backward()
        >>> gm.update_and_allocate(0)
        """
        adalora.update_and_allocate(self, step)


def _refusing(name: str, dtype: torch.dtype) -> Any:
    """``Module.half`` / ``bfloat16`` / ``float`` / ``double``, refused where they change the dtype."""
    def convert(self: AdaptedModule) -> AdaptedModule:
        self._refuse_dtype(dtype)
        return getattr(torch.fx.GraphModule, name)(self)
    convert.__name__ = convert.__qualname__ = name
    return convert


for _name, _dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16),
                      ("float", torch.float32), ("double", torch.float64)):
    setattr(AdaptedModule, _name, _refusing(_name, _dtype))
