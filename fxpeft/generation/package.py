"""``fxpeft.package``: the adapted graph as an AOTInductor package (``.pt2``), which a process
with only torch loads (``torch._inductor.aoti_load_package``) and runs, with no fxpeft and no
transformers.

What is packaged is a wrapper around one of two graphs, exported with ``torch.export`` and
compiled by ``torch._inductor.aoti_compile_and_package``:

- the forward graph (``decode_length=None``): called with the keyword tensors of
  ``example_inputs`` (``input_ids``, ``attention_mask``, ...), batch and sequence dynamic; it
  returns the logits, a plain tensor, not transformers' output dataclass;
- the KV-cached decode graph of a causal LM (``decode_length=N``, ``fxpeft.generate``'s graph):
  called ``(input_ids, attention_mask, position_ids, cache_position)`` for the prefill and for
  each one-token step, it writes its own static KV cache of ``N`` slots (the package keeps it
  between calls) and returns the last position's logits. ``attention_mask`` is
  ``[batch, cache length]``: 1 where a token was written, 0 elsewhere.

Unmerged (the default), the package keeps every adapter and takes one more keyword input,
``adapter``: a 0-d int64 tensor, the adapter's position in ``gm.adapter_names()``, or -1 for the
base model. It fills the gates (``fxpeft.graph.gates``) before the graph runs, so switching is
data, as in the graph itself. ``merged=True`` packages ``fxpeft.merge(gm, dequantize=True)``:
the base graph's ops on merged, dense weights, and no ``adapter`` input.

fxpeft's own custom ops are lowered to aten first (``fxpeft::frozen_linear``, which
``fxpeft.fuse`` puts in, is an ``aten.linear``); the exported program is then checked to call
only aten, prims and Python's operators: anything else (bitsandbytes' kernels behind
``fxpeft::linear_4bit``, a chunked loss) is refused by name, before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.fx

from fxpeft import registry
from fxpeft.capture.linear_sites import find_linear_sites
from fxpeft.capture.program import copy_graph
from fxpeft.errors import FxpeftError
from fxpeft.generation.decode_graph import cache_length, decoder_for
from fxpeft.graph.gates import adapter_names, gate_buffers, gate_open
from fxpeft.graph.records import adapter_records
from fxpeft.graph.state import graph_state, set_graph_state
from fxpeft.names import GATES
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft.transforms.merge import merge

log = logging.getLogger("fxpeft")
aten = torch.ops.aten

# fxpeft's custom ops that have an exact aten form: the packaged program must not need fxpeft
LOWERED = {"fxpeft::frozen_linear": aten.linear.default}
# namespaces a packaged program may call: torch's own
PACKAGEABLE_NAMESPACES = frozenset({"aten", "prims"})
PACKAGE_SUFFIX = ".pt2"
ADAPTER_INPUT = "adapter"


@dataclasses.dataclass(frozen=True)
class PackageInfo:
    """What ``package`` wrote: the file, the inputs it takes (in order; ``adapter`` last where
    the adapters switch), the adapters in index order (empty where merged) and the KV cache's
    length (None for a forward graph)."""

    path: Path
    inputs: tuple[str, ...]
    adapters: tuple[str, ...]
    cache_length: "int | None"


class _Packaged(torch.nn.Module):
    """What is exported: ``graph`` called on positional inputs (``keywords`` names the last ones
    the graph takes by keyword), after the trailing ``adapter`` input (where ``switches``) has
    filled the gates; the output reduced to tensors."""

    def __init__(self, graph: torch.fx.GraphModule, keywords: tuple[str, ...], switches: bool) -> None:
        super().__init__()
        self.graph_module, self.keywords, self.switches = graph, keywords, switches

    def forward(self, *inputs: torch.Tensor) -> Any:
        if self.switches:
            *inputs, adapter = inputs
            for position, (_, gate) in enumerate(gate_buffers(getattr(self.graph_module, GATES))):
                gate.copy_((adapter == position).to(gate.dtype))
        split = len(inputs) - len(self.keywords)
        # the generated forward itself: fx's call wrapper is kept out of torch.compile's frames
        # (torch.compiler.disable), which torch.export refuses, and the pre-hooks check inputs
        # that export traces symbolically anyway
        return plain_output(self.graph_module.forward(
            *inputs[:split], **dict(zip(self.keywords, inputs[split:]))))


def plain_output(output: Any) -> "torch.Tensor | tuple[torch.Tensor, ...]":
    """A graph's output as tensors: a tensor as it is, an HF output dataclass as its ``logits``,
    a tuple of tensors as it is.

    >>> plain_output(torch.zeros(1)).shape, len(plain_output((torch.zeros(1), torch.ones(1))))
    (torch.Size([1]), 2)
    >>> plain_output({"hidden": 1})
    Traceback (most recent call last):
    ...
    fxpeft.errors.FxpeftError: fxpeft.package: the graph returns dict, which is neither a tensor, a tuple of tensors nor an output with .logits
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, tuple) and output and all(isinstance(t, torch.Tensor) for t in output):
        return output
    raise FxpeftError(f"fxpeft.package: the graph returns {type(output).__name__}, which is "
                      f"neither a tensor, a tuple of tensors nor an output with .logits")


