"""Several adapters in one graph: which are active is data, not graph structure.

Every adapter owns a 0-d gate buffer ``fxpeft_gates.<adapter>`` (1.0 = on, 0.0 = off, not
saved). A pass multiplies its adapter's contribution by ``gate_node(...)``, so switching or
disabling adapters only fills buffers: no re-tracing, and no recompile under ``torch.compile``.
An off adapter adds exact zeros, so each adapter's outputs equal a graph holding it alone.
Passes of other kinds (IA3, prompts) use the same gate: tag nothing, just call ``gate_node``.

A kind whose graph changes shape with its adapter (virtual tokens that are there or not) needs
the state as a Python bool, not a tensor: ``gate_flag`` reads ``Gates.opened``, a frozenset of
the adapters that are on, kept by every switch (``fill_gates``, ``gate_node``, ``drop_gate``).
Under ``torch.compile`` it is a Python value that Dynamo guards on: no graph break; the first
switch to the other state compiles once, later switches hit the cache.

Mixed batches (PEFT's ``adapter_names=``, HF graphs only): before the graph runs, a forward
pre-hook (``index_sample_names``) turns the per-sample names into a LongTensor of indices into
``adapter_names(gm)`` (-1: ``"__base__"``). Hooks run outside ``torch.compile``'s frame, so the
compiled graph receives a tensor, not a list of strings that would be a guard: a new mixture
never recompiles. The input adapter passes the indices to the ``Gates`` module, which turns them
into per-sample gates; each gate read (``sample_gate``) then returns its adapter's gates shaped
to broadcast against the branch tensor instead of the 0-d buffer. Without names it returns the
buffer itself, so outputs are unchanged.

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
import operator
import re
from typing import Iterator

import torch
import torch.fx

from fxpeft.errors import FxpeftError
from fxpeft.graph.state import graph_state
from fxpeft.names import BASE_ADAPTER as BASE
from fxpeft.names import GATE_META, GATES, INPUTS_MODULE, PER_SAMPLE_META

_ADAPTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def check_adapter_name(name: str) -> str:
    if name == BASE:
        raise FxpeftError(f"adapter name {BASE!r} is reserved: adapter_names=[..., {BASE!r}] "
                          f"means the base model, without adapters; choose another name")
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise FxpeftError(f"adapter name {name!r} must be a Python identifier (letters, digits, _)")
    return name


class Gates(torch.nn.Module):
    """Holds one 0-d gate buffer per adapter; called with per-sample adapter indices (or None), it
    returns each adapter's per-sample gates (or None). ``index`` turns names into those indices.

    >>> gates = Gates(); gates.register_buffer("sql", torch.ones(()))
    >>> gates(gates.index(["sql", BASE]))["sql"]
    tensor([1., 0.])
    >>> gates.index(["chat"])
    Traceback (most recent call last):
    ...
    ValueError: adapter_names has unknown adapters ['chat']; this graph has ['sql'] (and '__base__')
    """

    def __init__(self) -> None:
        super().__init__()
        self.unmixable: set[str] = set()  # adapters whose gates are read without a branch
        self.opened: frozenset[str] = frozenset()  # the adapters that are on, mirrored (gate_flag)

    def index(self, names: list[str]) -> torch.Tensor:
        """Each name's position among the adapters, -1 for ``"__base__"``, checked."""
        adapters = [name for name, _ in gate_buffers(self)]
        unknown = sorted(set(names) - set(adapters) - {BASE})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; this graph has "
                             f"{adapters} (and {BASE!r})")
        unmixable = sorted(self.unmixable & set(adapters))
        if unmixable:
            raise ValueError(f"adapters {unmixable} have modules_to_save copies or prompts (or "
                             f"adapt whole weights), which cannot be mixed per sample; call "
                             f"without adapter_names=")
        device = next(self.buffers(), torch.zeros(())).device
        return torch.tensor([adapters.index(n) if n != BASE else -1 for n in names], device=device)

    def check_index(self, index: torch.Tensor) -> None:
        """An index tensor given as ``adapter_names=``: each entry an adapter's position or -1.

        >>> gates = Gates(); gates.register_buffer("sql", torch.ones(()))
        >>> gates.check_index(torch.tensor([0, 3]))
        Traceback (most recent call last):
        ...
        ValueError: adapter_names as a tensor holds indices into ['sql'] or -1 ('__base__'); got 3
        """
        if index.is_floating_point():
            return  # the input adapter refuses it, naming the dtype
        adapters = [name for name, _ in gate_buffers(self)]
        wrong = index[(index < -1) | (index >= len(adapters))]
        if wrong.numel():
            raise ValueError(f"adapter_names as a tensor holds indices into {adapters} or -1 "
                             f"({BASE!r}); got {wrong.flatten()[0].item()}")

    def forward(self, index: "torch.Tensor | None") -> "dict[str, torch.Tensor] | None":
        if index is None:
            return None
        return {adapter: (index == position).to(gate.dtype)
                for position, (adapter, gate) in enumerate(gate_buffers(self))}


