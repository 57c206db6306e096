"""The adapter-kind registry: one ``AdapterKind`` object per kind, registered once.

Everything that must know the kinds (the pass list, merge, strip, save/load, explain, the rule
loader, the command line) asks this registry; nothing else lists kinds by hand. A kind's file
(``fxpeft/kinds/lora.py``, ...) builds its ``AdapterKind`` and calls ``register``; importing
``fxpeft.kinds`` imports every kind file, in pass order.

>>> import fxpeft
>>> [k.name for k in all_kinds()][:3]
['lora', 'ia3', 'adaption_prompt']
>>> get("lora").sites, get("ia3").components
(('linear', 'embedding', 'conv', 'parameter'), ('ia3_l',))
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
    the parameters or submodules it attached; ``frozen``: those of its parameters that never
    train (MiCA's B), which switching adapters leaves frozen."""

    nodes: list[torch.fx.Node] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)


# A merger folds one removable node's adapter into ``weights`` (base target -> merged tensor).
Merger = Callable[[torch.fx.GraphModule, torch.fx.Node, AdapterNode, dict], None]


@dataclass(frozen=True)
class LowRankBranch:
    """Capability ``low_rank``: what fuse passes may rely on about a low-rank branch
    ``scale * B(gate * A(x))``: the targets of its down (A) and up (B) projection weights, and
    its scale. ``fold_lora_scale``, ``fuse_lora_a``, ``gather_lora`` and checkpointing read it;
    they still check the graph's shape around it, so a kind whose branch is shaped otherwise is
    simply left as it is."""

    down: str
    up: str
    scale: float
    transposed: bool = False  # the base weight is stored ``[in, out]`` (Conv1D, an embedding)


@dataclass(frozen=True)
class Combines:
    """Capability ``combines``: a low-rank kind whose adapters ``fxpeft.combine`` mixes.
    ``branch(record)``: the ``LowRankBranch`` of a removable node (None where the node is
    not one: refused); ``params(params, r)``: rule
    params like ``params`` for a branch of rank ``r`` and scale 1. A kind whose adapted weight
    rescales the rows of ``W + s·BA`` (DoRA's ``diag(g)(W + s·BA)``) also gives ``row_gain(gm,
    record)``, the ``g`` per output row, ``base_rows(gm, record)``, ``W`` as ``(out, in)`` in
    fp32, and ``set_row_gain(gm, record, g)``, which makes the gain ``g`` for the branch's
    current ``W + s·BA``."""

    branch: "Callable[[AdapterNode], LowRankBranch]"
    params: Callable[[Any, int], Any]
    row_gain: "Callable[[torch.nn.Module, AdapterNode], torch.Tensor] | None" = None
    base_rows: "Callable[[torch.nn.Module, AdapterNode], torch.Tensor] | None" = None
    set_row_gain: "Callable[[torch.nn.Module, AdapterNode, torch.Tensor], None] | None" = None


@dataclass(frozen=True)
class Lengthens:
    """Capability ``lengthens``: a kind that puts tokens in front of the input (prompt tuning).
    ``tokens(params)`` is how many (they size the KV cache); ``decode_splice(decoder, adapter,
    record)`` splices one adapter into a decode graph, which has no input adapter, and returns the
    ids of the virtual tokens the prefill puts in front. Only one such adapter per graph decodes
    with the cache."""

    tokens: Callable[[Any], int]
    decode_splice: Callable[[Any, str, Any], range]


