"""BOFT (butterfly orthogonal fine-tuning; PEFT's ``BOFTConfig``) on linears, as PEFT 0.21.2
defines it.

Each site gets ``boft_R`` ``[m, blocks, b, b]`` (``m`` butterfly factors; zeros at init) and
``boft_s`` ``[out, 1]`` (ones). Each ``b x b`` matrix ``A`` gives an orthogonal block by the
Cayley map of its skew part ``Q = (A - A^T) / 2``: ``(I - Q)(I + Q)^-1``. Factor ``i`` is the
block-diagonal matrix of its blocks, conjugated by PEFT's butterfly permutation ``P_i``
(``P_i B_i P_i^T``), and the rotation is their product ``M_{m-1} ... M_0``. As PEFT does, the
input is rotated (``x @ M``, in the input's dtype) and the output scaled per feature around the
bias: ``(f(x M) - bias) * s + bias``.

Both ends are gated, so each is a removable node: the input's ``blend`` (``fxpeft.kinds.oft``),
whose merger folds ``W M^T``, and the output's ``lerp(y, (y - bias) * s + bias, gate)``, whose
merger scales the weight's rows by ``s``. ``boft_dropout`` (PEFT's random multiplicative
dropout) is refused, as are convolutions: PEFT's BOFT on Conv2d is not implemented here.

PEFT 0.21.2 computes ``boft_n_butterfly_factor`` > 1 only with its CUDA extension (``fbd_cuda``);
without it (on CPU) it silently uses one factor. fxpeft computes the factors as the extension's
path does, on every device.

>>> import fxpeft
>>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(8, 3)),
...                     Rule(where=Where(path=["^0$"]), params=BoftParams(block_size=2)))
>>> tuple(gm.get_parameter("0.boft_R").shape), tuple(gm.get_parameter("0.boft_s").shape)
((1, 4, 2, 2), (3, 1))
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
from fxpeft.formats.peft_format import (PeftFormat, PeftFormatError, exclude_regexes, layers_prefix,
                                        target_regex, targets_for)
from fxpeft.graph.gates import gate_node, reroute
from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch
from fxpeft.kinds.lora import adapter_dtype, record_nodes
from fxpeft.kinds.oft import blend, non_negative_int
from fxpeft.match.query import Match
from fxpeft.names import AdapterNode
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, Where, spec

ROTATION, SCALE = "boft_R", "boft_s"


@dataclass(frozen=True)
class BoftParams(Params):
    """BOFT: ``block_size`` (PEFT's ``boft_block_size``) or ``block_num`` (``boft_block_num``),
    exactly one non-zero, and ``butterfly_factor`` (``boft_n_butterfly_factor``) factors.

    >>> BoftParams(block_size=0, block_num=4).block_num
    4
    >>> BoftParams(block_size=0)
    Traceback (most recent call last):
    ...
    fxpeft.errors.RuleError: <rules>: params.block_size: Either block_size or block_num must be non-zero. Currently, block_size = 0 and block_num = 0 (PEFT's BOFTConfig: boft_block_size and boft_block_num)
    """

    kind = "boft"
    match_kinds = ("linear",)
    block_size: int = spec(4, non_negative_int, "block size (0: derived from block_num)")
    block_num: int = spec(0, non_negative_int, "blocks per factor (0: derived from block_size)")
    butterfly_factor: int = spec(1, checks.positive_int, "butterfly factors")
    init: str = spec("default", checks.one_of("default", "random"),
                     "zeros and ones (identity), or PEFT's init_weights=False normals")
    autocast: bool = spec(True, checks.boolean, "fp32 adapters on fp16/bf16 bases")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size == 0 and self.block_num == 0:
            raise RuleError(f"Either block_size or block_num must be non-zero. Currently, "
                            f"block_size = {self.block_size} and block_num = {self.block_num} "
                            f"(PEFT's BOFTConfig: boft_block_size and boft_block_num)",
                            key="params.block_size")
        if self.block_size != 0 and self.block_num != 0:
            raise RuleError(f"You can only specify either block_size ({self.block_size}) or "
                            f"block_num ({self.block_num}), but not both simultaneously, because "
                            f"block_size x block_num == in_features (PEFT's BOFTConfig: "
                            f"boft_block_size and boft_block_num)", key="params.block_num")


@dataclass(frozen=True)
class BoftDetail:
    """What merge needs: the targets of the rotation, the scale and the weight, the butterfly
    permutations (one per factor), and which end of the layer a removable node gates."""

    rotation: str
    scale: str
    weight: str
    bias: str | None
    permutations: tuple[tuple[int, ...], ...]
    end: str = "input"


# --- sizes and permutations, with PEFT's checks -------------------------------------------------

def _sizes(features: int, params: BoftParams, where: str) -> tuple[int, int]:
    """``(block_size, block_num)`` at a site, PEFT's checks raised as located errors."""
    factor = params.butterfly_factor - 1  # PEFT's (the paper's) notation
    size, num = params.block_size, params.block_num
    fail = lambda message: FxpeftError(f"{where}: {message} (PEFT's BOFT)")  # noqa: E731
    if size == 0:
        if features % num:
            raise fail(f"in_features ({features}) must be divisible by block_num ({num})!")
        if factor and (factor > int(math.log2(num)) or num % 2 ** factor):
            raise fail(f"Invalid combination of butterfly_factor ({factor + 1}) and block_num ({num})!")
        size = features // num
    else:
        if features % size:
            raise fail(f"in_features ({features}) must be divisible by block_size ({size})!")
        if factor and features % (size * 2 ** factor):
            raise fail(f"Invalid combination of in_features ({features}), butterfly_factor "
                       f"({factor + 1}) and block_size ({size})!")
        num = features // size
    if factor and (num % 2 or size % 2):
        raise fail(f"block_num ({num}) and block_size ({size}) must be even numbers!")
    return size, num


def butterfly_permutation(features: int, blocks: int, half: int, factor: int) -> tuple[int, ...]:
    """PEFT's ``block_butterfly_perm``: within each of ``blocks`` chunks, the groups of ``half``
    entries at even positions, then those at odd positions (the identity without factors).

    >>> butterfly_permutation(8, 1, 2, 1)
    (0, 1, 4, 5, 2, 3, 6, 7)
    """
    if factor == 0:
        return tuple(range(features))
    if blocks * half * 2 > features:
        raise FxpeftError(f"Invalid number of blocks! ({blocks} blocks of {2 * half} in {features}, "
                          f"PEFT's BOFT butterfly)")
    chunk = features // blocks
    groups = chunk // half
    order = [g for g in range(0, groups, 2)] + [g for g in range(1, groups, 2)]
    within = [g * half + k for g in order for k in range(half)]
    return tuple(start + i for start in range(0, features, chunk) for i in within)


def _permutations(features: int, size: int, num: int, factor: int) -> tuple[tuple[int, ...], ...]:
    return tuple(butterfly_permutation(features, num // 2 ** i, size // 2, factor)
                 for i in range(factor + 1))


# --- the rotation, as graph call targets -----------------------------------------------------------

def butterfly(weight: torch.Tensor, permutations: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The orthogonal ``M = M_{m-1} ... M_0`` with ``M_i = P_i block_diag(cayley(A_i)) P_i^T``,
    in the parameter's dtype."""
    factors, blocks, size, _ = weight.shape
    data = weight.reshape(factors * blocks, size, size)
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(size, device=weight.device, dtype=weight.dtype).expand_as(skew)
    cayley = torch.linalg.solve(eye + skew, eye - skew, left=False).view(factors, blocks, size, size)
    total = None
    for i, order in enumerate(permutations):
        index = torch.tensor(order, device=weight.device)
        factor = torch.block_diag(*cayley[i])[index][:, index]
        total = factor if total is None else factor @ total
    return total


def rotate(x: torch.Tensor, weight: torch.Tensor, permutations: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """``x @ M``, the rotation cast to ``x``'s dtype first, as PEFT does."""
    return x @ butterfly(weight, permutations).to(x.dtype)


def rescale(y: torch.Tensor, scale: torch.Tensor, bias: "torch.Tensor | None",
            gate: torch.Tensor) -> torch.Tensor:
    """``lerp(y, (y - bias) * s + bias, gate)``, computed in the wider dtype as PEFT computes
    ``(y - bias) * s + bias``, cast back to ``y``'s."""
    centred = y if bias is None else y - bias
    scaled = centred * scale.squeeze(-1)
    scaled = scaled if bias is None else scaled + bias
    return torch.lerp(y.to(scaled.dtype), scaled, gate.to(scaled.dtype)).to(y.dtype)


# --- the splice -------------------------------------------------------------------------------------

def _attach(job: SpliceInput) -> tuple[BoftDetail, list[str]]:
    site, params = job.site, job.params
    if site.fan_in_fan_out:
        raise FxpeftError(f"{site.module_path}: PEFT's BOFT supports torch.nn.Linear, not GPT-2's "
                          f"Conv1D")
    size, num = _sizes(site.in_features, params, site.module_path)
    like = site.weight_like(job.gm)
    factory = {"dtype": adapter_dtype(params, like.dtype), "device": like.device}
    rotation = torch.zeros(params.butterfly_factor, num, size, size, **factory)
    scale = torch.ones(site.out_features, 1, **factory)
    if params.init == "random":
        torch.nn.init.normal_(rotation, mean=0.0, std=0.1)
        torch.nn.init.normal_(scale, mean=1.0, std=0.1)
    targets = [attach_component(job.gm, site.module_path, name, job.adapter, torch.nn.Parameter(value))
               for name, value in ((ROTATION, rotation), (SCALE, scale))]
    detail = BoftDetail(targets[0], targets[1], site.weight_target, site.bias_target(job.gm),
                        _permutations(site.in_features, size, num, params.butterfly_factor - 1))
    return detail, targets


def _rotate_input(job: SpliceInput, detail: BoftDetail) -> list[torch.fx.Node]:
    site, graph = job.site, job.gm.graph
    consumer, x = site.consumer, site.input
    first = consumer.prev
    with graph.inserting_before(consumer):
        rotated = graph.call_function(rotate, (x, graph.get_attr(detail.rotation), detail.permutations))
        gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(detail.rotation), x)
        total = graph.call_function(blend, (x, rotated, gate))
    consumer.replace_input_with(x, total)
    return record_nodes(job, first, total, "boft", detail)


def _scale_output(job: SpliceInput, detail: BoftDetail) -> list[torch.fx.Node]:
    graph, y = job.gm.graph, job.site.node
    with graph.inserting_before(y.next):
        bias = graph.get_attr(detail.bias) if detail.bias else None
        gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(detail.scale), y)
        total = graph.call_function(rescale, (y, graph.get_attr(detail.scale), bias, gate))
    added = record_nodes(job, y, total, "boft", BoftDetail(**{**detail.__dict__, "end": "output"}))
    reroute(y, total, keep=set(added))
    return added


def splice(job: SpliceInput) -> Spliced:
    """Rotate the linear's input and scale its output around the bias, both gated."""
    detail, attached = _attach(job)
    return Spliced(_rotate_input(job, detail) + _scale_output(job, detail), attached)


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """The input's node folds ``W M^T``, the output's scales the rows of ``W`` by ``s`` (the
    bias is unchanged): PEFT's ``(M W^T)^T * s``. fp32, cast once."""
    detail: BoftDetail = record.detail
    base = weight_so_far(gm, weights, detail.weight)
    if detail.end == "output":
        merged = base.float() * fetch(gm, detail.scale).detach().float()
    else:
        rotation = butterfly(fetch(gm, detail.rotation).detach().float(), detail.permutations)
        merged = base.float() @ rotation.T
    weights[detail.weight] = merged.to(base.dtype)


# --- PEFT's BOFTConfig -------------------------------------------------------------------------------

BOFT_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                         "boft_block_size", "boft_block_num", "boft_n_butterfly_factor",
                         "boft_dropout", "fan_in_fan_out", "bias", "init_weights"})


def _params(config: dict[str, Any], source: str) -> BoftParams:
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{source}: bias = {config['bias']!r} is not supported (only \"none\")")
    if config.get("boft_dropout") or 0:
        raise PeftFormatError(f"{source}: boft_dropout = {config['boft_dropout']!r} is not supported "
                              f"(PEFT's random multiplicative block dropout; only 0)")
    if config.get("init_weights", True) not in (True, False):
        raise PeftFormatError(f"{source}: init_weights = {config['init_weights']!r} is not supported")
    names = {"block_size": "boft_block_size", "block_num": "boft_block_num",
             "butterfly_factor": "boft_n_butterfly_factor"}
    defaults = {"block_size": 4, "block_num": 0, "butterfly_factor": 1}
    try:
        return BoftParams(**{ours: config.get(theirs, defaults[ours]) for ours, theirs in names.items()},
                          init="default" if config.get("init_weights", True) else "random")
    except RuleError as err:
        field = names.get(err.key.removeprefix("params."), err.key)
        raise PeftFormatError(f"{source}: {field}: {err.message}") from None


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """A ``BOFTConfig`` as one linear rule."""
    params = _params(config, source)
    path = "^" + layers_prefix(config) + target_regex(config, model, source)
    return RuleSet((Rule(name="peft boft", optional=True, params=params,
                         where=Where(path=[path], exclude=exclude_regexes(config))),), source=source)


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """The ``BOFTConfig`` fields selecting ``matches``' linears (one set of params per adapter)."""
    params = {m.rule.params for m in matches}
    if len(params) > 1:
        raise PeftFormatError(f"PEFT's BOFTConfig has one set of BOFT parameters; these rules use "
                              f"{len(params)}")
    (one,) = params
    return {"target_modules": targets_for(sorted(m.module_path for m in matches), program),
            "boft_block_size": one.block_size, "boft_block_num": one.block_num,
            "boft_n_butterfly_factor": one.butterfly_factor, "boft_dropout": 0.0,
            "bias": "none", "init_weights": one.init == "default", "fan_in_fan_out": False}


KIND = AdapterKind(name="boft", params=BoftParams, splice=splice, merge=merge,
                   components=(ROTATION, SCALE),
                   peft=PeftFormat("BOFT", rules_to_config, config_to_rules, BOFT_FIELDS))
