"""AdaLoRA (PEFT's ``AdaLoraConfig``): LoRA in SVD form, ``ΔW = B·diag(E)·A``, whose ranks shrink
to a budget during training.

Each matched linear gets ``lora_A`` (r, in), ``lora_E`` (r, 1) and ``lora_B`` (out, r): raw
parameters, as PEFT keeps them (saved keys have no ``.weight``). A ``Conv2d`` (PEFT's
``SVDConv2d``) gets ``lora_A`` (r, in * kh * kw): its branch is the base's convolution with
``ΔW = B·diag(E)·A`` reshaped to the kernel; PEFT has no other convolution (1-d, 3-d or grouped:
refused by name). E starts at zero (identity at
init), A and B at normal(0, 0.02), as PEFT does. The branch is
``y + alpha / (r + 1e-5) * B(gate * (A·E)(dropout(x)))``: PEFT's ``ranknum`` always holds ``r``
and is not saved, so it is part of the constant scale. The closing ``add`` is the removable node;
merge folds ``B·diag(E)·A`` times the scale into the weight.

Rank allocation (``fxpeft.kinds.rank_allocator``) runs after every step of the optimizer that
trains the adapter (``auto_allocate = true``, the default: that optimizer's own step hook, see
"the optimizers that train the graph" below), or when the training loop calls
``gm.update_and_allocate(step)`` (``auto_allocate = false``, PEFT's way). In train mode, with labels, the orthogonality regulariser ``orth_reg_weight * mean(|AAᵀ -
I|, |BᵀB - I|)`` joins the loss as PEFT's forward adds it: one gated, removable node after the
output adapter per adapter, which lists every site's A and B.

Saving writes PEFT's files: ``rank_pattern`` (each site's kept triplets, once a mask exists) and
the tensors pruned to it; loading scatters pruned tensors back to ``r`` rows, zeros where the
pattern drops a triplet (PEFT resizes the modules instead: the same outputs).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from fxpeft.graph.records import adapter_records
from fxpeft.graph.state import graph_state
from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch
from fxpeft.errors import FxpeftError, RuleError
from fxpeft.graph.gates import gate_attr, gate_node, reroute
from fxpeft.kinds.lora import adapter_dtype, adapter_input, casts, join, layer_op, record_nodes
from fxpeft.match.layer_sites import ConvSite
from fxpeft.kinds.rank_allocator import RankAllocator, Schedule, Triplet
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.match.query import Match
from fxpeft.names import (ADAPTER_META, GATE_META, OUTPUT_MODULE, PEFT_PREFIX, AdapterNode,
                          adapter_node)
from fxpeft.formats.peft_format import (PeftFormat, PeftFormatError, exclude_regexes,
                                        layers_prefix, target_regex, targets_for)
from fxpeft.capture.program import Program
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, Where, spec

aten = torch.ops.aten
KIND_NAME = "adalora"
COMPONENTS = ("lora_A", "lora_B", "lora_E")
ORTH_MODULE = "fxpeft_adalora_orth"  # the shared module that adds the regulariser to the loss
RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


def _beta(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        return f"expected a number in (0, 1), got {value!r}"
    return None


def _non_negative_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"expected an integer >= 0, got {value!r}"
    return None


def _non_negative(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return f"expected a number >= 0, got {value!r}"
    return None


def _total_step(value: Any) -> str | None:
    if value is None:
        return "AdaLoRA needs the number of training steps (total_step = N, or total_step=N " \
               "as a keyword of fxpeft.rewrite)"
    return checks.positive_int(value)


@dataclass(frozen=True)
class AdaLoraParams(Params):
    """AdaLoRA: PEFT's ``AdaLoraConfig`` knobs (``init_r``, ``target_r``, ``lora_alpha`` as
    ``alpha``, ``lora_dropout`` as ``dropout``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``,
    ``beta2``, ``orth_reg_weight``, ``total_step``). They hold for the whole adapter: every rule
    of one adapter must give the same values.

    >>> AdaLoraParams(total_step=100).scale
    0.6666661111115741
    >>> AdaLoraParams(total_step=10, tinit=10)
    Traceback (most recent call last):
    ...
    fxpeft.errors.RuleError: <rules>: params.tinit: tinit (10) must be below total_step - tfinal (10)
    """

    kind = KIND_NAME
    match_kinds = ("linear", "conv")
    init_r: int = spec(12, checks.positive_int, "initial rank of every site")
    target_r: int = spec(8, checks.positive_int, "average rank the budget shrinks to")
    alpha: float = spec(8, checks.positive_number, "scale = alpha / init_r")
    dropout: float = spec(0.0, checks.probability, "dropout on the adapter input")
    tinit: int = spec(0, _non_negative_int, "warm-up steps before ranks shrink")
    tfinal: int = spec(0, _non_negative_int, "final steps with the ranks fixed")
    deltaT: int = spec(1, checks.positive_int, "steps between two allocations")
    beta1: float = spec(0.85, _beta, "moving average of the sensitivity")
    beta2: float = spec(0.85, _beta, "moving average of the uncertainty")
    orth_reg_weight: float = spec(0.5, _non_negative, "weight of the orthogonality regulariser")
    total_step: int | None = spec(None, _total_step, "training steps (required)")
    auto_allocate: bool = spec(True, checks.boolean, "allocate after every optimizer step "
                               "(false: call gm.update_and_allocate)")
    autocast: bool = spec(True, checks.boolean, "fp32 adapters on fp16/bf16 bases")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tinit >= self.total_step - self.tfinal:
            raise RuleError(f"tinit ({self.tinit}) must be below total_step - tfinal "
                            f"({self.total_step - self.tfinal})", key="params.tinit")

    @property
    def scale(self) -> float:
        return self.alpha / (self.init_r + RANKNUM_EPS)

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.target_r, self.tinit, self.tfinal, self.total_step, self.deltaT,
                        self.beta1, self.beta2)


@dataclass(frozen=True)
class AdaLoraDetail:
    """What merge and the allocator need of one site: the targets of W, A, E and B, the scale,
    and the adapter's params."""

    scale: float
    weight: str
    lora_A: str
    lora_E: str
    lora_B: str
    fan_in_fan_out: bool
    params: AdaLoraParams
    kernel: tuple[int, ...] | None = None  # a Conv2d's weight shape: ΔW is reshaped to it


