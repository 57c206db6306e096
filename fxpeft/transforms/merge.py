"""Fold adapters into base weights: ``merge`` (a new graph) and ``merge_into`` (the HF model).

Only active adapters fold in (an off gate contributes nothing). Each active adapter's removable
nodes are handed to their kind's merger (``AdapterKind.merge``, from the registry); a kind that
cannot merge says why. The merged graph has the base graph's nodes, and new parameter objects
wherever a weight changed: the weights it shares with the original model are never written.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx

from fxpeft.graph.records import strip_adapters
from fxpeft.graph.targets import fetch, has_target, place
from fxpeft.graph.params import is_adapter_parameter
from fxpeft.errors import FxpeftError
from fxpeft.graph.gates import active_adapters, adapter_names, gate_buffers
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft import registry
from fxpeft.names import DEFAULT_ADAPTER, GATES, INPUTS_MODULE, adapter_node, is_fxpeft_node
from fxpeft.graph.targets import owning_module
from fxpeft.capture.layer_copies import ranges_text
from fxpeft.capture.program import copy_graph
from fxpeft.capture.quantized import dequantize_layers, quantized_op, requantize

aten = torch.ops.aten
log = logging.getLogger("fxpeft")


def _check_gates(gm: torch.nn.Module) -> None:
    gates = getattr(gm, GATES, None)
    for name, gate in (gate_buffers(gates) if gates is not None else ()):
        if float(gate) not in (0.0, 1.0):
            raise FxpeftError(f"merge: adapter {name!r} has a partly open gate ({float(gate)}); "
                              f"only on (1) or off (0) adapters can be folded")


def _check_not_replicated(gm: torch.nn.Module) -> None:
    """Copies of a replicated layer (``layer_replication``) read one shared base weight, each
    through an adapter of its own: no single weight holds every copy's adapter (PEFT refuses
    too)."""
    ranges = getattr(getattr(gm, "capture_info", None), "layer_replication", ())
    if ranges:
        raise FxpeftError(f"merge: cannot merge adapters when the base model's layers are "
                          f"replicated (layer_replication = {ranges_text(ranges)}): its "
                          f"copies share one base weight, each with its own adapter")


def merged_weights(gm: torch.fx.GraphModule, adapters: "set[str] | None" = None,
                   start: "dict[str, torch.Tensor] | None" = None) -> dict[str, torch.Tensor]:
    """Base parameter target -> its value with every active adapter folded in (new tensors);
    with ``adapters``, those adapters whatever their gates, and with ``start``, folded into
    these values of the base weights instead (fp32 copies: ``fxpeft.export_lora``)."""
    _check_not_replicated(gm)
    if adapters is None:
        _check_gates(gm)
    active = set(adapters) if adapters is not None else \
        set(active_adapters(gm)) if adapter_names(gm) else {DEFAULT_ADAPTER}
    weights: dict[str, torch.Tensor] = dict(start or {})
    owners: dict[str, str] = {}  # changed target -> the module whose adapter changed it
    folded = set()
    for node in gm.graph.nodes:
        entry = adapter_node(node)
        if entry is None or not entry.removable or entry.adapter not in active:
            continue
        if (entry.adapter, entry.kind, entry.detail) in folded:
            continue  # a module called at two sites: its adapter folds in once
        folded.add((entry.adapter, entry.kind, entry.detail))
        kind = registry.get(entry.kind)
        if isinstance(kind.merge, str):
            raise FxpeftError(f"merge: {entry.kind} adapter {entry.adapter!r} at "
                              f"{entry.module_path} cannot be merged: {kind.merge}")
        before = set(weights)
        kind.merge(gm, node, entry, weights)
        owners.update({target: entry.module_path for target in set(weights) - before})
    _check_not_shared(gm, owners)
    return weights


def _check_not_shared(gm: torch.fx.GraphModule, owners: dict[str, str]) -> None:
    """A merged weight that another module also reads (a tied ``lm_head`` and embedding) would
    change that module too: refuse, naming both."""
    for node in gm.graph.find_nodes(op="get_attr"):
        if node.target not in owners:
            continue
        for user in node.users:
            found = owning_module(user)
            if found is not None and not is_fxpeft_node(user) and found[0] != owners[node.target]:
                raise FxpeftError(f"merge: {node.target} is shared by {owners[node.target]} and "
                                  f"{found[0]} (tied weights); folding the adapter of "
                                  f"{owners[node.target]} into it would change {found[0]} too. "
                                  f"Untie the weights before rewriting, or keep the adapter unmerged")


def _module_with(module: torch.nn.Module, target: str, weights: dict) -> torch.nn.Module:
    """A ``call_module`` target as the merged graph needs it: a shallow copy holding the merged
    weights and none of the adapters' own parameters or submodules (``lora_A``, ``ia3_l_b``)."""
    changed = {k[len(target) + 1:]: v for k, v in weights.items() if k.startswith(f"{target}.")}
    adapters = [k for k in (*module._parameters, *module._modules) if is_adapter_parameter(k)]
    if not changed and not adapters:
        return module
    clone = copy.copy(module)
    clone._parameters = {k: v for k, v in module._parameters.items() if k not in adapters}
    clone._modules = {k: v for k, v in module._modules.items() if k not in adapters}
    for name, value in changed.items():
        clone._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    return clone


