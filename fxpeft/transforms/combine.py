"""Weighted adapter arithmetic: ``combine`` mixes named low-rank adapters into a new one.

PEFT's ``add_weighted_adapter`` methods, with its argument names: ``cat`` stacks the branches
(exact: ``ΔW = Σ wᵢ ΔWᵢ``); ``svd`` and the ``*_svd`` methods mix the full ``ΔWᵢ = sᵢ·BᵢAᵢ``
and keep the top ``svd_rank`` singular directions; ``linear``, ``ties``, ``dare_linear``,
``dare_ties`` and ``magnitude_prune`` mix the A factors and the B factors separately, each with
``sign(wᵢsᵢ)·√|wᵢsᵢ|`` (A) and ``√|wᵢsᵢ|`` (B), which needs equal ranks at each layer. TIES
(Yadav et al. 2023) keeps each tensor's ``density`` largest entries, elects a sign per entry
(``majority_sign_method``: the sum of values, ``total``, or of signs, ``frequency``) and averages
the weighted entries that agree with it; DARE (Yu et al. 2023) keeps each entry with probability
``density`` and rescales by ``1 / density``; ``magnitude_prune`` trims as TIES does, then sums.

The new adapter has scale 1 at every layer (``alpha = r``, no rsLoRA), so the numbers written
are its ``ΔW`` whatever the sources' ranks, alphas and ``use_rslora`` were; PEFT 0.21.2 gives the
mix the first source's ``use_rslora`` and so scales it by ``√r`` (``docs/combining-adapters.md``).
A kind whose weight rescales rows (DoRA: ``diag(gᵢ)(W + sᵢBᵢAᵢ)``) mixes exactly through its
``Combines`` gains: ``Σ wᵢΔWᵢ = diag(1 + d)(W + C / (1 + d))`` with ``d = Σ wᵢ(gᵢ - 1)`` and
``C`` the mix of the ``gᵢ``-scaled branches; PEFT keeps the mix's initial magnitudes instead.
DARE's random draws follow PEFT's order: layer by layer in the model's module order
(``_module_order``), each layer's tensors in the adapters' order (A factors before B factors),
from ``generator`` (or ``seed``, or torch's global generator).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.fx

from fxpeft import registry
from fxpeft.errors import FxpeftError
from fxpeft.graph.gates import adapter_names
from fxpeft.graph.records import adapter_records, record
from fxpeft.graph.targets import fetch
from fxpeft.names import adapter_node
from fxpeft.registry import LowRankBranch
from fxpeft.rules.schema import Rule, RuleSet, Where, did_you_mean
from fxpeft.runtime.apply import add_adapter

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*FACTOR_METHODS, "cat", *SVD_METHODS)
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Source:
    """One source adapter's branch at one layer: its A and B (detached, fp32), its branch (scale
    and layout) and its weight in the mix. A kind that rescales rows (DoRA) adds its gain ``g``
    and the base weight ``W`` (``(out, in)``): its adapted weight is ``diag(g)(W + s·BA)``."""

    adapter: str
    weight: float
    down: torch.Tensor
    up: torch.Tensor
    branch: LowRankBranch
    gain: "torch.Tensor | None" = None
    base: "torch.Tensor | None" = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The adapter's whole ``ΔW`` as a matrix in the ``B@A`` orientation (``[out, in·k·k]``):
        ``s·BA``, or with a gain ``diag(g)(W + s·BA) - W``."""
        low_rank = self.branch.scale * (self.up.flatten(1) @ self.down.flatten(1))
        return low_rank if self.gain is None else self.gain[:, None] * (self.base + low_rank) - self.base

    def gained_up(self) -> torch.Tensor:
        """B with its rows scaled by the gain (B itself without one)."""
        return self.up if self.gain is None else self.up * self.gain.view(-1, *[1] * (self.up.dim() - 1))


Factors = "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]"  # A, B, gain (or None)


