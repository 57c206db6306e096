"""Preallocated adapter slots: many LoRA adapters served from one (compiled) graph.

``fxpeft.fuse(gm, mixed=True, slots=256, slot_rank=16)`` is a serving copy of ``gm``. At each
site its adapters adapt, the copy holds two stacks allocated once: ``[slots + 1, in, slot_rank]``
down projections and ``[slots + 1, slot_rank, out]`` up projections (the scale folded in). The
graph gathers each sample's rows by its slot index (``adapter_names=``, ``"__base__"`` reads the
extra row, always zeros) and runs two batched matmuls: the same work however many adapters are
loaded (the Punica / S-LoRA idea).

Loading an adapter (``load_into_slot``) writes its rows into a free slot in place, its rank
zero-padded up to ``slot_rank`` (exact: the padding adds zeros); unloading (``unload_slot``)
zeros them and frees the slot. Neither touches the other slots, nor the graph: a compiled copy
does not recompile (the stacks are the same tensors; which slot a name means is resolved by a
forward pre-hook, outside the compiled frame, into an index tensor).

Only plain low-rank branches fit a slot (``scale * B(A x)`` on a linear layer: the ``low_rank``
capability, no bias, no magnitude, no embedding); other adapters are refused by name.

>>> import torch, fxpeft
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
...                          num_hidden_layers=1, num_attention_heads=2))
>>> gm = fxpeft.rewrite(model, "lora_qv", dropout=0.0).eval()
>>> served = fxpeft.fuse(gm, mixed=True, slots=4, slot_rank=8)
>>> served.fxpeft_slots.names
['default', None, None, None]
>>> fxpeft.load_into_slot(served, gm, "default", name="copy")
1
>>> served(torch.tensor([[1, 2], [3, 4]]), adapter_names=["copy", "__base__"]).logits.shape
torch.Size([2, 2, 32])
"""

from __future__ import annotations

import torch
import torch.fx

from fxpeft.errors import FxpeftError
from fxpeft.graph.gates import adapter_names, check_adapter_name
from fxpeft.graph.patterns import match
from fxpeft.names import BASE_ADAPTER, GATES, SLOTS, adapter_node
from fxpeft.registry import LowRankBranch, low_rank_branch
from fxpeft.transforms.branches import SCALED_BRANCH, branch_input, gatherable_joins, per_sample_low_rank

aten = torch.ops.aten
Plain = tuple[torch.Tensor, torch.Tensor, float]  # one site's (A [r, in], B [out, r], scale)


