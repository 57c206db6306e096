"""Capture once, replicate: export a shallow copy of an HF model holding a few of its decoder
layers, check that the layers of one kind are the same subgraph, and build the full model's graph
by copying each layer's kind's subgraph once per layer, in the model's own order. ``torch.export``
costs time in proportion to depth (6 s for 30 layers); a shallow export and a graph copy cost a
fraction.

Layers come in kinds: two layers are of one kind where they have the same submodule types, the
same plain attributes (a sliding window, an attention type, a KV-sharing flag, a MoE layer among
dense ones all differ), the same tensor shapes, dtypes and devices, and the same value in every
per-layer list of the config (``layer_types``, ...). A model of identical layers has one kind,
and the shallow copy holds its first and last layers; Gemma-3's sliding and full attention layers
are two kinds, and it holds the first and last layer of each (4 of 18). The shallow copy's config
holds those layers' entries of the per-layer lists that differ, in the model's order, so every
value appears first where it did (what is built once from them, Gemma-3's rotary tables and masks
per layer type, is built alike).

The result is the graph a full export gives, node for node (op, target, arguments, module paths,
shapes), bound to the full model's parameters. It is only used where that is shown, not assumed:

- the model has exactly one ``ModuleList`` of ``num_hidden_layers`` layers; no layer shares a
  tensor with another, none has hooks or a forward of its own; the shallow copy holds fewer;
- in the shallow graph, every layer's nodes equal its kind's last layer's (the template's) one
  for one, reading the same shared nodes (a kind's rotary table and mask), their twins inside the
  layer, and the same value the previous layer hands on (its nodes read outside it, in graph
  order: the hidden state); the first layer reads the embeddings there instead;
- every layer hands on as many values, of the same shapes; a layer's nodes are read only by the
  next layer (the last layer's by what follows the layers); no shared node runs between the
  layers' computations, and each run of layer nodes (parameters, computation) holds the layers in
  order, each layer's part as long as its template's.

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


@dataclass(frozen=True)
class Plan:
    """Each layer's kind (numbered by first appearance, in the model's order) and the layers the
    shallow copy holds: the first and last layer of each kind, ascending.

    >>> plan = Plan.of((0, 0, 1, 0, 1))
    >>> plan.held, plan.templates, plan.source(3)
    ((0, 2, 3, 4), {0: 2, 1: 3}, 2)
    """

    kinds: tuple[int, ...]
    held: tuple[int, ...]

    @staticmethod
    def of(kinds: tuple[int, ...]) -> "Plan":
        ends = {index for kind in set(kinds) for index in (kinds.index(kind),
                                                           len(kinds) - 1 - kinds[::-1].index(kind))}
        return Plan(tuple(kinds), tuple(sorted(ends)))

    @property
    def templates(self) -> dict[int, int]:
        """Each kind's template: the shallow position of its last held layer."""
        return {self.kinds[index]: position for position, index in enumerate(self.held)}

    def kind_at(self, position: int) -> int:
        """The kind of the layer at shallow ``position``."""
        return self.kinds[self.held[position]]

    def source(self, index: int) -> int:
        """The shallow position layer ``index`` is copied from: the first layer is the shallow
        copy's first; any other, its kind's template (which reads a previous layer)."""
        return 0 if index == 0 else self.templates[self.kinds[index]]


def captured_once(model: torch.nn.Module, export: Callable[[torch.nn.Module], Program],
                  stack: LayerStack | None = None, plan: Plan | None = None) -> Program:
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
    plan = plan or plan_layers(model, stack)
    shallow = export(shallow_model(model, stack, plan.held))
    graph = replicate(shallow.graph, stack, partition(shallow.graph, stack, plan), plan)
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


