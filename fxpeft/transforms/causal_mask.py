"""``causal_mask``: SDPA's ``is_causal`` instead of a 4-D mask when the attention mask is all ones.

The captured graph always builds transformers' 4-D mask from the 2-D ``attention_mask`` (the
input adapter fills ones when it is absent) and hands it to every SDPA call. Eager transformers
skips that when the mask is absent or all ones and calls SDPA with ``is_causal=True``. The pass
does the same in a fused copy: the nodes that only build the mask move into a submodule
(``fxpeft_causal_mask_<i>``) that returns None when the caller's mask is absent (under
``torch.compile``, a guard: one graph with, one without) or, outside compilation, all ones; each
SDPA call that reads the mask then runs causal. It applies only where that is exact: checked at
fuse time by building the mask for all-ones inputs of two lengths and comparing SDPA with it to
causal SDPA, and never for sliding-window or chunked attention (a window wider than the lengths
checked would pass the check).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx

from fxpeft.match.input_embedding import input_adapter, input_placeholder
from fxpeft.runtime.masks import CHECK_LENGTHS, PackedMask, mask_builder, mask_node, windowed
from fxpeft.transforms.checkpoint import region_of

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default


def masked_or_causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                          is_causal: bool = False, *, scale: Optional[float] = None,
                          enable_gqa: bool = False) -> torch.Tensor:
    """SDPA with ``attn_mask``, or causal SDPA when the mask is None (all ones).

    >>> q = torch.randn(1, 2, 4, 8)
    >>> torch.allclose(masked_or_causal_sdpa(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    True
    """
    return aten.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                             is_causal or attn_mask is None, scale=scale,
                                             enable_gqa=enable_gqa)


class CausalMask(torch.nn.Module):
    """The mask-building nodes of a graph, run only when the 2-D mask has a zero, or when the
    caller gave ``position_ids`` to a graph that packs sequences (``fxpeft.runtime.masks``)."""

    def __init__(self, body: torch.fx.GraphModule) -> None:
        super().__init__()
        self.body = body

    def forward(self, given: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                *inputs: Any) -> Optional[torch.Tensor]:
        if positions is None and (given is None or (not torch.compiler.is_compiling() and bool(given.all()))):
            return None
        return self.body(*inputs)[0]


def _only_for(mask: torch.fx.Node) -> list[torch.fx.Node]:
    """``mask`` and the nodes before it whose every use leads only to it, in graph order."""
    inside = {mask}
    for node in reversed(list(mask.graph.nodes)):
        if node.op == "call_function" and node.users and all(u in inside for u in node.users):
            inside.add(node)
    return [n for n in mask.graph.nodes if n in inside]


def _is_causal(gm: torch.fx.GraphModule, mask: torch.fx.Node) -> bool:
    """SDPA with ``mask`` built for all-ones inputs equals causal SDPA, at two lengths."""
    generator, builder = torch.Generator().manual_seed(0), mask_builder(gm, mask)
    for length in CHECK_LENGTHS:
        try:  # a batch of 2 sequences of ``length`` tokens and no attention mask
            built = builder(torch.ones(2, length, dtype=torch.long))
        except Exception:  # the mask needs inputs a plain call does not give: leave it
            return False
        if built.dim() != 4 or built.shape[-2] != built.shape[-1]:
            return False  # keys other than the queries (prompt tokens, a cache): not plain causal
        q, k, v = (torch.randn(2, 2, built.shape[-1], 8, generator=generator) for _ in range(3))
        masked = torch.nn.functional.scaled_dot_product_attention(q, k, v, built.to(q.device))
        causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        if not torch.allclose(masked, causal, atol=1e-6):
            return False
    return True


def causal_mask(gm: torch.fx.GraphModule) -> int:
    """Causal SDPA where the caller's mask is absent or all ones; returns the SDPA calls changed.

    >>> import fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> gm = fxpeft.rewrite(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
    ...     vocab_size=32, num_hidden_layers=2, num_attention_heads=2)), "lora_qv")
    >>> copy = fxpeft.transforms.fuse._copy(gm)
    >>> causal_mask(copy)
    2
    """
    given, info = input_placeholder(gm.graph, "attention_mask"), getattr(gm, "capture_info", None)
    if given is None or input_adapter(gm.graph) is None or info is None or windowed(info.config):
        return 0
    readers: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for sdpa in gm.graph.find_nodes(op="call_function", target=_SDPA):
        mask = mask_node(sdpa)
        if isinstance(mask, torch.fx.Node) and not sdpa.kwargs.get("is_causal", False):
            readers.setdefault(mask, []).append(sdpa)
    changed = 0
    for index, (mask, sdpas) in enumerate(readers.items()):
        if set(mask.users) == set(sdpas) and _is_causal(gm, mask):  # None must reach SDPA only
            _outline(gm, mask, f"fxpeft_causal_mask_{index}", given, _packs_positions(gm))
            for sdpa in sdpas:
                sdpa.target = masked_or_causal_sdpa
            changed += len(sdpas)
    return changed


def _packs_positions(gm: torch.fx.GraphModule) -> Optional[torch.fx.Node]:
    """The caller's ``position_ids`` where the graph packs sequences with them, else None."""
    packs = any(isinstance(m, PackedMask) for m in gm.modules())
    return input_placeholder(gm.graph, "position_ids") if packs else None


def _outline(gm: torch.fx.GraphModule, mask: torch.fx.Node, target: str, given: torch.fx.Node,
             positions: Optional[torch.fx.Node]) -> None:
    """Move the nodes that only build ``mask`` into a ``CausalMask`` submodule at ``target``."""
    region = region_of(_only_for(mask))
    gm.add_submodule(target, CausalMask(torch.fx.GraphModule(gm, region.graph)))
    with gm.graph.inserting_before(mask):
        call = gm.graph.call_module(target, (given, positions, *region.inputs))
    call.meta = {k: v for k, v in mask.meta.items() if k != "val"}
    mask.replace_all_uses_with(call)
    for node in reversed(region.nodes):
        gm.graph.erase_node(node)
