"""LoHa (LyCORIS' low-rank Hadamard product; PEFT's ``LoHaConfig``).

For each matched linear or convolution ``y = f(x)``, the weight update is the elementwise
(Hadamard) product of two rank-``r`` products, scaled by ``alpha / r``::

    ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) * alpha / r

reshaped to the layer's weight, and spliced as ``y + gate * f_ΔW(x)``: ``F.linear(x, ΔW)``, or
the base's convolution (stride, padding, dilation, groups) with ``ΔW`` as its kernel, computed
afresh each forward, as PEFT does. A convolution with a kernel larger than 1 and
``use_effective_conv2d`` takes the Tucker form (PEFT's ``hada_t1`` / ``hada_t2``, FedPara's
"Proposition 3"): ``ΔW = (t1 ×₁ w1_a ×₂ w1_b) ⊙ (t2 ×₁ w2_a ×₂ w2_b) * alpha / r``.

Parameters are raw tensors under PEFT's names (``hada_w1_a`` ... ``hada_t2``; ``hada_w1_a_<name>``
for an adapter not named ``"default"``), initialised as PEFT does: kaiming-uniform, with
``hada_w2_b`` zero so that ΔW = 0 at init (``init = "random"``: none zero, PEFT's
``init_weights=False``).

PEFT's training-time randomness follows ``gm.train()`` / ``gm.eval()``: ``module_dropout`` skips
the whole update with that probability, ``rank_dropout`` zeroes rows of ΔW and rescales the
kept ones by the kept fraction. Both are one ``LycorisDropout`` submodule (shared with LoKr,
``fxpeft.kinds.lycoris``) that reads its own ``training`` flag (dropout as data,
``fxpeft.graph.dropout``), drawing its masks from the same CPU generator calls as PEFT. In eval mode ΔW is used as it is. The closing ``add`` is the
removable node; merge folds ΔW into the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from fxpeft.capture.linear_sites import LinearSite
from fxpeft.capture.program import Program
from fxpeft.capture.quantized import weight_so_far
from fxpeft.formats.peft_format import PeftFormat, PeftFormatError, targets_for
from fxpeft.graph.gates import GATE_META, gate_node, reroute
from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch
from fxpeft.kinds.lora import (_common_and_exceptions, _flag, _number, adapter_dtype,
                               adapter_input, casts, join, layer_op, pattern_rules, record_nodes)
from fxpeft.kinds.lycoris import dropout_target
from fxpeft.match.layer_sites import ConvSite, find_conv_sites
from fxpeft.match.query import Match
from fxpeft.names import AdapterNode
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, RuleSet, spec

aten = torch.ops.aten
FLAT = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TUCKER = ("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b")
COMPONENTS = (*FLAT, "hada_t1", "hada_t2")


@dataclass(frozen=True)
class LohaParams(Params):
    """LoHa: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) * alpha / r`` on linears and 1-d / 2-d
    convolutions; ``use_effective_conv2d``: the Tucker form on kernels larger than 1.

    >>> LohaParams(r=4, alpha=8).scale
    2.0
    """

    kind = "loha"
    match_kinds = ("linear", "conv")
    dropout: ClassVar[float] = 0.0  # no input dropout (nor in PEFT); lora.adapter_input reads it
    r: int = spec(8, checks.positive_int, "rank of each of the two factors")
    alpha: float = spec(8, checks.positive_number, "scaling numerator (scale = alpha / r)")
    rank_dropout: float = spec(0.0, checks.probability, "train mode: drop rows of the update")
    module_dropout: float = spec(0.0, checks.probability, "train mode: skip the whole update")
    use_effective_conv2d: bool = spec(False, checks.boolean,
                                      "Tucker form (hada_t1, hada_t2) on convolution kernels > 1")
    init: str = spec("default", checks.one_of("default", "random"),
                     "\"default\": hada_w2_b zero (identity); \"random\": all kaiming-uniform")
    autocast: bool = spec(True, checks.boolean, "fp32 adapters on fp16/bf16 bases")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class LohaDetail:
    """What merge needs: the base weight, the factor targets (``FLAT`` or ``TUCKER`` order),
    the scale, the update's shape (``[out, in]`` or the kernel's) and whether the weight is
    stored ``[in, out]`` (GPT-2's Conv1D)."""

    scale: float
    weight: str
    factors: tuple[str, ...]
    shape: tuple[int, ...]
    fan_in_fan_out: bool

    @property
    def tucker(self) -> bool:
        return len(self.factors) == len(TUCKER)


# --- the update ---------------------------------------------------------------------------------

def hadamard(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
             scale: float, shape: list[int]) -> torch.Tensor:
    """``(w1_a @ w1_b) ⊙ (w2_a @ w2_b) * scale``, reshaped to ``shape``.

    >>> hadamard(torch.ones(2, 1), torch.ones(1, 3), torch.ones(2, 1), torch.full((1, 3), 2.), 0.5, [2, 3])
    tensor([[1., 1., 1.],
            [1., 1., 1.]])
    """
    return ((w1_a @ w1_b) * (w2_a @ w2_b) * scale).reshape(shape)


def tucker_hadamard(t1: torch.Tensor, w1_a: torch.Tensor, w1_b: torch.Tensor, t2: torch.Tensor,
                    w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float,
                    shape: list[int]) -> torch.Tensor:
    """The Tucker form: each core ``t [r, r, k, k']`` takes ``w_a [r, out]`` on its first mode
    and ``w_b [r, in]`` on its second; the two kernels' product times ``scale``, reshaped to
    ``shape`` (a 1-d kernel's core has a trailing 1).

    >>> tucker_hadamard(*[torch.ones(1, 1, 3, 1), torch.ones(1, 2), torch.ones(1, 4)] * 2, 1.0, [2, 4, 3]).shape
    torch.Size([2, 4, 3])
    """
    first = torch.einsum("ijkl,jr,ip->prkl", t1, w1_b, w1_a)
    second = torch.einsum("ijkl,jr,ip->prkl", t2, w2_b, w2_a)
    return (first * second * scale).reshape(shape)


# --- the splice ---------------------------------------------------------------------------------

def _uses_tucker(site: Any, params: LohaParams) -> bool:
    """PEFT's rule: the Tucker form only on convolutions whose kernel is larger than 1."""
    return params.use_effective_conv2d and isinstance(site, ConvSite) and \
        any(k != 1 for k in site.kernel_size)


def _update_shape(gm: torch.nn.Module, site: Any) -> tuple[int, ...]:
    """ΔW as the layer applies it: ``[out, in]`` for a linear, the kernel for a convolution."""
    if isinstance(site, ConvSite):
        return tuple(gm.get_parameter(site.weight_target).shape)
    return (site.out_features, site.in_features)


def _factor_shapes(shape: tuple[int, ...], r: int, tucker: bool) -> list[tuple[int, ...]]:
    """PEFT's parameter shapes, in ``FLAT`` or ``TUCKER`` order."""
    out, fan_in = shape[0], math.prod(shape[1:])
    if not tucker:
        return [(out, r), (r, fan_in)] * 2
    kernel = (*shape[2:], 1)[:2]  # a 1-d kernel's core gets a trailing 1, as in PEFT
    return [(r, r, *kernel), (r, out), (r, shape[1])] * 2


def _make_factors(shapes: list[tuple[int, ...]], params: LohaParams, tucker: bool,
                  like: torch.Tensor) -> list[torch.nn.Parameter]:
    """Kaiming-uniform factors (PEFT's ``a = sqrt(5)``), in PEFT's order; ``hada_w2_b`` zero
    with ``init = "default"``, so ΔW = 0."""
    factory = {"dtype": adapter_dtype(params, like.dtype), "device": like.device}
    tensors = [torch.empty(shape, **factory) for shape in shapes]
    order = [1, 2, 4, 5, 0, 3] if tucker else [0, 1, 2, 3]  # PEFT's: w1_a, w1_b, w2_a, w2_b, t1, t2
    zero = (5 if tucker else 3) if params.init == "default" else None
    for index in order:
        if index == zero:
            torch.nn.init.zeros_(tensors[index])
        else:
            torch.nn.init.kaiming_uniform_(tensors[index], a=math.sqrt(5))
    return [torch.nn.Parameter(t) for t in tensors]


def _attach(job: SpliceInput) -> LohaDetail:
    site, params = job.site, job.params
    tucker = _uses_tucker(site, params)
    shape = _update_shape(job.gm, site)
    factors = _make_factors(_factor_shapes(shape, params.r, tucker), params, tucker,
                            site.weight_like(job.gm))
    targets = tuple(attach_component(job.gm, site.module_path, name, job.adapter, factor)
                    for name, factor in zip(TUCKER if tucker else FLAT, factors))
    return LohaDetail(params.scale, site.weight_target, targets, shape, site.fan_in_fan_out)


def splice(job: SpliceInput) -> Spliced:
    """Insert ``y + gate * f_ΔW(x)`` after ``job.site.node`` and route its users through it."""
    detail, params = _attach(job), job.params
    graph, y = job.gm.graph, job.site.node
    with graph.inserting_before(y.next):  # keeps creation order
        x = adapter_input(job)
        factors = [graph.get_attr(target) for target in detail.factors]
        delta = graph.call_function(tucker_hadamard if detail.tucker else hadamard,
                                    (*factors, detail.scale, list(detail.shape)))
        if params.rank_dropout > 0 or params.module_dropout > 0:
            delta = graph.call_module(dropout_target(job.gm),  # PEFT's LoHa always rescales rows
                                      (delta, params.rank_dropout, True, params.module_dropout))
        branch = layer_op(graph, job.site, x, delta)
        gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(detail.factors[0]), branch)
        gated = graph.call_function(aten.mul.Tensor, (branch, gate))
        total = join(graph, y, gated, casts(job))
    reroute(y, total)
    return Spliced(record_nodes(job, y, total, "loha", detail), list(detail.factors))


