"""Fuse and clean-up passes. They run on an emitted copy of an adapted graph, as ``merge`` does:
the graph that ``add_adapter``, ``save`` and ``delete_adapter`` work on stays unfused, so these
passes never have to understand adapter bookkeeping, and that bookkeeping never has to
understand them. The copy shares every parameter and buffer (gates included) with the original,
so training it trains the adapters.

Each pass is small, named, individually switchable (``skip=``), and a ``GraphPass``
(``fxpeft.runtime.passes``): it declares what it does, the graph facts it requires, ensures and
breaks, and the passes it must follow; ``GRAPH_PASSES`` lists them in the order they run, and
``fuse`` and the decode graph each ask for theirs by what they do (``select``); the manager checks
the order and reports what each changed, with its time:

- ``drop_inactive``: an adapter whose gate is off contributes exact zeros; its nodes go, so idle
  adapters cost nothing (the copy is specialised to the active set, and refuses to run while
  an adapter it dropped is active: ``gates.refuse_dropped_adapters``).
- ``slot_lora`` (only with ``slots=``, in an eval-only serving copy): each site's LoRA branches
  read preallocated adapter slots instead, which ``load_into_slot`` fills in place
  (``fxpeft.transforms.slots``).
- ``fold_lora_scale``: ``B(g * A x) * s`` becomes ``B((g * s) * A x)``: the scale moves onto the
  0-d gate, which removes a full ``[tokens, out]`` multiply forward and backward per site.
- ``share_input_casts``: on a half-precision base, the fp32 adapters' input casts of one
  tensor (q and v both cast the norm output) become one cast, so ``fuse_lora_a`` can join them.
- ``fuse_lora_a``: the LoRA ``A`` projections that read the same tensor (q/k/v, gate/up, or
  several adapters on one layer) become one matmul on the concatenated weights and a split.
  Adapter dropout draws a mask per branch, so such branches read different tensors and are left
  alone, unless ``shared_dropout=True`` (a semantic choice: one mask for sibling branches).
- ``fuse_lm_loss``: in train mode with labels, a causal LM's head and loss become a chunked
  linear cross-entropy that never holds the full logits (``fxpeft.transforms.lm_loss``);
  ``.logits`` is then None. Only where exact: a plain fp32 or bf16 head without an adapter.
- ``causal_mask``: where the caller's ``attention_mask`` is absent or all ones, SDPA runs with
  ``is_causal=True`` and the 4-D mask is not built, as eager transformers does
  (``fxpeft.transforms.causal_mask``; only where checked exact).
- ``fp32_short_attention``: a bf16 CPU SDPA runs in fp32 when its keys are short (up to
  384 tokens) and gradients are on: there, PyTorch's bf16 CPU flash attention with its backward
  takes up to 2.5x fp32's time (``fxpeft.transforms.cpu_attention``).
- ``sdpa_gqa`` and ``gated_activation``: less for backward to keep: SDPA reads grouped-query
  keys and values without ``repeat_kv`` (``fxpeft.transforms.gqa``, which the decode graph runs
  too), and ``act(gate) * up`` saves only its two inputs (``fxpeft.transforms.activations``).
- ``recompute_norms`` (not with ``checkpoint=`` or ``regions=``): a norm that feeds LoRA ``A``
  projections is recomputed with them in backward, so its output is not kept beside its input.
- ``drop_dropout`` (not in ``fuse``; the decode graph runs it): dropouts become their input, for
  graphs that only ever run in eval mode.
- ``strip_leftovers``: no-op casts (to the dtype a tensor already has) and dead code.
- ``onednn_linear``: frozen base linears run on oneDNN's CPU GEMM, about 15% faster than MKL's
  at these shapes, forward and input gradient (``fxpeft.transforms.cpu_gemm``; other devices
  and dtypes, and autocast, run ``F.linear`` as before).
- ``checkpoint_layers`` (only with ``checkpoint="layers"``): gradient checkpointing, each layer
  a region recomputed in backward (``fxpeft.transforms.checkpoint``).
- ``region_layers`` (only with ``regions="layers"``): regional compilation, identical layers
  become calls of one shared region that ``torch.compile`` compiles once
  (``fxpeft.transforms.regions``).
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Hashable

import torch
import torch.fx

from fxpeft.runtime import compile_cache
from fxpeft.registry import low_rank_branch
from fxpeft.graph.records import adapter_records, strip_adapters
from fxpeft.graph.gates import active_adapters, adapter_names, gate_attr
from fxpeft.graph.state import graph_state, set_graph_state
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft.names import (DROPOUT_MODULE, GATE_META, GATES, LM_LOSS_MODULE, OUTPUT_MODULE, SLOTS,
                          adapter_node)
from fxpeft.capture.program import copy_graph
from fxpeft.registry import provide
from fxpeft.graph.patterns import copy_node, replace_matches
from fxpeft.runtime.passes import ADAPTED, GraphPass, run_pipeline, select
from fxpeft.transforms.branches import SCALED_BRANCH, branch_input, gatherable_joins, per_sample_low_rank
from fxpeft.transforms.slots import Slots, slot_lora
from fxpeft.transforms.norms import fuse_rms_norm
from fxpeft.transforms.activations import gated_activation
from fxpeft.transforms.causal_mask import causal_mask
from fxpeft.transforms.gqa import gqa_in_sdpa
from fxpeft.transforms.checkpoint import checkpoint_layers, recompute_norms
from fxpeft.transforms.cpu_gemm import onednn_linear
from fxpeft.transforms.cpu_attention import fp32_short_attention
from fxpeft.transforms.lm_loss import LMHeadLoss
from fxpeft.transforms.regions import region_layers

log = logging.getLogger("fxpeft")
aten = torch.ops.aten


def drop_inactive(gm: torch.fx.GraphModule) -> int:
    """Strip every adapter whose gate is off."""
    idle = set(adapter_names(gm)) - set(active_adapters(gm))
    if idle:
        strip_adapters(gm.graph, idle)
    return len(idle)


def _scale_on_gate(graph: torch.fx.Graph, found: dict) -> torch.fx.Node:
    """y + B(A x * (g * s)): the same branch, with the scale on the 0-d gate."""
    gate = graph.call_function(aten.mul.Tensor, (found["gate"], found["scale"]))
    gate.meta[GATE_META] = found["gated"].meta[GATE_META]
    gated = copy_node(graph, found["gated"], (found["down"], gate))
    up = copy_node(graph, found["up"], (gated, found["B"]))
    return copy_node(graph, found["join"], (found["y"], up))


def fold_lora_scale(gm: torch.fx.GraphModule) -> int:
    """Move each low-rank branch's scale onto its gate (``SCALED_BRANCH`` -> ``_scale_on_gate``)."""
    return replace_matches(gm, SCALED_BRANCH, _scale_on_gate)