@dataclass(frozen=True)
class Layer:
    """The sources at one layer (in the adapters' order), the site's match kind and params."""

    module_path: str
    match: str
    params: Any
    sources: tuple[Source, ...]


# --- checking the call ------------------------------------------------------------------------

def _fail(message: str) -> FxpeftError:
    return FxpeftError(f"combine: {message}")


def _check_weights(weights: Any, known: list[str]) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise _fail(f"weights must be a non-empty mapping adapter name -> weight, got {weights!r:.60}")
    for name, weight in weights.items():
        if name not in known:
            raise _fail(f"no adapter {name!r}{did_you_mean(str(name), known)}; this graph has {known}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise _fail(f"weights[{name!r}] must be a finite number, got {weight!r}")
    return {name: float(weight) for name, weight in weights.items()}


def _check_options(method: str, density: Any, majority_sign_method: str, svd_rank: Any,
                   svd_clamp: Any) -> None:
    if method not in METHODS:
        raise _fail(f"method {method!r} is unknown{did_you_mean(str(method), list(METHODS))}; "
                    f"known: {', '.join(METHODS)}")
    prunes = any(word in method for word in ("ties", "dare", "magnitude_prune"))
    if prunes and (isinstance(density, bool) or not isinstance(density, numbers.Real)
                   or not 0 < density <= 1):
        raise _fail(f"method {method!r} needs density, the fraction of entries kept, in (0, 1]; "
                    f"got {density!r}")
    if not prunes and density is not None:
        raise _fail(f"density applies to the ties, dare and magnitude_prune methods, not {method!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise _fail(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int)
                                 or svd_rank < 1):
        raise _fail(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, numbers.Real)
                                  or not 0 <= svd_clamp <= 1):
        raise _fail(f"svd_clamp must be a quantile in [0, 1] or None, got {svd_clamp!r}")


