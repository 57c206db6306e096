"""The named adapters of one graph: their records, ``modules_to_save`` copies, and removal.

``gm.meta["fxpeft"]["adapters"]`` maps each adapter name to an ``AdapterRecord`` (the rules and
matches that built it, and its ``modules_to_save``), which ``fxpeft.save`` writes out.

A ``modules_to_save`` module (PEFT's, e.g. BERT's ``classifier``) gets a fully trainable copy,
``classifier.modules_to_save`` (``modules_to_save_<name>`` for other adapters); each read of an
original parameter becomes ``where(gate, copy, original)``, so the adapter's gate picks the copy.
Every node a pass adds may carry ``"bypass": i`` in its adapter meta: removing the adapter
replaces that node by its ``i``-th argument (the LoRA ``add`` bypasses to ``y``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx

from fxpeft.adapters import adapter_component, register_adapter_names
from fxpeft.errors import FxpeftError
from fxpeft.gates import GATE_META, GATES, drop_unused_per_sample, gate_node
from fxpeft.rules import RuleSet
from fxpeft.transforms.lora import ADAPTER_META

aten = torch.ops.aten
MODULES_TO_SAVE = "modules_to_save"
register_adapter_names(MODULES_TO_SAVE)


@dataclass
class AdapterRecord:
    rules: RuleSet
    matches: list = field(default_factory=list)
    modules_to_save: tuple[str, ...] = ()


def adapter_records(gm: torch.nn.Module) -> dict[str, AdapterRecord]:
    return gm.meta.setdefault("fxpeft", {}).setdefault("adapters", {})


def record(gm: torch.nn.Module, adapter: str) -> AdapterRecord:
    records = adapter_records(gm)
    if adapter not in records:
        raise FxpeftError(f"no adapter {adapter!r} in this graph; it has {sorted(records)}")
    return records[adapter]


def _module_paths(gm: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """PEFT's rule: a module path equal to a name or ending in ``.name``."""
    paths = [p for p, _ in gm.named_modules() if p and any(p == n or p.endswith(f".{n}") for n in names)]
    return [p for p in paths if not any(p.startswith(f"{q}.") for q in paths)]


def _copy_reads(gm: torch.fx.GraphModule, path: str, copy_path: str, adapter: str) -> int:
    graph, reads = gm.graph, [n for n in gm.graph.nodes if n.op == "get_attr"
                              and n.target.startswith(f"{path}.") and GATE_META not in n.meta
                              and ADAPTER_META not in n.meta]
    for node in reads:
        with graph.inserting_before(node.next):  # keeps creation order
            copied = graph.get_attr(copy_path + node.target[len(path):])
            on = graph.call_function(aten.gt.Scalar, (gate_node(gm, adapter, fetch(gm, node.target)), 0))
            chosen = graph.call_function(aten.where.self, (on, copied, node))
        node.replace_all_uses_with(chosen, delete_user_cb=lambda user: user is not chosen)
        meta = {"kind": MODULES_TO_SAVE, "adapter": adapter, "bypass": 2, "base": node.target,
                "copy": copied.target}
        for added in (copied, on, chosen):
            added.meta[ADAPTER_META] = meta
    return len(reads)


def fetch(gm: torch.nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def add_modules_to_save(gm: torch.fx.GraphModule, names: Sequence[str], adapter: str) -> list[str]:
    """Give ``adapter`` a trainable copy of each module ``names`` selects; returns their paths."""
    paths = _module_paths(gm, names)
    for path in paths:
        module = gm.get_submodule(path)
        copied = copy.deepcopy(module)
        for child in [n for n, _ in copied.named_children() if n.startswith(("lora_", MODULES_TO_SAVE))]:
            delattr(copied, child)  # adapters' own submodules are not part of the copy
        copied.requires_grad_(True)  # the base it copies may already be frozen
        name = adapter_component(MODULES_TO_SAVE, adapter)
        module.add_module(name, copied)
        if _copy_reads(gm, path, f"{path}.{name}", adapter) == 0:
            raise FxpeftError(f"modules_to_save: {path!r} has no parameter the graph reads")
    gm.graph.lint()
    gm.recompile()
    return paths


def _drop_target(gm: torch.fx.GraphModule, target: str, adapter: str) -> None:
    owner_path, _, attr = target.rpartition(".")
    owner_name = owner_path.rpartition(".")[2]
    if owner_name.startswith(("lora_", MODULES_TO_SAVE)) and owner_name.endswith(
            "" if adapter == "default" else f"_{adapter}"):
        gm.delete_submodule(owner_path)
    elif hasattr(gm.get_submodule(owner_path), attr) and owner_path != GATES:
        delattr(gm.get_submodule(owner_path), attr)


def _belongs(node: torch.fx.Node, adapters: set[str]) -> bool:
    meta = node.meta.get(ADAPTER_META) or {}
    return meta.get("adapter") in adapters or node.meta.get(GATE_META) in adapters


def strip_adapters(graph: torch.fx.Graph, adapters: set[str]) -> list[str]:
    """Remove ``adapters``' nodes from ``graph`` (bypassing each); returns the targets they read."""
    targets = []
    for node in reversed(list(graph.nodes)):
        if not _belongs(node, adapters):
            continue
        bypass = (node.meta.get(ADAPTER_META) or {}).get("bypass")
        if bypass is None and node.op == "call_function" and node.target == aten.add.Tensor:
            bypass = 0  # a LoRA branch joins the base output here
        if bypass is not None:
            node.replace_all_uses_with(node.args[bypass])
        if not node.users:
            if node.op == "get_attr":
                targets.append(node.target)
            graph.erase_node(node)
    drop_unused_per_sample(graph)
    left = [n.name for n in graph.nodes if _belongs(n, adapters)]
    if left:
        raise FxpeftError(f"cannot remove adapter nodes {left[:3]}: their pass gave no \"bypass\"")
    return targets


def delete_adapter(gm: torch.fx.GraphModule, adapter: str) -> None:
    """Remove ``adapter`` from ``gm``: its nodes, parameters, gate and record."""
    for target in set(strip_adapters(gm.graph, {adapter})):
        if not target.startswith(f"{GATES}."):
            _drop_target(gm, target, adapter)
    gates = getattr(gm, GATES, None)
    if gates is not None and hasattr(gates, adapter):
        delattr(gates, adapter)
    adapter_records(gm).pop(adapter, None)
    gm.graph.lint()
    gm.recompile()