# Copies of a gate on the other devices of a split model are buffers "<adapter>_<n>" of the
# child module "_devices" (adapter names start with a letter, so it is never one). Functions, not
# methods: a fused copy's gates module is a plain Module (GraphModule copies attributes so).
DEVICE_COPIES = "_devices"


def gate_buffers(gates: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(adapter, its gate buffer), in the order the adapters were added; no device copies."""
    return list(gates.named_buffers(recurse=False))


def _copies(gates: torch.nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(attribute path, adapter, buffer) of each device copy."""
    holder = getattr(gates, DEVICE_COPIES, None)
    if holder is None:
        return []
    return [(f"{DEVICE_COPIES}.{name}", name.rsplit("_", 1)[0], buffer)
            for name, buffer in holder.named_buffers(recurse=False)]


def gate_on(gates: torch.nn.Module, adapter: str, device: torch.device) -> str:
    """The attribute path, under ``gates``, of ``adapter``'s gate on ``device``: the gate
    itself, or a copy made there the first time (a layer reads the gate on its own device).

    >>> gates = Gates(); gates.register_buffer("sql", torch.ones(()))
    >>> gate_on(gates, "sql", torch.device("cpu")), gate_on(gates, "sql", torch.device("meta"))
    ('sql', '_devices.sql_1')
    """
    own = [(adapter, gates.get_buffer(adapter))]
    own += [(path, buffer) for path, of, buffer in _copies(gates) if of == adapter]
    for path, buffer in own:
        if buffer.device == device:
            return path
    if not hasattr(gates, DEVICE_COPIES):
        gates.add_module(DEVICE_COPIES, torch.nn.Module())
    name = f"{adapter}_{len(own)}"
    getattr(gates, DEVICE_COPIES).register_buffer(name, own[0][1].to(device), persistent=False)
    return f"{DEVICE_COPIES}.{name}"


def fill_gates(gates: torch.nn.Module, on: set[str]) -> None:
    """Open the gates of the adapters in ``on`` and close the others, device copies included."""
    with torch.no_grad():
        for adapter, gate in gate_buffers(gates):
            gate.fill_(1.0 if adapter in on else 0.0)
        for _, adapter, gate in _copies(gates):
            gate.fill_(1.0 if adapter in on else 0.0)
    gates.opened = frozenset(adapter for adapter, _ in gate_buffers(gates) if adapter in on)


def drop_gate(gates: torch.nn.Module, adapter: str) -> None:
    """Forget ``adapter``'s gate and its device copies."""
    for path, of, _ in _copies(gates):
        if of == adapter:
            delattr(getattr(gates, DEVICE_COPIES), path.split(".", 1)[1])
    if hasattr(gates, adapter):
        delattr(gates, adapter)
    gates.opened = _opened(gates) - {adapter}


def _opened(gates: torch.nn.Module) -> frozenset[str]:
    """The mirror of the open gates (a plain module, as a fused copy's, starts without one)."""
    return getattr(gates, "opened", frozenset())


def gate_open(gates: torch.nn.Module, adapter: str) -> bool:
    """Whether ``adapter`` is on, as a Python bool read from the gates' mirror (no tensor read:
    ``torch.compile`` guards on it instead of breaking the graph).

    >>> gates = Gates(); gates.register_buffer("sql", torch.ones(()))
    >>> fill_gates(gates, {"sql"}); gate_open(gates, "sql")
    True
    >>> fill_gates(gates, set()); gate_open(gates, "sql")
    False
    """
    return adapter in _opened(gates)


@torch.compiler.disable  # reads the gates' values: kept out of compiled frames, as below
def refuse_dropped_adapters(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of adapted graphs: a copy specialised to the adapters that were active
    (``fxpeft.fuse`` drops the others' nodes) refuses to run while an adapter it dropped is
    active, rather than silently leaving it out. Fewer active adapters is fine: a closed gate
    adds zeros.

    >>> import fxpeft
    >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(2, 2)), fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> gm = gm.add_adapter("other", fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> fused = fxpeft.fuse(gm)
    >>> gm.set_adapter("other")
    >>> fused(torch.ones(1, 2))
    Traceback (most recent call last):
    ...
    fxpeft.errors.FxpeftError: this fused copy holds only adapters ['default'] (fxpeft.fuse drops the adapters that are off), but 'other' is active now: fuse again after set_adapter (fxpeft.fuse(gm)), or use fxpeft.fuse(gm, mixed=True), which keeps every adapter
    """
    state = graph_state(module)
    kept, gates = state.specialised_to, getattr(module, GATES, None)
    if kept is None or gates is None:
        return
    writes = tuple(gate._version for _, gate in gate_buffers(gates))
    if writes == state.gates_checked_at:
        return  # no gate written since the last check: reading them would stall a GPU
    dropped = [name for name, gate in gate_buffers(gates) if name not in kept and gate.item() != 0]
    if dropped:
        raise FxpeftError(f"this fused copy holds only adapters {list(kept)} (fxpeft.fuse drops "
                          f"the adapters that are off), but {', '.join(map(repr, dropped))} "
                          f"{'is' if len(dropped) == 1 else 'are'} active now: fuse again after "
                          f"set_adapter (fxpeft.fuse(gm)), or use fxpeft.fuse(gm, mixed=True), "
                          f"which keeps every adapter")
    state.gates_checked_at = writes


@torch.compiler.disable  # a hook is a frame of its own: never compiled, so it adds no graph break
def index_sample_names(module: torch.nn.Module, args: tuple, kwargs: dict) -> "tuple[tuple, dict]":
    """Forward pre-hook of adapted graphs: ``adapter_names=[names]`` becomes the LongTensor
    ``Gates.index`` gives, before ``torch.compile``'s frame starts. A tensor passes unchanged, as
    do names for a graph that reads no per-sample gates (merged, or prompts only): what reads
    them there refuses them, saying why.

    >>> gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    >>> _ = gate_node(gm, "sql", torch.zeros(1), branch=gm.graph.placeholder("x"))
    >>> _ = gm.graph.call_module(GATES, (None,))  # the per-sample gates (the input adapter feeds them)
    >>> index_sample_names(gm, (), {"adapter_names": ["__base__", "sql"]})[1]
    {'adapter_names': tensor([-1,  0])}
    """
    names = kwargs.get("adapter_names")
    graph = getattr(module, "graph", None)
    if names is None or graph is None or not graph.find_nodes(op="call_module", target=GATES):
        return args, kwargs
    gates = getattr(module, GATES)
    if isinstance(names, torch.Tensor):
        gates.check_index(names)
        return args, kwargs
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return args, kwargs  # the input adapter refuses it, saying why
    return args, {**kwargs, "adapter_names": gates.index(list(names))}


def sample_gate(gate: torch.Tensor, per_sample: "dict[str, torch.Tensor] | None", adapter: str,
                branch: torch.Tensor) -> torch.Tensor:
    """``gate`` itself without per-sample gates; else ``adapter``'s per-sample gates shaped
    ``[B, 1, ...]`` like ``branch`` (repeated for GPT-2 Conv1D's flattened ``[B*S, ...]``).

    >>> x = torch.zeros(4, 3)  # a batch of 2, flattened with 2 positions each
    >>> sample_gate(torch.ones(()), {"a": torch.tensor([1., 0.])}, "a", x).flatten().tolist()
    [1.0, 1.0, 0.0, 0.0]
    """
    if per_sample is None:
        return gate
    gates = per_sample[adapter].to(branch.device, branch.dtype)  # a split model's other device
    if branch.shape[0] != gates.shape[0]:  # rows are samples times positions, batch-major
        gates = gates.repeat_interleave(branch.shape[0] // gates.shape[0])
    return gates.reshape(-1, *[1] * (branch.dim() - 1))


def _gates(gm: torch.nn.Module) -> torch.nn.Module:
    if not hasattr(gm, GATES):
        gm.add_module(GATES, Gates())
    return getattr(gm, GATES)


def _per_sample_node(graph: torch.fx.Graph) -> "torch.fx.Node | None":
    """The ``Gates`` call fed by the input adapter's names, added once; None without an input
    adapter (plain graphs take no ``adapter_names=``)."""
    found = next(iter(graph.find_nodes(op="call_module", target=GATES)), None)
    inputs = next(iter(graph.find_nodes(op="call_module", target=INPUTS_MODULE)), None)
    if found is not None or inputs is None:
        return found
    with graph.inserting_after(inputs):
        names = graph.call_function(operator.getitem, (inputs, -1))
    with graph.inserting_after(names):
        found = graph.call_module(GATES, (names,))
    names.meta[PER_SAMPLE_META] = found.meta[PER_SAMPLE_META] = True
    return found


def gate_node(gm: torch.fx.GraphModule, adapter: str, like: "torch.Tensor | torch.nn.Module",
              branch: "torch.fx.Node | None" = None) -> torch.fx.Node:
    """``adapter``'s gate (created on, the first time), to multiply into a branch: the 0-d
    buffer on ``like``'s device (a tensor's, or a module's first tensor's), or per sample
    (``sample_gate``) shaped like ``branch``, a batch-leading tensor. Without a branch (a
    parameter choice, as ``modules_to_save``) it is the buffer, and the adapter refuses mixed
    batches."""
    like = _new_gate(gm, adapter, like)
    node = gate_attr(gm, adapter, like.device)
    if branch is None:
        _gates(gm).unmixable.add(adapter)
    per_sample = _per_sample_node(gm.graph) if branch is not None else None
    if per_sample is None:
        return node
    node = gm.graph.call_function(sample_gate, (node, per_sample, adapter, branch))
    node.meta[GATE_META] = adapter
    return node


def check_sample_names(gm: torch.fx.GraphModule) -> None:
    """Make the graph read ``adapter_names=`` (its per-sample gates) even where no branch is
    gated per sample, so ``Gates.index`` refuses names for adapters that cannot mix (an
    adapter that changes a whole weight) instead of the names going unread.

    >>> gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    >>> check_sample_names(gm)  # a plain graph takes no adapter_names=: nothing to add
    """
    _per_sample_node(gm.graph)


def _new_gate(gm: torch.fx.GraphModule, adapter: str,
              like: "torch.Tensor | torch.nn.Module") -> torch.Tensor:
    """Create ``adapter``'s gate, on, on ``like``'s device the first time; returns a tensor
    on that device (``like``, or a module's first tensor)."""
    gates = _gates(gm)
    if isinstance(like, torch.nn.Module):
        like = next(iter([*like.parameters(), *like.buffers()]), torch.zeros(()))
    if not hasattr(gates, check_adapter_name(adapter)):
        gates.register_buffer(adapter, torch.ones((), device=like.device), persistent=False)
        gates.opened = _opened(gates) | {adapter}
    return like


def gate_flag(gm: torch.fx.GraphModule, adapter: str,
              like: "torch.Tensor | torch.nn.Module") -> torch.fx.Node:
    """``adapter``'s on/off state (its gate created on, the first time) as a Python bool, for a
    kind whose graph changes shape with it: the ``Gates`` module itself (``get_attr``, so copies
    of the graph share it, and with it the mirror) and ``gate_open`` of it. Such an adapter
    refuses mixed batches.

    >>> gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    >>> flag = gate_flag(gm, "sql", torch.zeros(1)); _ = gm.graph.output(flag); _ = gm.recompile()
    >>> gm(), (set_adapter(gm, []), gm())[1]
    (True, False)
    """
    _new_gate(gm, adapter, like)
    _gates(gm).unmixable.add(adapter)
    gates = gm.graph.get_attr(GATES)
    with gm.graph.inserting_after(gates):
        flag = gm.graph.call_function(gate_open, (gates, adapter))
    gates.meta[GATE_META] = flag.meta[GATE_META] = adapter
    return flag


def gate_attr(gm: torch.fx.GraphModule, adapter: str, device: torch.device) -> torch.fx.Node:
    """A node reading ``adapter``'s (existing) 0-d gate buffer on ``device``.

    >>> gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    >>> _ = gate_node(gm, "sql", torch.zeros(1))
    >>> gate_attr(gm, "sql", torch.device("meta")).target
    'fxpeft_gates._devices.sql_1'
    """
    node = gm.graph.get_attr(f"{GATES}.{gate_on(_gates(gm), adapter, torch.device(device))}")
    node.meta[GATE_META] = adapter
    return node


def reroute(node: torch.fx.Node, new: torch.fx.Node, keep: "set[torch.fx.Node]" = frozenset()) -> None:
    """Send ``node``'s users to ``new`` (which reads ``node``), except per-sample gate reads (they
    use ``node`` only for its shape, and ``new`` comes after them) and the nodes in ``keep`` (a
    branch that reads ``node`` on its way to ``new``).

    >>> graph = torch.fx.Graph(); x = graph.placeholder("x")
    >>> y = graph.call_function(torch.neg, (x,)); z = graph.call_function(torch.abs, (y,))
    >>> reroute(y, w := graph.call_function(torch.relu, (y,))); z.args == (w,)
    True
    >>> branch = graph.call_function(torch.neg, (w,)); total = graph.call_function(torch.add, (w, branch))
    >>> reroute(w, total, keep={branch}); branch.args == (w,) and z.args == (total,)
    True
    """
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new
                               and user.target is not sample_gate and user not in keep)


def drop_unused_per_sample(graph: torch.fx.Graph) -> None:
    """Remove the ``Gates`` call once no gate reads it (its adapters were stripped)."""
    for node in list(graph.find_nodes(op="call_module", target=GATES)):
        if not node.users:
            names = node.args[0]
            graph.erase_node(node)
            graph.erase_node(names)


def adapter_names(gm: torch.nn.Module) -> list[str]:
    """The adapters in ``gm``, in the order they were added."""
    return [name for name, _ in gate_buffers(_gates(gm))] if hasattr(gm, GATES) else []


def active_adapters(gm: torch.nn.Module) -> list[str]:
    return [name for name, gate in gate_buffers(_gates(gm)) if gate.item() != 0] \
        if hasattr(gm, GATES) else []


def set_adapter(gm: torch.nn.Module, names: "str | list[str]") -> None:
    """Make ``names`` (one adapter or several, which then add up) the active adapters."""
    wanted = [names] if isinstance(names, str) else list(names)
    known = adapter_names(gm)
    for name in wanted:
        if name not in known:
            raise FxpeftError(f"no adapter {name!r} in this graph; it has {known}")
    fill_gates(_gates(gm), set(wanted))


@contextlib.contextmanager
def disable_adapters(gm: torch.nn.Module) -> Iterator[None]:
    """Run the base model inside the ``with`` block; the active adapters come back after."""
    was_active = set(active_adapters(gm))
    fill_gates(_gates(gm), set())
    try:
        yield
    finally:
        fill_gates(_gates(gm), was_active)