def _mark_without_adapters(root: torch.nn.Module) -> None:
    """The merged graph's input adapter (a copy: ``gm`` keeps its own) refuses adapter_names."""
    inputs = getattr(root, INPUTS_MODULE, None)
    if inputs is not None:
        inputs = copy.copy(inputs)
        inputs.has_adapters = False
        setattr(root, INPUTS_MODULE, inputs)


def _fold_quantized(gm: AdaptedModule, graph: torch.fx.Graph, weights: dict,
                    dequantize: bool) -> dict[str, float]:
    """Quantized layers that changed are requantized (returns the error that adds, per layer),
    or, with ``dequantize``, every quantized layer becomes a dense linear."""
    if dequantize:
        dequantize_layers(gm, graph, weights)
        return {}
    errors = requantize(gm, weights)
    if errors:
        worst = max(errors, key=errors.get)
        log.warning("merge: requantized %d layer(s); the merged weights moved by up to %.3g "
                    "(max-abs, at %s). merge(gm, dequantize=True) keeps them dense.",
                    len(errors), errors[worst], worst)
    return errors


def merge(gm: AdaptedModule, dequantize: bool = False) -> AdaptedModule:
    """A new graph with every active adapter folded into (new) base weights: the base graph's
    nodes, the adapted graph's outputs. ``gm`` and the original model are left as they were.

    A quantized (bitsandbytes) layer is dequantized, merged in fp32 and quantized again; the
    result's ``requantization_error`` holds, per layer, the max-abs weight error that adds.
    ``dequantize=True`` instead turns every quantized layer into a dense one (no added error).

    >>> import torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> gm = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> merged = fxpeft.merge(gm)
    >>> fxpeft.trainable_parameters(merged), merged.get_submodule("0").weight is net[0].weight
    ((0, 20), False)
    """
    weights = merged_weights(gm)
    graph = copy_graph(gm.graph)
    strip_adapters(graph, set(adapter_names(gm)) | {DEFAULT_ADAPTER})
    errors = _fold_quantized(gm, graph, weights, dequantize)
    root = torch.nn.Module()
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in weights:
            place(root, node.target, torch.nn.Parameter(weights[node.target], requires_grad=False))
        elif node.op == "get_attr" and not has_target(root, node.target):
            place(root, node.target, fetch(gm, node.target))
        elif node.op == "call_module" and not has_target(root, node.target):
            place(root, node.target, _module_with(gm.get_submodule(node.target), node.target, weights))
    _mark_without_adapters(root)
    merged = AdaptedModule(root, graph, class_name=type(gm).__name__)
    merged.capture_info = gm.capture_info
    merged.requantization_error = errors
    merged.requires_grad_(False)
    return merged.train(gm.training)


def merge_into(model: torch.nn.Module, gm: AdaptedModule) -> torch.nn.Module:
    """Write ``gm``'s merged weights into ``model`` (new parameter objects, so ``gm`` stays
    valid); ``model.save_pretrained()`` then saves a plain checkpoint. Returns ``model``.

    >>> import torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> gm = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> fxpeft.merge_into(net, gm) is net
    True
    """
    for target, value in merged_weights(gm).items():
        if quantized_op(gm.graph, target) is not None:
            raise FxpeftError(f"merge_into: {target} is a quantized (bitsandbytes) weight; use "
                              f"fxpeft.merge(gm) (requantizes) or merge(gm, dequantize=True)")
        owner_path, _, name = target.rpartition(".")
        owner = model.get_submodule(owner_path)
        old = getattr(owner, name, None)
        if not isinstance(old, torch.nn.Parameter) or old.shape != value.shape:
            raise FxpeftError(f"merge_into: {type(model).__name__} has no parameter {target!r} "
                              f"of shape {list(value.shape)}; is it the model gm was built from?")
        owner._parameters[name] = torch.nn.Parameter(value.detach().clone(),
                                                     requires_grad=old.requires_grad)
    return model