def _generator(seed: Any, generator: Any) -> "torch.Generator | None":
    if seed is not None and generator is not None:
        raise _fail("give seed or generator, not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise _fail(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seed is None:
        return generator
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _combinable_kinds() -> list[str]:
    return [k.name for k in registry.all_kinds() if k.combines is not None]


def _kind_of(gm: torch.nn.Module, adapter: str) -> str:
    """The one kind ``adapter`` is made of, if fxpeft can combine it; a refusal naming it."""
    rec = record(gm, adapter)
    if rec.modules_to_save:
        raise _fail(f"adapter {adapter!r} has modules_to_save {list(rec.modules_to_save)}: whole "
                    f"module copies have no weighted mix; combine adapters without them")
    kinds = sorted({m.rule.rewrite for m in rec.matches})
    refused = [k for k in kinds if k not in _combinable_kinds()]
    if refused or len(kinds) != 1:
        raise _fail(f"adapter {adapter!r} is a {'+'.join(kinds) or 'empty'} adapter; combine mixes "
                    f"adapters of one low-rank kind ({', '.join(_combinable_kinds())})")
    return kinds[0]


def _check_kinds(gm: torch.nn.Module, names: list[str]) -> str:
    kinds = {name: _kind_of(gm, name) for name in names}
    if len(set(kinds.values())) > 1:
        raise _fail(f"the adapters are of different kinds ({kinds}); combine mixes one kind")
    return kinds[names[0]]


# --- reading the sources ----------------------------------------------------------------------

def _tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    return fetch(gm, target).detach().float()


def _combines(entry: Any) -> "registry.Combines | None":
    """The ``Combines`` capability of a removable adapter node's kind, else None."""
    if entry is None or not entry.removable or entry.kind not in _combinable_kinds():
        return None
    return registry.get(entry.kind).combines


def _source(gm: torch.fx.GraphModule, entry: Any, weight: float) -> Source:
    combines = _combines(entry)
    branch = combines.branch(entry)
    if branch is None:
        raise _fail(f"adapter {entry.adapter!r} at {entry.module_path}: its {entry.kind} update "
                    f"there is not a plain low-rank branch W + s·BA on a linear weight (a bias on "
                    f"B, a block-diagonal factor, an embedding's or a convolution's DoRA "
                    f"magnitudes, or a weight update at a parameter read); combine cannot mix it")
    rescales = combines.row_gain is not None
    return Source(entry.adapter, weight, _tensor(gm, branch.down), _tensor(gm, branch.up), branch,
                  combines.row_gain(gm, entry) if rescales else None,
                  combines.base_rows(gm, entry) if rescales else None)


def _module_order(gm: torch.nn.Module) -> dict[str, int]:
    """Each module's place in the order of the graph module's parameters: the model's own
    (definition) order for ``torch.export`` captures, the graph's for ``symbolic_trace`` ones."""
    order: dict[str, int] = {}
    for name, _ in gm.named_parameters(remove_duplicate=False):
        order.setdefault(name.rpartition(".")[0], len(order))
    return order


def _layers(gm: torch.fx.GraphModule, weights: dict[str, float]) -> list[Layer]:
    """Every layer at least one source adapter adapts, in module order (``_module_order``),
    which is where PEFT draws DARE's masks."""
    matches = {(name, m.module_path): m for name in weights for m in record(gm, name).matches}
    found: dict[str, dict[str, Source]] = {}
    for node in gm.graph.nodes:
        entry = adapter_node(node)
        if _combines(entry) is None or entry.adapter not in weights:
            continue
        sources = found.setdefault(entry.module_path, {})
        if entry.adapter not in sources:
            sources[entry.adapter] = _source(gm, entry, weights[entry.adapter])
    layers, order = [], _module_order(gm)
    for path, sources in sorted(found.items(), key=lambda item: order.get(item[0], -1)):
        ordered = tuple(sources[name] for name in weights if name in sources)
        first = matches[ordered[0].adapter, path]
        layers.append(Layer(path, first.rule.match, first.rule.params, ordered))
    return layers


# --- the arithmetic (PEFT's merge_utils semantics) --------------------------------------------

def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: the ``int(density · numel)`` entries largest in magnitude, the rest zero."""
    if density >= 1:
        return tensor
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[tensor.abs().flatten().topk(int(density * tensor.numel())).indices] = 1
    return tensor * mask.view(tensor.shape)


def _keep_random(tensor: torch.Tensor, density: float, generator: "torch.Generator | None") -> torch.Tensor:
    """DARE: each entry kept with probability ``density``, the kept ones scaled by ``1/density``."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def _sign_elected_mean(stacked: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES' elect and disjoint merge: per entry, the sign of the sum of values (``total``) or of
    signs (``frequency``) of the unweighted tensors; the mean of the weighted entries that agree."""
    signs = stacked.sign()
    votes = stacked.sum(0) if sign_method == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0)
    return (stacked * weights * agree).sum(0) / agree.sum(0).clamp(min=1)


def mix(method: str, tensors: list[torch.Tensor], weights: list[float], density: "float | None",
        sign_method: str = "total", generator: "torch.Generator | None" = None) -> torch.Tensor:
    """One of PEFT's task-arithmetic mixes (``method`` without ``_svd``) of same-shape tensors.

    >>> mix("linear", [torch.ones(2), torch.full((2,), 3.0)], [0.5, 0.5], None)
    tensor([2., 2.])
    >>> mix("ties", [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])], [1.0, 1.0], 1.0)
    tensor([ 2., -2.])
    """
    base = method.removesuffix("_svd")
    if base in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif base.startswith("dare"):
        tensors = [_keep_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    scale = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    if base in ("ties", "dare_ties"):
        return _sign_elected_mean(stacked, scale, sign_method)
    return (stacked * scale).sum(0)


def _factor_weights(source: Source) -> tuple[float, float]:
    """PEFT's split of ``w·s`` over the factors: ``sign·√|w·s|`` on A, ``√|w·s|`` on B."""
    both = source.weight * source.branch.scale
    root = math.sqrt(abs(both))
    return (root if both >= 0 else -root), root