def plan_layers(model: torch.nn.Module, stack: LayerStack) -> Plan:
    """``stack``'s layers by kind, and which the shallow copy holds; raises ``NotReplicable``
    where it would hold them all.

    >>> model = _tiny_llama(4)
    >>> model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    >>> plan_layers(model, find_layer_stack(model))
    Plan(kinds=(0, 1, 0, 0), held=(0, 1, 3))
    """
    count = len(stack.layers)
    if count <= 2:
        raise NotReplicable(f"{count} layers: nothing to save")
    plan = Plan.of(layer_kinds(model, stack))
    if len(plan.held) >= count:
        raise NotReplicable(f"{len(set(plan.kinds))} kinds of layer among {count} layers "
                            f"(each kind's first and last are exported): nothing to save")
    _distinct_held(stack, plan)
    return plan


def layer_kinds(model: torch.nn.Module, stack: LayerStack) -> tuple[int, ...]:
    """Each layer's kind, numbered by first appearance: layers of one kind have the same
    ``_layer_signature`` and the same value in each per-layer list of the config. Raises
    ``NotReplicable`` where a layer has hooks or its own forward, or layers share tensors
    other than as copies of one layer (``layer_replication``).

    >>> model = _tiny_llama()
    >>> model.model.layers[2].mlp.act_fn = torch.nn.GELU()
    >>> layer_kinds(model, find_layer_stack(model))
    (0, 0, 1)
    """
    lists = _per_layer_lists(_text_config(model.config), len(stack.layers))
    signatures = [(_layer_signature(layer), tuple(repr(values[index]) for values in lists.values()))
                  for index, layer in enumerate(stack.layers)]
    _check_shared_tensors(stack.layers)
    first = {signature: kind for kind, signature in reversed(list(enumerate(signatures)))}
    numbers = {index: number for number, index in enumerate(sorted(set(first.values())))}
    return tuple(numbers[first[signature]] for signature in signatures)


def _check_shared_tensors(layers: "tuple[torch.nn.Module, ...] | list[torch.nn.Module]") -> None:
    """Layers may share a tensor only under one name, as copies of one layer do (PEFT's
    ``layer_replication``: ``fxpeft.capture.layer_copies``); any other sharing is refused.

    >>> first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> second.weight = first.weight
    >>> _check_shared_tensors([first, second])
    >>> second.bias = first.weight
    >>> _check_shared_tensors([first, second])
    Traceback (most recent call last):
    ...
    fxpeft.capture.replicate.NotReplicable: layers share tensors (weight and weight and bias)
    """
    names: dict[int, tuple[str, ...]] = {}
    for layer in layers:
        own: dict[int, tuple[str, ...]] = {}  # a tensor's names in this layer (tied ones: several)
        for name, tensor in (*layer.named_parameters(remove_duplicate=False),
                             *layer.named_buffers(remove_duplicate=False)):
            own[id(tensor)] = (*own.get(id(tensor), ()), name)
        for key, held in own.items():
            seen = names.setdefault(key, held)
            if seen != held:
                raise NotReplicable(f"layers share tensors ({' and '.join(seen)} and {' and '.join(held)})")


def _distinct_held(stack: LayerStack, plan: "Plan") -> None:
    """The shallow copy's layers share no tensor (export reads a shared one once, under one
    layer's name, so the held layers' subgraphs would differ)."""
    held = [stack.layers[index] for index in plan.held]
    tensors = [id(t) for layer in held for t in (*layer.parameters(), *layer.buffers())]
    if len(set(tensors)) != len(tensors):
        raise NotReplicable("the exported layers share tensors (copies of one layer)")


def _per_layer_lists(config: Any, count: int) -> dict[str, list]:
    """The config's lists of one value per layer that hold more than one value (they decide kinds)."""
    return {key: list(value) for key, value in config.to_dict().items()
            if isinstance(value, (list, tuple)) and len(value) == count
            and len(set(map(repr, value))) > 1 and isinstance(getattr(config, key, None), (list, tuple))}


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


