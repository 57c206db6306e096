"""Frontends: turn an ``nn.Module`` into a plain ``Program`` (a GraphModule plus its index);
the emit step (``fxpeft.runtime.emit``) builds the ``AdaptedModule`` from it.

HF transformers models go through non-strict ``torch.export`` with dynamic batch and sequence
dimensions (a model exports the first and last layer of each kind of layer only, and
``fxpeft.capture.replicate`` copies each kind's subgraph for the rest); plain modules through
``torch.fx.symbolic_trace`` (with user leaf modules), falling back to ``torch.export`` when
example inputs are given.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.utils._sympy.numbers import int_oo

from fxpeft.capture import attention, cache as capture_cache, hf, positions, quantized, replicate
from fxpeft.errors import CaptureError
from fxpeft.capture.linear_sites import find_linear_sites
from fxpeft.graph.targets import owning_module
from fxpeft.capture.program import CaptureInfo, Program, shell_module
from fxpeft.capture.versions import check_versions

log = logging.getLogger("fxpeft")
aten = torch.ops.aten
_EXPORT_CHECKS = (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                  aten.sym_constrain_range_for_size.default)
# Ops whose train-mode form export freezes into the graph (dropout is handled by fxpeft.runtime.emit).
_RANDOM_OPS = frozenset({aten.rand.default, aten.rand_like.default, aten.randn.default,
                         aten.randn_like.default, aten.bernoulli.default, aten.bernoulli.p,
                         aten.bernoulli_.float, aten.uniform_.default, aten.normal_.default,
                         aten.multinomial.default, aten.randint.low, aten.randperm.default,
                         aten.native_dropout.default})
_BATCH_NORMS = {aten._native_batch_norm_legit_functional.default: 5,  # -> the "training" argument
                aten._native_batch_norm_legit.default: 5, aten.native_batch_norm.default: 5,
                aten.batch_norm.default: 5, aten.cudnn_batch_norm.default: 5}


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside, as it was after. Capture makes hundreds of
    thousands of short-lived objects (fake tensors, symbolic sizes, nodes), which set off full
    collections that walk every object the process holds: 0.27 s of a 2.0 s first ``rewrite`` of
    SmolLM2 (for 2 MB more peak memory). The setting is process-wide, like ``gc.disable``.

    >>> with collector_paused():
    ...     gc.isenabled()
    False
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def capture(model: torch.nn.Module, example_inputs: Any = None, leaf_modules: Sequence[type] = (),
            allow_training_branches: bool = False) -> Program:
    """Capture ``model`` into a ``Program``; the model's parameters are shared, not copied.

    Export captures in train mode, which freezes every ``if self.training:`` branch; dropout
    is made switchable again (``fxpeft.runtime.emit``), but any other train-only op (batch-norm batch
    statistics, drop-path or router-jitter randomness) is refused with a ``CaptureError`` unless
    ``allow_training_branches`` (a rule file's top-level key) says it is safe.

    >>> program = capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> program.frontend, [s.module_path for s in program.sites]
    ('symbolic_trace', ['0'])
    """
    check_versions()
    if isinstance(getattr(model, "capture_info", None), CaptureInfo):  # an emitted graph
        raise CaptureError(f"{type(model).__name__} is already an fxpeft graph; rewrite the "
                           f"original model instead (or load several adapters into it)")
    with _quantized_stand_ins(model) as count:
        if hf.is_hf_model(model):
            program = _capture_hf(model, example_inputs, cacheable=count == 0)
        else:
            program = _capture_plain(model, example_inputs, tuple(leaf_modules))
    if program.frontend == "export" and not allow_training_branches:
        _refuse_training_branches(model, program.graph)
    attention.mark_weight_reads(program.graph, model)
    program.sites = find_linear_sites(program.graph_module)
    log.debug("capture: %s via %s, %d linear sites", program.model_class, program.frontend,
              len(program.sites))
    return program


@contextlib.contextmanager
def _quantized_stand_ins(model: torch.nn.Module) -> Iterator[int]:
    """bitsandbytes layers become one custom op each (``fxpeft.capture.quantized``) while capturing."""
    try:
        with quantized.stand_ins(model) as count:
            yield count
    except quantized.QuantizedLayerError as err:
        raise CaptureError(f"{type(model).__name__}: {err}") from None


def _train_only_op(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _RANDOM_OPS:
        return True
    return node.target in _BATCH_NORMS and bool(node.args[_BATCH_NORMS[node.target]])


def _refuse_training_branches(model: torch.nn.Module, graph: torch.fx.Graph) -> None:
    found = [n for n in graph.nodes if _train_only_op(n)]
    if found:
        where = ", ".join(f"{n.target} in {(owning_module(n) or ('?', ''))[0] or 'the model'}"
                          for n in found[:3])
        raise CaptureError(f"{type(model).__name__}: the graph is captured in train mode, and "
                           f"{len(found)} train-only op(s) besides dropout would run in eval mode "
                           f"too: {where}. Set allow_training_branches = true at the top of the "
                           f"rule file if that is safe, or remove them (e.g. freeze batch norm)")


def _fail(model: torch.nn.Module, how: str, err: Exception, advice: str) -> CaptureError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return CaptureError(f"could not capture {type(model).__name__} with {how}: {reason}\n"
                        f"Try: {advice}")


@contextlib.contextmanager
def _capture_mode(model: torch.nn.Module) -> Iterator[None]:
    """Train mode (so every dropout probability lands in the graph) and no KV cache.

    Sub-modules may hold their own config copies (T5's decoder stack), so each is switched.
    """
    was_training = model.training
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "use_cache")}
    saved = {key: config.use_cache for key, config in configs.items()}
    model.train()
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        for key, config in configs.items():
            config.use_cache = saved[key]


def _capture_hf(model: torch.nn.Module, example_inputs: Any, cacheable: bool = True) -> Program:
    inputs = dict(example_inputs) if example_inputs is not None else hf.example_inputs(model)
    if "input_ids" not in inputs:
        raise CaptureError(f"{type(model).__name__}: example_inputs must include input_ids")
    inputs = {"input_ids": inputs.pop("input_ids"), **inputs}
    # Quantized layers are not the model's parameters: the cache could not rebind them.
    key = capture_cache.cache_key(model, inputs) if cacheable and capture_cache.enabled() else None
    cached = capture_cache.lookup(key, model, disk=True) if key is not None else None
    if cached is not None:
        log.debug("capture: %s from the capture cache", type(model).__name__)
        return cached
    # Replicated graphs are bound to the model's parameters by name: not for quantized layers.
    default, packs = _positions(probe_model(model, cacheable), inputs)
    program = (_replicated(model, inputs) if cacheable and replication_enabled() else None) \
        or _exported(model, inputs)
    program.info = replace(program.info, positions=default, packs=packs,
                           max_seq=program.info.max_seq or _learned_positions(model, inputs))
    if key is not None:
        capture_cache.store(key, model, program, disk=True)
    return program


def _positions(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[str | None, bool]:
    """``positions.probe``'s answers; ``position_ids`` leaves ``inputs`` when the graph could
    not fill it as the model does. A graph captured without it computes the default inside,
    and ``fxpeft.generate`` numbers a lengthened prefill as it does (``probe_default``)."""
    if "position_ids" in inputs:
        default, packs = positions.probe(model, inputs)
        if default is None:
            inputs.pop("position_ids")
        return default, packs
    return (positions.probe_default(model, inputs) if positions.takes_positions(model) else None), False


def probe_model(model: torch.nn.Module, replicable: bool = True) -> torch.nn.Module:
    """The model ``positions.probe`` runs: for a model whose layers replicate, its shallow copy
    holding each kind's first layer (``replicate.shallow_model``: the model's own embeddings,
    config and mask code, one layer per kind of layer), which answers as the whole model does in
    a fraction of the time. What the probe asks (the default ``position_ids``, whether packed
    sequences are kept apart) is decided by the position and mask code each kind of layer reads,
    and one attention layer already mixes tokens across a pack. (The eager forwards on the whole
    model were half of a cold ``rewrite`` of the 30-layer SmolLM2, and 7 s of CPU for an 18-layer
    Gemma-3.)

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
    ...                          num_attention_heads=2, vocab_size=32))
    >>> len(probe_model(model).model.layers)
    1
    """
    if not (replicable and replication_enabled()):
        return model
    try:
        stack = replicate.find_layer_stack(model)
        kinds = replicate.plan_layers(model, stack).kinds
    except replicate.NotReplicable:
        return model
    return replicate.shallow_model(model, stack, tuple(sorted({kinds.index(kind) for kind in kinds})))


def _learned_positions(model: torch.nn.Module, inputs: dict[str, Any]) -> int | None:
    """The rows of a learned position table (BERT, OPT, GPT-2): with ``position_ids`` an input,
    export no longer bounds the sequence by slicing it, so the input adapter checks the length."""
    rows = getattr(model.config, "max_position_embeddings", None)
    if "position_ids" not in inputs or not rows:
        return None
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)
              and m.num_embeddings - getattr(m, "offset", 0) == rows]
    return rows if len(tables) > 0 and any(m is not model.get_input_embeddings() for m in tables) else None


def replication_enabled() -> bool:
    """Capture-once-and-replicate (``fxpeft.capture.replicate``); ``FXPEFT_REPLICATE=0`` turns it off."""
    return os.environ.get("FXPEFT_REPLICATE", "1") != "0"


def _export(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.export.ExportedProgram:
    with _capture_mode(model):
        try:
            return torch.export.export(model, (), inputs, dynamic_shapes=hf.dynamic_shapes(inputs),
                                       strict=False)
        except Exception as err:  # torch.export raises many types; all mean "could not capture"
            raise _fail(model, "torch.export", err, _export_advice(model)) from err


def _export_advice(model: torch.nn.Module) -> str:
    """What to try; for a mixture-of-experts model on transformers' ``eager`` experts, whose
    loop over the experts hit has a data-dependent length, an implementation export captures."""
    if getattr(getattr(model, "config", None), "_experts_implementation", None) == "eager":
        return ("load it with experts_implementation='batched_mm' (or 'grouped_mm'): the 'eager' "
                "experts loop over the experts a batch routes to, a data-dependent length")
    return ("pass example_inputs= that the model's forward accepts, or load it with "
            "attn_implementation='sdpa' or 'eager'")


def _exported(model: torch.nn.Module, inputs: dict[str, Any]) -> Program:
    return _hf_program(model, _export(model, inputs), tuple(inputs))


def _replicated(model: torch.nn.Module, inputs: dict[str, Any]) -> Program | None:
    """The full graph built from an export of the first and last layer of each kind, or None
    (with the reason in the debug log) where ``fxpeft.capture.replicate`` cannot show it is the
    same graph."""
    try:
        stack = replicate.find_layer_stack(model)
        plan = replicate.plan_layers(model, stack)
        program = replicate.captured_once(
            model, lambda shallow: _hf_program(model, _export(shallow, inputs), tuple(inputs)), stack, plan)
    except (replicate.NotReplicable, CaptureError) as why:
        log.debug("capture: %s exported whole, not replicated: %s", type(model).__name__, why)
        return None
    log.debug("capture: %s replicated from %d of its %d layers (%d kinds)", type(model).__name__,
              len(plan.held), len(stack.layers), len(set(plan.kinds)))
    return program


def _max_sequence(exported: torch.export.ExportedProgram, example: torch.fx.Node) -> int | None:
    size = example.meta["val"].shape[1] if "val" in example.meta else None
    bound = exported.range_constraints.get(getattr(size, "node", None) and size.node.expr)
    upper = getattr(bound, "upper", None)
    return int(upper) if upper is not None and upper != int_oo else None


def _hf_program(model: torch.nn.Module, exported: torch.export.ExportedProgram,
                names: tuple[str, ...]) -> Program:
    root = exported.module()
    tidy_export(root)
    first = next(iter(root.graph.find_nodes(op="placeholder")))
    info = CaptureInfo(type(model).__name__, "export", names, model.config, root._out_spec,
                       _max_sequence(exported, first), model.training, hf.face_of(model))
    return Program(root, info)


def strip_export_checks(graph: torch.fx.Graph) -> int:
    """Remove export's input guards and metadata asserts (they pin nothing we rely on)."""
    doomed = [n for n in graph.nodes if (n.op == "call_module" and n.target == "_guards_fn")
              or (n.op == "call_function" and n.target in _EXPORT_CHECKS and not n.users)]
    for node in doomed:
        graph.erase_node(node)
    return len(doomed)


