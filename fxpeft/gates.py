"""Several adapters in one graph: which are active is data, not graph structure.

Every adapter owns a 0-d gate buffer ``fxpeft_gates.<adapter>`` (1.0 = on, 0.0 = off, not
saved). A pass multiplies its adapter's contribution by ``gate_node(...)``, so switching or
disabling adapters only fills buffers: no re-tracing, and no recompile under ``torch.compile``.
An off adapter adds exact zeros, so each adapter's outputs equal a graph holding it alone.
Passes of other kinds (IA3, prompts) use the same gate: tag nothing, just call ``gate_node``.

>>> import torch
>>> gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
>>> _ = gate_node(gm, "default", torch.zeros(1)); _ = gate_node(gm, "sql", torch.zeros(1))
>>> set_adapter(gm, "sql"); active_adapters(gm), adapter_names(gm)
(['sql'], ['default', 'sql'])
>>> with disable_adapters(gm):
...     active_adapters(gm)
[]
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
import torch.fx

from fxpeft.errors import FxpeftError

GATES = "fxpeft_gates"
GATE_META = "fxpeft_gate"
_ADAPTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise FxpeftError(f"adapter name {name!r} must be a Python identifier (letters, digits, _)")
    return name


def _gates(gm: torch.nn.Module) -> torch.nn.Module:
    if not hasattr(gm, GATES):
        gm.add_module(GATES, torch.nn.Module())
    return getattr(gm, GATES)


def gate_node(gm: torch.fx.GraphModule, adapter: str, like: torch.Tensor) -> torch.fx.Node:
    """A ``get_attr`` of ``adapter``'s gate, created (on) the first time."""
    gates = _gates(gm)
    if not hasattr(gates, check_adapter_name(adapter)):
        gates.register_buffer(adapter, torch.ones((), device=like.device), persistent=False)
    node = gm.graph.get_attr(f"{GATES}.{adapter}")
    node.meta[GATE_META] = adapter
    return node


def adapter_names(gm: torch.nn.Module) -> list[str]:
    """The adapters in ``gm``, in the order they were added."""
    return [name for name, _ in _gates(gm).named_buffers()] if hasattr(gm, GATES) else []


def active_adapters(gm: torch.nn.Module) -> list[str]:
    return [name for name, gate in _gates(gm).named_buffers() if gate.item() != 0] \
        if hasattr(gm, GATES) else []


def _set_gates(gm: torch.nn.Module, on: set[str]) -> None:
    with torch.no_grad():
        for name, gate in _gates(gm).named_buffers():
            gate.fill_(1.0 if name in on else 0.0)


def set_adapter(gm: torch.nn.Module, names: "str | list[str]") -> None:
    """Make ``names`` (one adapter or several, which then add up) the active adapters."""
    wanted = [names] if isinstance(names, str) else list(names)
    known = adapter_names(gm)
    for name in wanted:
        if name not in known:
            raise FxpeftError(f"no adapter {name!r} in this graph; it has {known}")
    _set_gates(gm, set(wanted))


@contextlib.contextmanager
def disable_adapters(gm: torch.nn.Module) -> Iterator[None]:
    """Run the base model inside the ``with`` block; the active adapters come back after."""
    was_active = set(active_adapters(gm))
    _set_gates(gm, set())
    try:
        yield
    finally:
        _set_gates(gm, was_active)