class Slots(torch.nn.Module):
    """A serving copy's slots: per site, the stacked down and up rows (buffers ``site<n>_down``
    and ``site<n>_up``, one row more than ``capacity``: the zeros ``"__base__"`` reads), and
    which adapter each slot holds (``names``, None: free). Called with the per-sample slot
    indices, it returns them; ``index`` turns names into them.

    >>> slots = Slots(2, 4); slots.names[1] = "sql"
    >>> slots.index(["sql", "__base__"])
    tensor([ 1, -1])
    >>> slots.index(["chat"])
    Traceback (most recent call last):
    ...
    ValueError: adapter_names has adapters ['chat'] in no slot; the slots hold ['sql'] (and '__base__'): load them with fxpeft.load_into_slot
    """

    needs_names = ("this serving copy (fxpeft.fuse(..., slots=)) runs each sample with its own "
                   "slot's adapter: pass adapter_names= (a loaded adapter or '__base__' per sample)")

    def __init__(self, capacity: int, rank: int) -> None:
        super().__init__()
        self.capacity, self.rank = capacity, rank
        self.names: list[str | None] = [None] * capacity
        self.sites: dict[str, str] = {}  # module path -> buffer prefix

    def add_site(self, path: str, features_in: int, features_out: int, like: torch.Tensor) -> str:
        """Allocate ``path``'s stacks, zeros in ``like``'s dtype and device; their prefix."""
        key = f"site{len(self.sites)}"
        rows = self.capacity + 1
        self.register_buffer(f"{key}_down", like.new_zeros(rows, features_in, self.rank), persistent=False)
        self.register_buffer(f"{key}_up", like.new_zeros(rows, self.rank, features_out), persistent=False)
        self.sites[path] = key
        return key

    def index(self, names: list[str]) -> torch.Tensor:
        """Each name's slot, -1 for ``"__base__"``, checked."""
        loaded = [n for n in self.names if n is not None]
        unknown = sorted(set(names) - set(loaded) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(f"adapter_names has adapters {unknown} in no slot; the slots hold "
                             f"{loaded} (and {BASE_ADAPTER!r}): load them with fxpeft.load_into_slot")
        device = next(self.buffers(), torch.zeros(())).device
        return torch.tensor([self.names.index(n) if n != BASE_ADAPTER else -1 for n in names],
                            device=device)

    def check_index(self, index: torch.Tensor) -> None:
        """Slot indices given as ``adapter_names=``: each in range, or -1."""
        if index.is_floating_point():
            return  # the input adapter refuses it, naming the dtype
        wrong = index[(index < -1) | (index >= self.capacity)]
        if wrong.numel():
            raise ValueError(f"adapter_names as a tensor holds slot indices in [0, {self.capacity}) "
                             f"or -1 ({BASE_ADAPTER!r}); got {wrong.flatten()[0].item()}")

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return index


def slotted_lora(x: torch.Tensor, downs: torch.Tensor, ups: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
    """One site's LoRA for every sample: its slot's rows, gathered (-1 reads the zero row)."""
    return per_sample_low_rank(x, downs[index], ups[index])


def _plain(found: dict, branch: LowRankBranch) -> bool:
    """A matched ``SCALED_BRANCH`` whose down and up projections are plain linears of A and B."""
    down, up = found["down"], found["up"]
    return getattr(down, "target", None) == aten.linear.default and len(down.args) == 2 and \
        getattr(down.args[1], "target", None) == branch.down and \
        getattr(up.args[1], "target", None) == branch.up


def plain_branches(gm: torch.fx.GraphModule, adapter: str) -> dict[str, Plain]:
    """``adapter``'s branches in ``gm``, per module path, when every one of them is a plain
    low-rank branch; a ``FxpeftError`` naming where it is not."""
    found: dict[str, Plain] = {}
    other: list[str] = []
    for node in gm.graph.nodes:
        record = adapter_node(node)
        if record is None or record.adapter != adapter or not record.removable:
            continue
        branch = low_rank_branch(record)
        parts = match(SCALED_BRANCH, node) if branch is not None else None
        if parts is None or not _plain(parts, branch):
            other.append(record.module_path)
            continue
        found[record.module_path] = (gm.get_parameter(branch.down).detach(),
                                     gm.get_parameter(branch.up).detach(), branch.scale)
    if other:
        raise FxpeftError(f"adapter {adapter!r} is not plain LoRA at {other[:3]}: slots hold "
                          f"low-rank branches scale * B(A x) of linear layers (no bias, magnitude "
                          f"or embedding)")
    if not found:
        raise FxpeftError(f"no LoRA adapter {adapter!r} in this graph; it has {adapter_names(gm)}")
    return found


def _check_fits(slots: Slots, adapter: str, branches: dict[str, Plain]) -> None:
    outside = sorted(set(branches) - set(slots.sites))
    if outside:
        raise FxpeftError(f"adapter {adapter!r} adapts {outside[:3]}, where this serving copy has "
                          f"no slots (it has them where the adapters it was fused with were)")
    for path, (lora_a, lora_b, _) in branches.items():
        down = slots.get_buffer(f"{slots.sites[path]}_down")
        if lora_a.shape[0] > slots.rank:
            raise FxpeftError(f"adapter {adapter!r} has rank {lora_a.shape[0]} at {path}; the slots "
                              f"hold rank {slots.rank} at most (fxpeft.fuse(..., slot_rank=))")
        if (lora_a.shape[1], lora_b.shape[0]) != (down.shape[1], slots.get_buffer(
                f"{slots.sites[path]}_up").shape[2]):
            raise FxpeftError(f"adapter {adapter!r} at {path} is {lora_b.shape[0]}x{lora_a.shape[1]}; "
                              f"the slots there are {down.shape[2]}x{down.shape[1]}")


@torch.no_grad()
def _write(slots: Slots, slot: int, branches: dict[str, Plain]) -> None:
    """Slot ``slot``'s rows at every site: the branch's A and scale * B, zero-padded (zeros where
    the adapter has no branch). Only this slot's rows are written."""
    for path, key in slots.sites.items():
        down, up = slots.get_buffer(f"{key}_down")[slot], slots.get_buffer(f"{key}_up")[slot]
        down.zero_()
        up.zero_()
        if path in branches:
            lora_a, lora_b, scale = branches[path]
            rank = lora_a.shape[0]
            down[:, :rank].copy_(lora_a.T)
            up[:rank].copy_(lora_b.T * scale)


def _slots_of(served: torch.nn.Module) -> Slots:
    slots = getattr(served, SLOTS, None)
    if not isinstance(slots, Slots):
        raise FxpeftError("this graph has no adapter slots; make a serving copy with "
                          "fxpeft.fuse(gm, mixed=True, slots=...)")
    return slots


def load_into_slot(served: torch.nn.Module, source: torch.fx.GraphModule, adapter: str,
                   name: str | None = None) -> int:
    """Write ``source``'s LoRA adapter ``adapter`` into a free slot of the serving copy
    ``served`` (``fxpeft.fuse(gm, mixed=True, slots=...)``), as ``name`` (default: ``adapter``),
    in place: no other slot is copied, and a compiled ``served`` does not recompile. ``source``
    is any adapted graph of the same base model (``gm.load_adapter(folder, "x")`` reads a PEFT
    folder into one). Returns the slot; ``adapter_names=[name, ...]`` then selects it.

    >>> import torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> gm = fxpeft.rewrite(model, "lora_qv", dropout=0.0, r=4).eval()
    >>> served = fxpeft.fuse(gm, mixed=True, slots=2, slot_rank=4)
    >>> fxpeft.load_into_slot(served, gm, "default", name="again")
    1
    >>> fxpeft.load_into_slot(served, gm, "default", name="third")
    Traceback (most recent call last):
    ...
    fxpeft.errors.FxpeftError: all 2 slots are full (['default', 'again']); unload one (fxpeft.unload_slot) or fuse with more slots=
    """
    slots = _slots_of(served)
    name = check_adapter_name(adapter if name is None else name)
    if name in slots.names:
        raise FxpeftError(f"slot {slots.names.index(name)} already holds {name!r}; unload it "
                          f"first (fxpeft.unload_slot) or load under another name=")
    if None not in slots.names:
        raise FxpeftError(f"all {slots.capacity} slots are full ({slots.names}); unload one "
                          f"(fxpeft.unload_slot) or fuse with more slots=")
    branches = plain_branches(source, adapter)
    _check_fits(slots, adapter, branches)
    slot = slots.names.index(None)
    _write(slots, slot, branches)
    slots.names[slot] = name
    return slot


def unload_slot(served: torch.nn.Module, name: str) -> int:
    """Free the slot holding ``name`` in the serving copy ``served`` (its rows become zeros, in
    place; the others are untouched); returns the slot.

    >>> import torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> served = fxpeft.fuse(fxpeft.rewrite(model, "lora_qv").eval(), mixed=True, slots=2)
    >>> fxpeft.unload_slot(served, "default"), served.fxpeft_slots.names
    (0, [None, None])
    """
    slots = _slots_of(served)
    if name not in slots.names:
        raise FxpeftError(f"no slot holds {name!r}; the slots hold "
                          f"{[n for n in slots.names if n is not None]}")
    slot = slots.names.index(name)
    _write(slots, slot, {})
    slots.names[slot] = None
    return slot


def _replace_site(gm: torch.fx.GraphModule, slots: Slots, path: str, joins: list[torch.fx.Node],
                  index: torch.fx.Node) -> None:
    """The site's LoRA branches, of every adapter, become one ``slotted_lora`` call."""
    graph, branch = gm.graph, low_rank_branch(adapter_node(joins[0]))
    lora_a, lora_b = gm.get_parameter(branch.down), gm.get_parameter(branch.up)
    key = slots.add_site(path, lora_a.shape[1], lora_b.shape[0], lora_a.detach())
    with graph.inserting_before(joins[0]):
        downs, ups = graph.get_attr(f"{SLOTS}.{key}_down"), graph.get_attr(f"{SLOTS}.{key}_up")
        lora = graph.call_function(slotted_lora, (branch_input(joins[0]), downs, ups, index))
        total = graph.call_function(aten.add.Tensor, (joins[0].args[0], lora))
    joins[-1].replace_all_uses_with(total)


def slot_lora(gm: torch.fx.GraphModule) -> int:
    """Every site's LoRA branches read the stacks of ``gm``'s slots instead (its ``SLOTS``
    module, added empty by ``serving_copy``; without one, nothing changes); ``gm``'s own
    adapters fill the first slots. Refuses adapters that are not plain LoRA, and graphs without
    per-sample names."""
    slots = getattr(gm, SLOTS, None)
    if not isinstance(slots, Slots):
        return 0
    per_sample = next(iter(gm.graph.find_nodes(op="call_module", target=GATES)), None)
    if per_sample is None:
        raise FxpeftError("slots serve per-sample adapters (adapter_names=), which only graphs "
                          "captured from transformers models take")
    loaded = {name: plain_branches(gm, name) for name in adapter_names(gm)}
    if len(loaded) > slots.capacity:
        raise FxpeftError(f"{len(loaded)} adapters do not fit {slots.capacity} slots")
    with gm.graph.inserting_after(per_sample):
        index = gm.graph.call_module(SLOTS, (per_sample.args[0],))
    sites = gatherable_joins(gm, least=1)
    for path, joins in sites.items():
        _replace_site(gm, slots, path, joins, index)
    gm.graph.eliminate_dead_code()
    for name, branches in loaded.items():
        _check_fits(slots, name, branches)
        slot = slots.names.index(None)
        _write(slots, slot, branches)
        slots.names[slot] = name
    return len(sites)
