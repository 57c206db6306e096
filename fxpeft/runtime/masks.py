"""The attention masks of an emitted graph: finding them, rebuilding one for given inputs, and
packed sequences.

Capture runs the model with an ``attention_mask``, so the graph builds transformers' 4-D mask from
it, and never the block-diagonal mask transformers builds from restarting ``position_ids`` when
no ``attention_mask`` is given (a padding-free packed batch, ``masking_utils``). Where the eager
model does that (``CaptureInfo.packs``), ``route_packed`` gives each SDPA mask a ``PackedMask``
in front: with ``position_ids`` and no ``attention_mask`` from the caller it returns the
packed mask, else the captured one. It applies to masks checked, for all-ones inputs of two
lengths, to be plain causal or fully visible (bidirectional); a graph whose mask is neither
(sliding windows, chunks, prompt tokens) refuses packed batches with a one-line error.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx

from fxpeft.errors import FxpeftError
from fxpeft.match.input_embedding import input_adapter, input_placeholder
from fxpeft.names import INPUTS_MODULE

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
CHECK_LENGTHS = (5, 12)
PACKED_MASK_MODULE = "fxpeft_packed_mask"


class PackedBatchError(FxpeftError):
    """A packed batch (``position_ids`` restarting, no ``attention_mask``) the graph cannot mask."""


def windowed(config: Any) -> bool:
    """Whether ``config`` asks for sliding-window or chunked attention in any layer."""
    types = set(getattr(config, "layer_types", None) or ())
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return bool(types - {"full_attention"} or sliding or getattr(config, "attention_chunk_size", None))


def mask_node(sdpa: torch.fx.Node) -> object:
    """The ``attn_mask`` argument of an SDPA call."""
    return sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)


def ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(current.all_input_nodes)
    return seen


def mask_builder(gm: torch.fx.GraphModule, mask: torch.fx.Node) -> torch.fx.GraphModule:
    """A module that computes ``mask`` from the graph's inputs (``builder(input_ids)``)."""
    sub, needed = torch.fx.Graph(), ancestors(mask) | {mask}
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = sub.node_copy(node, env.__getitem__)
    sub.output(env[mask])
    sub._codegen = gm.graph._codegen
    return torch.fx.GraphModule(gm, sub)