@dataclass(frozen=True)
class OrthDetail:
    """The record of the regulariser's nodes (nothing to merge)."""

    weight: float


# --- splice -------------------------------------------------------------------------------------

def _conv_kernel(site: ConvSite, weight: torch.Tensor) -> tuple[int, ...]:
    """The kernel shape ``ΔW`` takes: PEFT's ``SVDConv2d`` knows only plain 2-d convolutions."""
    if site.dims != 2 or site.groups != 1:
        what = f"a {site.dims}-d convolution" if site.dims != 2 else f"a convolution with groups = {site.groups}"
        raise FxpeftError(f"{site.module_path}: AdaLoRA on {what} is not supported (PEFT's "
                          f"AdaLoRA has Linear, Conv1D and plain Conv2d layers only)")
    return tuple(weight.shape)


def _attach(job: SpliceInput) -> AdaLoraDetail:
    """A, E (zeros) and B, PEFT's shapes and initialisation, in the adapter dtype."""
    site, params = job.site, job.params
    weight = job.gm.get_parameter(site.weight_target)
    factory = {"dtype": adapter_dtype(params, weight.dtype), "device": weight.device}
    kernel = _conv_kernel(site, weight) if isinstance(site, ConvSite) else None
    fan_in = weight[0].numel() if kernel else site.in_features
    out = kernel[0] if kernel else site.out_features
    shapes = {"lora_A": (params.init_r, fan_in), "lora_E": (params.init_r, 1),
              "lora_B": (out, params.init_r)}
    targets = {}
    for name, shape in shapes.items():
        value = torch.zeros(shape, **factory) if name == "lora_E" else \
            torch.nn.init.normal_(torch.empty(shape, **factory), mean=0.0, std=0.02)
        targets[name] = attach_component(job.gm, site.module_path, name, job.adapter,
                                         torch.nn.Parameter(value))
    return AdaLoraDetail(params.scale, site.weight_target, targets["lora_A"], targets["lora_E"],
                         targets["lora_B"], site.fan_in_fan_out, params, kernel)


