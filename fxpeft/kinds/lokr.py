"""LoKr (LyCORIS' low-rank Kronecker product; PEFT's ``LoKrConfig``): for each matched linear or
convolution ``y = f(x)``, splice ``y + gate * f_delta(x)``, where ``f_delta`` is the layer's own
op (``linear``, or a convolution with the base's stride, padding, dilation and groups) with the
weight ``ΔW = kron(w1, w2) * alpha / r``, reshaped to the base weight's shape.

The layer's output and input sizes factor as ``out = a*b`` and ``in = c*d`` (``factorization``,
PEFT's shapes); ``w1`` is ``[a, c]`` and ``w2`` ``[b, d, *kernel]``. Either factor is learned
whole (``lokr_w1``, ``lokr_w2``) or as a rank-``r`` product (``lokr_w1_a @ lokr_w1_b``,
``lokr_w2_a @ lokr_w2_b``) when ``r`` is small against it, PEFT's rule; a convolution with
``use_effective_conv2d`` gets ``w2`` from a CP core ``lokr_t2`` ``[r, r, *kernel]`` and two
mode factors. PEFT's default init zeroes ``w1`` (or ``w1_a``), so ``ΔW = 0`` at init;
``init = "lycoris"`` zeroes ``w2`` (or ``w2_b``) instead, and ``"random"`` nothing.

``rank_dropout`` (rows of ``ΔW``, optionally rescaled to keep their mean) and
``module_dropout`` (the whole branch) are training-time randomness, as in PEFT: they act only
while the graph is in train mode (``gm.train()``), through one shared ``LycorisDropout``
submodule that reads its ``training`` flag (``fxpeft.kinds.lycoris``, LoHa's too). The ``add``
joining the branch is the removable node; merge adds ``ΔW`` to the weight. Saved keys are PEFT's (``...q_proj.lokr_w1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpeft.capture.program import Program
from fxpeft.capture.quantized import weight_so_far
from fxpeft.errors import FxpeftError, RuleError
from fxpeft.formats.peft_format import PeftFormat, PeftFormatError, targets_for
from fxpeft.graph.gates import gate_node, reroute
from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch
from fxpeft.kinds.lora import (_common_and_exceptions, _number, adapter_dtype, adapter_input,
                               adaptable_paths, casts, join, layer_op, pattern_rules, record_nodes)
from fxpeft.kinds.lycoris import dropout_target
from fxpeft.match.layer_sites import ConvSite
from fxpeft.match.query import Match
from fxpeft.names import AdapterNode
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, RuleSet, spec

aten = torch.ops.aten
W1, W1_A, W1_B, W2, W2_A, W2_B, T2 = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                      "lokr_w2_b", "lokr_t2")


def _factor_check(value: Any) -> str | None:
    if value == -1 and not isinstance(value, bool):
        return None
    return checks.positive_int(value) and f"expected -1 or a positive integer, got {value!r}"


@dataclass(frozen=True)
class LokrParams(Params):
    """LoKr: ``ΔW = kron(w1, w2) * alpha / r``, each factor whole or a rank-``r`` product.

    >>> LokrParams(r=4, alpha=8).scale
    2.0
    >>> LokrParams(decompose_factor=0)
    Traceback (most recent call last):
    ...
    fxpeft.errors.RuleError: <rules>: params.decompose_factor: expected -1 or a positive integer, got 0
    """

    kind = "lokr"
    match_kinds = ("linear", "conv")
    dropout = 0.0  # PEFT's LoKr has no dropout on its input (``adapter_input`` reads this)
    r: int = spec(8, checks.positive_int, "rank of the decomposed factors")
    alpha: float = spec(8, checks.positive_number, "scaling numerator (scale = alpha / r)")
    rank_dropout: float = spec(0.0, checks.probability, "train mode: drop rows of the delta weight")
    module_dropout: float = spec(0.0, checks.probability, "train mode: drop the whole branch")
    rank_dropout_scale: bool = spec(False, checks.boolean, "rescale kept rows by 1 / their mean")
    use_effective_conv2d: bool = spec(False, checks.boolean, "CP-decompose w2 of k>1 convolutions")
    decompose_both: bool = spec(False, checks.boolean, "low-rank w1 too (when r is small)")
    decompose_factor: int = spec(-1, _factor_check, "factor sizes near this (-1: near sqrt)")
    init: str = spec("default", checks.one_of("default", "random", "lycoris"), "initialisation")
    autocast: bool = spec(True, checks.boolean, "fp32 adapters on fp16/bf16 bases")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


# --- shapes -------------------------------------------------------------------------------------

def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Two factors of ``dimension``, PEFT's (LyCORIS') choice: ``(factor, dimension // factor)``
    when ``factor`` divides it; else the divisor pair nearest the square root whose smaller
    side is at most ``factor`` (any, with ``-1``), smaller first.

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
    ((16, 16), (8, 16), (1, 127), (4, 32))
    >>> factorization(128, 32), factorization(12, 5)
    ((32, 4), (3, 4))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    small = 1
    for divisor in range(2, dimension + 1):
        if small >= dimension // small or divisor > limit:
            break
        if dimension % divisor == 0:
            small = divisor
    return tuple(sorted((small, dimension // small)))  # type: ignore[return-value]


@dataclass(frozen=True)
class LokrShape:
    """How ``ΔW`` is factored at one layer: ``out = a*b``, ``in = c*d`` (per group), the
    kernel, and which factors are whole (``use_w1``, ``use_w2``) or CP-decomposed
    (``effective``)."""

    out: tuple[int, int]
    inputs: tuple[int, int]
    kernel: tuple[int, ...]
    use_w1: bool
    use_w2: bool
    effective: bool

    def parameters(self, r: int) -> dict[str, tuple[int, ...]]:
        """The parameters' names and shapes (PEFT's).

        >>> lokr_shape(64, 64, (), LokrParams(r=2)).parameters(2)
        {'lokr_w1': (8, 8), 'lokr_w2_a': (8, 2), 'lokr_w2_b': (2, 8)}
        """
        (a, b), (c, d), kernel = self.out, self.inputs, self.kernel
        shapes = {W1: (a, c)} if self.use_w1 else {W1_A: (a, r), W1_B: (r, c)}
        if self.use_w2:
            return {**shapes, W2: (b, d, *kernel)}
        if self.effective:  # a 1-d kernel gets a trailing 1, as PEFT's CP core does
            return {**shapes, T2: (r, r, *kernel, *[1] * (2 - len(kernel))), W2_A: (r, b), W2_B: (r, d)}
        return {**shapes, W2_A: (b, r), W2_B: (r, d * math.prod(kernel))}


def lokr_shape(out_features: int, in_features: int, kernel: tuple[int, ...],
               params: LokrParams) -> LokrShape:
    """PEFT's factoring for a layer ``[out, in, *kernel]`` (``in`` per group)."""
    out = factorization(out_features, params.decompose_factor)
    inputs = factorization(in_features, params.decompose_factor)
    use_w1 = not (params.decompose_both and params.r < max(out[0], inputs[0]) / 2)
    use_w2 = params.r >= max(out[1], inputs[1]) / 2
    effective = params.use_effective_conv2d and math.prod(kernel) > 1
    return LokrShape(out, inputs, kernel, use_w1, use_w2, effective)


