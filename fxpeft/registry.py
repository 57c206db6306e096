"""The adapter-kind registry: one ``AdapterKind`` object per kind, registered once.

Everything that must know the kinds (the pass list, merge, strip, save/load, explain, the rule
loader, the command line) asks this registry; nothing else lists kinds by hand. A kind's file
(``fxpeft/kinds/lora.py``, ...) builds its ``AdapterKind`` and calls ``register``; importing
``fxpeft.kinds`` imports every kind file, in pass order.

>>> import fxpeft
>>> [k.name for k in all_kinds()][:3]
['lora', 'ia3', 'adaption_prompt']
>>> get("lora").sites, get("ia3").components
(('linear', 'embedding', 'conv'), ('ia3_l',))
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx

from fxpeft.errors import FxpeftError
from fxpeft.names import AdapterNode, component_base


@dataclass(frozen=True)
class SpliceInput:
    """What a splice gets for one match: the graph module, the matched site, the rule's params
    and the adapter's name."""

    gm: torch.fx.GraphModule
    site: Any
    params: Any
    adapter: str


@dataclass
class Spliced:
    """What a splice returns: the nodes it added (each carrying its record) and the targets of
    the parameters or submodules it attached."""

    nodes: list[torch.fx.Node] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)


# A merger folds one removable node's adapter into ``weights`` (base target -> merged tensor).
Merger = Callable[[torch.fx.GraphModule, torch.fx.Node, AdapterNode, dict], None]


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind.

    ``params``: the rule-params class (``rewrite = name`` in rule files), or None for a kind that
    is applied by keyword only (``modules_to_save``). ``splice``: adds parameters and nodes for
    one match. ``merge``: a ``Merger``, or the reason the kind cannot merge. ``components``: the
    name components of its parameters (``lora_A``), suffixed for non-default adapters.
    ``peft``: its PEFT format (``fxpeft.formats.peft_format.PeftFormat``), or None. Removal needs no
    function: every node records its own bypass.
    """

    name: str
    params: type | None
    splice: Callable[[SpliceInput], Spliced]
    merge: "Merger | str"
    components: tuple[str, ...]
    peft: Any = None
    # For a kind that lengthens the input (prompt tuning): splices one adapter (name, record) into
    # a decode graph, which has no input adapter; returns the ids of the virtual tokens the
    # prefill puts in front (as many as its params' num_virtual_tokens, which sizes the cache).
    # Only one such adapter per graph decodes with the cache.
    decode_splice: "Callable[[Any, str, Any], range] | None" = None

    @property
    def sites(self) -> tuple[str, ...]:
        """The match kinds (``linear``, ``attention``) this kind consumes."""
        return tuple(self.params.match_kinds) if self.params is not None else ()


_KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    """Add ``kind`` to the registry (once); returns it."""
    if kind.name in _KINDS:
        raise FxpeftError(f"adapter kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def all_kinds() -> list[AdapterKind]:
    """Every registered kind, in registration (= pass) order."""
    return list(_KINDS.values())


def get(name: str) -> AdapterKind:
    if name not in _KINDS:
        raise FxpeftError(f"no adapter kind {name!r}; known: {', '.join(_KINDS)}")
    return _KINDS[name]


def rewrite_kinds() -> dict[str, type]:
    """The rewrite names rule files may use, with their params classes."""
    return {k.name: k.params for k in _KINDS.values() if k.params is not None}


def match_kinds() -> list[str]:
    """What rules may match: the union of every kind's sites."""
    return sorted({site for k in _KINDS.values() for site in k.sites})


def components() -> list[str]:
    return [c for k in _KINDS.values() for c in k.components]


def is_adapter_parameter(name: str) -> bool:
    """Whether the parameter or buffer ``name`` belongs to an adapter: a component of its
    dotted name is a kind's component (for any adapter).

    >>> is_adapter_parameter("q_proj.lora_A_sql.weight"), is_adapter_parameter("q_proj.weight")
    (True, False)
    """
    known = components()
    return any(component_base(part, known) for part in name.split("."))


_FROM_FILE = contextvars.ContextVar("fxpeft_values_from_file", default=False)


@contextlib.contextmanager
def values_from_file() -> Iterator[None]:
    """Splices in this block get their values from an adapter file right after (``fxpeft.load``),
    so a kind may skip an initialisation that needs outside resources (a tokenizer).

    >>> with values_from_file():
    ...     initialising()
    False
    >>> initialising()
    True
    """
    token = _FROM_FILE.set(True)
    try:
        yield
    finally:
        _FROM_FILE.reset(token)


def initialising() -> bool:
    """Whether a splice must initialise its parameters (False inside ``values_from_file``)."""
    return not _FROM_FILE.get()


# --- the graph's HF-model face: what upper layers provide ---------------------------------------
# ``AdaptedModule`` (``fxpeft.runtime``) answers ``generate``, ``save_pretrained`` and
# ``gradient_checkpointing_enable``, whose work lives in layers above it (generation, io,
# transforms). Each of those registers its entry here when imported (``import fxpeft`` imports
# them all), so imports still point only down the layers.

_PROVIDED: dict[str, Callable[..., Any]] = {}


def provide(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the function that does ``name`` for ``AdaptedModule``'s face.

    >>> @provide("_doc_example")
    ... def twice(x): return 2 * x
    >>> provided("_doc_example")(4)
    8
    """
    def register_function(function: Callable[..., Any]) -> Callable[..., Any]:
        _PROVIDED[name] = function
        return function
    return register_function


def provided(name: str) -> Callable[..., Any]:
    """The function registered for ``name``; a one-line error when none is (a partial import)."""
    if name not in _PROVIDED:
        raise FxpeftError(f"{name}: nothing provides it; import fxpeft (not only fxpeft.runtime)")
    return _PROVIDED[name]