def lower_fxpeft_ops(gm: torch.fx.GraphModule) -> int:
    """Replace each fxpeft custom op that has an exact aten form (``LOWERED``) by that form, in
    place; returns how many nodes changed.

    >>> from fxpeft.transforms.cpu_gemm import frozen_linear  # registers fxpeft::frozen_linear
    >>> g = torch.fx.Graph(); x, w = g.placeholder("x"), g.placeholder("w")
    >>> _ = g.output(g.call_function(torch.ops.fxpeft.frozen_linear.default, (x, w, None)))
    >>> gm = torch.fx.GraphModule(torch.nn.Module(), g)
    >>> lower_fxpeft_ops(gm), [n.target for n in gm.graph.nodes][2]
    (1, <OpOverload(op='aten.linear', overload='default')>)
    """
    changed = 0
    for node in gm.graph.nodes:
        name = getattr(node.target, "name", lambda: "")() if node.op == "call_function" else ""
        if name in LOWERED:
            node.target = LOWERED[name]
            changed += 1
    if changed:
        gm.recompile()
    return changed


def _lowered_copy(gm: AdaptedModule) -> AdaptedModule:
    """``gm`` itself where it calls no lowerable op, else a copy (sharing its tensors) with them
    lowered: the caller's graph keeps its fast CPU GEMM."""
    if not any(n.op == "call_function" and getattr(n.target, "name", lambda: "")() in LOWERED
               for n in gm.graph.nodes):
        return gm
    lowered = AdaptedModule(gm, copy_graph(gm.graph), class_name=type(gm).__name__)
    lowered.capture_info = gm.capture_info
    set_graph_state(lowered, graph_state(gm).derived(role=graph_state(gm).role))
    lower_fxpeft_ops(lowered)
    return lowered.eval()


def _op_name(target: Any) -> "str | None":
    """The ``namespace::op`` of an operator overload (None for Python callables)."""
    return target.name() if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) \
        else None


def foreign_ops(graph: torch.fx.Graph) -> list[str]:
    """The ops of ``graph`` a process with only torch cannot run: operator overloads outside
    ``PACKAGEABLE_NAMESPACES``, and Python functions other than ``operator``'s and torch's
    symbolic-shape helpers, each named once.

    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> _ = g.output(g.call_function(torch.ops.aten.relu.default, (x,)))
    >>> foreign_ops(g)
    []
    """
    found: dict[str, None] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name is not None and name.split("::")[0] not in PACKAGEABLE_NAMESPACES:
            found[name] = None
        elif name is None and getattr(node.target, "__module__", "") not in (
                operator.__name__, "_operator", "torch", "torch.sym_float", "math"):
            found[f"{getattr(node.target, '__module__', '?')}.{node.target.__name__}"] = None
    return list(found)