def _factor_mix(layer: Layer, method: str, density: "float | None", sign_method: str,
                generator: "torch.Generator | None") -> Factors:
    ranks = {s.adapter: s.rank for s in layer.sources}
    if len(set(ranks.values())) > 1:
        raise _fail(f"{layer.module_path}: method {method!r} mixes the A and B factors entry by "
                    f"entry and needs equal ranks, got {ranks}; use 'cat' or an svd method")
    split = [_factor_weights(s) for s in layer.sources]
    down = mix(method, [s.down for s in layer.sources], [a for a, _ in split], density,
               sign_method, generator)
    up = mix(method, [s.gained_up() for s in layer.sources], [b for _, b in split], density,
             sign_method, generator)
    return _with_gain(layer, down, up)


def _cat(layer: Layer) -> Factors:
    """Exact: ``[w₁s₁A₁; w₂s₂A₂]`` and ``[B₁ B₂]`` (with gains: ``[g₁B₁ g₂B₂] / (1 + d)``)."""
    down = torch.cat([s.weight * s.branch.scale * s.down for s in layer.sources])
    return _with_gain(layer, down, torch.cat([s.gained_up() for s in layer.sources], dim=1))


def _with_gain(layer: Layer, down: torch.Tensor, up: torch.Tensor) -> Factors:
    """Rows rescaled by gains: ``Σ wᵢ ΔWᵢ = (I + D)W + C`` with ``d = Σ wᵢ(gᵢ - 1)`` and ``C``
    the mixed ``gᵢ``-scaled branches, which is ``diag(1 + d)(W + C / (1 + d))``: the new
    branch is ``C / (1 + d)`` and its gain ``1 + d`` (exact for ``cat``)."""
    if layer.sources[0].gain is None:
        return down, up, None
    gain = 1 + sum(s.weight * (s.gain - 1) for s in layer.sources)
    if bool((gain.abs() < 1e-6).any()):
        raise _fail(f"{layer.module_path}: the weighted magnitudes cancel (1 + Σ wᵢ(gᵢ - 1) = 0 "
                    f"on a row); no adapter of this kind gives that mix")
    return down, up / gain.view(-1, *[1] * (up.dim() - 1)), gain


def _weight_layout(delta: torch.Tensor, source: Source) -> torch.Tensor:
    """``ΔW`` laid out like the stored weight, where PEFT draws DARE's masks (and back: a
    transpose is its own inverse)."""
    return delta.T if source.branch.transposed else delta


def _svd_mix(layer: Layer, method: str, rank: int, options: dict) -> Factors:
    """Mix the full ``ΔWᵢ``, then keep the top ``rank`` singular directions (``U·S`` as B); a
    kind with gains gets gain 1, so it adds exactly that ``BA``."""
    first = layer.sources[0]
    deltas = [_weight_layout(s.delta(), first) for s in layer.sources]
    total = _weight_layout(mix(method, deltas, [s.weight for s in layer.sources], options["density"],
                               options["sign_method"], options["generator"]), first)
    u, s, vh = torch.linalg.svd(total, full_matrices=options["full_matrices"],
                                driver=options["driver"] if total.is_cuda else None)
    keep = min(rank, s.numel())
    up, down = u[:, :keep] * s[:keep], vh[:keep]
    if options["clamp"] is not None:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), options["clamp"])
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    up = torch.nn.functional.pad(up, (0, rank - keep))
    gain = None if first.gain is None else torch.ones_like(first.gain)
    return torch.nn.functional.pad(down, (0, 0, 0, rank - keep)), up, gain


# --- writing the new adapter ------------------------------------------------------------------

def _rules(layers: list[Layer], factors: dict[str, Factors], kind: str) -> RuleSet:
    """One rule per layer: that exact module, the kind's params of the mix's rank, scale 1."""
    make = registry.get(kind).combines.params
    return RuleSet(tuple(Rule(match=layer.match, name=f"combine {layer.module_path}",
                              where=Where(path=[f"^{re.escape(layer.module_path)}$"]),
                              params=make(layer.params, factors[layer.module_path][0].shape[0]))
                         for layer in layers), source="<fxpeft.combine>")


