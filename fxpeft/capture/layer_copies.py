"""PEFT's ``layer_replication``: a model whose decoder layer list is rebuilt from ``[start, end)``
ranges (``[[0, 4], [2, 5]]`` -> layers ``0 1 2 3 2 3 4``) before capture, every entry a copy of
its source layer that shares the source's parameters.

The user's model is never changed: the copy is shallow down to the layer list (each module on
the path to it is a new object with its own child table), its config is a copy with the new
``num_hidden_layers`` (and per-layer lists such as ``layer_types`` remapped to the new order),
and each copied layer numbers its ``layer_idx`` (the KV cache's slot) by its new position, as
PEFT's ``replicate_layers`` does. Copies are deep except for parameters, which are the source's
own objects, so every copy's adapter trains against one shared, frozen base weight.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                          num_attention_heads=2, vocab_size=32))
>>> copy_ = replicated_model(model, ((0, 2), (1, 2)), "rules.toml")
>>> len(copy_.model.layers), copy_.config.num_hidden_layers, len(model.model.layers)
(3, 3, 2)
>>> copy_.model.layers[2].mlp.up_proj.weight is model.model.layers[1].mlp.up_proj.weight
True
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fxpeft.errors import RuleError

KEY = "layer_replication"
# Where PEFT looks for the layer list, below ``model(.model)*`` (and BERT's ``.bert``).
_STACKS = (("layers",), ("encoder", "layer"), ("h",))
# transformers 5 config fields holding one entry per layer (the entry's meaning, not a layer
# index), which follow the copies; a list of layer indices (``kv_source_layers``)
# would need its values remapped too, so it is not among them.
PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types", "num_attention_heads_per_layer",
                    "intermediate_size", "no_rope_layers")


def _stack_path(model: torch.nn.Module) -> tuple[str, ...] | None:
    """The attribute path to the layer ``ModuleList``, PEFT's search: ``model`` followed down
    its ``.model`` chain (then ``.bert``), then ``layers``, ``encoder.layer`` or ``h``."""
    path: tuple[str, ...] = ()
    holder = model
    while isinstance(getattr(holder, "model", None), torch.nn.Module):
        path, holder = (*path, "model"), holder.model
    if isinstance(getattr(holder, "bert", None), torch.nn.Module):
        path, holder = (*path, "bert"), holder.bert
    for tail in _STACKS:
        found = holder
        for name in tail:
            found = getattr(found, name, None)
        if isinstance(found, torch.nn.ModuleList):
            return (*path, *tail)
    return None


def layer_count(model: torch.nn.Module) -> int | None:
    """How many layers the model's replicable stack holds, or None without one.

    >>> layer_count(torch.nn.Linear(2, 2)) is None
    True
    """
    path = _stack_path(model)
    if path is None:
        return None
    return len(_walk(model, path))


def _walk(model: torch.nn.Module, path: tuple[str, ...]) -> Any:
    for name in path:
        model = getattr(model, name)
    return model


def source_layers(ranges: tuple[tuple[int, int], ...]) -> list[int]:
    """The source layer of each new position.

    >>> source_layers(((0, 4), (2, 5)))
    [0, 1, 2, 3, 2, 3, 4]
    """
    return [i for start, end in ranges for i in range(start, end)]


def ranges_text(ranges: tuple[tuple[int, int], ...]) -> str:
    """Ranges as a rule file and PEFT's config write them, for messages.

    >>> ranges_text(((0, 2), (1, 2)))
    '[[0, 2], [1, 2]]'
    """
    return str([list(pair) for pair in ranges])


def check_ranges(model: torch.nn.Module, ranges: tuple[tuple[int, int], ...], where: str) -> None:
    """A one-line ``RuleError`` at ``where`` (``file:line``) unless ``model`` has a layer list
    PEFT finds and every range lies inside it."""
    count = layer_count(model)
    if count is None:
        raise RuleError(f"{type(model).__name__} has no layer list PEFT replicates (a "
                        f"ModuleList at model(.model)*.layers, .encoder.layer or .h)",
                        file=where, key=KEY)
    for start, end in ranges:
        if end > count:
            raise RuleError(f"range [{start}, {end}] is outside the {count} layers of "
                            f"{type(model).__name__} (ranges are [start, end), end <= {count})",
                            file=where, key=KEY)


def _layer_copy(layer: torch.nn.Module, config: Any, new_config: Any, index: int) -> torch.nn.Module:
    """A deep copy of ``layer`` sharing its parameters (the memo maps each to itself) and holding
    ``new_config`` where it held ``config``; every ``layer_idx`` set to ``index``."""
    memo: dict[int, Any] = {id(p): p for p in layer.parameters()}
    if new_config is not None:
        memo[id(config)] = new_config
    clone = copy.deepcopy(layer, memo)
    for module in clone.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
    return clone


def _new_config(config: Any, sources: list[int]) -> Any:
    """``config`` copied, with ``num_hidden_layers`` the new count and each per-layer list
    (``PER_LAYER_FIELDS``, one entry per layer) in the new order; None for a model without one
    (a plain module)."""
    count = getattr(config, "num_hidden_layers", None)
    if count is None:
        return None
    new = copy.deepcopy(config)
    for name in PER_LAYER_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == count:
            setattr(new, name, type(value)(value[i] for i in sources))
    new.num_hidden_layers = len(sources)
    return new


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    shell = copy.copy(module)
    shell._modules = dict(module._modules)
    return shell


def replicated_model(model: torch.nn.Module, ranges: tuple[tuple[int, int], ...],
                     where: str) -> torch.nn.Module:
    """A copy of ``model`` whose layer list is rebuilt from ``ranges``; ``model`` is unchanged
    (see the module's docstring). Bad ranges are a ``RuleError`` at ``where``."""
    check_ranges(model, ranges, where)
    path = _stack_path(model)
    sources = source_layers(ranges)
    config = getattr(model, "config", None)
    new_config = _new_config(config, sources)
    top = holder = _shallow(model)
    for name in path[:-1]:
        child = _shallow(holder._modules[name])
        holder._modules[name] = child
        holder = child
    layers = _walk(model, path)
    holder._modules[path[-1]] = torch.nn.ModuleList(
        _layer_copy(layers[source], config, new_config, index) for index, source in enumerate(sources))
    for module in (top, *(_walk(top, path[:i + 1]) for i in range(len(path) - 1))):
        if new_config is not None and getattr(module, "config", None) is config:
            module.config = new_config
    return top