def _check_same_params(gm: torch.fx.GraphModule, adapter: str, params: AdaLoraParams) -> None:
    """PEFT's knobs hold for a whole adapter: every rule of one adapter must agree."""
    for detail in _site_details(gm, adapter):
        if detail.params != params:
            differ = next(f.name for f in dataclasses.fields(params)
                          if getattr(params, f.name) != getattr(detail.params, f.name))
            raise RuleError(f"AdaLoRA's params hold for the whole adapter {adapter!r}, but "
                            f"{differ} is {getattr(detail.params, differ)!r} for one rule and "
                            f"{getattr(params, differ)!r} for another", key=f"params.{differ}")


def _conv_branch(job: SpliceInput, detail: AdaLoraDetail, scaled_a: torch.fx.Node) -> torch.fx.Node:
    """``y + scale * gate * conv(x, reshape(B @ (A·E)))``, as PEFT's ``SVDConv2d``."""
    graph, y = job.gm.graph, job.site.node
    delta = graph.call_function(aten.mm.default, (graph.get_attr(detail.lora_B), scaled_a))
    delta = graph.call_function(aten.reshape.default, (delta, list(detail.kernel)))
    branch = layer_op(graph, job.site, adapter_input(job), delta)
    gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(detail.lora_E), branch)
    branch = graph.call_function(aten.mul.Tensor, (branch, gate))
    return join(graph, y, graph.call_function(aten.mul.Tensor, (branch, detail.scale)), casts(job))


def _branch(job: SpliceInput, detail: AdaLoraDetail) -> torch.fx.Node:
    """``y + scale * B(gate * (A·E)(x))``, the ``add`` last."""
    graph, y = job.gm.graph, job.site.node
    scaled_a = graph.call_function(aten.mul.Tensor, (graph.get_attr(detail.lora_A),
                                                     graph.get_attr(detail.lora_E)))
    if detail.kernel is not None:
        return _conv_branch(job, detail, scaled_a)
    down = graph.call_function(aten.linear.default, (adapter_input(job), scaled_a))
    gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(detail.lora_E), down)
    down = graph.call_function(aten.mul.Tensor, (down, gate))
    down.meta[GATE_META] = job.adapter
    up = graph.call_function(aten.linear.default, (down, graph.get_attr(detail.lora_B)))
    return join(graph, y, graph.call_function(aten.mul.Tensor, (up, detail.scale)), casts(job))


def _regulariser_node(graph: torch.fx.Graph, adapter: str) -> torch.fx.Node | None:
    return next((n for n in graph.find_nodes(op="call_module", target=ORTH_MODULE)
                 if adapter_node(n).adapter == adapter), None)


def _record(nodes: list[torch.fx.Node], job: SpliceInput,
            removable: torch.fx.Node | None = None) -> list[torch.fx.Node]:
    """The regulariser's records (it bypasses to the output it adds to)."""
    detail = OrthDetail(job.params.orth_reg_weight)
    for node in nodes:
        node.meta[ADAPTER_META] = AdapterNode(KIND_NAME, job.adapter, job.site.module_path,
                                              0 if node is removable else None, detail)
    return nodes


def _new_regulariser(job: SpliceInput, a: torch.fx.Node, b: torch.fx.Node) -> list[torch.fx.Node]:
    """The node after the output adapter that adds the regulariser to ``.loss``."""
    graph = job.gm.graph
    if not hasattr(job.gm, ORTH_MODULE):
        job.gm.add_module(ORTH_MODULE, OrthogonalRegulariser())
    final = next(iter(graph.find_nodes(op="output")))
    with graph.inserting_before(final):
        gate = gate_attr(job.gm, job.adapter, job.gm.get_parameter(a.target).device)
        reg = graph.call_module(ORTH_MODULE, (final.args[0], gate, job.params.orth_reg_weight,
                                              a, b))
    final.args = (reg,)
    return _record([reg], job, reg)


def _regularise(job: SpliceInput, detail: AdaLoraDetail) -> list[torch.fx.Node]:
    """Add this site's A and B to the adapter's regulariser (made by its first site); graphs
    without an HF output (no loss) have none."""
    graph = job.gm.graph
    if not graph.find_nodes(op="call_module", target=OUTPUT_MODULE):
        return []
    reg = _regulariser_node(graph, job.adapter)
    if reg is not None and any(getattr(n, "target", None) == detail.lora_A for n in reg.args):
        return []  # a module called at two sites: its parameters count once, as in PEFT
    final = next(iter(graph.find_nodes(op="output")))
    with graph.inserting_before(reg if reg is not None else final):
        a, b = graph.get_attr(detail.lora_A), graph.get_attr(detail.lora_B)
    added = _record([a, b], job)
    if reg is None:
        return added + _new_regulariser(job, a, b)
    reg.args = (*reg.args, a, b)
    return added