def _write(gm: torch.fx.GraphModule, adapter: str, factors: dict[str, Factors]) -> None:
    """Copy each layer's mixed A and B into the new adapter's parameters (in their shape and
    dtype), then its gain, where the kind has one."""
    for node in gm.graph.nodes:
        entry = adapter_node(node)
        combines = _combines(entry)
        if combines is None or entry.adapter != adapter:
            continue
        down, up, gain = factors[entry.module_path]
        branch = combines.branch(entry)
        with torch.no_grad():
            for target, value in ((branch.down, down), (branch.up, up)):
                param = fetch(gm, target)
                param.copy_(value.reshape(param.shape))
        if gain is not None:
            combines.set_row_gain(gm, entry, gain)


def _mixed_factors(layers: list[Layer], method: str, options: dict) -> dict[str, Factors]:
    """Per layer, the new adapter's ``(A, B, gain)`` (B@A orientation, flattened)."""
    ranks = [s.rank for layer in layers for s in layer.sources]
    svd_rank = options["svd_rank"] or max(ranks)  # PEFT: the largest source rank
    factors = {}
    for layer in layers:
        if method == "cat":
            factors[layer.module_path] = _cat(layer)
        elif method in SVD_METHODS:
            factors[layer.module_path] = _svd_mix(layer, method, svd_rank, options)
        else:
            factors[layer.module_path] = _factor_mix(layer, method, options["density"],
                                                     options["sign_method"], options["generator"])
    return factors


def combine(gm: torch.fx.GraphModule, weights: Mapping[str, float], method: str = "svd", *,
            adapter: str = "combined", density: "float | None" = None,
            majority_sign_method: str = "total", svd_rank: "int | None" = None,
            svd_clamp: "float | None" = None, svd_full_matrices: bool = True,
            svd_driver: "str | None" = None, seed: "int | None" = None,
            generator: "torch.Generator | None" = None) -> torch.fx.GraphModule:
    """Add ``adapter``, the weighted mix of ``gm``'s adapters (``{name: weight}``), by one of
    PEFT's ``add_weighted_adapter`` methods (``METHODS``, PEFT's argument names). It is an
    ordinary adapter, inactive and frozen like any ``add_adapter``: ``gm.set_adapter(adapter)``
    switches to it; it saves, loads, merges and deletes. One source adapter is always mixed
    ``linear``, as in PEFT. Refused, with a one-line error: unknown adapters or methods, bad
    weights or ``density``, kinds that are not low-rank (or mixed kinds), ``modules_to_save``.

    >>> import torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> rule = fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"]))
    >>> gm = fxpeft.rewrite(net, rule)
    >>> _ = fxpeft.add_adapter(gm, "b", rule)
    >>> _ = fxpeft.combine(gm, {"default": 0.7, "b": 0.3}, "cat", adapter="mix")
    >>> gm.adapter_names
    ['default', 'b', 'mix']
    """
    names = _check_weights(weights, list(adapter_records(gm)))
    _check_options(method, density, majority_sign_method, svd_rank, svd_clamp)
    if adapter in adapter_records(gm) or adapter in adapter_names(gm):
        raise _fail(f"adapter {adapter!r} already exists in this graph")
    kind = _check_kinds(gm, list(names))
    method = "linear" if len(names) == 1 else method
    options = {"density": density, "sign_method": majority_sign_method, "svd_rank": svd_rank,
               "clamp": svd_clamp, "full_matrices": svd_full_matrices, "driver": svd_driver,
               "generator": _generator(seed, generator)}
    layers = _layers(gm, names)
    factors = _mixed_factors(layers, method, options)
    add_adapter(gm, adapter, _rules(layers, factors, kind))
    _write(gm, adapter, factors)
    return gm