@dataclass(frozen=True)
class FillsCache:
    """Capability ``fills_cache``: a kind whose adapter is keys and values in front of every
    layer's attention (prefix tuning). ``tokens(params)`` is how many cache slots it fills;
    ``entries(gm, adapter)`` gives, per layer index, the ``(keys, values)`` to write there, each
    ``(kv_heads, tokens, head_dim)``, from ``gm``'s current parameters. ``fxpeft.generate`` writes
    them into the decode graph's KV cache once, before the prefill, in front of the prompt (the
    mask counts them, positions start after them); the decode graph does not splice the kind."""

    tokens: Callable[[Any], int]
    entries: "Callable[[torch.fx.GraphModule, str], dict[int, tuple[torch.Tensor, torch.Tensor]]]"


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind.

    ``params``: the rule-params class (``rewrite = name`` in rule files), or None for a kind that
    is applied by keyword only (``modules_to_save``). ``splice``: adds parameters and nodes for
    one match. ``merge``: a ``Merger``, or the reason the kind cannot merge. ``components``: the
    name components of its parameters (``lora_A``), suffixed for non-default adapters.
    ``peft``: its PEFT format (``fxpeft.formats.peft_format.PeftFormat``), or None. Removal needs no
    function: every node records its own bypass.

    Capabilities, which shared code calls without knowing the kind (``docs``: writing a new kind):
    ``default_rule``: a rule without ``rewrite`` and ``params`` is this kind's (one kind);
    ``keyword_sites(gm, names)``: a kind applied by a ``rewrite`` keyword of its own name
    (``modules_to_save=[...]``) finds its sites; ``low_rank(record)``: a ``LowRankBranch`` for a
    removable node of a low-rank kind; ``lengthens``: a ``Lengthens``; ``on_step(gm, adapters,
    step)``: a kind with state across optimizer steps (AdaLoRA's rank allocation) advances it
    for ``adapters`` of ``gm`` (``AdaptedModule.update_and_allocate``); ``fills_cache``: a
    ``FillsCache``; ``no_weight_delta``: why the weights its merger writes are not a change of the
    adapted layers' own weights (``modules_to_save`` swaps in trained copies of whole modules),
    so ``fxpeft.export_lora`` refuses it; None: merged minus base weights is the adapter.
    ``combines``: a ``Combines`` (how ``fxpeft.combine`` mixes the kind's adapters).
    ``prompt_state(decoder, adapter, params, ids, filled)``: a kind whose adapter depends on
    the prompt's token ids (aLoRA's invocation) writes its per-row state into a decode graph
    before the prefill of ``ids`` (at cache slots ``filled`` on), since the decode steps no
    longer see the prompt.
    ``carries``: kinds whose rules this kind's PEFT config holds in a field of its own (LoRA's
    ``trainable_token_indices``): an adapter of this kind may mix in their rules, its
    ``to_config`` gets their matches too, and their parameters join its saved keys.
    ``layer_replication``: its adapters may sit on a layer stack that capture rebuilt from a rule
    set's ``layer_replication`` ranges (PEFT's ``LoraConfig.layer_replication``), and its PEFT
    config writes the ranges back.
    """

    name: str
    params: type | None
    splice: Callable[[SpliceInput], Spliced]
    merge: "Merger | str"
    components: tuple[str, ...]
    peft: Any = None
    default_rule: bool = False
    keyword_sites: "Callable[[torch.fx.GraphModule, Any], list] | None" = None
    low_rank: "Callable[[AdapterNode], LowRankBranch | None] | None" = None
    lengthens: Lengthens | None = None
    on_step: "Callable[[torch.fx.GraphModule, list[str], int], None] | None" = None
    fills_cache: FillsCache | None = None
    no_weight_delta: str | None = None
    combines: Combines | None = None
    prompt_state: "Callable[[torch.nn.Module, str, Any, torch.Tensor, int], None] | None" = None
    carries: tuple[str, ...] = ()
    layer_replication: bool = False

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


def default_kind() -> AdapterKind:
    """The kind a rule without ``rewrite`` gets (``default_rule``).

    >>> import fxpeft
    >>> default_kind().params is fxpeft.rules.LoraParams
    True
    """
    found = [k for k in _KINDS.values() if k.default_rule]
    if len(found) != 1:
        raise FxpeftError(f"exactly one adapter kind must be the default rule's; found {len(found)}")
    return found[0]


def low_rank_branch(record: "AdapterNode | None") -> LowRankBranch | None:
    """The low-rank branch an adapter node belongs to, if its kind has one.

    >>> low_rank_branch(None) is None
    True
    """
    if record is None or record.kind not in _KINDS:
        return None
    kind = _KINDS[record.kind]
    return kind.low_rank(record) if kind.low_rank is not None else None


def rewrite_kinds() -> dict[str, type]:
    """The rewrite names rule files may use, with their params classes."""
    return {k.name: k.params for k in _KINDS.values() if k.params is not None}


def match_kinds() -> list[str]:
    """What rules may match: the union of every kind's sites."""
    return sorted({site for k in _KINDS.values() for site in k.sites})


def saved_components(kind: AdapterKind) -> tuple[str, ...]:
    """The components of ``kind``'s saved keys: its own and those of the kinds it carries.

    >>> "trainable_tokens_delta" in saved_components(get("lora"))
    True
    """
    return tuple(kind.components) + tuple(c for name in kind.carries for c in get(name).components)


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
