"""``gqa_in_sdpa``: grouped-query attention without repeating keys and values.

transformers' SDPA path, when traced, repeats each k/v head for its group of query heads
(``repeat_kv``: ``unsqueeze(2)`` -> ``expand`` -> ``reshape``) before
``aten.scaled_dot_product_attention``. The reshape of the expanded view copies k and v; in a
decode graph they are the whole static KV cache, so every single-token step copied the cache
``n_rep`` times over (a profile of SmolLM2's decode step put 39% of its time in those copies).
SDPA reads grouped heads itself (``enable_gqa=True``), so the pass feeds it the unrepeated
tensors. In a training graph (``fxpeft.fuse``'s ``sdpa_gqa``) this also means SDPA keeps one
copy of each key/value head for backward instead of ``n_rep``. Same result: the kernel
computes the same dot products (tested against PEFT's tokens).
"""

from __future__ import annotations

import sys

import torch
import torch.fx

from fxpeft.capture.program import erase_unused

aten = torch.ops.aten
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _is_full_slice(node: object) -> bool:
    """``x[:, ...]`` as export records it around ``None`` indexing: a slice from 0 to the end."""
    if not isinstance(node, torch.fx.Node) or node.target is not aten.slice.Tensor:
        return False
    start, end, step = (list(node.args[2:]) + [0, sys.maxsize, 1][len(node.args) - 2:])[:3]
    return start in (0, None) and end in (sys.maxsize, None) and step == 1


def _through_full_slices(node: object) -> object:
    while _is_full_slice(node):
        node = node.args[0]
    return node


def _unrepeated(node: object) -> "tuple[torch.fx.Node, int] | None":
    """``(x, n_rep)`` when ``node`` is ``reshape(expand(unsqueeze(x, 2), [b, kv, n_rep, L, d]),
    [b, kv * n_rep, L, d])``; else None."""
    if not isinstance(node, torch.fx.Node) or node.target not in _RESHAPES:
        return None
    expand = node.args[0]
    if not isinstance(expand, torch.fx.Node) or expand.target is not aten.expand.default:
        return None
    unsqueeze = _through_full_slices(expand.args[0])
    if not isinstance(unsqueeze, torch.fx.Node) or unsqueeze.target is not aten.unsqueeze.default \
            or unsqueeze.args[1] != 2:
        return None
    source, shape = _through_full_slices(unsqueeze.args[0]), node.meta.get("val")
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    if value is None or shape is None or value.dim() != 4 or shape.dim() != 4:
        return None
    heads, kv_heads = shape.shape[1], value.shape[1]
    if heads % kv_heads or tuple(shape.shape[2:]) != tuple(value.shape[2:]):
        return None
    return source, heads // kv_heads


def gqa_in_sdpa(gm: torch.fx.GraphModule) -> int:
    """Every SDPA whose k and v are ``repeat_kv`` copies reads the unrepeated k and v with
    ``enable_gqa=True``; returns how many SDPA nodes changed.

    >>> import torch, torch.fx
    >>> class Attend(torch.nn.Module):
    ...     def forward(self, q, k, v):
    ...         rep = lambda x: x[:, :, None].expand(1, 2, 2, 5, 8).reshape(1, 4, 5, 8)
    ...         return torch.nn.functional.scaled_dot_product_attention(q, rep(k), rep(v))
    >>> q, kv = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    >>> gm = torch.export.export(Attend(), (q, kv, kv)).module()
    >>> before = gm(q, kv, kv)
    >>> gqa_in_sdpa(gm), torch.allclose(gm(q, kv, kv), before, atol=1e-6)
    (1, True)
    """
    changed = 0
    for sdpa in list(gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)):
        key, value = _unrepeated(sdpa.args[1]), _unrepeated(sdpa.args[2])
        if key is None or value is None or key[1] != value[1] or sdpa.kwargs.get("enable_gqa"):
            continue
        repeated = sdpa.args[1:3]
        sdpa.args = (sdpa.args[0], key[0], value[0], *sdpa.args[3:])
        sdpa.kwargs = {**sdpa.kwargs, "enable_gqa": True}
        for node in repeated:
            erase_unused(gm.graph, node)
        changed += 1
    if changed:
        gm.recompile()
    return changed