def grad_mode_region(enable: bool, body: Callable[..., Any], *args: Any) -> Any:
    """Export's ``wrap_with_set_grad_enabled`` (a ``no_grad`` block in ``forward``), restoring
    the grad mode however ``body`` ends: torch's own leaves it switched off when the body raises.

    >>> def fails(x):
    ...     raise ValueError("no")
    >>> try:
    ...     grad_mode_region(False, fails, 1)
    ... except ValueError:
    ...     torch.is_grad_enabled()
    True
    """
    with torch.set_grad_enabled(enable):
        return body(*args)


def tidy_export(root: torch.fx.GraphModule) -> int:
    """``strip_export_checks`` in ``root`` and in the bodies of its higher-order ops, whose grad
    mode regions become ``grad_mode_region`` calls; returns how many nodes changed."""
    from torch._higher_order_ops.wrap import wrap_with_set_grad_enabled
    changed = 0
    for module in [m for m in root.modules() if isinstance(m, torch.fx.GraphModule)]:
        changed += strip_export_checks(module.graph)
        for node in module.graph.find_nodes(op="call_function", target=wrap_with_set_grad_enabled):
            node.target = grad_mode_region
            changed += 1
        if module is not root:
            module.recompile()
    return changed


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaf_modules: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_modules = leaf_modules

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.leaf_modules) or super().is_leaf_module(module, qualified_name)

    def call_module(self, module: torch.nn.Module, forward: Callable[..., Any], args: tuple,
                    kwargs: dict[str, Any]) -> Any:
        # An attention layer's packed weights become reads a kind can adapt (fxpeft.capture.attention).
        if attention.opens(module) and not isinstance(module, self.leaf_modules):
            return attention.trace_attention(self, module, args, kwargs)
        return super().call_module(module, forward, args, kwargs)


