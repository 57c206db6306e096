"""LoRA on a bare parameter (PEFT's ``target_parameters``), where the graph reads it.

At a ``parameter`` site (``fxpeft.match.parameter_sites``) the read of ``W`` becomes
``W + scale * ΔW`` with ``ΔW`` built from A and B in the graph, so every op that reads ``W`` (a
matmul, a mixture-of-experts layer's ``index`` + ``bmm`` or grouped matmul) computes with the
adapted weight, as PEFT's ``ParamWrapper`` does by re-parametrising the module. The layout is
PEFT's: for ``W`` of shape ``[out, in]``, A ``[r, in]`` and B ``[out, r]``, ``ΔW = B @ A``; for
stacked experts ``[E, out, in]``, A ``[r*E, in]`` (expert ``e`` owns rows ``e*r .. e*r+r``) and B
``[out, r*E]`` (expert ``e`` owns columns ``e, e+E, ...``), ``ΔW[e] = B_e @ A_e``.

Where several parameters of one module are adapted, PEFT nests one wrapper per parameter, the
first one (in the module's registration order) innermost, so their A and B live under
``base_layer.`` prefixes; fxpeft attaches them at the same paths (``_nest``), so saved keys are
PEFT's. ``ΔW`` is gated as a whole: such an adapter refuses mixed batches, as PEFT's does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from fxpeft.errors import FxpeftError
from fxpeft.graph.gates import GATE_META, check_sample_names, gate_node
from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch
from fxpeft.match.parameter_sites import ParameterSite
from fxpeft.names import ADAPTER_META, AdapterNode, adapter_component
from fxpeft.registry import SpliceInput, Spliced

aten = torch.ops.aten
NEST = "base_layer"


@dataclass(frozen=True)
class ParameterDetail:
    """What merge needs of LoRA on one parameter: W's, A's and B's targets, the scale, and
    ``experts`` (0 for a 2-d W)."""

    scale: float
    weight: str
    lora_A: str
    lora_B: str
    experts: int = 0
    groups = 1
    fan_in_fan_out = False
    lora_bias = None  # LoRA's lora_bias: never on a parameter


def _pair(site: ParameterSite, rank: int, init: str,
          factory: dict[str, Any]) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """PEFT's A (kaiming-uniform) ``[r*E, in]`` and B (zeros unless ``random``) ``[out, r*E]``."""
    experts, out, inputs = (site.shape if len(site.shape) == 3 else (1, *site.shape))
    lora_a = torch.nn.Linear(inputs, rank * experts, bias=False, **factory)
    lora_b = torch.nn.Linear(rank * experts, out, bias=False, **factory)
    if init == "default":
        torch.nn.init.zeros_(lora_b.weight)
    return lora_a, lora_b


def _depth_path(owner: str, depth: int) -> str:
    return ".".join([owner, *[NEST] * depth]) if owner else ".".join([NEST] * depth)


def _ensure_path(gm: torch.nn.Module, owner: str, depth: int) -> str:
    """The module at ``owner`` + ``depth`` times ``.base_layer`` (plain modules created)."""
    parent = gm
    for name in owner.split(".") if owner else ():
        if name not in parent._modules:
            parent.add_module(name, torch.nn.Module())
        parent = parent._modules[name]
    for level in range(1, depth + 1):
        parent = gm.get_submodule(_depth_path(owner, level - 1))
        if NEST not in parent._modules:
            parent.add_module(NEST, torch.nn.Module())
    return _depth_path(owner, depth)


def _records_at(gm: torch.fx.GraphModule, adapter: str, owner: str) -> list[tuple[torch.fx.Node, AdapterNode]]:
    return [(n, n.meta[ADAPTER_META]) for n in gm.graph.nodes
            if isinstance(getattr(n.meta.get(ADAPTER_META), "detail", None), ParameterDetail)
            and n.meta[ADAPTER_META].adapter == adapter
            and n.meta[ADAPTER_META].detail.weight.rpartition(".")[0] == owner]


def _nest(gm: torch.fx.GraphModule, adapter: str, owner: str, names: tuple[str, str],
          home: str) -> list[str]:
    """Move ``adapter``'s A and B of every adapted parameter of ``owner`` to PEFT's nesting: the
    k-th of n (registration order) under ``n - 1 - k`` ``base_layer`` prefixes; the graph's
    reads and the records follow; ``home`` is where they live (the owner, or PEFT's path for
    it). Returns the new deepest A and B paths (the slots the set of paths gained)."""
    records = _records_at(gm, adapter, owner)
    order = list(gm.get_submodule(owner)._parameters)
    details = sorted({r.detail.weight: r.detail for _, r in records}.values(),
                     key=lambda d: order.index(d.weight.rpartition(".")[2]))
    moved: dict[str, str] = {}  # old module path -> new
    for depth, detail in zip(range(len(details) - 1, -1, -1), details):
        for target, base in ((detail.lora_A, names[0]), (detail.lora_B, names[1])):
            new = f"{_ensure_path(gm, home, depth)}.{adapter_component(base, adapter)}"
            moved[target.rpartition(".")[0]] = new
    modules = {old: gm.get_submodule(old) for old in moved}
    for old in moved:  # detach all first: two may swap places
        parent, _, name = old.rpartition(".")
        delattr(gm.get_submodule(parent), name)
    for old, new in moved.items():
        parent, _, name = new.rpartition(".")
        gm.get_submodule(parent).add_module(name, modules[old])
    _retarget(gm, records, {f"{old}.weight": f"{new}.weight" for old, new in moved.items()})
    deepest = _depth_path(home, len(details) - 1)
    return [f"{deepest}.{adapter_component(base, adapter)}" for base in names]