def visible(mask: torch.Tensor) -> torch.Tensor:
    """Which keys each query sees, for a boolean mask or an additive one (0 or a large negative)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def mask_shape(gm: torch.fx.GraphModule, mask: torch.fx.Node) -> Optional[str]:
    """``"causal"`` or ``"bidirectional"`` when ``mask``, built for all-ones inputs of two
    lengths, is that (square and the same in every row of the batch), else None."""
    builder = mask_builder(gm, mask)
    shapes = set()
    for length in CHECK_LENGTHS:
        try:  # a batch of 2 sequences of ``length`` tokens and no attention mask
            built = builder(torch.ones(2, length, dtype=torch.long))
        except Exception:  # the mask needs inputs a plain call does not give: leave it
            return None
        if not isinstance(built, torch.Tensor) or built.dim() != 4 or built.shape[-2:] != (length, length):
            return None  # keys other than the queries (prompt tokens, a cache)
        seen = visible(built).cpu()
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        shapes.add("causal" if bool((seen == causal).all()) else
                   "bidirectional" if bool(seen.all()) else None)
    return shapes.pop() if len(shapes) == 1 else None


def sequence_index(positions: torch.Tensor) -> torch.Tensor:
    """Which packed sequence each token is in: a new one wherever ``positions`` does not step by one
    (transformers' ``find_packed_sequence_indices``, without its data-dependent early exit).

    >>> sequence_index(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    tensor([[0, 0, 0, 1, 1, 2]])
    """
    step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def packed_mask(positions: torch.Tensor, causal: bool, like: torch.Tensor) -> torch.Tensor:
    """The 4-D mask of a packed batch in ``like``'s form (boolean or additive): a token sees the
    tokens of its own sequence, and for ``causal`` only those at earlier or equal positions.

    >>> packed_mask(torch.tensor([[0, 1, 0]]), True, torch.ones(1, 1, 3, 3, dtype=torch.bool))[0, 0]
    tensor([[ True, False, False],
            [ True,  True, False],
            [False, False,  True]])
    """
    index = sequence_index(positions)
    seen = index[:, :, None] == index[:, None, :]
    if causal:
        seen = seen & (positions[:, None, :] <= positions[:, :, None])
    seen = seen[:, None].to(like.device)
    if like.dtype == torch.bool:
        return seen
    return torch.zeros((), dtype=like.dtype, device=like.device).masked_fill(~seen, torch.finfo(like.dtype).min)


class PackedMask(torch.nn.Module):
    """In front of an SDPA mask: the packed mask when the caller gave ``position_ids`` and no
    ``attention_mask``, else the captured mask (``built``) unchanged."""

    def __init__(self, shape: str) -> None:
        super().__init__()
        self.causal = shape == "causal"

    def forward(self, given: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                built: torch.Tensor) -> torch.Tensor:
        if given is not None or positions is None:
            return built
        positions = positions.expand(built.shape[0], -1) if positions.shape[0] == 1 else positions
        return packed_mask(positions, self.causal, built)


class RefusePacked(torch.nn.Module):
    """In front of the input adapter of a graph whose masks cannot be packed: a packed batch is
    an error (the eager model would keep the sequences apart; the graph would not)."""

    _is_impure = True  # its use is to raise: dead-code elimination must keep it

    def __init__(self, model_class: str, reason: str) -> None:
        super().__init__()
        self.model_class, self.reason = model_class, reason

    def forward(self, given: Optional[torch.Tensor], positions: Optional[torch.Tensor]) -> None:
        if given is None and positions is not None and bool((sequence_index(positions)[:, -1] > 0).any()):
            raise PackedBatchError(f"{self.model_class} graph: position_ids restart without an "
                                   f"attention_mask (a packed batch), but {self.reason}; pass an "
                                   f"attention_mask, or batches of unpacked sequences")


def _sdpa_masks(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    readers: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for sdpa in gm.graph.find_nodes(op="call_function", target=SDPA):
        mask = mask_node(sdpa)
        if isinstance(mask, torch.fx.Node):
            readers.setdefault(mask, []).append(sdpa)
    return readers


def _why_not_packed(gm: torch.fx.GraphModule, masks: dict, config: Any) -> Optional[str]:
    if windowed(config):
        return "its attention is windowed or chunked"
    if not masks:
        return "its attention takes no mask fxpeft can find (load it with attn_implementation='sdpa')"
    if any(mask_shape(gm, mask) is None for mask in masks):
        return "its attention mask is not plain causal or bidirectional"
    return None


def route_packed(gm: torch.fx.GraphModule, config: Any, model_class: str) -> int:
    """Give an emitted graph the packed-sequence path of a model that has one (see the module
    docstring); returns the masks routed (0 and a ``RefusePacked`` check where it cannot).

    >>> import fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> gm = fxpeft.rewrite(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
    ...     vocab_size=32, num_hidden_layers=2, num_attention_heads=2)), "lora_qv")
    >>> len([m for m in gm.modules() if isinstance(m, PackedMask)])
    1
    """
    given, positions = (input_placeholder(gm.graph, n) for n in ("attention_mask", "position_ids"))
    if given is None or positions is None or input_adapter(gm.graph) is None:
        return 0
    masks = _sdpa_masks(gm)
    reason = _why_not_packed(gm, masks, config)
    if reason is not None:
        _refuse(gm, given, positions, model_class, reason)
        return 0
    for index, (mask, sdpas) in enumerate(masks.items()):
        target = f"{PACKED_MASK_MODULE}_{index}"
        gm.add_submodule(target, PackedMask(mask_shape(gm, mask)))
        with gm.graph.inserting_after(mask):
            routed = gm.graph.call_module(target, (given, positions, mask))
        routed.meta = {k: v for k, v in mask.meta.items() if k != "val"}
        for sdpa in sdpas:
            sdpa.replace_input_with(mask, routed)
    return len(masks)


def _refuse(gm: torch.fx.GraphModule, given: torch.fx.Node, positions: torch.fx.Node,
            model_class: str, reason: str) -> None:
    gm.add_submodule(f"{PACKED_MASK_MODULE}_refused", RefusePacked(model_class, reason))
    with gm.graph.inserting_before(input_adapter(gm.graph)):
        gm.graph.call_module(f"{PACKED_MASK_MODULE}_refused", (given, positions))