def _refuse(adapters: list[str], why: str) -> None:
    if adapters:
        raise FxpeftError(f"fxpeft.package: adapters {sorted(adapters)} {why}")


def _check_switchable(gm: AdaptedModule) -> None:
    """Refuse adapters whose on/off state changes the graph's shape (``gate_flag``): export bakes
    that Python bool in, so the ``adapter`` input could not switch them."""
    _refuse(list({n.args[1] for n in gm.graph.find_nodes(op="call_function", target=gate_open)}),
            "change the graph's shape when switched (their kinds lengthen the input): an input "
            "tensor cannot switch them, so an unmerged package cannot hold them")


def _check_decodable(gm: AdaptedModule) -> None:
    """Refuse, by adapter and kind, adapters the packaged decode graph cannot hold: kinds that
    put tokens in front of the prompt or fill the KV cache need ``fxpeft.generate``'s loop."""
    _refuse([f"{adapter} ({rule.rewrite})" for adapter, record in adapter_records(gm).items()
             for rule in record.rules.rules
             if registry.get(rule.rewrite).lengthens or registry.get(rule.rewrite).fills_cache],
            "put tokens or cache entries in front of the prompt, which fxpeft.generate writes "
            "outside the decode graph; a packaged decode graph cannot hold them (package the "
            "forward graph: decode_length=None)")


def _check_dense(gm: AdaptedModule) -> None:
    quantized = [site.module_path for site in find_linear_sites(gm) if site.kind == "quantized"]
    if quantized:
        raise FxpeftError(f"fxpeft.package: {len(quantized)} quantized (bitsandbytes) layers, "
                          f"{quantized[0]} first: their kernels are bitsandbytes', not torch's; "
                          f"merged=True packages them dense (fxpeft.merge(gm, dequantize=True))")


def _decode_inputs(example: torch.Tensor, length: int) -> tuple[tuple, dict]:
    """Example prefill inputs of the decode graph, and their dynamic shapes (the tokens)."""
    batch, tokens = example.shape
    mask = torch.zeros(batch, length, dtype=torch.long, device=example.device)
    mask[:, :tokens] = 1
    steps = torch.arange(tokens, device=example.device)
    seq = torch.export.Dim("tokens", min=1, max=length - 1)
    return (example, mask, steps.expand(batch, tokens), steps), \
        ({1: seq}, None, {1: seq}, {0: seq})


def _forward_shapes(inputs: Mapping[str, torch.Tensor]) -> tuple[dict, ...]:
    """Batch and sequence dynamic in every input (``Dim.AUTO``: kept static where the graph
    needs them so)."""
    return tuple({d: torch.export.Dim.AUTO for d in range(min(t.dim(), 2))} for t in inputs.values())


def _graph_to_package(gm: AdaptedModule, merged: bool, decode_length: "int | None",
                      batch: int) -> AdaptedModule:
    if merged:
        gm = merge(gm, dequantize=True)
    if decode_length is not None:
        _check_decodable(gm)
        gm = decoder_for(gm, batch, decode_length)
    elif not merged:
        _check_dense(gm)
        _check_switchable(gm)
    return _lowered_copy(gm)