def splice(job: SpliceInput) -> Spliced:
    """Insert the AdaLoRA branch after ``job.site.node``, route its users through the sum, and
    join the site's A and B to the adapter's regulariser."""
    _check_same_params(job.gm, job.adapter, job.params)
    detail = _attach(job)
    graph, y = job.gm.graph, job.site.node
    with graph.inserting_before(y.next):  # keeps creation order
        total = _branch(job, detail)
    reroute(y, total)
    added = record_nodes(job, y, total, KIND_NAME, detail) + _regularise(job, detail)
    _count_backwards(job.gm, job.adapter, job.gm.get_parameter(detail.lora_E))
    return Spliced(added, [detail.lora_A, detail.lora_E, detail.lora_B])


def orthogonality(pairs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """PEFT's regulariser: the mean over A and B of ``||AAᵀ - I||`` and ``||BᵀB - I||``
    (Frobenius), for ``pairs = (A1, B1, A2, B2, ...)``.

    >>> orthogonality((torch.eye(2), torch.eye(2))).item()
    0.0
    """
    total = 0
    for index, p in enumerate(pairs):
        cov = p @ p.T if index % 2 == 0 else p.T @ p
        eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
        total = total + torch.norm(cov - eye, p="fro").to(pairs[0].device)  # split models
    return total / len(pairs)


class OrthogonalRegulariser(torch.nn.Module):
    """Adds ``gate * weight * orthogonality(A, B, ...)`` to an HF output's ``loss``, in train
    mode when there is a loss; otherwise returns the output as it is."""

    def forward(self, output: Any, gate: torch.Tensor, weight: float, *pairs: torch.Tensor) -> Any:
        loss = getattr(output, "loss", None)
        if not self.training or not isinstance(loss, torch.Tensor):
            return output
        term = weight * orthogonality(pairs) * gate.to(pairs[0].device)
        return type(output)(**{**output, "loss": loss + term.to(loss.device)})


# --- merge --------------------------------------------------------------------------------------

def delta(gm: torch.nn.Module, detail: AdaLoraDetail) -> torch.Tensor:
    """``scale * B @ (A * E)`` in fp32, laid out like the stored weight."""
    a, e, b = (fetch(gm, t).detach().float() for t in (detail.lora_A, detail.lora_E, detail.lora_B))
    update = (b @ (a * e)) * detail.scale
    if detail.kernel is not None:
        return update.reshape(detail.kernel)
    return update.T if detail.fan_in_fan_out else update


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """``W + scale * B·diag(E)·A`` (fp32, cast once); the regulariser folds to nothing."""
    detail = record.detail
    if not isinstance(detail, AdaLoraDetail):
        return
    base = weights.get(detail.weight, fetch(gm, detail.weight).detach())
    weights[detail.weight] = (base.float() + delta(gm, detail)).to(base.dtype)


# --- rank allocation ------------------------------------------------------------------------------

def _site_records(gm: torch.fx.GraphModule, adapter: str) -> list[AdapterNode]:
    """The records of ``adapter``'s sites in graph order (a module called twice counts once)."""
    found: dict[str, AdapterNode] = {}
    for node in gm.graph.nodes:
        record = adapter_node(node)
        if record is not None and record.kind == KIND_NAME and record.adapter == adapter and \
                record.removable and isinstance(record.detail, AdaLoraDetail):
            found.setdefault(record.detail.lora_E, record)
    return list(found.values())


def _site_details(gm: torch.fx.GraphModule, adapter: str) -> list[AdaLoraDetail]:
    return [record.detail for record in _site_records(gm, adapter)]


def adalora_adapters(gm: torch.nn.Module) -> list[str]:
    """The AdaLoRA adapters of ``gm``, in the order they were added.

    >>> adalora_adapters(torch.nn.Linear(2, 2))
    []
    """
    records = adapter_records(gm) if isinstance(gm, torch.fx.GraphModule) else {}
    return [name for name, rec in records.items()
            if any(rule.rewrite == KIND_NAME for rule in rec.rules.rules)]


@dataclass(eq=False)
class _Entry:
    """An adapter's allocator (in ``graph_state(gm).kinds``), with the adapter record it was made
    for, and what ties it to the optimizer that trains it."""

    record: Any
    allocator: RankAllocator
    auto: bool
    backwards: int = 0  # backward passes that reached the adapter
    allocated_at: int = 0  # ``backwards`` when it last allocated: once per step, whoever asks
    optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = dataclasses.field(default_factory=weakref.WeakSet)


def _entry(gm: torch.fx.GraphModule, adapter: str) -> _Entry:
    """Made on first use; a deleted and re-added adapter (a new record) gets a new one."""
    rec = adapter_records(gm)[adapter]
    store = graph_state(gm).kinds.setdefault(KIND_NAME, {})
    found = store.get(adapter)
    if found is None or found.record is not rec:
        records = _site_records(gm, adapter)
        triplets = [Triplet(r.module_path, *(fetch(gm, t) for t in (
            r.detail.lora_A, r.detail.lora_E, r.detail.lora_B))) for r in records]
        params = records[0].detail.params
        found = store[adapter] = _Entry(rec, RankAllocator(params.schedule, triplets),
                                        params.auto_allocate)
    return found


def allocator(gm: torch.fx.GraphModule, adapter: str) -> RankAllocator:
    """``adapter``'s rank allocator (its masks, ranks and moving averages)."""
    return _entry(gm, adapter).allocator


def _auto(gm: torch.fx.GraphModule, adapter: str) -> bool:
    return _entry(gm, adapter).auto


# --- the optimizers that train the graph ------------------------------------------------------------
# Nothing acts on an optimizer that does not train an AdaLoRA adapter, and no process-wide hook
# outlives the need for it. Each site's E counts the backward passes that reach it (a hook on that
# tensor, which the graph owns). A backward of an auto-allocating adapter whose optimizer is not
# known yet arms a discovery hook: torch's process-wide optimizer post-hook, kept only until an
# optimizer holding the adapter steps. That optimizer then gets a step hook of its own, which
# allocates after each of its steps, and the discovery hook goes.

_WAITING: "weakref.WeakKeyDictionary[torch.fx.GraphModule, set[str]]" = weakref.WeakKeyDictionary()
_DISCOVERY: list[RemovableHandle] = []  # the discovery hook's handle, while armed


def _count_backwards(gm: torch.fx.GraphModule, adapter: str, lora_E: torch.nn.Parameter) -> None:
    graph = weakref.ref(gm)

    def reached(_: torch.Tensor) -> None:
        owner = graph()
        if owner is not None and adapter in adapter_records(owner):
            _after_backward(owner, adapter)
    lora_E.register_post_accumulate_grad_hook(reached)


def _after_backward(gm: torch.fx.GraphModule, adapter: str) -> None:
    found = _entry(gm, adapter)
    found.backwards += 1
    if found.auto and not any(_holds(opt, found) for opt in found.optimizers):
        _WAITING.setdefault(gm, set()).add(adapter)
        if not _DISCOVERY:
            _DISCOVERY.append(register_optimizer_step_post_hook(_discover))
    elif _DISCOVERY and not _WAITING:
        _DISCOVERY.pop().remove()  # safe here: no optimizer is running its post-hooks


def _holds(optimizer: torch.optim.Optimizer, found: _Entry) -> bool:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return any(id(p) in held for p in found.allocator.parameters())


def _discover(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The discovery hook: an optimizer that holds a waiting adapter gets its own step hook
    (from its next step on) and allocates for this step; any other is left alone. (It cannot
    remove itself: torch is iterating over its hooks; the next backward or step does.)"""
    for gm, adapters in list(_WAITING.items()):
        for adapter in sorted(adapters):
            found = _entry(gm, adapter)
            if _holds(optimizer, found):
                adapters.discard(adapter)
                found.optimizers.add(optimizer)
                optimizer.register_step_post_hook(_step_hook(gm, adapter))
                _allocate_once(found)
        if not adapters:
            _WAITING.pop(gm, None)


def _step_hook(gm: torch.fx.GraphModule, adapter: str) -> Any:
    graph = weakref.ref(gm)

    def stepped(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        owner = graph()
        if owner is not None and adapter in adapter_records(owner):
            _allocate_once(_entry(owner, adapter))
        if _DISCOVERY and not _WAITING:
            _DISCOVERY.pop().remove()  # the optimizer's own hooks run before the global ones
    return stepped


def _allocate_once(found: _Entry) -> None:
    """Allocate for the step just taken, if a backward reached the adapter since the last time."""
    if found.auto and found.backwards > found.allocated_at and \
            all(p.grad is not None for p in found.allocator.parameters()):
        found.allocated_at = found.backwards
        found.allocator.update_and_allocate(found.allocator.steps)
        found.allocator.steps += 1


def on_step(gm: torch.fx.GraphModule, adapters: list[str], step: int) -> None:
    """PEFT's ``update_and_allocate(step)`` for every trainable AdaLoRA adapter among
    ``adapters`` whose rules say ``auto_allocate = false`` (``AdapterKind.on_step``)."""
    trainable = [a for a in adapters if allocator(gm, a).triplets[0].E.requires_grad]
    if not trainable:
        raise FxpeftError("update_and_allocate: this graph has no trainable AdaLoRA adapter")
    for adapter in trainable:
        if _auto(gm, adapter):
            raise FxpeftError(f"update_and_allocate: AdaLoRA adapter {adapter!r} allocates ranks "
                              f"by itself after every optimizer step (auto_allocate = true); "
                              f"drop this call, or set auto_allocate = false in its rules")
        allocator(gm, adapter).update_and_allocate(step)


# --- PEFT's AdaLoraConfig -----------------------------------------------------------------------

_KNOBS = {"init_r": "init_r", "target_r": "target_r", "lora_alpha": "alpha",
          "lora_dropout": "dropout", "tinit": "tinit", "tfinal": "tfinal", "deltaT": "deltaT",
          "beta1": "beta1", "beta2": "beta2", "orth_reg_weight": "orth_reg_weight",
          "total_step": "total_step"}
# LoraConfig fields PEFT's AdaLoRA ignores: "r" (it writes the default, 8), "use_rslora" and
# "alpha_pattern" (its scale is always lora_alpha / ranknum).
ADALORA_FIELDS = frozenset({*_KNOBS, "r", "use_rslora", "alpha_pattern", "target_modules",
                            "exclude_modules", "layers_to_transform", "layers_pattern",
                            "fan_in_fan_out", "bias", "init_lora_weights", "rank_pattern"})


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """``AdaLoraConfig`` fields to a rule per site kind (the knobs hold for the whole adapter); loaded
    adapters allocate only when told (``auto_allocate = false``)."""
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{source}: bias = {config['bias']!r} is not supported (only \"none\")")
    knobs = {ours: config[theirs] for theirs, ours in _KNOBS.items() if config.get(theirs) is not None}
    try:
        params = AdaLoraParams(**knobs, auto_allocate=False)
    except RuleError as err:  # named as the config names it
        ours = err.key.split(".")[-1]
        theirs = next((k for k, v in _KNOBS.items() if v == ours), ours)
        raise PeftFormatError(f"{source}: {theirs}: {err.message}") from None
    target = "^" + layers_prefix(config) + target_regex(config, model, source)
    return RuleSet(tuple(Rule(name="peft adalora" if site == "linear" else f"peft adalora {site}",
                              match=site, optional=True, params=params,
                              where=Where(path=[target], exclude=exclude_regexes(config)))
                         for site in AdaLoraParams.match_kinds), source=source)


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """The ``AdaLoraConfig`` fields that select ``matches``' modules with their knobs."""
    params = matches[0].rule.params
    knobs = {theirs: getattr(params, ours) for theirs, ours in _KNOBS.items()}
    return {"target_modules": targets_for(sorted({m.module_path for m in matches}), program),
            **knobs, "rank_pattern": None, "bias": "none", "init_lora_weights": True,
            "fan_in_fan_out": any(m.site.fan_in_fan_out for m in matches)}


def _pruned(tensor: torch.Tensor, component: str, keep: torch.Tensor) -> torch.Tensor:
    return tensor[:, keep] if component == "lora_B" else tensor[keep]


def _site_keys(key: str) -> tuple[str, str] | None:
    """``(module path, component)`` of a PEFT key (``base_model.model.<path>.lora_E``)."""
    path, _, component = key.rpartition(".")
    return (path.removeprefix(PEFT_PREFIX), component) if component in COMPONENTS else None


def save_state(gm: torch.fx.GraphModule, adapter: str, config: dict[str, Any],
               tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's save: once a mask exists, ``rank_pattern`` lists each site's kept triplets and the
    tensors hold only those."""
    pattern = allocator(gm, adapter).rank_pattern
    if pattern is None:
        return config, tensors
    pruned = {}
    for key, tensor in tensors.items():
        site = _site_keys(key)
        pruned[key] = tensor if site is None else _pruned(tensor, site[1], pattern[site[0]].cpu())
    ranks = {f"{path}.lora_E": keep.tolist() for path, keep in pattern.items()}
    return {**config, "rank_pattern": ranks}, pruned


def _pattern(config: dict[str, Any], found: RankAllocator, source: str) -> dict[str, torch.Tensor]:
    """The file's ``rank_pattern`` as masks per site path, checked against the sites."""
    pattern = config.get("rank_pattern")
    if not isinstance(pattern, dict):
        raise PeftFormatError(f"{source}: rank_pattern must be a mapping, got {pattern!r}")
    sites = {f"{t.path}.lora_E" for t in found.triplets}
    unknown = sorted(k for k in pattern if k not in sites and k.removesuffix(".default") not in sites)
    if unknown:
        raise PeftFormatError(f"{source}: rank_pattern names {unknown[0]}, which is not an "
                              f"AdaLoRA site of this adapter")
    masks = {}
    for t in found.triplets:
        keep = pattern.get(f"{t.path}.lora_E", pattern.get(f"{t.path}.lora_E.default"))
        if not isinstance(keep, list) or len(keep) != t.E.shape[0] or \
                not all(isinstance(k, bool) for k in keep):
            raise PeftFormatError(f"{source}: rank_pattern[{t.path}.lora_E]: expected "
                                  f"{t.E.shape[0]} booleans, got {keep!r}")
        masks[t.path] = torch.tensor(keep, dtype=torch.bool)
    return masks


def _scattered(tensor: torch.Tensor, component: str, keep: torch.Tensor, like: torch.Tensor,
               key: str, source: str) -> torch.Tensor:
    """A pruned tensor back at ``like``'s shape, zeros where a triplet was dropped."""
    kept = int(keep.sum())
    if tensor.shape != _pruned(like, component, keep).shape:
        raise PeftFormatError(f"{source}: {key}: rank_pattern keeps {kept} of {keep.numel()} "
                              f"ranks, but the tensor is {list(tensor.shape)}")
    full = torch.zeros(like.shape, dtype=tensor.dtype)
    if component == "lora_B":
        full[:, keep] = tensor
    else:
        full[keep] = tensor
    return full


def _drop_ranknum(tensors: dict[str, torch.Tensor], init_r: int, source: str) -> dict[str, torch.Tensor]:
    """PEFT 0.21 does not save ``ranknum``; a file that has it must hold the initial rank."""
    for key in [k for k in tensors if k.endswith(".ranknum")]:
        if tensors[key].numel() != 1 or float(tensors[key].reshape(-1)[0]) != float(init_r):
            raise PeftFormatError(f"{source}: {key} = {tensors[key].tolist()}: fxpeft reads "
                                  f"only ranknum = init_r ({init_r})")
    return {k: v for k, v in tensors.items() if not k.endswith(".ranknum")}


def load_state(gm: torch.fx.GraphModule, adapter: str, config: dict[str, Any],
               tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """PEFT's files to full-rank tensors: with a ``rank_pattern``, pruned tensors are scattered
    back (zeros for dropped triplets) and the mask is kept for the next save."""
    found = allocator(gm, adapter)
    tensors = _drop_ranknum(tensors, found.triplets[0].E.shape[0], source)
    if config.get("rank_pattern") is None:
        return tensors
    masks = _pattern(config, found, source)
    ours = {t.path: dict(zip(("lora_A", "lora_E", "lora_B"), t.parameters())) for t in found.triplets}
    full = dict(tensors)
    for key, tensor in tensors.items():
        site = _site_keys(key)
        if site is not None and site[0] in masks:
            like = ours[site[0]][site[1]]
            full[key] = _scattered(tensor, site[1], masks[site[0]], like, key, source)
    found.rank_pattern = masks
    return full


KIND = AdapterKind(
    name=KIND_NAME, params=AdaLoraParams, splice=splice, merge=merge, components=COMPONENTS,
    peft=PeftFormat("ADALORA", rules_to_config, config_to_rules, ADALORA_FIELDS,
                    save_state=save_state, load_state=load_state,
                    state_fields=frozenset({"rank_pattern"})),
    on_step=on_step)