def shallow_model(model: torch.nn.Module, stack: LayerStack,
                  held: tuple[int, ...] | None = None) -> torch.nn.Module:
    """A copy of ``model`` whose layer list holds only the layers ``held`` (by default the first
    and last, under names ``<path>.0``, ``<path>.1``, ...); every module and tensor is the
    model's own, not copied. The config is the model's too, so what is built from it outside the
    layers (masks, rotary tables) is what the full model builds; where its per-layer lists differ
    between layers, the shell modules above the layers get a copy holding the held layers' entries.

    >>> model = _tiny_llama()
    >>> shallow = shallow_model(model, find_layer_stack(model))
    >>> len(shallow.model.layers), shallow.model.layers[1] is model.model.layers[2]
    (2, True)
    """
    held = held if held is not None else (0, len(stack.layers) - 1)
    text = _text_config(model.config)
    lists = _per_layer_lists(text, len(stack.layers))
    shallow_config = copy.copy(text) if lists else text
    for key, values in lists.items():
        setattr(shallow_config, key, type(getattr(text, key))(values[index] for index in held))
    root = shell_module(model)
    owner = root
    *parents, name = stack.path.split(".")
    for part in ("", *parents):
        if part:
            owner._modules[part] = shell_module(owner._modules[part])
            owner = owner._modules[part]
        _use_config(owner, text, shallow_config)
    owner._modules[name] = torch.nn.ModuleList([stack.layers[index] for index in held])
    return root


def _use_config(shell: torch.nn.Module, text: Any, shallow_config: Any) -> None:
    """Point ``shell`` (a shell module above the layers) at the shallow copy's config."""
    config = vars(shell).get("config")
    if shallow_config is text or config is None:
        return
    if config is text:
        shell.config = shallow_config
    elif getattr(config, "text_config", None) is text:  # a multimodal model's config
        shell.config = copy.copy(config)
        shell.config.text_config = shallow_config


def _layer_of(node: torch.fx.Node, stack: LayerStack, count: int) -> int | None:
    """The shallow position of the layer ``node`` belongs to, or None (shared)."""
    if node.op == "get_attr":
        paths = [node.target]
    else:
        paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    for index in range(count):
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
    """The shallow graph's nodes by layer, what each layer hands on, and each layer node's twin
    in its kind's template."""

    plan: Plan
    layer: dict[torch.fx.Node, int | None]  # node -> shallow position, None where shared
    layers: list[list[torch.fx.Node]]  # per shallow position, graph order
    handed_on: list[list[torch.fx.Node]]  # per shallow position: its nodes read outside it
    twin: dict[torch.fx.Node, torch.fx.Node]  # node of a non-template layer -> template's node

    def slot(self, node: torch.fx.Node) -> int:
        return self.handed_on[self.layer[node]].index(node)


def partition(graph: torch.fx.Graph, stack: LayerStack, plan: Plan) -> _Partition:
    """Split the shallow graph by layer and check that the layers of each kind are the same
    subgraph (see the module doc)."""
    count = len(plan.held)
    layer = {n: _layer_of(n, stack, count) for n in graph.nodes}
    layers = [[n for n in graph.nodes if layer[n] == i] for i in range(count)]
    handed_on = [[n for n in nodes if any(layer[u] != i for u in n.users)]
                 for i, nodes in enumerate(layers)]
    found = _Partition(plan, layer, layers, handed_on, {})
    _check_handed_on(found)
    templates = plan.templates
    for position in range(count):
        template = templates[plan.kind_at(position)]
        if position == template:
            continue
        if len(layers[position]) != len(layers[template]) or not layers[position]:
            raise NotReplicable(f"layers {plan.held[position]} and {plan.held[template]} differ: "
                                f"{len(layers[position])} and {len(layers[template])} nodes")
        for node, twin in zip(layers[position], layers[template]):
            _check_twins(node, twin, found, stack, (position, template))
            found.twin[node] = twin
    _check_span(graph, found)
    return found