def _site_shape(site: Any, params: LokrParams) -> tuple[LokrShape, tuple[int, ...]]:
    """The site's factoring and the shape ``ΔW`` takes (the base weight's, ``[out, in]`` for a
    linear even when stored ``[in, out]``)."""
    if isinstance(site, ConvSite):
        per_group = site.in_channels // site.groups
        weight = (site.out_channels, per_group, *site.kernel_size)
        return lokr_shape(site.out_channels, per_group, tuple(site.kernel_size), params), weight
    weight = (site.out_features, site.in_features)
    return lokr_shape(site.out_features, site.in_features, (), params), weight


# --- the delta weight, as the graph and merge compute it ----------------------------------------

def factor_weight(*parts: torch.Tensor) -> torch.Tensor:
    """A Kronecker factor from its parameters: whole ``(w,)``, a product ``(a, b)``, or a CP
    core with its mode factors ``(t, a, b)``: ``w[p, q, k, l] = sum t[i, j, k, l] a[i, p] b[j, q]``.

    >>> factor_weight(torch.ones(2, 3), torch.ones(3, 4)).tolist()[0]
    [3.0, 3.0, 3.0, 3.0]
    """
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] @ parts[1]
    core, mode_a, mode_b = parts
    return torch.einsum("ijkl,ip,jq->pqkl", core, mode_a, mode_b)


