"""Bad tensors caught at the door: an HF graph's inputs checked against what it was captured for.

A forward pre-hook of ``AdaptedModule`` (``check_inputs``) runs before the graph, outside
``torch.compile``'s frame (``torch.compiler.disable``, as ``fxpeft.graph.gates`` does for
``adapter_names``), so a compiled graph with ``fullgraph=True`` still traces one graph. It refuses,
with a one-line ``InputError`` naming the argument:

- token ids that are not an integer tensor ``[batch, tokens]`` (floats, 3-D ids) or are empty;
- token ids outside the vocabulary, or negative (this reads the values, see below);
- an ``attention_mask`` or ``token_type_ids`` whose shape is not the ids' shape;
- more tokens than a model with learned positions (GPT-2, BERT) can embed.

Shape checks read only shapes. The vocabulary check reads the ids, which on a GPU waits for the
device (a sync): by default it runs only where the ids are on the CPU. ``gm.check_token_values``
is the switch: ``True`` checks on every device, ``False`` never, ``None`` (the default) on the CPU.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
import torch.fx

from fxpeft.errors import InputError

_EMBEDDING = torch.ops.aten.embedding.default
# Module names of learned position embeddings (GPT-2's wpe, BERT's position_embeddings, OPT's
# embed_positions); a rotary model (Llama) has none, so its sequences are bounded only by memory.
_POSITIONS = re.compile(r"(^|\.)(wpe|\w*pos\w*)$")
_ID_DTYPES = (torch.int64, torch.int32)  # what aten.embedding indexes with
_SPEC_ATTRIBUTE = "_fxpeft_input_spec"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What an HF graph's inputs must be: its input names, the rows of its input embedding
    (``vocab``, from module ``embedding``), the longest sequence its learned positions embed
    (``positions``, from ``position_source``; None for rotary or relative positions), and whether
    its mask covers a KV cache (``cached``: a decode graph, whose mask is longer than its ids)."""

    model_class: str
    names: tuple[str, ...]
    vocab: int | None = None
    embedding: str = "the input embedding"
    positions: int | None = None
    position_source: str = ""
    cached: bool = False


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _rows(gm: torch.fx.GraphModule, weight: Any) -> int | None:
    value = getattr(weight, "meta", {}).get("val")
    if value is not None:
        return int(value.shape[0])
    if getattr(weight, "op", None) == "get_attr":
        return int(gm.get_parameter(weight.target).shape[0])
    return None


def _config_positions(config: Any) -> int | None:
    for field in ("n_positions", "max_position_embeddings"):
        value = getattr(config, field, None)
        if isinstance(value, int):
            return value
    return None


def _embeddings(gm: torch.fx.GraphModule) -> list[tuple[str, int | None]]:
    return [(_module_path(node), _rows(gm, node.args[0]))
            for node in gm.graph.find_nodes(op="call_function", target=_EMBEDDING)]


def build_spec(gm: torch.fx.GraphModule) -> InputSpec | None:
    """The ``InputSpec`` of an HF graph from its capture (None for a plain ``nn.Module``'s).

    >>> import torch, fxpeft
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=24))
    >>> spec = build_spec(fxpeft.rewrite(model, "lora_all_linear.toml"))
    >>> spec.vocab, spec.positions, spec.position_source
    (32, 24, 'transformer.wpe')
    """
    info = getattr(gm, "capture_info", None)
    if info is None or "input_ids" not in info.inputs:
        return None
    embeddings = _embeddings(gm)
    wanted = info.hf.input_embeddings if info.hf is not None else None
    token = next(((p, rows) for p, rows in embeddings if p == wanted), None)
    token = token or next(iter(embeddings), None)
    learned = next(((p, rows) for p, rows in embeddings if _POSITIONS.search(p)), None)
    positions, source = info.max_seq, "the captured graph"
    if learned is not None:
        limit = _config_positions(info.config) or learned[1]
        if limit is not None and (positions is None or limit <= positions):  # name the table
            positions, source = limit, learned[0]
    return InputSpec(info.model_class, info.inputs, token[1] if token else None,
                     token[0] if token and token[0] else "the input embedding", positions, source,
                     cached="cache_position" in info.inputs)


def input_spec(gm: torch.fx.GraphModule) -> InputSpec | None:
    """``build_spec(gm)``, built once per graph object and kept on ``gm``."""
    kept = gm.__dict__.get(_SPEC_ATTRIBUTE)
    if kept is None or kept[0] is not gm.graph:
        kept = (gm.graph, build_spec(gm))
        gm.__dict__[_SPEC_ATTRIBUTE] = kept
    return kept[1]