def _check_handed_on(found: _Partition) -> None:
    """Each layer's nodes are read by itself and the next layer (the last one's by what
    follows); every layer hands on as many values, of the same shapes."""
    last = len(found.layers) - 1
    for position, nodes in enumerate(found.layers):
        for node in found.handed_on[position]:
            for user in node.users:
                reader = found.layer[user]
                if reader != position and reader != position + 1 and not (reader is None and position == last):
                    raise NotReplicable(f"{user.name} reads {node.name} of layer "
                                        f"{found.plan.held[position]}, not the layer before it")
    shapes = {tuple(_describe(n.meta.get("val")) for n in handed) for handed in found.handed_on}
    if len(shapes) != 1:
        raise NotReplicable("the layers hand on different values to the next")


def _check_twins(node: torch.fx.Node, twin: torch.fx.Node, found: _Partition, stack: LayerStack,
                 positions: tuple[int, int]) -> None:
    old, new = positions
    target = renumber(node.target, stack, old, new) if node.op == "get_attr" else node.target
    if (node.op, target) != (twin.op, twin.target):
        raise NotReplicable(f"{node.format_node()} vs {twin.format_node()}")
    if not _same_args((node.args, node.kwargs), (twin.args, twin.kwargs), found, positions):
        raise NotReplicable(f"the arguments of {node.name} and {twin.name} differ")
    if _renumbered_stack(node.meta, stack, old, new) != (twin.meta.get("nn_module_stack") or {}) or \
            node.meta.get("stack_trace") != twin.meta.get("stack_trace") or \
            _describe(node.meta.get("val")) != _describe(twin.meta.get("val")):
        raise NotReplicable(f"the metadata of {node.name} and {twin.name} differ")


def _same_args(a: Any, b: Any, found: _Partition, positions: tuple[int, int]) -> bool:
    """Equal argument trees; a node the layer reads must be the one its twin reads (shared), the
    twin of its own node, or the same value handed on by the layer before (where the first
    layer reads a shared node there: the embeddings)."""
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        return isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and \
            _same_node(a, b, found, positions)
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_args(x, y, found, positions) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_args(a[k], b[k], found, positions) for k in a)
    if isinstance(a, slice):
        return _same_args((a.start, a.stop, a.step), (b.start, b.stop, b.step), found, positions)
    if isinstance(a, torch.Tensor):
        return a is b
    return a == b


def _same_node(a: torch.fx.Node, b: torch.fx.Node, found: _Partition, positions: tuple[int, int]) -> bool:
    old, new = positions
    where_a, where_b = found.layer[a], found.layer[b]
    if where_a == old:
        return where_b == new and found.twin.get(a) is b
    if where_a is None and where_b is None:
        return a is b
    if where_b == new - 1:
        if where_a is None:
            return old == 0  # the first layer reads the embeddings where others read the hidden state
        return where_a == old - 1 and found.slot(a) == found.slot(b)
    return False


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape)), value.dtype, value.device
    return repr(value)


def _check_span(graph: torch.fx.Graph, found: _Partition) -> None:
    """The layers' computations run in order, nothing shared in between."""
    compute = [n for n in graph.nodes if n.op != "get_attr"]
    where = [found.layer[n] for n in compute]
    layered = [i for i, w in enumerate(where) if w is not None]
    span = where[layered[0]:layered[-1] + 1] if layered else []
    if not span or None in span or span != sorted(span):
        raise NotReplicable("shared nodes run between the layers, or the layers interleave")


