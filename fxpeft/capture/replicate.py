"""Capture once, replicate: export a shallow copy of an HF model holding only its first and last
decoder layers, check that the two layers' subgraphs are the same graph, and build the full
model's graph by copying that layer's subgraph once per layer. ``torch.export`` costs time in
proportion to depth (6 s for 30 layers); a 2-layer export and a graph copy cost a fraction.

The result is the graph a full export gives, node for node (op, target, arguments, module paths,
shapes), bound to the full model's parameters. It is only used where that is shown, not assumed:

- the model has exactly one ``ModuleList`` of ``num_hidden_layers`` layers, all of one class, with
  the same submodules, the same tensor shapes, dtypes and devices, and the same plain attributes
  (a sliding-window layer, a KV-sharing layer, a MoE layer among dense ones all differ);
- no layer shares a tensor with another;
- every per-layer list in the config (``layer_types``, ...) holds one value;
- in the shallow graph, the last layer's nodes equal the first layer's one for one, reading the
  same shared nodes (rotary tables, the mask) and, where the first layer read the embeddings, the
  first layer's output; no shared node runs between the layers, and nothing after the layers
  reads the first layer.

Anything else is refused with a reason, and capture exports the whole model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx

from fxpeft.capture import cache as capture_cache
from fxpeft.capture.program import Program, shell_module

# Attributes a layer keeps only to know its position (for KV caches, which capture turns off).
# Any other plain attribute that differs between layers makes them different layers.
INDEX_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx"})
_PLAIN = (bool, int, float, str, type(None))


class NotReplicable(Exception):
    """Why a model's layers cannot be captured once and replicated."""


@dataclass(frozen=True)
class LayerStack:
    """The model's repeated decoder layers: their ``ModuleList`` path and the layers.

    ``root_names``: templates of root-level targets that belong to one layer each (a decode
    graph's KV cache, ``fxpeft_kv_keys_{}``), copied and renumbered with the layer."""

    path: str
    layers: tuple[torch.nn.Module, ...]
    root_names: tuple[str, ...] = ()

    def prefix(self, index: int) -> str:
        return f"{self.path}.{index}"

    def owns(self, index: int, target: str) -> bool:
        """Whether ``target`` (a module path or get_attr target) belongs to layer ``index``.

        >>> stack = LayerStack("model.layers", (), ("kv_{}",))
        >>> stack.owns(1, "model.layers.1.mlp"), stack.owns(1, "model.layers.10"), stack.owns(1, "kv_1")
        (True, False, True)
        """
        prefix = self.prefix(index)
        return target == prefix or target.startswith(f"{prefix}.") or \
            any(target == name.format(index) for name in self.root_names)


def captured_once(model: torch.nn.Module, export: Callable[[torch.nn.Module], Program],
                  stack: LayerStack | None = None) -> Program:
    """``model``'s program, built from ``export`` of its shallow copy (``shallow_model``) and
    bound to ``model``'s own tensors; raises ``NotReplicable`` where that is not shown to be
    the graph a full export gives.

    >>> from fxpeft.capture.export import _export, _hf_program
    >>> from fxpeft.capture.hf import example_inputs
    >>> model = _tiny_llama()
    >>> inputs = example_inputs(model)
    >>> program = captured_once(model, lambda shallow: _hf_program(model, _export(shallow, inputs), tuple(inputs)))
    >>> program.graph_module.get_parameter("model.layers.1.mlp.up_proj.weight") is model.model.layers[1].mlp.up_proj.weight
    True
    """
    stack = stack or find_layer_stack(model)
    if len(stack.layers) <= 2:
        raise NotReplicable(f"{len(stack.layers)} layers: nothing to save")
    check_uniform(model, stack)
    shallow = export(shallow_model(model, stack))
    graph = replicate(shallow.graph, stack, partition(shallow.graph, stack), len(stack.layers))
    lifted = capture_cache.constants(shallow.graph_module, model)
    return Program(capture_cache.bind(graph, lifted, model), shallow.info)