def kron_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """``kron(w1, w2) * scale`` in the layer weight's ``shape`` (a 4-d ``w2`` takes ``w1`` as a
    1x1 kernel), the layout PEFT saves and merges.

    >>> kron_delta(torch.eye(2), torch.ones(1, 2), 0.5, (2, 4)).tolist()
    [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    """
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2.contiguous()) * scale).reshape(shape)


# --- splice ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LokrDetail:
    """What merge needs: the base weight, the targets of each factor's parameters (in
    ``factor_weight``'s order), the scale, ``ΔW``'s shape, and whether the weight is stored
    ``[in, out]`` (GPT-2's Conv1D)."""

    weight: str
    w1: tuple[str, ...]
    w2: tuple[str, ...]
    scale: float
    shape: tuple[int, ...]
    fan_in_fan_out: bool


def _initial(shapes: dict[str, tuple[int, ...]], init: str, factory: dict) -> dict[str, torch.Tensor]:
    """Kaiming-uniform tensors (PEFT's ``a = sqrt(5)``), with PEFT's zeroed factor: ``w1`` (or
    ``w1_a``) by default, ``w2`` (or ``w2_b``) for ``"lycoris"``, none for ``"random"``."""
    values = {}
    for name, shape in shapes.items():
        values[name] = torch.nn.init.kaiming_uniform_(torch.empty(shape, **factory), a=math.sqrt(5))
    zeroed = {"default": (W1, W1_A), "lycoris": (W2, W2_B), "random": ()}[init]
    for name in zeroed:
        if name in values:
            values[name].zero_()
    return values


def _check_adapter_name(job: SpliceInput) -> None:
    """``lokr_w1`` of adapter ``a`` would be named as the default adapter's ``lokr_w1_a``."""
    if job.adapter in ("a", "b") or job.adapter.startswith(("a_", "b_")):
        raise FxpeftError(f"{job.site.module_path}: a LoKr adapter cannot be named {job.adapter!r}: "
                          f"its parameter names would collide with lokr_w1_a / lokr_w1_b")


def attach(job: SpliceInput) -> tuple[LokrDetail, list[str]]:
    """Create and attach ``job.adapter``'s factors at the site's module."""
    _check_adapter_name(job)
    site, params = job.site, job.params
    shape, weight_shape = _site_shape(site, params)
    like = site.weight_like(job.gm)
    factory = {"dtype": adapter_dtype(params, like.dtype), "device": like.device}
    values = _initial(shape.parameters(params.r), params.init, factory)
    targets = {name: attach_component(job.gm, site.module_path, name, job.adapter,
                                      torch.nn.Parameter(value)) for name, value in values.items()}
    w1 = tuple(targets[n] for n in (W1, W1_A, W1_B) if n in targets)
    w2 = tuple(targets[n] for n in (W2, T2, W2_A, W2_B) if n in targets)
    detail = LokrDetail(site.weight_target, w1, w2, params.scale, weight_shape, site.fan_in_fan_out)
    return detail, list(targets.values())


def _factor_node(graph: torch.fx.Graph, targets: tuple[str, ...]) -> torch.fx.Node:
    parts = [graph.get_attr(t) for t in targets]
    return parts[0] if len(parts) == 1 else graph.call_function(factor_weight, tuple(parts))


def _delta_node(job: SpliceInput, detail: LokrDetail) -> torch.fx.Node:
    """``ΔW`` in the graph, through the LyCORIS dropouts when the rule has them."""
    graph, params = job.gm.graph, job.params
    delta = graph.call_function(kron_delta, (_factor_node(graph, detail.w1),
                                             _factor_node(graph, detail.w2), detail.scale, detail.shape))
    if params.rank_dropout > 0 or params.module_dropout > 0:
        delta = graph.call_module(dropout_target(job.gm), (delta, params.rank_dropout,
                                                            params.rank_dropout_scale, params.module_dropout))
    return delta


def splice(job: SpliceInput) -> Spliced:
    """Insert the LoKr branch after ``job.site.node`` and route its users through the sum."""
    detail, attached = attach(job)
    graph, y = job.gm.graph, job.site.node
    with graph.inserting_before(y.next):  # keeps creation order
        x = adapter_input(job)
        branch = layer_op(graph, job.site, x, _delta_node(job, detail))
        like = job.gm.get_parameter(attached[0])
        gate = gate_node(job.gm, job.adapter, like, branch)
        gated = graph.call_function(aten.mul.Tensor, (branch, gate))
        total = join(graph, y, gated, casts(job))
    reroute(y, total)
    return Spliced(record_nodes(job, y, total, "lokr", detail), attached)


