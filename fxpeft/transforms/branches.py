"""The shape of a low-rank branch, as the fuse passes (``fuse``, ``slots``) read it, and the
per-sample low-rank product a mixed batch runs. Kinds offer the branch through the ``low_rank``
capability (``fxpeft.registry.LowRankBranch``); this module checks the graph around it.
"""

from __future__ import annotations

import torch
import torch.fx

from fxpeft.graph.patterns import Op, Var, match
from fxpeft.names import GATE_META, adapter_node
from fxpeft.registry import low_rank_branch

aten = torch.ops.aten


def low_rank_join(node: torch.fx.Node) -> bool:
    record = adapter_node(node)
    return low_rank_branch(record) is not None and record.removable


# y + B(A x * g) * s, the branch of a low-rank kind (its join is the removable node)
SCALED_BRANCH = Op(None, (Var("y"), Op(aten.mul.Tensor, (
    Op(aten.linear.default, (Op(aten.mul.Tensor, (Var("down"), Var("gate")), name="gated",
                                single_user=True, where=lambda n: GATE_META in n.meta),
                             Var("B")), name="up", single_user=True),
    Var("scale")), single_user=True)), name="join", where=low_rank_join)


def per_sample_low_rank(x: torch.Tensor, downs: torch.Tensor, ups: torch.Tensor) -> torch.Tensor:
    """``x @ down @ up`` with each sample's own ``down`` (``[batch, in, rank]``) and ``up``
    (``[batch, rank, out]``): two batched matmuls, whatever the number of adapters. ``x`` is
    batch-major (``[batch, ..., in]``, or GPT-2's flattened ``[batch * tokens, in]``).

    >>> x = torch.ones(2, 3, 4)
    >>> per_sample_low_rank(x, torch.ones(2, 4, 1), torch.tensor([[[1.]], [[0.]]])).sum((1, 2))
    tensor([12.,  0.])
    """
    xs = x.reshape(downs.shape[0], -1, x.shape[-1])
    up = torch.bmm(torch.bmm(xs, downs), ups)
    return up.reshape(*x.shape[:-1], up.shape[-1])


def gatherable_joins(gm: torch.fx.GraphModule, least: int = 2) -> dict[str, list[torch.fx.Node]]:
    """Per site with at least ``least`` adapters, the plain LoRA joins (no dropout, no cast),
    when every branch reads one input."""
    joins: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        record = adapter_node(node)
        if low_rank_branch(record) is not None and record.removable:
            joins.setdefault(record.module_path, []).append(node)
    plain = {}
    for path, found in joins.items():
        inputs = {branch_input(j) for j in found}
        if len(found) >= least and None not in inputs and len(inputs) == 1 and \
                all(j.target == aten.add.Tensor for j in found):
            plain[path] = found
    return plain


def branch_input(join: torch.fx.Node) -> torch.fx.Node | None:
    """What the down-projection of a ``SCALED_BRANCH`` reads, or None for another shape."""
    found = match(SCALED_BRANCH, join)
    down = found["down"] if found is not None else None
    return down.args[0] if isinstance(down, torch.fx.Node) and down.args else None