def find_layer_stack(model: torch.nn.Module) -> LayerStack:
    """The one ``ModuleList`` holding ``num_hidden_layers`` layers.

    >>> stack = find_layer_stack(_tiny_llama())
    >>> stack.path, len(stack.layers)
    ('model.layers', 3)
    """
    count = getattr(_text_config(model.config), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and count is not None and len(m) == count]
    if len(found) != 1:
        raise NotReplicable(f"{len(found)} module lists of num_hidden_layers={count} layers")
    name, layers = found[0]
    return LayerStack(name, tuple(layers))


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def check_uniform(model: torch.nn.Module, stack: LayerStack) -> None:
    """Raise ``NotReplicable`` unless every layer is built like the first (see the module doc).

    >>> model = _tiny_llama()
    >>> model.model.layers[2].mlp.act_fn = torch.nn.GELU()
    >>> check_uniform(model, find_layer_stack(model))
    Traceback (most recent call last):
    ...
    fxpeft.capture.replicate.NotReplicable: layer 2 differs from layer 0 (LlamaDecoderLayer)
    """
    _check_config_lists(_text_config(model.config), len(stack.layers))
    first = _layer_signature(stack.layers[0])
    for index, layer in enumerate(stack.layers[1:], start=1):
        if _layer_signature(layer) != first:
            raise NotReplicable(f"layer {index} differs from layer 0 ({type(layer).__name__})")
    tensors = [id(t) for layer in stack.layers for t in (*layer.parameters(), *layer.buffers())]
    if len(set(tensors)) != len(tensors):
        raise NotReplicable("layers share tensors")


def _check_config_lists(config: Any, count: int) -> None:
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == count and len(set(map(repr, value))) > 1:
            raise NotReplicable(f"config.{key} differs between layers")


def _layer_signature(layer: torch.nn.Module) -> tuple:
    """What makes two layers build the same graph: submodule types and plain attributes, tensor
    shapes, dtypes and devices."""
    for name, module in layer.named_modules():
        if _has_own_behaviour(module):
            raise NotReplicable(f"{type(layer).__name__}.{name} has hooks or its own forward")
    modules = tuple((name, type(m), _plain_attributes(m)) for name, m in layer.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device)
                    for name, t in (*layer.named_parameters(), *layer.named_buffers()))
    return modules, tensors


def _has_own_behaviour(module: torch.nn.Module) -> bool:
    """Hooks or an instance-level ``forward``: code that may differ per layer and that no
    attribute comparison sees."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
             module._backward_pre_hooks)
    return "forward" in vars(module) or any(hooks)


def _plain_attributes(module: torch.nn.Module) -> tuple:
    return tuple(sorted((key, repr(value)) for key, value in vars(module).items()
                        if not key.startswith("_") and key not in INDEX_ATTRIBUTES
                        and _is_plain(value)))


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN) or isinstance(value, torch.dtype)


def shallow_model(model: torch.nn.Module, stack: LayerStack) -> torch.nn.Module:
    """A copy of ``model`` whose layer list holds only its first and last layers (under names
    ``<path>.0`` and ``<path>.1``); every module and tensor is the model's own, not copied. The
    config is the model's too, so what is built from it outside the layers (masks, rotary
    tables) is what the full model builds.

    >>> model = _tiny_llama()
    >>> shallow = shallow_model(model, find_layer_stack(model))
    >>> len(shallow.model.layers), shallow.model.layers[1] is model.model.layers[2]
    (2, True)
    """
    root = shell_module(model)
    owner = root
    *parents, name = stack.path.split(".")
    for part in parents:
        owner._modules[part] = shell_module(owner._modules[part])
        owner = owner._modules[part]
    owner._modules[name] = torch.nn.ModuleList([stack.layers[0], stack.layers[-1]])
    return root


def _layer_of(node: torch.fx.Node, stack: LayerStack) -> int | None:
    """The index (0 or 1 in a shallow graph) of the layer ``node`` belongs to, or None (shared)."""
    if node.op == "get_attr":
        paths = [node.target]
    else:
        paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    for index in (0, 1):
        if any(stack.owns(index, p) for p in paths):
            return index
    return None


def renumber(text: str, stack: LayerStack, old: int, new: int) -> str:
    """``text`` with the module path of layer ``old`` replaced by layer ``new``'s.

    >>> renumber("model.layers.1.mlp", LayerStack("model.layers", ()), 1, 7)
    'model.layers.7.mlp'
    >>> renumber("kv_1", LayerStack("model.layers", (), ("kv_{}",)), 1, 7)
    'kv_7'
    """
    for name in stack.root_names:
        if text == name.format(old):
            return name.format(new)
    old_prefix = stack.prefix(old)
    if text == old_prefix or text.startswith(f"{old_prefix}."):
        return stack.prefix(new) + text[len(old_prefix):]
    return text


def _renumbered_stack(meta: dict, stack: LayerStack, old: int, new: int) -> dict:
    """``nn_module_stack`` with layer ``old``'s paths (and keys, which end in the path) moved."""
    moved = {}
    for key, (path, kind) in (meta.get("nn_module_stack") or {}).items():
        new_path = renumber(path, stack, old, new)
        if new_path != path:
            if not key.endswith(path):
                raise NotReplicable(f"module stack key {key!r} does not end in its path {path!r}")
            key = key[:len(key) - len(path)] + new_path
        moved[key] = (path if new_path == path else new_path, kind)
    return moved