def loha_delta(gm: torch.nn.Module, detail: LohaDetail) -> torch.Tensor:
    """ΔW in fp32, laid out like the stored weight (transposed for a ``[in, out]`` weight)."""
    factors = [fetch(gm, target).detach().float() for target in detail.factors]
    delta = (tucker_hadamard if detail.tucker else hadamard)(*factors, detail.scale, list(detail.shape))
    return delta.T if detail.fan_in_fan_out else delta


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """``W + ΔW`` (computed in fp32, cast once); the bias is unchanged."""
    detail: LohaDetail = record.detail
    base = weight_so_far(gm, weights, detail.weight)
    weights[detail.weight] = (base.float() + loha_delta(gm, detail)).to(base.dtype)


# --- PEFT's LoHaConfig --------------------------------------------------------------------------

LOHA_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform",
                         "layers_pattern", "r", "alpha", "rank_pattern", "alpha_pattern",
                         "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"})


def _check_config(config: dict[str, Any], source: str) -> None:
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise PeftFormatError(f"{source}: {key} must be a mapping, got {config[key]!r}")
    if not isinstance(config.get("init_weights", True), bool):
        raise PeftFormatError(f"{source}: init_weights = {config['init_weights']!r} is not "
                              f"supported (LoHa's is true or false)")


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """PEFT ``LoHaConfig`` fields to rules, one per pattern pair and site kind
    (``lora.pattern_rules``)."""
    _check_config(config, source)

    def params_for(r: int, alpha: float) -> LohaParams:
        return LohaParams(r=r, alpha=alpha, rank_dropout=config.get("rank_dropout") or 0.0,
                          module_dropout=config.get("module_dropout") or 0.0,
                          use_effective_conv2d=_flag(config.get("use_effective_conv2d")),
                          init="default" if config.get("init_weights", True) else "random")
    return pattern_rules(config, model, source, LohaParams.match_kinds, params_for, "alpha")