def _lora_downs(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """LoRA ``A`` projections grouped by the tensor they read."""
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.find_nodes(op="call_function", target=aten.linear.default):
        branch = low_rank_branch(adapter_node(node))
        if branch is not None and len(node.args) == 2 and \
                getattr(node.args[1], "target", None) == branch.down:
            groups.setdefault(node.args[0], []).append(node)
    return {x: downs for x, downs in groups.items() if len(downs) > 1}


def _fuse_group(gm: torch.fx.GraphModule, x: torch.fx.Node, downs: list[torch.fx.Node]) -> None:
    graph = gm.graph
    ranks = [gm.get_parameter(d.args[1].target).shape[0] for d in downs]
    first = min(downs, key=lambda d: list(graph.nodes).index(d))
    with graph.inserting_before(first):
        weights = graph.call_function(aten.cat.default, ([d.args[1] for d in downs], 0))
        fused = graph.call_function(aten.linear.default, (x, weights))
        parts = graph.call_function(aten.split_with_sizes.default, (fused, ranks, -1))
        for index, down in enumerate(downs):
            piece = graph.call_function(operator.getitem, (parts, index))
            down.replace_all_uses_with(piece)
    for down in downs:
        graph.erase_node(down)


def _topological_fix(graph: torch.fx.Graph) -> None:
    """get_attr nodes of A weights may sit after the first A projection: move them up."""
    for node in list(graph.find_nodes(op="call_function", target=aten.cat.default)):
        for weight in node.args[0]:
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                node.prepend(weight)


def fuse_lora_a(gm: torch.fx.GraphModule) -> int:
    """One matmul for the LoRA A projections that read the same tensor."""
    groups = _lora_downs(gm)
    for x, downs in groups.items():
        _fuse_group(gm, x, downs)
    _topological_fix(gm.graph)
    return len(groups)


def _share_identical(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> int:
    """Adapter nodes among ``nodes`` with the same target and arguments become the first of
    them; returns how many went."""
    seen: dict[tuple, torch.fx.Node] = {}
    shared = 0
    for node in nodes:
        if adapter_node(node) is None:
            continue
        key = (node.target, tuple(node.args), tuple(sorted(node.kwargs.items())))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            shared += 1
        else:
            seen[key] = node
    return shared


def share_dropout(gm: torch.fx.GraphModule) -> int:
    """Adapter dropouts of the same tensor and probability become one (one mask)."""
    return _share_identical(gm, list(gm.graph.find_nodes(op="call_module", target=DROPOUT_MODULE)))


def share_input_casts(gm: torch.fx.GraphModule) -> int:
    """Adapter input casts of the same tensor to the same dtype become one: on a bf16 base, the
    q and v adapters (PEFT's too) each cast the shared norm output to fp32; one cast is enough,
    and their A projections then read one tensor, which ``fuse_lora_a`` joins."""
    return _share_identical(gm, list(gm.graph.find_nodes(op="call_function", target=aten.to.dtype)))


def drop_dropout(gm: torch.fx.GraphModule) -> int:
    """Every dropout becomes its input: only for graphs that never train (the decode graph), as
    a graph running in eval mode draws no mask. Sibling LoRA ``A`` projections then read one
    tensor, so ``fuse_lora_a`` can join them."""
    dropped = 0
    for node in list(gm.graph.find_nodes(op="call_module", target=DROPOUT_MODULE)):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        dropped += 1
    return dropped


def strip_leftovers(gm: torch.fx.GraphModule) -> int:
    """No-op casts, then dead code."""
    removed = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.to.dtype)):
        source = node.args[0]
        value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if isinstance(value, torch.Tensor) and value.dtype == node.args[1] and len(node.args) == 2 \
                and not node.kwargs:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            removed += 1
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    return removed + before - len(gm.graph.nodes)