@dataclass
class _Partition:
    """The shallow graph's nodes by layer, and the first layer's node for each last-layer node."""

    layers: list[list[torch.fx.Node]]  # [layer 0 nodes, layer 1 nodes], graph order
    layer: dict[torch.fx.Node, int | None]
    twin: dict[torch.fx.Node, torch.fx.Node]  # layer-0 node -> its layer-1 counterpart


def partition(graph: torch.fx.Graph, stack: LayerStack) -> _Partition:
    """Split the shallow graph and check that its two layers are the same subgraph."""
    layer = {n: _layer_of(n, stack) for n in graph.nodes}
    layers = [[n for n in graph.nodes if layer[n] == i] for i in (0, 1)]
    if len(layers[0]) != len(layers[1]) or not layers[0]:
        raise NotReplicable(f"the layers differ: {len(layers[0])} and {len(layers[1])} nodes")
    found = _Partition(layers, layer, {})
    for first, last in zip(*layers):
        _check_twins(first, last, found, stack)
        found.twin[first] = last
    _check_span(graph, found)
    return found


def _check_twins(first: torch.fx.Node, last: torch.fx.Node, found: _Partition,
                 stack: LayerStack) -> None:
    target = renumber(first.target, stack, 0, 1) if first.op == "get_attr" else first.target
    if (first.op, target) != (last.op, last.target):
        raise NotReplicable(f"{first.format_node()} vs {last.format_node()}")
    if not _same_args((first.args, first.kwargs), (last.args, last.kwargs), found):
        raise NotReplicable(f"the arguments of {first.name} and {last.name} differ")
    if _renumbered_stack(first.meta, stack, 0, 1) != (last.meta.get("nn_module_stack") or {}) or \
            first.meta.get("stack_trace") != last.meta.get("stack_trace") or \
            _describe(first.meta.get("val")) != _describe(last.meta.get("val")):
        raise NotReplicable(f"the metadata of {first.name} and {last.name} differ")


def _same_args(a: Any, b: Any, found: _Partition) -> bool:
    """Equal argument trees; a node the first layer reads must be the one the last layer reads
    (shared), its twin (inside the layer), or, where the first reads a shared node, a first-layer
    node (the hidden state carried from layer to layer)."""
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        return isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and _same_node(a, b, found)
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_args(x, y, found) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_args(a[k], b[k], found) for k in a)
    if isinstance(a, slice):
        return _same_args((a.start, a.stop, a.step), (b.start, b.stop, b.step), found)
    if isinstance(a, torch.Tensor):
        return a is b
    return a == b


def _same_node(a: torch.fx.Node, b: torch.fx.Node, found: _Partition) -> bool:
    where_a, where_b = found.layer[a], found.layer[b]
    if where_b == 1:
        return where_a == 0 and found.twin.get(a) is b
    if where_b == 0:
        return where_a is None  # the carried hidden state
    return a is b


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape)), value.dtype, value.device
    return repr(value)