def _retarget(gm: torch.fx.GraphModule, records: list, moved: dict[str, str]) -> None:
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in moved:
            node.target = moved[node.target]
    for node, record in records:
        detail = dataclasses.replace(record.detail, lora_A=moved.get(record.detail.lora_A, record.detail.lora_A),
                                     lora_B=moved.get(record.detail.lora_B, record.detail.lora_B))
        node.meta[ADAPTER_META] = dataclasses.replace(record, detail=detail)


def _free_depth(gm: torch.nn.Module, adapter: str, owner: str, name: str) -> int:
    """The first depth under ``owner`` where ``adapter`` has no ``name`` (A) yet."""
    depth = 0
    while adapter_component(name, adapter) in _submodules(gm, _depth_path(owner, depth)):
        depth += 1
    return depth


def _submodules(gm: torch.nn.Module, path: str) -> dict[str, Any]:
    try:
        return gm.get_submodule(path)._modules
    except AttributeError:
        return {}


def _attach(job: SpliceInput, dtype: torch.dtype, names: tuple[str, str]) -> ParameterDetail:
    site = job.site
    weight = fetch(job.gm, site.weight_target)
    lora_a, lora_b = _pair(site, job.params.r, job.params.init, {"dtype": dtype, "device": weight.device})
    home = site.adapter_owner
    path = _ensure_path(job.gm, home, _free_depth(job.gm, job.adapter, home, names[0]))
    a_path = attach_component(job.gm, path, names[0], job.adapter, lora_a)
    b_path = attach_component(job.gm, path, names[1], job.adapter, lora_b)
    return ParameterDetail(job.params.scale * site.delta_factor, site.weight_target, f"{a_path}.weight", f"{b_path}.weight",
                           site.shape[0] if len(site.shape) == 3 else 0)


def _delta_nodes(graph: torch.fx.Graph, detail: ParameterDetail, lora_a: torch.fx.Node,
                 lora_b: torch.fx.Node, rank: int) -> torch.fx.Node:
    """``ΔW`` (unscaled) in the graph: ``B @ A``, or per expert ``B_e @ A_e`` as one ``bmm``."""
    if not detail.experts:
        return graph.call_function(aten.mm.default, (lora_b, lora_a))
    experts = detail.experts
    per_a = graph.call_function(aten.view.default, (lora_a, [experts, rank, -1]))
    per_b = graph.call_function(aten.view.default, (lora_b, [-1, rank, experts]))
    per_b = graph.call_function(aten.permute.default, (per_b, [2, 0, 1]))
    return graph.call_function(aten.bmm.default, (per_b, per_a))


def splice(job: SpliceInput, dtype: torch.dtype, names: tuple[str, str],
           record: Callable[..., list[torch.fx.Node]]) -> Spliced:
    """Make the parameter's reads yield ``W + scale * gate * ΔW`` (``ΔW`` cast to W's dtype, as
    PEFT adds it); ``names`` are LoRA's A and B names, ``record`` its ``record_nodes``."""
    # PEFT: dropout cannot act on x through a weight update; on an attention layer's weights
    # PEFT takes the config's lora_dropout and, merging before the call, never applies it
    if job.params.dropout > 0 and not job.site.attention:
        raise FxpeftError(f"{job.site.module_path}: LoRA on a parameter cannot have dropout "
                          f"(got {job.params.dropout}), as in PEFT")
    detail, graph, read = _attach(job, dtype, names), job.gm.graph, job.site.node
    weight = fetch(job.gm, detail.weight)
    with graph.inserting_before(read.next):
        lora_a = graph.get_attr(detail.lora_A)
        gate = gate_node(job.gm, job.adapter, weight)
    check_sample_names(job.gm)  # names are refused, not ignored: one weight for the whole batch
    with graph.inserting_before(gate.next):
        gated = graph.call_function(aten.mul.Tensor, (lora_a, gate))
        gated.meta[GATE_META] = job.adapter
        delta = _delta_nodes(graph, detail, gated, graph.get_attr(detail.lora_B), job.params.r)
        delta = graph.call_function(aten.mul.Tensor, (delta, detail.scale))
        if dtype != weight.dtype:
            delta = graph.call_function(aten._to_copy.default, (delta,), {"dtype": weight.dtype})
        total = graph.call_function(aten.add.Tensor, (read, delta))
    for other in job.site.reads:
        other.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    added = record(job, read, total, "lora", detail)
    return Spliced(added, _nest(job.gm, job.adapter, job.site.owner, names, job.site.adapter_owner))


def parameter_delta(gm: torch.nn.Module, detail: ParameterDetail) -> torch.Tensor:
    """``scale * ΔW`` in fp32, W's shape (for merge).

    >>> gm = torch.nn.Module(); gm.A, gm.B = torch.nn.Linear(3, 2), torch.nn.Linear(2, 4)
    >>> parameter_delta(gm, ParameterDetail(0.5, "w", "A.weight", "B.weight")).shape
    torch.Size([4, 3])
    """
    lora_a, lora_b = fetch(gm, detail.lora_A).detach().float(), fetch(gm, detail.lora_B).detach().float()
    if not detail.experts:
        return lora_b @ lora_a * detail.scale
    rank = lora_a.shape[0] // detail.experts
    per_a = lora_a.view(detail.experts, rank, -1)
    per_b = lora_b.view(lora_b.shape[0], rank, detail.experts).permute(2, 0, 1)
    return torch.bmm(per_b, per_a) * detail.scale