def _shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(value.shape)


def check_id_layout(spec: InputSpec, name: str, ids: Any) -> None:
    """``ids`` is an integer tensor ``[batch, tokens]`` with at least one token per row.

    >>> check_id_layout(InputSpec("GPT2LMHeadModel", ("input_ids",)), "input_ids", torch.ones(2, 3))
    Traceback (most recent call last):
    ...
    fxpeft.errors.InputError: input_ids holds token ids, an integer tensor (torch.long); got torch.float32 (GPT2LMHeadModel)
    """
    if not isinstance(ids, torch.Tensor):
        raise InputError(f"{name} must be a tensor of token ids [batch, tokens]; got "
                         f"{type(ids).__name__} ({spec.model_class})")
    if ids.dtype not in _ID_DTYPES:
        raise InputError(f"{name} holds token ids, an integer tensor (torch.long); got {ids.dtype} "
                         f"({spec.model_class})")
    if ids.dim() != 2:
        raise InputError(f"{name} must be [batch, tokens], as {spec.model_class} was captured; got "
                         f"shape {_shape(ids)} ({ids.dim()}-D)")
    if ids.numel() == 0:
        raise InputError(f"{name} is empty (shape {_shape(ids)}): give at least one token per row")


def check_id_values(spec: InputSpec, name: str, ids: torch.Tensor) -> None:
    """Every id of ``ids`` lies in ``[0, spec.vocab)``; reads the tensor (a sync on a GPU).

    >>> check_id_values(InputSpec("LlamaForCausalLM", ("input_ids",), vocab=8), "input_ids", torch.tensor([[1, 9]]))
    Traceback (most recent call last):
    ...
    fxpeft.errors.InputError: input_ids holds token id 9, outside the vocabulary [0, 8) of the input embedding (LlamaForCausalLM)
    """
    if spec.vocab is None:
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high >= spec.vocab:
        raise InputError(f"{name} holds token id {low if low < 0 else high}, outside the vocabulary "
                         f"[0, {spec.vocab}) of {spec.embedding} ({spec.model_class})")


def check_length(spec: InputSpec, name: str, tokens: int) -> None:
    """``tokens`` fit the learned positions (``spec.positions``); no bound without them."""
    if spec.positions is not None and tokens > spec.positions:
        raise InputError(f"{name} has {tokens} tokens, which exceeds the {spec.positions} positions "
                         f"{spec.model_class} embeds ({spec.position_source}); shorten or split it")


def _check_alongside(spec: InputSpec, name: str, value: Any, ids: torch.Tensor) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or _shape(value) != _shape(ids):
        shape = _shape(value) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"{name} has shape {shape}, input_ids {_shape(ids)}; they must match "
                         f"([batch, tokens], as {spec.model_class} was captured)")


def values_checked(gm: torch.nn.Module, ids: torch.Tensor) -> bool:
    """Whether ``gm`` reads ``ids``' values: ``gm.check_token_values``, else only on the CPU."""
    switch = getattr(gm, "check_token_values", None)
    return ids.device.type == "cpu" if switch is None else bool(switch)


def check_ids(gm: torch.nn.Module, spec: InputSpec, name: str, ids: Any) -> None:
    """Layout, length and (``values_checked``) vocabulary of one token-id input."""
    check_id_layout(spec, name, ids)
    if not spec.cached:
        check_length(spec, name, ids.shape[1])
    if values_checked(gm, ids):
        check_id_values(spec, name, ids)


@torch.compiler.disable  # a hook is a frame of its own: never compiled, so it adds no graph break
def check_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of adapted graphs: refuse inputs the captured graph cannot take.

    >>> import torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> gm = fxpeft.rewrite(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=32)), "lora_qv.toml")
    >>> gm(torch.tensor([[3, 40]]))
    Traceback (most recent call last):
    ...
    fxpeft.errors.InputError: input_ids holds token id 40, outside the vocabulary [0, 32) of model.embed_tokens (LlamaForCausalLM)
    """
    spec = input_spec(module)
    if spec is None:
        return
    given = {**dict(zip(spec.names, args)), **kwargs}
    ids = given.get("input_ids")
    if ids is None:
        return  # inputs_embeds or a missing argument: the graph's own signature says so
    check_ids(module, spec, "input_ids", ids)
    if given.get("decoder_input_ids") is not None:
        check_ids(module, spec, "decoder_input_ids", given["decoder_input_ids"])
    if not spec.cached:
        for name in ("attention_mask", "token_type_ids"):
            _check_alongside(spec, name, given.get(name), ids)