def delta_weight(gm: torch.nn.Module, detail: LokrDetail) -> torch.Tensor:
    """``ΔW`` in fp32, laid out like the stored weight (transposed for ``fan_in_fan_out``)."""
    def factor(targets: tuple[str, ...]) -> torch.Tensor:
        return factor_weight(*[fetch(gm, t).detach().float() for t in targets])
    delta = kron_delta(factor(detail.w1), factor(detail.w2), detail.scale, detail.shape)
    return delta.T if detail.fan_in_fan_out else delta


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """``W + ΔW`` (computed in fp32, cast once); a grouped convolution's ``ΔW`` has the base
    weight's per-group shape, so it merges too."""
    detail: LokrDetail = record.detail
    base = weight_so_far(gm, weights, detail.weight)
    weights[detail.weight] = (base.float() + delta_weight(gm, detail)).to(base.dtype)


# --- PEFT's LoKrConfig ----------------------------------------------------------------------------

# Options PEFT's config holds once, for every layer: config field -> params field.
OPTIONS = {"rank_dropout": "rank_dropout", "module_dropout": "module_dropout",
           "rank_dropout_scale": "rank_dropout_scale", "use_effective_conv2d": "use_effective_conv2d",
           "decompose_both": "decompose_both", "decompose_factor": "decompose_factor"}
LOKR_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                         "r", "alpha", "rank_pattern", "alpha_pattern", "init_weights", *OPTIONS})
_INITS = {True: "default", False: "random", "lycoris": "lycoris"}


def _options(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The per-config params, checked: a bad value is a one-line error naming the field."""
    init = config.get("init_weights", True)
    if init not in _INITS:
        raise PeftFormatError(f"{source}: init_weights = {init!r} is not supported (True, False "
                              f"or \"lycoris\")")
    options = {ours: config[field] for field, ours in OPTIONS.items() if config.get(field) is not None}
    try:
        LokrParams(**options)
    except RuleError as error:  # "params.rank_dropout: expected ...": the field, said PEFT's way
        raise PeftFormatError(f"{source}: {str(error).split('params.', 1)[-1]}") from None
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise PeftFormatError(f"{source}: {key} must be a mapping, got {config[key]!r}")
    return {**options, "init": _INITS[init]}


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """PEFT ``LoKrConfig`` fields to rules on linears and convolutions.

    >>> rules = config_to_rules({"target_modules": ["q"], "r": 4, "alpha": 8, "decompose_both": True},
    ...                         torch.nn.Linear(2, 2), "cfg")
    >>> [(r.match, r.params.r, r.params.scale, r.params.decompose_both) for r in rules.rules]
    [('linear', 4, 2.0, True), ('conv', 4, 2.0, True)]
    """
    options = _options(config, source)
    return pattern_rules(config, model, source, LokrParams.match_kinds,
                         lambda r, alpha: LokrParams(r=r, alpha=alpha, **options), "alpha")


def _one_value(params: list[LokrParams], name: str) -> Any:
    values = {getattr(p, name) for p in params}
    if len(values) > 1:  # PEFT's config holds one
        raise PeftFormatError(f"PEFT's LoKrConfig has one {name}; these rules use {sorted(values, key=str)}")
    return values.pop()


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """The ``LoKrConfig`` fields that select ``matches``' modules with their ranks and alphas."""
    params = {m.module_path: m.rule.params for m in matches}
    r, rank_pattern = _common_and_exceptions({k: p.r for k, p in params.items()})
    alpha, alpha_pattern = _common_and_exceptions({k: _number(p.alpha) for k, p in params.items()})
    options = {field: _one_value(list(params.values()), ours) for field, ours in OPTIONS.items()}
    init = _one_value(list(params.values()), "init")
    return {"target_modules": targets_for(sorted(params), program, adaptable_paths(program)),
            "r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            **options, "init_weights": {v: k for k, v in _INITS.items()}[init]}


KIND = AdapterKind(name="lokr", params=LokrParams, splice=splice, merge=merge,
                   components=(W1, W1_A, W1_B, W2, W2_A, W2_B, T2),
                   peft=PeftFormat("LOKR", rules_to_config, config_to_rules, LOKR_FIELDS))