def _one(values: set[Any], field: str) -> Any:
    """The one value PEFT's config holds for ``field``."""
    if len(values) > 1:
        raise PeftFormatError(f"PEFT's LoHaConfig has one {field}; these rules use {sorted(values)}")
    return values.pop()


def _adaptable(program: Program) -> list[str]:
    """The module paths of every layer LoHa can adapt: linears and convolutions."""
    return [site.module_path for site in (*program.sites, *find_conv_sites(program.graph_module))]


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """The ``LoHaConfig`` fields that select ``matches``' modules with their rank and alpha."""
    params = {m.module_path: m.rule.params for m in matches}
    r, rank_pattern = _common_and_exceptions({k: p.r for k, p in params.items()})
    alpha, alpha_pattern = _common_and_exceptions({k: _number(p.alpha) for k, p in params.items()})
    tucker = {m.rule.params.use_effective_conv2d for m in matches
              if isinstance(m.site, ConvSite) and any(k != 1 for k in m.site.kernel_size)}
    return {"target_modules": targets_for(sorted(params), program, _adaptable(program)),
            "r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "rank_dropout": _one({p.rank_dropout for p in params.values()}, "rank_dropout"),
            "module_dropout": _one({p.module_dropout for p in params.values()}, "module_dropout"),
            "use_effective_conv2d": _one(tucker, "use_effective_conv2d") if tucker else False,
            "init_weights": all(p.init == "default" for p in params.values())}


KIND = AdapterKind(
    name="loha", params=LohaParams, splice=splice, merge=merge, components=COMPONENTS,
    peft=PeftFormat("LOHA", rules_to_config, config_to_rules, LOHA_FIELDS))