def _capture_plain(model: torch.nn.Module, example_inputs: Any,
                   leaf_modules: tuple[type, ...]) -> Program:
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # symbolic tracing raises anything the model's Python does
        if example_inputs is None:
            raise _fail(model, "torch.fx.symbolic_trace", err, "mark untraceable submodules with "
                        "leaf_modules=(...), or pass example_inputs= to capture with torch.export") from err
        return _capture_plain_export(model, example_inputs)
    graph_module = torch.fx.GraphModule(tracer.root, graph)
    _detach_called_modules(graph_module)
    return Program(graph_module, CaptureInfo(type(model).__name__, "symbolic_trace",
                                             training=model.training))


def _detach_called_modules(graph_module: torch.fx.GraphModule) -> None:
    """GraphModule keeps the user's own objects for ``call_module`` targets; swap in shells, as
    the export frontend never touches the user's modules either."""
    targets = {n.target for n in graph_module.graph.nodes if n.op == "call_module"}
    for target in sorted(targets, key=lambda t: t.count(".")):
        parent, _, name = target.rpartition(".")
        owner = graph_module.get_submodule(parent) if parent else graph_module
        owner._modules[name] = shell_module(owner._modules[name])


def _capture_plain_export(model: torch.nn.Module, example_inputs: Any) -> Program:
    args, kwargs = (example_inputs, {}) if isinstance(example_inputs, tuple) else ((), dict(example_inputs))
    auto = torch.export.Dim.AUTO
    shapes = pytree.tree_map(lambda t: {i: auto for i in range(t.dim())}
                             if isinstance(t, torch.Tensor) else None, kwargs or args)
    with _capture_mode(model):
        try:
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as err:
            raise _fail(model, "torch.export", err, "check example_inputs match forward()") from err
    root = exported.module()
    tidy_export(root)
    return Program(root, CaptureInfo(type(model).__name__, "export", training=model.training))
