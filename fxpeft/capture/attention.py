"""``torch.nn.MultiheadAttention`` opened up by ``symbolic_trace``: its weights as reads.

``symbolic_trace`` keeps a ``torch.nn`` module whole (one ``call_module``), so the packed
``in_proj_weight`` of an attention layer is never read in the graph, and nothing can adapt it.
The plain frontend traces an attention layer whose query, key and value share one size
(``_qkv_same_embed_dim``) and whose dropout is 0 as ``get_attr`` reads of ``in_proj_weight``,
``in_proj_bias``, ``out_proj.weight`` and ``out_proj.bias`` (and ``bias_k`` / ``bias_v``) and a
call of ``multihead_attention``: the module's own computation
(``torch.nn.functional.multi_head_attention_forward``, ``batch_first`` transposes included).
Dropout 0 keeps the call free of the train / eval flag. The module's inference fast path
(``torch._native_multi_head_attention``, eval under ``no_grad``) is not taken, as under
``torch.export``: outputs equal the module's other path.

Each read of an adapted weight carries the layer's path (node meta ``ATTENTION_LAYER``, under
either frontend: ``mark_weight_reads``): PEFT adapts an
attention layer as a whole (``target_modules=["mha"]``: LoRA on ``in_proj_weight`` and on
``out_proj.weight``), and wraps ``out_proj`` inside its layer, so the adapters of
``out_proj.weight`` live under the layer's ``base_layer`` (``adapter_owner``). PEFT (0.21.2,
and its main branch as of 2026-12) applies ``out_proj``'s LoRA twice: its layer adds the delta
to ``out_proj.weight`` and then merges the wrapped ``Linear``, which adds it again, in forward
and in ``merge_and_unload`` alike. Its outputs are ``out_proj.weight + 2 * scale * B @ A``;
fxpeft reproduces them (``delta_factor``), so adapters move both ways unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F

Tensor = torch.Tensor
# Node meta on a weight read: the path of the attention layer that reads it.
ATTENTION_LAYER = "fxpeft_attention_layer"
# The weights an adapter on an attention layer adapts (PEFT's MultiheadAttention LoRA).
ADAPTED_WEIGHTS = ("in_proj_weight", "out_proj.weight")
_SIGNATURE = inspect.signature(torch.nn.MultiheadAttention.forward)


def opens(module: torch.nn.Module) -> bool:
    """Whether the plain frontend traces ``module`` as weight reads and ``multihead_attention``.

    >>> opens(torch.nn.MultiheadAttention(4, 2)), opens(torch.nn.MultiheadAttention(4, 2, dropout=0.1))
    (True, False)
    """
    return isinstance(module, torch.nn.MultiheadAttention) and module._qkv_same_embed_dim and \
        module.dropout == 0 and isinstance(module.out_proj, torch.nn.Linear)


def multihead_attention(query: Tensor, key: Tensor, value: Tensor, in_proj_weight: Tensor,
                        in_proj_bias: Optional[Tensor], out_proj_weight: Tensor,
                        out_proj_bias: Optional[Tensor], bias_k: Optional[Tensor],
                        bias_v: Optional[Tensor], key_padding_mask: Optional[Tensor] = None,
                        need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                        average_attn_weights: bool = True, is_causal: bool = False, *,
                        num_heads: int, add_zero_attn: bool,
                        batch_first: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``nn.MultiheadAttention.forward`` (dropout 0, one embedding size) with its weights as
    arguments.

    >>> mha = torch.nn.MultiheadAttention(4, 2).eval()
    >>> x = torch.randn(3, 4)
    >>> out = multihead_attention(x, x, x, mha.in_proj_weight, mha.in_proj_bias,
    ...     mha.out_proj.weight, mha.out_proj.bias, None, None, num_heads=2,
    ...     add_zero_attn=False, batch_first=False)
    >>> torch.equal(out[0], mha(x, x, x)[0])
    True
    """
    batched = query.dim() == 3
    if batch_first and batched:
        # one transpose per distinct tensor: the packed projection fuses key and value (or all
        # three) when they are the same object, as the module does
        moved: dict[int, Tensor] = {}
        query, key, value = (moved.setdefault(id(t), t.transpose(1, 0)) for t in (query, key, value))
    output, weights = F.multi_head_attention_forward(
        query, key, value, in_proj_weight.shape[1], num_heads, in_proj_weight, in_proj_bias,
        bias_k, bias_v, add_zero_attn, 0.0, out_proj_weight, out_proj_bias, training=False,
        key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        average_attn_weights=average_attn_weights, is_causal=is_causal)
    return (output.transpose(1, 0) if batch_first and batched else output), weights


def trace_attention(tracer: torch.fx.Tracer, module: torch.nn.MultiheadAttention,
                    args: tuple, kwargs: dict[str, Any]) -> Any:
    """Emit ``module``'s call (``args`` / ``kwargs``, proxies) as weight reads and one
    ``multihead_attention`` call; returns its proxy."""
    path = tracer.path_of_module(module)
    bound = _SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    del call["self"]

    def read(name: str) -> Any:
        owner, _, attr = name.rpartition(".")
        # under tracing, a parameter attribute is a proxy of its get_attr (the tracer's getattr)
        return getattr(module.get_submodule(owner) if owner else module, attr)

    weights = tuple(read(name) for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                            "out_proj.bias", "bias_k", "bias_v"))
    positional = (call.pop("query"), call.pop("key"), call.pop("value"), *weights)
    return tracer.create_proxy("call_function", multihead_attention, positional,
                               {**call, "num_heads": module.num_heads,
                                "add_zero_attn": module.add_zero_attn,
                                "batch_first": module.batch_first})



def mark_weight_reads(graph: torch.fx.Graph, model: torch.nn.Module) -> int:
    """Tag each read of an attention layer's adapted weights with the layer's path
    (``ATTENTION_LAYER``), whichever frontend captured it; returns how many reads.

    >>> mha = torch.nn.Sequential(torch.nn.MultiheadAttention(4, 2))
    >>> graph = torch.fx.Graph(); read = graph.get_attr("0.out_proj.weight")
    >>> mark_weight_reads(graph, mha), read.meta[ATTENTION_LAYER]
    (1, '0')
    """
    layers = {f"{path}.{name}" if path else name: path for path, module in model.named_modules()
              if isinstance(module, torch.nn.MultiheadAttention) and module._qkv_same_embed_dim
              for name in ADAPTED_WEIGHTS}
    reads = [n for n in graph.find_nodes(op="get_attr") if n.target in layers]
    for node in reads:
        node.meta[ATTENTION_LAYER] = layers[node.target]
    return len(reads)


def adapter_owner(layer: str, owner: str) -> str:
    """Where PEFT keeps the adapters of a weight of ``owner`` read by the attention layer
    ``layer``: ``out_proj``'s under the layer's ``base_layer``.

    >>> adapter_owner("mha", "mha"), adapter_owner("mha", "mha.out_proj")
    ('mha', 'mha.base_layer.out_proj')
    """
    return f"{layer}.base_layer.out_proj" if owner == f"{layer}.out_proj" else owner


def delta_factor(layer: str, owner: str) -> float:
    """How many times PEFT adds the LoRA delta of a weight of ``owner`` read by the attention
    layer ``layer``: twice for ``out_proj`` (see the module's docstring).

    >>> delta_factor("mha", "mha"), delta_factor("mha", "mha.out_proj")
    (1.0, 2.0)
    """
    return 2.0 if owner == f"{layer}.out_proj" else 1.0
