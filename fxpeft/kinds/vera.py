"""VeRA (PEFT's ``VeraConfig``): for each matched linear ``y = f(x)``, splice
``y + λ_b ⊙ B(gate * λ_d ⊙ A(dropout(x)))``.

``A`` ``[r, in]`` and ``B`` ``[out, r]`` are frozen random projections shared by every layer of
an adapter: one pair, sized for the largest adapted layer (each dimension's maximum), that every
layer slices (``A[:, :in]``, ``B[:out]``). They are buffers of root submodules ``vera_A`` and
``vera_B`` (``vera_A_<name>`` for other adapters) drawn exactly as PEFT 0.21.2 draws them: a CPU
``torch.Generator`` seeded with ``projection_prng_key``, then a kaiming-uniform ``A`` and then
``B``. A splice whose layer needs a larger pair draws the pair again at the larger size, so the
graph ends with the pair PEFT makes for the same layers. Like PEFT, a second VeRA adapter reuses
the first one's pair (a copy), so its layers must fit it, its rank must equal it and its key
must be the same.

Per layer, ``vera_lambda_d`` ``[r]`` (``d_initial`` at init) and ``vera_lambda_b`` ``[out]``
(zeros at init: the identity) are the trained parameters; PEFT's keys
(``...q_proj.vera_lambda_b``; the pair as ``base_model.vera_A`` / ``base_model.vera_B``, left out
of the file with ``save_projection = false`` and drawn again on load). The ``add`` that joins the
branch is the removable node; merge folds ``(λ_b ⊙ B) @ (λ_d ⊙ A)`` into the weight.

VeRA does not declare the ``low_rank`` capability: ``λ_d`` sits between ``A`` and the gate,
``λ_b`` is a vector, not a scale, and ``A``/``B`` are slices of a shared pair, so a fuse pass
that gathered or rescaled "the A and B weights" of a site would compute something else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpeft.errors import FxpeftError
from fxpeft.graph.gates import GATE_META, gate_node, reroute
from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch
from fxpeft.kinds.lora import adapter_dtype, adapter_input, casts, join, record_nodes
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.match.query import Match
from fxpeft.names import PEFT_PREFIX, AdapterNode, adapter_component, adapter_node
from fxpeft.formats.peft_format import (PeftFormat, PeftFormatError, exclude_regexes,
                                        layers_prefix, target_regex, targets_for)
from fxpeft.capture.quantized import weight_so_far
from fxpeft.capture.program import Program
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, Where, spec

aten = torch.ops.aten
LAMBDA_B, LAMBDA_D, PROJ_A, PROJ_B = "vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"


def _number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    return None


def _integer(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected an integer, got {value!r}"
    return None


@dataclass(frozen=True)
class VeraParams(Params):
    """VeRA: ``y = f(x) + λ_b ⊙ B(λ_d ⊙ A(dropout(x)))`` with frozen random ``A``, ``B`` drawn
    from ``prng_key`` and shared by the adapter's layers. ``init = "default"`` gives PEFT's
    ``λ_d = d_initial``, ``λ_b = 0``; ``"random"`` PEFT's ``init_weights=False`` (``λ_d``
    normal, ``λ_b`` ones).

    >>> VeraParams(r=4).d_initial, VeraParams().r
    (0.1, 256)
    """

    kind = "vera"
    match_kinds = ("linear",)
    r: int = spec(256, checks.positive_int, "rank of the shared projections")
    d_initial: float = spec(0.1, _number, "initial value of vera_lambda_d")
    dropout: float = spec(0.0, checks.probability, "dropout on the adapter input")
    prng_key: int = spec(0, _integer, "seed the shared projections are drawn from")
    save_projection: bool = spec(True, checks.boolean, "save the projections in the file")
    init: str = spec("default", checks.one_of("default", "random"), "initialisation")
    autocast: bool = spec(True, checks.boolean, "fp32 adapters on fp16/bf16 bases")


@dataclass(frozen=True)
class VeraDetail:
    """What merge needs of one VeRA branch: the weight, the shared pair's buffers, the two
    vectors, the slice sizes, and whether the weight is stored ``[in, out]``."""

    weight: str
    vera_A: str
    vera_B: str
    lambda_b: str
    lambda_d: str
    in_features: int
    out_features: int
    fan_in_fan_out: bool


class Projection(torch.nn.Module):
    """One shared projection (``weight``, a frozen buffer) and how it was made: ``key`` (its
    PRNG key), ``grows`` (drawn by this adapter, so a larger layer redraws it; False for a copy
    of another adapter's pair, which layers must fit) and ``saved`` (``save_projection``)."""

    def __init__(self, weight: torch.Tensor, key: int, grows: bool, saved: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.key, self.grows, self.saved = key, grows, saved


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's draw: uniform in ``±sqrt(3) * sqrt(2) / sqrt(fan_in)`` (fan_in = ``shape[1]``)."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def draw_projections(key: int, r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair PEFT 0.21.2 draws for ``projection_prng_key = key``: ``A`` ``[r, in]``
    first, then ``B`` ``[out, r]``, from one CPU generator (fp32).

    >>> a, b = draw_projections(0, 4, 8, 6)
    >>> tuple(a.shape), tuple(b.shape), torch.equal(a, draw_projections(0, 4, 8, 6)[0])
    ((4, 8), (6, 4), True)
    """
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = _kaiming_uniform((r, in_features), generator)
    return vera_a, _kaiming_uniform((out_features, r), generator)


def _first_pair(gm: torch.nn.Module, skip: str) -> "tuple[Projection, Projection] | None":
    """The pair of the first other VeRA adapter in ``gm`` (PEFT's ``next(iter(vera_A))``)."""
    for node in gm.graph.nodes:
        record = adapter_node(node)
        if record is not None and record.kind == "vera" and record.adapter != skip:
            owners = [target.rsplit(".", 1)[0] for target in (record.detail.vera_A, record.detail.vera_B)]
            if all(hasattr(gm, owner) for owner in owners):
                return getattr(gm, owners[0]), getattr(gm, owners[1])
    return None


def _check_same_config(job: SpliceInput, first: Projection) -> None:
    """PEFT's checks for a second VeRA adapter (``_check_new_adapter_config``)."""
    params = job.params
    if first.key != params.prng_key:
        raise FxpeftError(f"VeRA adapter {job.adapter!r}: prng_key = {params.prng_key} differs from "
                          f"the graph's other VeRA adapter's ({first.key}); PEFT requires one "
                          f"projection_prng_key for all VeRA adapters")
    if first.saved != params.save_projection:
        raise FxpeftError(f"VeRA adapter {job.adapter!r}: save_projection = "
                          f"{params.save_projection} differs from the graph's other VeRA adapter's; "
                          f"PEFT requires the same save_projection for all VeRA adapters")


def _check_fits(job: SpliceInput, vera_a: torch.Tensor, vera_b: torch.Tensor) -> None:
    """A layer must fit a pair it cannot redraw (PEFT's checks in ``update_layer``)."""
    site, r = job.site, job.params.r
    for name, have, need in ((PROJ_A, vera_a.shape[1], site.in_features),
                             (PROJ_B, vera_b.shape[0], site.out_features)):
        if have < need:
            raise FxpeftError(f"{site.module_path}: {name} has a size of {have} but {need} or "
                              f"greater is required: VeRA adapter {job.adapter!r} reuses the pair of "
                              f"the first VeRA adapter, sized for its layers (as PEFT does)")
    if vera_a.shape[0] != r:
        raise FxpeftError(f"{site.module_path}: VeRA adapter {job.adapter!r} has r = {r}, but it "
                          f"reuses the first VeRA adapter's pair of rank {vera_a.shape[0]} (as PEFT "
                          f"does); every VeRA adapter of a graph needs that rank")


def _place(job: SpliceInput, base: str, weight: torch.Tensor, grows: bool) -> None:
    projection = Projection(weight, job.params.prng_key, grows, job.params.save_projection)
    job.gm.add_module(adapter_component(base, job.adapter), projection)


def _start_projections(job: SpliceInput, dtype: torch.dtype, device: torch.device) -> None:
    """The adapter's first layer: a copy of another VeRA adapter's pair, or a fresh draw."""
    other = _first_pair(job.gm, job.adapter)
    if other is not None:
        _check_same_config(job, other[0])
        pair, grows = (other[0].weight, other[1].weight), False
    else:
        pair, grows = draw_projections(job.params.prng_key, job.params.r, job.site.in_features,
                                       job.site.out_features), True
    for base, weight in zip((PROJ_A, PROJ_B), pair):
        _place(job, base, weight.to(device, dtype, copy=True), grows)


def _check_one_config(job: SpliceInput, proj_a: Projection) -> None:
    """One adapter has one key, ``save_projection`` and (for a pair it drew) rank."""
    params = job.params
    if proj_a.key != params.prng_key or proj_a.saved != params.save_projection or (
            proj_a.grows and proj_a.weight.shape[0] != params.r):
        raise FxpeftError(f"{job.site.module_path}: VeRA adapter {job.adapter!r}: its rules must "
                          f"share r, prng_key and save_projection (PEFT's VeraConfig has one of each)")


def _grow(job: SpliceInput, proj_a: Projection, proj_b: Projection) -> None:
    """Draw the pair again when this layer is larger than every layer before it."""
    site, params = job.site, job.params
    size_in = max(proj_a.weight.shape[1], site.in_features)
    size_out = max(proj_b.weight.shape[0], site.out_features)
    if (size_in, size_out) != (proj_a.weight.shape[1], proj_b.weight.shape[0]):
        vera_a, vera_b = draw_projections(params.prng_key, params.r, size_in, size_out)
        like = proj_a.weight
        proj_a.weight, proj_b.weight = vera_a.to(like.device, like.dtype), vera_b.to(like.device, like.dtype)


def _projections(job: SpliceInput, dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """The adapter's shared pair, made to fit this layer; returns the buffers' targets."""
    names = adapter_component(PROJ_A, job.adapter), adapter_component(PROJ_B, job.adapter)
    if not hasattr(job.gm, names[0]):
        _start_projections(job, dtype, device)
    proj_a, proj_b = getattr(job.gm, names[0]), getattr(job.gm, names[1])
    _check_one_config(job, proj_a)
    if proj_a.grows:
        _grow(job, proj_a, proj_b)
    else:
        _check_fits(job, proj_a.weight, proj_b.weight)
    return f"{names[0]}.weight", f"{names[1]}.weight"


def _vectors(job: SpliceInput, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """``λ_b`` ``[out]`` and ``λ_d`` ``[r]`` as PEFT initialises them."""
    params, out = job.params, job.site.out_features
    if params.init == "default":
        lambda_b, lambda_d = torch.zeros(out), torch.full((params.r,), float(params.d_initial))
    else:
        lambda_b, lambda_d = torch.ones(out), torch.randn(params.r)
    return (torch.nn.Parameter(lambda_b.to(device, dtype)), torch.nn.Parameter(lambda_d.to(device, dtype)))


def attach_vera(job: SpliceInput) -> tuple[VeraDetail, list[str]]:
    """Attach ``job.adapter``'s vectors at the site and fit the shared pair; returns the record
    and the targets (the pair's modules too, so a decode graph shares them)."""
    site, like = job.site, job.site.weight_like(job.gm)
    dtype = adapter_dtype(job.params, like.dtype)
    target_a, target_b = _projections(job, dtype, like.device)
    lambda_b, lambda_d = _vectors(job, dtype, like.device)
    b_path = attach_component(job.gm, site.module_path, LAMBDA_B, job.adapter, lambda_b)
    d_path = attach_component(job.gm, site.module_path, LAMBDA_D, job.adapter, lambda_d)
    detail = VeraDetail(site.weight_target, target_a, target_b, b_path, d_path, site.in_features,
                        site.out_features, site.fan_in_fan_out)
    return detail, [b_path, d_path, target_a.rsplit(".", 1)[0], target_b.rsplit(".", 1)[0]]


def _sliced(graph: torch.fx.Graph, target: str, dim: int, size: int) -> torch.fx.Node:
    return graph.call_function(aten.slice.Tensor, (graph.get_attr(target), dim, 0, size))


def _branch(job: SpliceInput, detail: VeraDetail, x: torch.fx.Node) -> torch.fx.Node:
    """``λ_b ⊙ B(gate * λ_d ⊙ A x)``, in PEFT's order; the gate on the rank-r tensor."""
    graph = job.gm.graph
    down = graph.call_function(aten.linear.default, (x, _sliced(graph, detail.vera_A, 1, detail.in_features)))
    down = graph.call_function(aten.mul.Tensor, (down, graph.get_attr(detail.lambda_d)))
    gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(detail.lambda_d), down)
    gated = graph.call_function(aten.mul.Tensor, (down, gate))
    gated.meta[GATE_META] = job.adapter
    up = graph.call_function(aten.linear.default, (gated, _sliced(graph, detail.vera_B, 0, detail.out_features)))
    return graph.call_function(aten.mul.Tensor, (up, graph.get_attr(detail.lambda_b)))


def splice(job: SpliceInput) -> Spliced:
    """Insert the VeRA branch after ``job.site.node`` and route its users through the sum."""
    detail, attached = attach_vera(job)
    graph, y = job.gm.graph, job.site.node
    with graph.inserting_before(y.next):  # keeps creation order
        total = join(graph, y, _branch(job, detail, adapter_input(job)), casts(job))
    reroute(y, total)
    return Spliced(record_nodes(job, y, total, "vera", detail), attached)


def vera_delta(gm: torch.nn.Module, detail: VeraDetail) -> torch.Tensor:
    """``(λ_b ⊙ B) @ (λ_d ⊙ A)`` in fp32 with the layer's slices, laid out like the weight."""
    vera_a = fetch(gm, detail.vera_A).detach().float()[:, :detail.in_features]
    vera_b = fetch(gm, detail.vera_B).detach().float()[:detail.out_features]
    lambda_b = fetch(gm, detail.lambda_b).detach().float()[:, None]
    lambda_d = fetch(gm, detail.lambda_d).detach().float()[:, None]
    delta = (lambda_b * vera_b) @ (lambda_d * vera_a)
    return delta.T if detail.fan_in_fan_out else delta


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """``W + (λ_b ⊙ B) @ (λ_d ⊙ A)`` (computed in fp32, cast once)."""
    base = weight_so_far(gm, weights, record.detail.weight)
    weights[record.detail.weight] = (base.float() + vera_delta(gm, record.detail)).to(base.dtype)


# --- PEFT's VeraConfig ------------------------------------------------------------------------

VERA_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform",
                         "layers_pattern", "r", "projection_prng_key", "save_projection",
                         "vera_dropout", "d_initial", "fan_in_fan_out", "bias", "init_weights"})
_FILE_KEYS = {f"{PEFT_PREFIX}{name}.weight": f"base_model.{name}" for name in (PROJ_A, PROJ_B)}


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """``VeraConfig`` fields to one rule over the targeted linears."""
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{source}: bias = {config['bias']!r} is not supported (only \"none\")")
    params = VeraParams(r=config.get("r", 256), d_initial=config.get("d_initial", 0.1),
                        dropout=config.get("vera_dropout", 0.0),
                        prng_key=config.get("projection_prng_key", 0),
                        save_projection=config.get("save_projection", True),
                        init="default" if config.get("init_weights", True) else "random")
    path = "^" + layers_prefix(config) + target_regex(config, model, source)
    rule = Rule(name="peft vera", optional=True, params=params,
                where=Where(path=[path], exclude=exclude_regexes(config)))
    return RuleSet((rule,), source=source)


def _one(matches: list[Match], field: str, peft_name: str) -> Any:
    values = {getattr(m.rule.params, field) for m in matches}
    if len(values) > 1:
        raise PeftFormatError(f"PEFT's VeraConfig has one {peft_name}; these rules use {sorted(values)}")
    return values.pop()


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """The ``VeraConfig`` fields that select ``matches``' modules with their params."""
    one = lambda field, name: _one(matches, field, name)  # noqa: E731
    return {"target_modules": targets_for(sorted(m.module_path for m in matches), program),
            "r": one("r", "r"), "projection_prng_key": one("prng_key", "projection_prng_key"),
            "save_projection": one("save_projection", "save_projection"),
            "vera_dropout": one("dropout", "vera_dropout"), "d_initial": one("d_initial", "d_initial"),
            "fan_in_fan_out": any(m.site.fan_in_fan_out for m in matches), "bias": "none",
            "init_weights": one("init", "init_weights") == "default"}


def save_state(gm: torch.nn.Module, adapter: str, config: dict[str, Any],
               tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The pair under PEFT's keys (``base_model.vera_A``), or left out (``save_projection``)."""
    kept = {key: value for key, value in tensors.items() if key not in _FILE_KEYS}
    if config["save_projection"]:
        kept.update({_FILE_KEYS[key]: tensors[key] for key in _FILE_KEYS})
    return config, kept


def load_state(gm: torch.nn.Module, adapter: str, config: dict[str, Any],
               tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The file's pair under our keys; without ``save_projection`` the pair drawn from
    ``projection_prng_key`` (the graph's own, as PEFT draws it), whatever the file holds."""
    ours = {file_key: key for key, file_key in _FILE_KEYS.items()}
    rest = {key: value for key, value in tensors.items() if key not in ours}
    if not config.get("save_projection", True):
        targets = [adapter_component(name, adapter) + ".weight" for name in (PROJ_A, PROJ_B)]
        return {**rest, **{key: fetch(gm, target).detach()
                           for key, target in zip(_FILE_KEYS, targets)}}
    missing = [key for key in ours if key not in tensors]
    if missing:
        raise PeftFormatError(f"{source}: save_projection = true, but the adapter file has no "
                              f"{missing[0]} (the shared projection)")
    return {**rest, **{key: tensors[file_key] for file_key, key in ours.items()}}


KIND = AdapterKind(
    name="vera", params=VeraParams, splice=splice, merge=merge,
    components=(LAMBDA_B, LAMBDA_D, PROJ_A, PROJ_B),
    peft=PeftFormat("VERA", rules_to_config, config_to_rules, VERA_FIELDS,
                    save_state=save_state, load_state=load_state))
