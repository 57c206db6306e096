"""An in-process cache of exported graphs: a second ``rewrite`` (or ``load``) of a model of the
same class, configuration, structure and input signature skips ``torch.export`` (the seconds a
rewrite costs) and rebinds the cached graph to the new model's own parameters by name.

The key holds the model class, its config (``to_json_string``), attention and experts
implementations,
every module's path and type, every parameter's and buffer's name, shape, dtype and device,
which names share one parameter (tied weights, replicated layers), the captured inputs' names, dtypes and ranks, and the torch and transformers versions. A changed
forward that none of these reveal (a monkeypatched method) is not seen: set
``FXPEFT_CAPTURE_CACHE=0`` to turn the cache off. HF captures are also kept on disk, for a new
process (``fxpeft.capture.disk_cache``; ``FXPEFT_CAPTURE_CACHE=memory`` keeps them in memory only).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from typing import Any, Hashable

import torch
import torch.fx
from torch.fx._lazy_graph_module import _make_graph_module, _use_lazy_graph_module

from fxpeft.graph.targets import fetch, has_target, place
from fxpeft.graph.bounded_cache import BoundedCache
from fxpeft.capture import disk_cache
from fxpeft.capture.hf import face_of
from fxpeft.capture.program import CaptureInfo, Program, copy_graph

MAX_ENTRIES = 4
_ENTRIES = BoundedCache(MAX_ENTRIES)  # key -> CachedGraph


@dataclass(frozen=True)
class CachedGraph:
    graph: torch.fx.Graph  # never handed out: every hit gets a copy
    constants: dict[str, Any]  # get_attr targets that are not the model's (lifted constants)
    info: CaptureInfo


def enabled() -> bool:
    return os.environ.get("FXPEFT_CAPTURE_CACHE", "1") != "0"


def _versions() -> tuple[str, str]:
    import transformers
    return torch.__version__, transformers.__version__


def cache_key(model: torch.nn.Module, inputs: dict[str, Any]) -> Hashable:
    """What decides the exported graph, as a hashable value."""
    config = model.config
    structure = tuple((name, type(m).__module__, type(m).__qualname__) for name, m in model.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device.type)
                    for name, t in (*model.named_parameters(), *model.named_buffers()))
    signature = tuple((name, getattr(t, "dtype", type(t)), getattr(t, "ndim", None))
                      for name, t in inputs.items())
    return (type(model).__module__, type(model).__qualname__, config.to_json_string(),
            getattr(config, "_attn_implementation", None),
            getattr(config, "_experts_implementation", None), structure, tensors, shared_names(model),
            signature, _versions())


def shared_names(model: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
    """The names that hold one parameter object between them (tied embeddings, the copies of a
    replicated layer): export reads such a parameter once, so they shape the graph.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> net[1].weight = net[0].weight
    >>> shared_names(net)
    (('0.weight', '1.weight'),)
    """
    holders: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(name)
    return tuple(tuple(names) for names in holders.values() if len(names) > 1)


def store(key: Hashable, model: torch.nn.Module, program: Program, disk: bool = False) -> None:
    """Keep a copy of ``program``'s graph (before emit changes it) and its constants; with
    ``disk``, write it to the on-disk cache too (``fxpeft.capture.disk_cache``)."""
    lifted = constants(program.graph_module, model)
    _ENTRIES.keep(key, CachedGraph(copy_graph(program.graph), _own(lifted),
                                   replace(program.info, config=None, hf=None)))
    if disk and not lifted and disk_cache.enabled():  # lifted constants are data: not on disk
        disk_cache.save(key, program.graph, program.info)


def lookup(key: Hashable, model: torch.nn.Module, disk: bool = False) -> Program | None:
    """A ``Program`` bound to ``model``'s parameters, or None on a miss; with ``disk``, an
    in-process miss reads the on-disk cache (whose graph the ``Program`` then gets: copying it
    for the in-process cache would cost what reading it again does)."""
    cached = _ENTRIES.recall(key)
    if cached is not None:
        graph, info = copy_graph(cached.graph), cached.info
    elif disk and disk_cache.enabled() and (found := disk_cache.load(key)) is not None:
        graph, info = found
    else:
        return None
    info = replace(info, config=model.config, training=model.training,
                   hf=face_of(model) if info.inputs else None)
    return Program(bind(graph, _own(cached.constants) if cached is not None else {}, model), info)


def _own(constants: dict[str, Any]) -> dict[str, Any]:
    """``constants`` with a copy of each submodule (the bodies of export's higher-order ops,
    such as ``wrap_with_set_grad_enabled``): a graph's ``.to(device)`` rewrites its submodules'
    device constants in place, which must not reach the cache or the graphs it hands out.

    >>> body = torch.nn.Linear(1, 1)
    >>> _own({"submod_1": body, "c": torch.ones(())})["submod_1"] is body
    False
    """
    return {t: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for t, v in constants.items()}


def constants(graph_module: torch.fx.GraphModule, model: torch.nn.Module) -> dict[str, Any]:
    """The values of ``graph_module``'s get_attr targets that ``model`` does not have (constants
    export lifted), by target."""
    targets = {n.target for n in graph_module.graph.find_nodes(op="get_attr")}
    return {t: fetch(graph_module, t) for t in targets if not has_target(model, t)}


def bind(graph: torch.fx.Graph, lifted: dict[str, Any], model: torch.nn.Module) -> torch.fx.GraphModule:
    """A GraphModule running ``graph`` on ``model``'s own parameters and buffers (by name), and on
    ``lifted`` constants for the targets the model does not have.

    >>> model = torch.nn.Linear(2, 2)
    >>> graph = torch.fx.Graph(); _ = graph.output(graph.get_attr("weight"))
    >>> bind(graph, {}, model).weight is model.weight
    True
    """
    root = torch.nn.Module()
    for target in {n.target for n in graph.find_nodes(op="get_attr")}:
        place(root, target, lifted[target] if target in lifted else fetch(model, target))
    # Lazy: this module only carries the graph until emit builds the one users call, so its
    # Python code (a tenth of a second for a 30-layer model) is generated only if it runs.
    with _use_lazy_graph_module(True):
        return _make_graph_module(root, graph)


def clear() -> None:
    _ENTRIES.clear()