FUSED_LOSS_DTYPES = (torch.float32, torch.bfloat16)  # transformers' loss upcasts bf16 logits


def _plain_head(node: Any) -> bool:
    """An un-adapted ``linear(h, W)`` in fp32 or bf16 (both the same): where the fused loss is exact."""
    if not isinstance(node, torch.fx.Node) or node.target != aten.linear.default or \
            len(node.args) != 2 or adapter_node(node) is not None or len(node.users) != 1:
        return False
    values = [a.meta.get("val") for a in node.args if isinstance(a, torch.fx.Node)]
    return len(values) == 2 and all(isinstance(v, torch.Tensor) and v.dtype == values[0].dtype
                                    in FUSED_LOSS_DTYPES for v in values)


def fuse_lm_loss(gm: torch.fx.GraphModule) -> int:
    """A causal LM's plain fp32 or bf16 head and loss become one chunked linear cross-entropy."""
    outputs = list(gm.graph.find_nodes(op="call_module", target=OUTPUT_MODULE))
    if not outputs or not gm.get_submodule(OUTPUT_MODULE).output_class.startswith("CausalLMOutput"):
        return 0
    out = outputs[0]
    head = next((a for a in out.args[2:] if _plain_head(a)), None)
    if head is None:
        return 0
    gm.add_module(LM_LOSS_MODULE, LMHeadLoss().train(gm.training))
    with gm.graph.inserting_before(out):
        fused = gm.graph.call_module(LM_LOSS_MODULE, (*head.args, out.args[0], out.args[1]))
        logits = gm.graph.call_function(operator.getitem, (fused, 0))
        loss = gm.graph.call_function(operator.getitem, (fused, 1))
    head.replace_all_uses_with(logits)
    out.kwargs = {**out.kwargs, "loss": loss}
    gm.graph.erase_node(head)
    return 1


def mixed_lora(x: torch.Tensor, weights_a: list[torch.Tensor], weights_b: list[torch.Tensor],
               scales: list[float], gates: list[torch.Tensor], adapters: list[str],
               per_sample: "dict[str, torch.Tensor] | None") -> torch.Tensor:
    """The LoRA branches of one site. Without per-sample adapters: the gated sum. With them
    (``adapter_names=``): each sample gathers its own adapter's A and B, so the cost is one
    adapter's work per sample however many adapters the site has (the Punica / S-LoRA idea)."""
    if per_sample is None:
        total = 0
        for a, b, scale, gate in zip(weights_a, weights_b, scales, gates):
            total = total + torch.nn.functional.linear(torch.nn.functional.linear(x, a) * gate, b) * scale
        return total
    # [batch, adapters], on the site's device (a split model's gates start on the first one)
    rows = torch.stack([per_sample[name] for name in adapters], 1).to(x.device, x.dtype)
    chosen, used = rows.argmax(1), rows.sum(1)  # one adapter per sample, or none (__base__)
    a_all, b_all = _stacked_ranks(weights_a, weights_b)
    scale = torch.tensor(scales, dtype=x.dtype, device=x.device)[chosen] * used  # 0: __base__
    # the per-sample scale goes on the gathered [batch, out, rank] B, not on the [batch, tokens,
    # out] result: no full-size multiply
    return per_sample_low_rank(x, a_all[chosen].transpose(1, 2),
                               (b_all[chosen] * scale[:, None, None]).transpose(1, 2))