def packaged_program(gm: AdaptedModule, example_inputs: "Mapping[str, torch.Tensor] | torch.Tensor",
                     *, merged: bool = False,
                     decode_length: "int | None" = None) -> tuple[torch.export.ExportedProgram, PackageInfo]:
    """The exported program ``package`` compiles (and what it takes), checked to need only
    torch: cheap to build, so tests and callers can run it (``.module()``) before compiling.

    >>> import torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> gm = fxpeft.rewrite(model, "lora_qv.toml")
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> program, info = packaged_program(gm, {"input_ids": ids})
    >>> info.inputs, info.adapters
    (('input_ids', 'adapter'), ('default',))
    >>> torch.allclose(program.module()(ids, torch.tensor(0)), gm(ids).logits)
    True
    """
    if decode_length is not None:
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 2:
            raise FxpeftError("fxpeft.package: with decode_length, example_inputs is a prompt's "
                              "input_ids [batch, tokens]")
        decode_length = cache_length(decode_length)
        args, shapes = _decode_inputs(example_inputs, decode_length)
        keywords: tuple[str, ...] = ()
        names: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids", "cache_position")
    else:
        if not isinstance(example_inputs, Mapping) or not example_inputs:
            raise FxpeftError("fxpeft.package: example_inputs is a dict of keyword tensors, "
                              "e.g. {'input_ids': ids, 'attention_mask': mask}")
        names = keywords = tuple(example_inputs)
        args, shapes = tuple(example_inputs.values()), _forward_shapes(example_inputs)
    graph = _graph_to_package(gm, merged, decode_length, args[0].shape[0])
    adapters = () if merged else tuple(adapter_names(graph))
    if adapters:
        args, shapes = (*args, torch.tensor(-1)), (*shapes, None)  # export must not depend on which is on
        names = (*names, ADAPTER_INPUT)
    program = _export(_Packaged(graph, keywords, bool(adapters)), args, {"inputs": shapes})
    return program, PackageInfo(Path(), names, adapters, decode_length)


def _export(packaged: _Packaged, args: tuple, shapes: Any) -> torch.export.ExportedProgram:
    graph = packaged.graph_module
    was_training = graph.training
    graph.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(packaged, args, dynamic_shapes=shapes, strict=False)
    except FxpeftError:
        raise
    except Exception as err:  # torch.export raises many types; all mean "could not capture"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise FxpeftError(f"fxpeft.package: could not export the graph: {reason}") from err
    finally:
        graph.train(was_training)
    foreign = foreign_ops(program.graph)
    if foreign:
        raise FxpeftError(f"fxpeft.package: the graph calls {foreign}, which a process with only "
                          f"torch cannot run; they have no aten form fxpeft knows")
    return program


def package(gm: AdaptedModule, path: "str | Path",
            example_inputs: "Mapping[str, torch.Tensor] | torch.Tensor", *, merged: bool = False,
            decode_length: "int | None" = None) -> PackageInfo:
    """Compile ``gm`` into an AOTInductor package at ``path`` (``.pt2``) that runs without
    fxpeft or transformers: ``torch._inductor.aoti_load_package(path)`` gives a callable.

    ``example_inputs``: the forward graph's keyword tensors (``{"input_ids": ids, ...}``), or,
    with ``decode_length``, a prompt's ``input_ids`` (its batch size is the package's) for the
    KV-cached decode graph of up to ``decode_length`` tokens (rounded up to a multiple of 16).
    Unmerged, the package takes an ``adapter`` input (index into ``PackageInfo.adapters``, -1
    for none); ``merged=True`` folds the active adapters in. Compiling takes about a minute on
    two cores, even for a tiny model (C++, with g++).

    >>> import torch, fxpeft  # doctest: +SKIP
    >>> info = fxpeft.package(gm, "model.pt2", {"input_ids": ids}, merged=True)  # doctest: +SKIP
    >>> torch._inductor.aoti_load_package("model.pt2")(ids)  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix != PACKAGE_SUFFIX:
        raise FxpeftError(f"fxpeft.package: {path}: an AOTInductor package's name ends in "
                          f"{PACKAGE_SUFFIX}")
    if not path.parent.is_dir():
        raise FxpeftError(f"fxpeft.package: {path}: no folder {path.parent}")
    program, info = packaged_program(gm, example_inputs, merged=merged, decode_length=decode_length)
    partial = path.with_name(f".partial-{path.name}")  # nothing half-written under the real name
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    log.info("fxpeft.package: %s, inputs %s, %d adapters", path, info.inputs, len(info.adapters))
    return dataclasses.replace(info, path=path)