def _check_span(graph: torch.fx.Graph, found: _Partition) -> None:
    """Layer 0's computation, then layer 1's, nothing shared in between; later shared nodes do
    not read layer 0."""
    compute = [n for n in graph.nodes if n.op != "get_attr"]
    where = [found.layer[n] for n in compute]
    layered = [i for i, w in enumerate(where) if w is not None]
    span = where[layered[0]:layered[-1] + 1] if layered else []
    if not span or None in span or span != sorted(span):
        raise NotReplicable("shared nodes run between the layers, or the layers interleave")
    for node in compute[layered[-1] + 1:]:
        if any(found.layer[n] == 0 for n in node.all_input_nodes):
            raise NotReplicable(f"{node.name}, after the layers, reads the first layer")


def replicate(graph: torch.fx.Graph, stack: LayerStack, found: _Partition, count: int) -> torch.fx.Graph:
    """The graph of the model with ``count`` layers: layer 1's nodes, copied for layers
    2 .. count - 1 after each run of them, and later shared nodes reading the last copy.

    >>> from fxpeft.capture.export import _export
    >>> from fxpeft.capture.hf import example_inputs
    >>> model = _tiny_llama()
    >>> stack = find_layer_stack(model)
    >>> shallow = _export(shallow_model(model, stack), example_inputs(model)).module().graph
    >>> full = replicate(shallow, stack, partition(shallow, stack), 3)
    >>> sorted({n.target.split(".")[2] for n in full.find_nodes(op="get_attr") if ".layers." in n.target})
    ['0', '1', '2']
    """
    new = torch.fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    base: dict[torch.fx.Node, torch.fx.Node] = {}  # every node of the shallow graph -> its copy
    copies: dict[int, dict[torch.fx.Node, torch.fx.Node]] = {i: {} for i in range(2, count)}

    def at(index: int, node: torch.fx.Node) -> torch.fx.Node:
        """Layer ``index``'s copy of layer-1 template ``node``."""
        return base[node] if index == 1 else copies[index][node]

    def in_layer(index: int) -> Callable[[torch.fx.Node], torch.fx.Node]:
        def arg(node: torch.fx.Node) -> torch.fx.Node:
            where = found.layer[node]
            if where == 1:
                return at(index, node)
            return at(index - 1, found.twin[node]) if where == 0 else base[node]
        return arg

    last = in_layer(count - 1)
    for node, run_ends in _with_run_ends(graph, found):
        after_layers = found.layer[node] is None and node.op != "get_attr"
        base[node] = new.node_copy(node, last if after_layers else base.__getitem__)
        if run_ends:
            for index in range(2, count):
                _copy_run(new, run_ends, index, stack, copies[index], in_layer(index))
    return new


def _with_run_ends(graph: torch.fx.Graph, found: _Partition
                   ) -> Iterator[tuple[torch.fx.Node, list[torch.fx.Node]]]:
    """Each node, with the run of layer-1 nodes it ends (empty unless it ends one)."""
    run: list[torch.fx.Node] = []
    for node in graph.nodes:
        if found.layer[node] == 1:
            run.append(node)
            if node.next.op == "root" or found.layer[node.next] != 1:
                yield node, run
                run = []
                continue
        yield node, []


def _copy_run(new: torch.fx.Graph, run: list[torch.fx.Node], index: int, stack: LayerStack,
              env: dict[torch.fx.Node, torch.fx.Node], arg: Callable) -> None:
    for node in run:
        if node.op == "get_attr":  # named as export names it, after the target
            target = renumber(node.target, stack, 1, index)
            copied = new.create_node("get_attr", target, name=target.replace(".", "_"))
            copied.meta = copy.copy(node.meta)
        else:
            copied = new.node_copy(node, arg)
        if "nn_module_stack" in node.meta:
            copied.meta["nn_module_stack"] = _renumbered_stack(node.meta, stack, 1, index)
        env[node] = copied


def _tiny_llama() -> torch.nn.Module:
    """A 3-layer Llama for the examples above."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, vocab_size=32))