def replicate(graph: torch.fx.Graph, stack: LayerStack, found: _Partition, plan: Plan) -> torch.fx.Graph:
    """The graph of the model with ``plan``'s layers: each run of layer nodes in the shallow
    graph (parameters, computation) becomes the same run for every layer, copied from the layer's
    source (``Plan.source``); shared nodes are copied once, those after the layers reading the
    last layer.

    >>> from fxpeft.capture.export import _export
    >>> from fxpeft.capture.hf import example_inputs
    >>> model = _tiny_llama()
    >>> stack = find_layer_stack(model)
    >>> plan = plan_layers(model, stack)
    >>> shallow = _export(shallow_model(model, stack, plan.held), example_inputs(model)).module().graph
    >>> full = replicate(shallow, stack, partition(shallow, stack, plan), plan)
    >>> sorted({n.target.split(".")[2] for n in full.find_nodes(op="get_attr") if ".layers." in n.target})
    ['0', '1', '2']
    """
    new = torch.fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    shared: dict[torch.fx.Node, torch.fx.Node] = {}
    copies: list[dict[torch.fx.Node, torch.fx.Node]] = [{} for _ in plan.kinds]  # per layer

    def handed_on(index: int, node: torch.fx.Node) -> torch.fx.Node:
        """Layer ``index``'s copy of the value ``node`` (of another shallow layer) hands on."""
        return copies[index][found.handed_on[plan.source(index)][found.slot(node)]]

    def in_layer(index: int) -> Callable[[torch.fx.Node], torch.fx.Node]:
        source = plan.source(index)

        def arg(node: torch.fx.Node) -> torch.fx.Node:
            where = found.layer[node]
            if where is None:
                return shared[node]
            return copies[index][node] if where == source else handed_on(index - 1, node)
        return arg

    after_layers = in_layer(len(plan.kinds) - 1)
    for run in _runs(graph, found):
        if found.layer[run[0]] is None:
            for node in run:
                shared[node] = new.node_copy(node, after_layers)
            continue
        blocks = _blocks(run, found)
        for index in range(len(plan.kinds)):
            source = plan.source(index)
            _copy_block(new, blocks.get(source, []), (source, index), stack, copies[index], in_layer(index))
    return new


def _runs(graph: torch.fx.Graph, found: _Partition) -> Iterator[list[torch.fx.Node]]:
    """The graph's nodes in maximal runs of shared nodes and of layer nodes."""
    run: list[torch.fx.Node] = []
    for node in graph.nodes:
        if run and (found.layer[run[0]] is None) != (found.layer[node] is None):
            yield run
            run = []
        run.append(node)
    if run:
        yield run


def _blocks(run: list[torch.fx.Node], found: _Partition) -> dict[int, list[torch.fx.Node]]:
    """A run of layer nodes by shallow position; each layer's block as long as its template's."""
    positions = [found.layer[n] for n in run]
    if positions != sorted(positions):
        raise NotReplicable(f"the layers interleave at {run[0].name}")
    blocks: dict[int, list[torch.fx.Node]] = {}
    for node, position in zip(run, positions):
        blocks.setdefault(position, []).append(node)
    for position, block in blocks.items():
        template = found.plan.templates[found.plan.kind_at(position)]
        if len(block) != len(blocks.get(template, [])):
            raise NotReplicable(f"layers {found.plan.held[position]} and {found.plan.held[template]} "
                                f"differ at {block[0].name}")
    return blocks


def _copy_block(new: torch.fx.Graph, block: list[torch.fx.Node], positions: tuple[int, int],
                stack: LayerStack, env: dict[torch.fx.Node, torch.fx.Node], arg: Callable) -> None:
    """Copy ``block`` (nodes of the shallow layer at ``positions[0]``) as layer ``positions[1]``."""
    source, index = positions
    for node in block:
        if node.op == "get_attr" and (source, index) != (0, 0):  # named as export names it, after the target
            target = renumber(node.target, stack, source, index)
            copied = new.create_node("get_attr", target, name=target.replace(".", "_"))
            copied.meta = copy.copy(node.meta)
        else:
            copied = new.node_copy(node, arg)
        if "nn_module_stack" in node.meta and source != index:
            copied.meta["nn_module_stack"] = _renumbered_stack(node.meta, stack, source, index)
        env[node] = copied


def _tiny_llama(layers: int = 3) -> torch.nn.Module:
    """A Llama of ``layers`` layers for the examples above."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, vocab_size=32))