def _stacked_ranks(weights_a: list[torch.Tensor],
                   weights_b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[adapters, rank, in]`` and ``[adapters, out, rank]``, ranks zero-padded to the largest
    (padding adds exact zeros)."""
    rank = max(a.shape[0] for a in weights_a)
    if all(a.shape[0] == rank for a in weights_a):
        return torch.stack(weights_a), torch.stack(weights_b)
    return (torch.stack([torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0])) for a in weights_a]),
            torch.stack([torch.nn.functional.pad(b, (0, rank - b.shape[1])) for b in weights_b]))


def gather_lora(gm: torch.fx.GraphModule) -> int:
    """Each site's LoRA branches of several adapters become one ``mixed_lora`` call."""
    per_sample = next(iter(gm.graph.find_nodes(op="call_module", target=GATES)), None)
    if per_sample is None:
        return 0
    sites = gatherable_joins(gm)
    for joins in sites.values():
        records = [adapter_node(j) for j in joins]
        branches = [low_rank_branch(r) for r in records]
        x = branch_input(joins[0])
        graph = gm.graph
        with graph.inserting_before(joins[0]):
            branch = graph.call_function(mixed_lora, (
                x, [graph.get_attr(b.down) for b in branches],
                [graph.get_attr(b.up) for b in branches], [b.scale for b in branches],
                [gate_attr(gm, r.adapter, gm.get_parameter(b.down).device)
                 for r, b in zip(records, branches)],
                [r.adapter for r in records], per_sample))
            total = graph.call_function(aten.add.Tensor, (joins[0].args[0], branch))
        joins[-1].replace_all_uses_with(total)
    gm.graph.eliminate_dead_code()
    return len(sites)


LAYER_CHOICES = (None, "layers")  # for checkpoint= and regions=


def _graph_pass(name: str, transform: Any, does: str, **declared: Any) -> GraphPass:
    return GraphPass(name, transform, frozenset(does.split()), **declared)


# Every optimisation pass, in the order any pipeline runs them; ``fuse`` and the decode graph
# ask for theirs by what they do (``select``), and the manager checks each pipeline's order.
GRAPH_PASSES = (
    _graph_pass("drop_inactive", drop_inactive, "specialises", invalidates={"every_adapter"},
                specialises=True),
    _graph_pass("gather_lora", gather_lora, "mixes", requires={"every_adapter", "lora_branches"},
                invalidates={"lora_branches", "explicit_lora_scale"}),
    _graph_pass("drop_dropout", drop_dropout, "slims", requires={"eval_only"}),
    # a serving copy's: after drop_dropout, every branch of a site reads the site's own input
    _graph_pass("slot_lora", slot_lora, "slots", requires={"every_adapter", "lora_branches", "eval_only"},
                invalidates={"lora_branches", "explicit_lora_scale"}, after=("drop_dropout",)),
    _graph_pass("fold_lora_scale", fold_lora_scale, "slims",
                requires={"explicit_lora_scale", "aten_linear"}, invalidates={"explicit_lora_scale"}),
    _graph_pass("share_dropout", share_dropout, "shares_dropout"),
    _graph_pass("share_input_casts", share_input_casts, "shares_casts"),
    # sibling branches read one tensor only once their casts and dropouts are shared or gone
    _graph_pass("fuse_lora_a", fuse_lora_a, "slims", requires={"lora_branches", "aten_linear"},
                after=("share_dropout", "drop_dropout", "share_input_casts")),
    _graph_pass("fuse_lm_loss", fuse_lm_loss, "fuses_loss", requires={"aten_linear"}),
    _graph_pass("sdpa_gqa", gqa_in_sdpa, "saves_activations"),
    _graph_pass("causal_mask", causal_mask, "skips_mask"),
    _graph_pass("fp32_short_attention", fp32_short_attention, "cpu_attention", after=("causal_mask",)),
    _graph_pass("gated_activation", gated_activation, "saves_activations"),
    _graph_pass("strip_leftovers", strip_leftovers, "slims", ensures={"no_cast_leftovers"}),
    _graph_pass("fuse_rms_norm", fuse_rms_norm, "slims", requires={"eval_only"}),
    _graph_pass("checkpoint_layers", checkpoint_layers, "checkpoints", invalidates={"flat_layers"}),
    _graph_pass("region_layers", region_layers, "regions", requires={"flat_layers"},
                invalidates={"flat_layers"}),
    # a norm and its A projections must be adjacent: no no-op cast between them, no region
    _graph_pass("recompute_norms", recompute_norms, "saves_activations",
                requires={"flat_layers", "no_cast_leftovers", "aten_linear"}),
    _graph_pass("onednn_linear", onednn_linear, "cpu_gemm", invalidates={"aten_linear"}),
)
# what every fuse asks for
_TRAINING = {"slims", "saves_activations", "skips_mask", "cpu_gemm", "shares_casts", "cpu_attention"}


def fuse_passes(shared_dropout: bool = False, mixed: bool = False, checkpoint: str | None = None,
                regions: str | None = None, skip: tuple[str, ...] = ()) -> list[GraphPass]:
    """The passes ``fuse`` runs with these options, in order.

    >>> [p.name for p in fuse_passes(mixed=True)][:2]
    ['gather_lora', 'share_input_casts']
    """
    wants = _TRAINING | ({"mixes"} if mixed else {"specialises", "fuses_loss"})
    wants |= {"shares_dropout"} if shared_dropout and not mixed else set()
    wants |= {"checkpoints"} if checkpoint == "layers" else set()
    wants |= {"regions"} if regions == "layers" else set()
    return select(GRAPH_PASSES, wants, ADAPTED, skip)


def _copy(gm: torch.fx.GraphModule, role: str = "fused") -> torch.fx.GraphModule:
    fused = AdaptedModule(gm, copy_graph(gm.graph), class_name=f"Fused{type(gm).__name__}")
    fused.capture_info = getattr(gm, "capture_info", None)
    set_graph_state(fused, graph_state(gm).derived(role=role))  # save() reads the same records
    return fused.train(gm.training)


def serving_copy(gm: torch.fx.GraphModule, capacity: int, rank: int,
                 skip: tuple[str, ...] = ()) -> torch.fx.GraphModule:
    """What ``fxpeft.fuse(gm, mixed=True, slots=capacity, slot_rank=rank)`` returns: a new copy
    each call (its slots are its own state), in eval mode (it only serves): ``fuse``'s passes
    for an eval-only graph, with ``slot_lora`` for ``gather_lora``.

    >>> import fxpeft
    >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(2, 2)), fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> serving_copy(gm, 2, 8)
    Traceback (most recent call last):
    ...
    fxpeft.errors.PassError: pass 'slot_lora' failed: slots serve per-sample adapters (adapter_names=), which only graphs captured from transformers models take (passes run before it: drop_dropout)
    """
    for option, value in (("slots", capacity), ("slot_rank", rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"fuse: {option}={value!r}; expected a positive integer")
    served = _copy(gm)
    served.add_module(SLOTS, Slots(capacity, rank))  # slot_lora fills it
    passes = select(GRAPH_PASSES, _TRAINING | {"slots"}, ADAPTED | {"eval_only"}, skip)
    run_pipeline(served, passes, ADAPTED | {"eval_only"}, recompile=False)
    served.recompile()
    return served.eval()


def _check_layer_options(checkpoint: str | None, regions: str | None) -> None:
    for name, value in (("checkpoint", checkpoint), ("regions", regions)):
        if value not in LAYER_CHOICES:
            raise ValueError(f"fuse: {name}={value!r}; choose one of {list(LAYER_CHOICES)}")
    if checkpoint and regions:
        raise ValueError("fuse: checkpoint='layers' and regions='layers' both make each layer a "
                         "region; choose one")


def fuse(gm: torch.fx.GraphModule, *, skip: tuple[str, ...] = (), shared_dropout: bool = False,
         mixed: bool = False, checkpoint: str | None = None, regions: str | None = None,
         slots: int | None = None, slot_rank: int = 16) -> torch.fx.GraphModule:
    """A fused copy of ``gm``, specialised to its active adapters, sharing its parameters.
    ``mixed=True`` instead keeps every adapter and gathers each site's LoRA branches, for
    mixed-batch serving (``adapter_names=``). ``checkpoint="layers"`` adds gradient
    checkpointing: backward recomputes each layer's activations instead of keeping them.
    ``regions="layers"`` is regional compilation: identical layers call one shared region,
    which ``torch.compile`` compiles once however deep the model (cold compile time).
    ``mixed=True, slots=N`` makes a serving copy instead (a new one each call, eval only): N
    preallocated adapter slots of rank up to ``slot_rank``, that ``fxpeft.load_into_slot`` and
    ``fxpeft.unload_slot`` fill and free in place, without recompiling (``fxpeft.transforms.slots``).

    The same copy comes back while nothing it depends on has changed (the active adapters, for
    a specialised copy; the options; the graph's adapters and tensors), up to ``MAX_COPIES``
    copies per graph: switching adapters back is instant, and ``torch.compile`` reuses what it
    compiled for that copy, so it compiles at most once per active set.

    >>> import torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> gm = fxpeft.rewrite(model, "lora_qv", dropout=0.0)
    >>> fused = fxpeft.fuse(gm)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> torch.allclose(fused(ids).logits, gm(ids).logits, atol=1e-5), fxpeft.fuse(gm) is fused
    (True, True)
    >>> compiled = torch.compile(fxpeft.fuse(gm, regions="layers"))  # each layer structure once
    """
    known = {p.name for p in GRAPH_PASSES}
    unknown = sorted(set(skip) - known)
    if unknown:
        raise ValueError(f"fuse: no pass {unknown}; passes: {', '.join(sorted(known))}")
    _check_layer_options(checkpoint, regions)
    compile_cache.activate()
    if slots is not None:
        if not mixed:
            raise ValueError("fuse: slots= holds adapters for mixed batches; pass mixed=True too")
        return serving_copy(gm, slots, slot_rank, tuple(skip))
    return _fused(gm, fuse_passes(shared_dropout, mixed, checkpoint, regions, tuple(skip)))


def _fused(gm: torch.fx.GraphModule, passes: list[GraphPass]) -> torch.fx.GraphModule:
    """The copy of ``gm`` that ``passes`` make, from the cache while nothing it depends on changed."""
    specialised = any(p.specialises for p in passes)
    key, keep_alive = _depends_on(gm, specialised, tuple(p.name for p in passes))
    fused, _ = graph_state(gm).fused_copies.get_or_build(key, lambda: (
        _fused_copy(gm, passes), keep_alive))
    return fused.train(gm.training)


@provide("checkpointed_copy")
def checkpointed_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with every layer checkpointed and nothing else changed (no fusing, every adapter
    kept): what ``gm.gradient_checkpointing_enable()`` runs. The same copy comes back while
    ``gm`` is unchanged (``fuse``'s cache).

    >>> import torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=2, num_attention_heads=2))
    >>> gm = fxpeft.rewrite(model, "lora_qv")
    >>> len(checkpointed_copy(gm).get_submodule("_fxpeft_checkpointed")._modules), checkpointed_copy(gm) is checkpointed_copy(gm)
    (2, True)
    """
    compile_cache.activate()
    return _fused(gm, select(GRAPH_PASSES, {"checkpoints"}, ADAPTED))


# The copies are kept in the graph's own state (``graph_state(gm).fused_copies``): a copy reaches
# the graph through the adapter records it shares, so a cache outside would keep every graph
# alive; on it, the two are one cycle that gc frees.


def _depends_on(gm: torch.fx.GraphModule, specialised: bool, options: tuple) -> tuple[Hashable, list]:
    """What a fused copy of ``gm`` depends on, as a key, and the objects whose ids the key holds
    (kept alive with the copy, so no id is reused while it is cached): the active adapters (for
    a specialised copy), the options, the graph, its adapter records, and every tensor (``to``
    replaces buffers; AdaLoRA replaces parameters)."""
    records = list(adapter_records(gm).items())
    tensors = [*gm.parameters(), *gm.buffers()]
    active = tuple(active_adapters(gm)) if specialised else None
    key = (active, options, id(gm.graph), len(gm.graph.nodes),
           tuple((name, id(rec)) for name, rec in records), tuple(id(t) for t in tensors))
    return key, [gm.graph, *(rec for _, rec in records)]


def _fused_copy(gm: torch.fx.GraphModule, passes: list[GraphPass]) -> torch.fx.GraphModule:
    fused = _copy(gm)
    if any(p.specialises for p in passes):
        graph_state(fused).specialised_to = tuple(active_adapters(gm))
    run_pipeline(fused, passes, ADAPTED, recompile=False)
    fused.recompile()
    return fused
