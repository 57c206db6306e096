"""LoRA: for each matched linear ``y = f(x)``, splice ``y + scale * B(gate * A(dropout(x)))``.

The same on embeddings and convolutions (match kinds ``embedding`` and ``conv``), in PEFT's
layout. An embedding gets raw parameters ``lora_embedding_A`` ``[r, num_embeddings]`` (zeros at
init) and ``lora_embedding_B`` ``[embedding_dim, r]`` (normal): ``E[x] + scale * A.T[x] @ B.T``,
the lookup repeating the base's ``padding_idx``; PEFT applies no dropout there, nor does fxpeft.
A 1-d, 2-d or 3-d convolution gets ``lora_A``, a convolution with the base's kernel, stride, padding
and dilation producing ``r`` channels, and ``lora_B``, a 1x1 convolution to the output channels
with the base's ``groups``.

``gate`` is the adapter's on/off gate (``fxpeft.graph.gates``), on the rank-r tensor where it is
cheapest. Adapter ``"default"`` adds ``lora_A`` / ``lora_B``, any other ``lora_A_<name>`` /
``lora_B_<name>``; the saved keys are PEFT's (``fxpeft.formats.peft_format``). The ``add`` that joins the
branch is the removable node: stripping the adapter routes its users back to ``y``, and merge
folds ``scale * B @ A`` into the weight there.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch, nodes_between
from fxpeft.errors import FxpeftError
from fxpeft.graph.gates import GATE_META, gate_node, reroute
from fxpeft.graph.dropout import dropout_target
from fxpeft.registry import AdapterKind, Combines, LowRankBranch, SpliceInput, Spliced
from fxpeft.match.layer_sites import ConvSite, EmbeddingSite, find_conv_sites, find_embedding_sites
from fxpeft.match.parameter_sites import ParameterSite, find_parameter_sites
from fxpeft.kinds import bd_lora, kasa, lora_parameters, trainable_tokens, velora
from fxpeft.kinds.kasa import DEFAULTS as KASA_DEFAULTS, non_negative
from fxpeft.match.query import Match
from fxpeft.names import ADAPTER_META, AdapterNode
from fxpeft.formats.peft_format import (PeftFormat, PeftFormatError, exclude_regexes, names_regex, neutral,
                                        target_regex,
                                        targets_for, layers_prefix)
from fxpeft.capture.quantized import base_weight, weight_so_far
from fxpeft.capture.linear_sites import LinearSite, find_linear_sites
from fxpeft.capture import attention
from fxpeft.capture.program import Program
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, Where, spec

aten = torch.ops.aten


@dataclass(frozen=True)
class LoraParams(Params):
    """LoRA: ``y = f(x) + scale * B(A(dropout(x)))`` with ``scale = alpha / r`` (or
    ``alpha / sqrt(r)`` with ``use_rslora``). ``init = "default"`` gives PEFT's kaiming-uniform
    A and zero B; ``init = "random"`` makes B random too (PEFT's ``init_lora_weights=False``).

    >>> LoraParams(r=8, alpha=16).scale
    2.0
    """

    kind = "lora"
    match_kinds = ("linear", "embedding", "conv", "parameter")
    r: int = spec(8, checks.positive_int, "rank")
    alpha: float = spec(8, checks.positive_number, "scaling numerator")
    dropout: float = spec(0.0, checks.probability, "dropout on the adapter input")
    use_rslora: bool = spec(False, checks.boolean, "scale by alpha/sqrt(r)")
    init: str = spec("default", checks.one_of("default", "random", "mica"), "initialisation")
    autocast: bool = spec(True, checks.boolean, "fp32 adapters on fp16/bf16 bases")
    lora_bias: bool = spec(False, checks.boolean, "a bias on B (PEFT's lora_bias; zeros at init)")
    block_diagonal: str = spec("none", checks.one_of("none", "A", "B"),
                               "BD-LoRA: the factor that is block-diagonal (linears only)")
    blocks: int = spec(1, checks.positive_int, "BD-LoRA: the number of diagonal blocks")
    velora: str = spec("none", checks.one_of("none", *velora.INITS),
                       "VeLoRA: its vector's init (none: plain LoRA; linears only)")
    velora_groups: int = spec(64, checks.positive_int, "VeLoRA: sub-tokens per input row")
    velora_scale: float = spec(1.0, checks.positive_number, "VeLoRA: scale of the rebuilt input")
    kasa: bool = spec(False, checks.boolean, "KaSA: drop W's r smallest singular components, "
                                             "learn singular values between A and B (linears)")
    kasa_beta: float = spec(KASA_DEFAULTS["beta"], non_negative, "KaSA: kasa_loss's weight of sum(diag^2)")
    kasa_gamma: float = spec(KASA_DEFAULTS["gamma"], non_negative,
                             "KaSA: kasa_loss's weight of A's and B's orthogonality")

    @property
    def scale(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)


@dataclass(frozen=True)
class LoraDetail:
    """What merge needs of one LoRA branch: the targets of W, A and B, and the scale.
    ``fan_in_fan_out``: W is stored ``[in, out]`` (GPT-2's Conv1D, an embedding table);
    ``groups``: a grouped convolution's, which no merge can fold; ``lora_bias``: the target of
    B's bias (PEFT's ``lora_bias``), merged into the layer's bias ``base_bias``."""

    scale: float
    weight: str
    lora_A: str
    lora_B: str
    fan_in_fan_out: bool
    groups: int = 1
    lora_bias: str | None = None
    base_bias: str | None = None
    blocks: tuple[int, int] = (1, 1)  # BD-LoRA: diagonal blocks of A and of B
    velora: tuple[str, ...] = ()  # VeLoRA: the targets of its vector and set flag
    kasa: kasa.KasaDetail | None = None  # KaSA: its singular values and the base's dropped part


HALF_DTYPES = (torch.float16, torch.bfloat16)
KASA_DIAG = "lora_diag"  # KaSA's learnable singular values (PEFT's key)


def adapter_dtype(params: Any, base: torch.dtype) -> torch.dtype:
    """PEFT's ``autocast_adapter_dtype``: adapters on an fp16/bf16 base are fp32, unless the
    rule says ``autocast = false``.

    >>> adapter_dtype(LoraParams(), torch.bfloat16), adapter_dtype(LoraParams(autocast=False), torch.bfloat16)
    (torch.float32, torch.bfloat16)
    """
    return torch.float32 if params.autocast and base in HALF_DTYPES else base


def add_in_dtype_of(y: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``y + branch`` computed in the wider dtype, then cast to ``y``'s, where PEFT casts."""
    return (y + branch).to(y.dtype)


def join(graph: torch.fx.Graph, y: torch.fx.Node, branch: torch.fx.Node, cast_back: bool) -> torch.fx.Node:
    """The node that adds a branch to the base output (removable: it bypasses to ``y``)."""
    return graph.call_function(add_in_dtype_of if cast_back else aten.add.Tensor, (y, branch))


def _factory(params: Any, like: torch.Tensor) -> dict[str, Any]:
    return {"dtype": adapter_dtype(params, like.dtype), "device": like.device}


def make_lora_modules(site: LinearSite, params: LoraParams,
                      like: torch.Tensor) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """A (kaiming-uniform, as PEFT and ``nn.Linear`` do) and B (zeros unless ``init="random"``),
    in the adapter dtype (``adapter_dtype``)."""
    factory = _factory(params, like)
    if params.block_diagonal != "none":
        return bd_lora.make_pair(site, params, factory)
    lora_a = torch.nn.Linear(site.in_features, params.r, bias=False, **factory)
    lora_b = torch.nn.Linear(params.r, site.out_features, bias=params.lora_bias, **factory)
    _zero_b(lora_b, params)
    return lora_a, lora_b


def _zero_b(lora_b: torch.nn.Module, params: LoraParams) -> None:
    """``init = "default"``: B and its bias (``lora_bias``) start at zeros."""
    if params.init == "default":
        torch.nn.init.zeros_(lora_b.weight)
        if lora_b.bias is not None:
            torch.nn.init.zeros_(lora_b.bias)


def _embedding_pair(site: EmbeddingSite, params: LoraParams,
                    like: torch.Tensor) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """PEFT's: A ``[r, num]`` zeros and B ``[dim, r]`` normal (both normal with ``random``)."""
    if params.lora_bias:
        raise FxpeftError(f"{site.module_path}: lora_bias is not supported on embeddings (as in PEFT)")
    factory = _factory(params, like)
    lora_a = torch.randn(params.r, site.num_embeddings, **factory)
    lora_b = torch.randn(site.embedding_dim, params.r, **factory)
    if params.init == "default":
        torch.nn.init.zeros_(lora_a)
    return torch.nn.Parameter(lora_a), torch.nn.Parameter(lora_b)


_CONV_MODULES = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}


def _conv_pair(site: ConvSite, params: LoraParams,
               like: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A: the base's kernel, stride, padding and dilation to ``r`` channels (kaiming-uniform);
    B: 1x1 to the output channels with the base's groups (zeros unless ``random``)."""
    if params.r % site.groups:
        raise FxpeftError(f"{site.module_path}: LoRA rank {params.r} must be a multiple of the "
                          f"convolution's groups ({site.groups}), as in PEFT")
    conv, factory = _CONV_MODULES[site.dims], _factory(params, like)
    lora_a = conv(site.in_channels, params.r, site.kernel_size, site.stride, site.padding,
                  site.dilation, bias=False, **factory)
    lora_b = conv(params.r, site.out_channels, 1, groups=site.groups, bias=params.lora_bias, **factory)
    _zero_b(lora_b, params)
    return lora_a, lora_b


def _linear_op(graph: torch.fx.Graph, site: Any, x: torch.fx.Node, weight: torch.fx.Node,
               bias: torch.fx.Node | None = None) -> torch.fx.Node:
    return graph.call_function(aten.linear.default, (x, weight) if bias is None else (x, weight, bias))


def _lookup(graph: torch.fx.Graph, site: EmbeddingSite, ids: torch.fx.Node,
            lora_a: torch.fx.Node) -> torch.fx.Node:
    """``A.T[ids]``, with the base lookup's padding index and gradient options."""
    table = graph.call_function(aten.t.default, (lora_a,))
    return graph.call_function(aten.embedding.default, (table, ids, site.padding_idx,
                                                        site.scale_grad_by_freq, site.sparse))


def _conv_op(site: ConvSite, padding: "tuple[int, ...] | str") -> Any:
    op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[site.dims]
    return op.padding if isinstance(padding, str) else op.default


def _conv_down(graph: torch.fx.Graph, site: ConvSite, x: torch.fx.Node, weight: torch.fx.Node) -> torch.fx.Node:
    padding = site.padding if isinstance(site.padding, str) else list(site.padding)
    return graph.call_function(_conv_op(site, padding), (x, weight, None, list(site.stride),
                                                         padding, list(site.dilation), 1))


def _conv_up(graph: torch.fx.Graph, site: ConvSite, x: torch.fx.Node, weight: torch.fx.Node,
             bias: torch.fx.Node | None = None) -> torch.fx.Node:
    ones, zeros = [1] * site.dims, [0] * site.dims
    return graph.call_function(_conv_op(site, zeros), (x, weight, bias, ones, zeros, ones,
                                                       site.groups))


def layer_op(graph: torch.fx.Graph, site: Any, x: torch.fx.Node, weight: torch.fx.Node) -> torch.fx.Node:
    """The site's own operation with ``weight`` in place of its weight and no bias: a linear, or
    the base's convolution (stride, padding, dilation, groups). For kinds whose branch is a
    whole update weight ``ΔW`` (LoHa, LoKr)."""
    if not isinstance(site, ConvSite):
        return graph.call_function(aten.linear.default, (x, weight))
    padding = site.padding if isinstance(site.padding, str) else list(site.padding)
    return graph.call_function(_conv_op(site, padding), (x, weight, None, list(site.stride), padding,
                                                         list(site.dilation), site.groups))


@dataclass(frozen=True)
class Layout:
    """How LoRA sits on one kind of layer: the names of A and B, how to make them (identity at
    init), the down and up projections in the graph (the up one takes B's bias, if any), whether the layer stores its weight
    transposed (``[in, out]``: an embedding table), and whether its input takes dropout and the
    adapter dtype (an embedding's input is indices)."""

    names: tuple[str, str]
    make: Callable[[Any, LoraParams, torch.Tensor], tuple[Any, Any]]
    down: Callable[[torch.fx.Graph, Any, torch.fx.Node, torch.fx.Node], torch.fx.Node]
    up: Callable[..., torch.fx.Node]
    transposed: bool = False
    features_in: bool = True


LINEAR = Layout(("lora_A", "lora_B"), make_lora_modules, _linear_op, _linear_op)
EMBEDDING = Layout(("lora_embedding_A", "lora_embedding_B"), _embedding_pair, _lookup, _linear_op,
                   transposed=True, features_in=False)
CONV = Layout(("lora_A", "lora_B"), _conv_pair, _conv_down, _conv_up)
# VeLoRA's buffers (``velora``): its vector (saved, PEFT's key) and whether it is set (not saved).
VELORA = ("lora_velora_embed", "lora_velora_set")


def layout_of(site: Any) -> Layout:
    """The ``Layout`` for a matched site.

    >>> layout_of(None).names
    ('lora_A', 'lora_B')
    """
    return EMBEDDING if isinstance(site, EmbeddingSite) else CONV if isinstance(site, ConvSite) else LINEAR


def _tensor_target(path: str, value: Any) -> str:
    return f"{path}.weight" if isinstance(value, torch.nn.Module) else path


def attach_lora(job: SpliceInput) -> tuple[LoraDetail, list[str]]:
    """Create and attach ``job.adapter``'s A and B at the site's module; returns their record
    and targets."""
    site, params, layout = job.site, job.params, layout_of(job.site)
    if params.block_diagonal != "none":
        bd_lora.check_site(site, params, layout is LINEAR)
    if params.velora != "none":
        velora.check_site(site, params, layout is LINEAR)
    kasa.check_mixing(job.gm, job.adapter, params)
    if params.kasa:
        kasa.check_site(site, params, layout is LINEAR)
    lora_a, lora_b = layout.make(site, params, site.weight_like(job.gm))
    transposed = site.fan_in_fan_out or layout.transposed
    if params.init == "mica":
        _mica(job, _weight_of(lora_a), _weight_of(lora_b), transposed)
    a_path = attach_component(job.gm, site.module_path, layout.names[0], job.adapter, lora_a)
    b_path = attach_component(job.gm, site.module_path, layout.names[1], job.adapter, lora_b)
    b_bias = getattr(lora_b, "bias", None)
    kasa_detail, added = None, []
    if params.kasa:
        kasa_detail, diag, buffers = kasa.attach(job.gm, site, params, job.adapter, _weight_of(lora_a).dtype,
                                              KASA_DIAG)
        added = [diag, *buffers]
    detail = LoraDetail(params.scale, site.weight_target, _tensor_target(a_path, lora_a),
                        _tensor_target(b_path, lora_b), transposed, getattr(site, "groups", 1),
                        f"{b_path}.bias" if b_bias is not None else None, site.bias_target(job.gm),
                        bd_lora.blocks_of(params), kasa=kasa_detail)
    if params.velora != "none":
        detail = dataclasses.replace(detail, velora=tuple(velora.attach(
            job.gm, site, params, job.adapter, _weight_of(lora_a).dtype, VELORA)))
    return detail, [a_path, b_path, *added, *detail.velora]


def _weight_of(value: Any) -> torch.Tensor:
    return value.weight if isinstance(value, torch.nn.Module) else value


def _mica(job: SpliceInput, lora_a: torch.Tensor, lora_b: torch.Tensor, transposed: bool) -> None:
    """PEFT's MiCA (``init_lora_weights = "mica"``): B the left singular vectors of the ``r``
    smallest singular values of ``W`` as ``(out, in)`` (an embedding's ``W.T``), frozen; A zeros.
    B @ A is zero, so the base weight stays as it is."""
    if isinstance(job.site, ConvSite):
        raise FxpeftError(f"{job.site.module_path}: MiCA (init = \"mica\") applies to linears and "
                          f"embeddings, as in PEFT, not to convolutions")
    weight = base_weight(job.gm, job.site.weight_target).float()
    weight = weight.T if transposed else weight
    if job.params.r > min(weight.shape):
        raise FxpeftError(f"{job.site.module_path}: MiCA needs r <= {min(weight.shape)} here, got "
                          f"r = {job.params.r}")
    with torch.no_grad():
        lora_b.copy_(torch.linalg.svd(weight, full_matrices=False)[0][:, -job.params.r:])
        lora_a.zero_()
    lora_b.requires_grad_(False)  # MiCA trains A only


def casts(job: SpliceInput) -> bool:
    """Whether the adapter computes in another dtype than the base (fp32 on a half base)."""
    base = job.site.weight_like(job.gm).dtype
    return adapter_dtype(job.params, base) != base


def cast_input(job: SpliceInput) -> torch.fx.Node:
    """The site's input in the adapter dtype; an embedding's indices as they are."""
    x = job.site.input
    if layout_of(job.site).features_in and casts(job):
        x = job.gm.graph.call_function(aten.to.dtype, (x, torch.float32))
    return x


def adapter_input(job: SpliceInput, cast: torch.fx.Node | None = None) -> torch.fx.Node:
    """The site's input, cast to the adapter dtype (``cast``, when the caller made it) and
    through the adapter's dropout when it has one (train mode only), in PEFT's order."""
    x = cast_input(job) if cast is None else cast
    if layout_of(job.site).features_in and job.params.dropout > 0:
        x = job.gm.graph.call_module(dropout_target(job.gm), (x, job.params.dropout))
    return x


def low_rank(job: SpliceInput, detail: LoraDetail, x: torch.fx.Node,
             gated: bool = True) -> torch.fx.Node:
    """``B(gate * A(x))`` (unscaled), the gate on the rank-r tensor where it is cheapest, or on
    ``B(A(x)) + bias`` when B has a bias (``lora_bias``), which an off adapter must not add; with
    ``gated=False`` plain ``B(A(x))``, for a caller that gates the whole branch."""
    graph, layout = job.gm.graph, layout_of(job.site)
    weight = _factor(graph, detail.lora_A, detail.blocks[0])
    down = velora.down(job.gm, x, weight, list(detail.velora), job.params) if detail.velora \
        else layout.down(graph, job.site, x, weight)
    if gated and not detail.lora_bias:
        down = _gated(job, detail, down)
    if detail.kasa is not None:
        down = kasa.scaled_down(graph, detail.kasa, down)
    bias = graph.get_attr(detail.lora_bias) if detail.lora_bias else None
    up = layout.up(graph, job.site, down, _factor(graph, detail.lora_B, detail.blocks[1]), bias)
    return _gated(job, detail, up) if gated and detail.lora_bias else up


def _factor(graph: torch.fx.Graph, target: str, blocks: int) -> torch.fx.Node:
    """A or B's weight as the projection needs it (BD-LoRA's stacked blocks made dense)."""
    weight = graph.get_attr(target)
    return weight if blocks == 1 else graph.call_function(bd_lora.block_diagonal, (weight, blocks))


def _gated(job: SpliceInput, detail: LoraDetail, value: torch.fx.Node) -> torch.fx.Node:
    gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(detail.weight), value)
    gated = job.gm.graph.call_function(aten.mul.Tensor, (value, gate))
    gated.meta[GATE_META] = job.adapter
    return gated


def record_nodes(job: SpliceInput, first: torch.fx.Node, last: torch.fx.Node, kind: str,
                 detail: Any) -> list[torch.fx.Node]:
    """Give the nodes after ``first`` up to ``last`` (the removable join, bypassing to its
    ``args[0]``) their records; gate nodes keep only theirs."""
    added = [n for n in nodes_between(first, last) if GATE_META not in n.meta]
    for node in added:
        node.meta[ADAPTER_META] = AdapterNode(kind, job.adapter, job.site.module_path,
                                              0 if node is last else None, detail)
    return added


def _linear_site_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearSite:
    return next(site for site in find_linear_sites(gm) if site.node is node)


def splice(job: SpliceInput) -> Spliced:
    """Insert the LoRA branch after ``job.site.node`` and route its users through the sum; at a
    parameter read, adapt the weight it yields (``lora_parameters``)."""
    if isinstance(job.site, ParameterSite):
        _check_parameter_site(job)
    if isinstance(job.site, ParameterSite) and job.site.module_call:  # W of a whole nn.Linear
        job = dataclasses.replace(job, site=_linear_site_of(job.gm, job.site.node))
    elif isinstance(job.site, ParameterSite):
        kasa.check_mixing(job.gm, job.adapter, job.params)
        return lora_parameters.splice(job, _factory(job.params, job.site.weight_like(job.gm))["dtype"],
                                      LINEAR.names, record_nodes)
    detail, attached = attach_lora(job)
    graph, y = job.gm.graph, job.site.node
    with graph.inserting_before(y.next):  # keeps creation order
        x = cast_input(job) if detail.kasa else None  # KaSA's correction: the base's input, no dropout
        up = low_rank(job, detail, adapter_input(job, x))
        branch = graph.call_function(aten.mul.Tensor, (up, detail.scale))
        if detail.kasa is not None:
            branch = kasa.less_dropped(graph, detail.kasa, x, branch, lambda v: _gated(job, detail, v))
        total = join(graph, y, branch, casts(job))
    reroute(y, total)
    return Spliced(record_nodes(job, y, total, "lora", detail), attached, frozen_of(job, detail))


def _check_parameter_site(job: SpliceInput) -> None:
    """PEFT's parameter wrapper (``target_parameters``) has no variant, ``lora_bias`` or MiCA,
    whether the parameter is a bare one or the weight of a whole ``nn.Linear``: refused by name."""
    if job.params.velora != "none":
        velora.check_site(job.site, job.params, linear=False)
    if job.params.kasa:
        kasa.check_site(job.site, job.params, linear=False)
    if job.params.lora_bias or job.params.init == "mica":
        raise FxpeftError(f"{job.site.module_path}: LoRA on a parameter takes no lora_bias or "
                          f"MiCA (as in PEFT)")


def frozen_of(job: SpliceInput, detail: LoraDetail) -> list[str]:
    """MiCA trains A only: its B is frozen for good; KaSA's dropped part is a frozen buffer."""
    if detail.kasa is not None:
        return [detail.kasa.dropped_us, detail.kasa.dropped_vh]
    return [detail.lora_B] if job.params.init == "mica" else []


def lora_delta(gm: torch.nn.Module, detail: LoraDetail) -> torch.Tensor:
    """``scale * B @ A`` in fp32, laid out like the stored weight. A convolution's A and B
    flatten to matrices (B is 1x1), and the product takes the kernel's shape back. A
    parameter's (``lora_parameters``) is PEFT's per-expert product."""
    if isinstance(detail, lora_parameters.ParameterDetail):
        return lora_parameters.parameter_delta(gm, detail)
    lora_b, lora_a = fetch(gm, detail.lora_B).detach(), fetch(gm, detail.lora_A).detach()
    if detail.blocks != (1, 1):
        lora_a, lora_b = (bd_lora.block_diagonal(t, n) for t, n in zip((lora_a, lora_b), detail.blocks))
    if detail.kasa is not None:
        return kasa.delta(gm, detail.kasa, lora_a, lora_b, detail.scale)
    delta = (lora_b.float().flatten(1) @ lora_a.float().flatten(1)) * detail.scale
    delta = delta.T if detail.fan_in_fan_out else delta
    return delta.reshape(fetch(gm, detail.weight).shape) if lora_a.dim() > 2 else delta


def check_mergeable(record: AdapterNode) -> None:
    """A branch on a grouped convolution cannot merge: B mixes channels across groups, so W
    would have to become dense (PEFT does not merge it either)."""
    if record.detail.groups > 1:
        raise FxpeftError(f"merge: the {record.kind} adapter {record.adapter!r} at {record.module_path} "
                          f"cannot be merged: its convolution has groups = {record.detail.groups}")


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """``W + scale * B @ A`` (computed in fp32, cast once)."""
    detail = record.detail
    check_mergeable(record)
    base = weight_so_far(gm, weights, detail.weight)
    weights[detail.weight] = (base.float() + lora_delta(gm, detail)).to(base.dtype)
    if detail.lora_bias:
        _merge_bias(gm, record, weights)


def _merge_bias(gm: torch.fx.GraphModule, record: AdapterNode, weights: dict[str, torch.Tensor]) -> None:
    """``lora_bias``: the layer's bias gains ``scale * B.bias``, as PEFT merges it."""
    detail = record.detail
    if detail.base_bias is None:
        raise FxpeftError(f"merge: the {record.kind} adapter {record.adapter!r} at {record.module_path} "
                          f"has lora_bias but its layer has no bias to merge it into (as in PEFT)")
    bias = weights.get(detail.base_bias, fetch(gm, detail.base_bias).detach())
    lora_bias = fetch(gm, detail.lora_bias).detach().float()
    weights[detail.base_bias] = (bias.float() + detail.scale * lora_bias).to(bias.dtype)


# --- PEFT's LoraConfig ------------------------------------------------------------------------

# init_lora_weights values that leave the base weights as they were and whose forward is plain
# LoRA's ("mica": B from the base weight's minor singular vectors, frozen; PEFT's MiCA variant).
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "mica")
# Those that rewrite the base weights (PiSSA, OLoRA, CorDA and LoftQ subtract their init from W).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
# PEFT 0.21.2's LoRA variants that fxpeft refuses, with why (their config field -> reason).
_REFUSED_VARIANTS = {
    "monteclora_config": "MonteCLoRA samples a random perturbation of A in every training forward "
                         "(its forward is not a fixed function of its parameters)",
}


LORA_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform",
                         "layers_pattern", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
                         "use_rslora", "fan_in_fan_out", "bias", "lora_dropout",
                         "init_lora_weights", "lora_bias", "target_parameters", bd_lora.CONFIG_FIELD,
                         velora.CONFIG_FIELD, kasa.CONFIG_FIELD,
                         trainable_tokens.CARRIED_FIELD, "layer_replication", *_REFUSED_VARIANTS})


GRAPH_FIELDS = frozenset({"layer_replication"})  # PeftFormat.graph_fields


def _check_init(config: dict[str, Any], source: str) -> None:
    init = config.get("init_lora_weights", True)
    if init in _PLAIN_INITS:
        return
    if isinstance(init, str) and init.startswith(_BASE_REWRITING_INITS):
        raise PeftFormatError(f"{source}: init_lora_weights = {init!r} changes the base weights; "
                              f"fxpeft cannot load such an adapter")
    raise PeftFormatError(f"{source}: init_lora_weights = {init!r} is an initialisation fxpeft "
                          f"does not implement")


def _check_config(config: dict[str, Any], source: str) -> None:
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{source}: bias = {config['bias']!r} is not supported (only \"none\")")
    for key, reason in _REFUSED_VARIANTS.items():
        if config.get(key):
            raise PeftFormatError(f"{source}: {key} is set: the LoRA variant is not supported: {reason}")
    _check_init(config, source)
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise PeftFormatError(f"{source}: {key} must be a mapping, got {config[key]!r}")


def _flag(value: Any) -> Any:
    """A config boolean; None (an older PEFT) is False, anything else is validated as given."""
    return False if value is None else value


def _key_lookahead(key: str | None) -> str:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` keys match as ``(.*\\.)?(KEY)$``."""
    return "" if key is None else rf"(?=(?:.*\.)?(?:{key})$)"


def pattern_rules(config: dict[str, Any], model: torch.nn.Module, source: str, sites: tuple[str, ...],
                  params_for: Callable[[int, float], Params], alpha_field: str,
                  names: str | None = None) -> RuleSet:
    """PEFT's ``target_modules`` (with ``layers_to_transform``, ``exclude_modules`` and
    ``modules_to_save``) as rules: one rule per ``rank_pattern`` x ``alpha_pattern`` key pair,
    in PEFT's key order, so first-match-wins picks PEFT's rank and alpha; each pair has a rule
    per site kind in ``sites``. ``params_for(r, alpha)`` makes a rule's params; ``alpha_field``
    is the config's default alpha (``lora_alpha``, LoHa's ``alpha``); ``names``, a regex of the
    targeted names in place of ``target_modules``' (``target_parameters``)."""
    names = target_regex(config, model, source) if names is None else names
    target = "^" + layers_prefix(config) + "{keys}" + names
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rules = []
    for rank_key in [*ranks, None]:
        for alpha_key in [*alphas, None]:
            params = params_for(ranks.get(rank_key, config.get("r", 8)),
                                alphas.get(alpha_key, config.get(alpha_field, 8)))
            path = target.format(keys=_key_lookahead(rank_key) + _key_lookahead(alpha_key))
            name = f"peft {rank_key or '*'}/{alpha_key or '*'}"
            rules += [Rule(name=name if site == "linear" else f"{name} {site}", match=site,
                           optional=True, params=params,
                           where=Where(path=[path], exclude=exclude_regexes(config)))
                      for site in sites]
    return RuleSet(tuple(rules), source=source)


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str,
                    params_class: type = LoraParams) -> RuleSet:
    """PEFT ``LoraConfig`` fields to rules (``pattern_rules``), for linears, embeddings and
    convolutions (the site kinds the params apply to)."""
    _check_config(config, source)
    variant = velora.params_fields(config, source, params_class is LoraParams)
    kasa_fields = kasa.params_fields(config, source)

    def params_for(r: int, alpha: float) -> Params:
        return params_class(r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0),
                            use_rslora=_flag(config.get("use_rslora")),
                            init="mica" if config.get("init_lora_weights") == "mica" else "default",
                            lora_bias=_flag(config.get("lora_bias")), **variant, **kasa_fields)
    modules = tuple(site for site in params_class.match_kinds if site != "parameter")
    rules: tuple[Rule, ...] = ()
    weights = _attention_weights(config, model, source, params_class)
    if config.get("target_modules") or not config.get("target_parameters"):
        rules = bd_lora.with_block_diagonal(
            pattern_rules(config, model, source, modules, params_for, "lora_alpha"), config, source,
            params_class is LoraParams).rules
        rules = _skip_attention_calls(rules, weights)
    parameters = [*(config.get("target_parameters") or []), *weights]
    if parameters:
        regex = _parameters_regex(parameters, model, params_class, source)
        rules += pattern_rules(config, model, source, ("parameter",), params_for, "lora_alpha",
                               regex).rules
    rules += trainable_tokens.carried_rules(config.get(trainable_tokens.CARRIED_FIELD), model,
                                            source, config.get("modules_to_save"))
    return RuleSet(rules, source=source, layer_replication=_layer_replication(config, source))


def _layer_replication(config: dict[str, Any], source: str) -> tuple:
    """PEFT's ``layer_replication`` ranges, checked as a rule file's are (the model's layer count
    is checked when the layers are replicated, before capture).

    >>> _layer_replication({"layer_replication": [[0, 2], [1, 2]]}, "adapter_config.json")
    ((0, 2), (1, 2))
    """
    value = config.get("layer_replication")
    if neutral(value):  # PEFT, too, replicates nothing for None or []
        return ()
    problem = checks.layer_ranges(value)
    if problem:
        raise PeftFormatError(f"{source}: layer_replication: {problem}")
    return tuple((start, end) for start, end in value)


def _attention_weights(config: dict[str, Any], model: torch.nn.Module, source: str,
                       params_class: type) -> list[str]:
    """The weights PEFT adapts on each attention layer ``target_modules`` selects (its
    ``MultiheadAttention`` LoRA: ``in_proj_weight`` and ``out_proj.weight``), full names;
    none without a model (``fxpeft convert`` of a config alone: names only)."""
    if not config.get("target_modules") or model is None:
        return []
    selects = re.compile("^" + layers_prefix(config) + target_regex(config, model, source))
    excluded = [re.compile(e) for e in exclude_regexes(config)]
    selected = [(path, module) for path, module in model.named_modules()
                if isinstance(module, torch.nn.MultiheadAttention) and selects.match(path)
                and not any(e.match(path) for e in excluded)]
    closed = [path for path, module in selected if not attention.opens(module)]
    if closed:
        raise PeftFormatError(f"{source}: target_modules selects {closed[0]} (MultiheadAttention with "
                              "dropout, separate key / value sizes or a custom out_proj): LoRA is "
                              "supported on one with equal sizes and dropout 0 only")
    layers = [path for path, _ in selected]
    if layers and "parameter" not in params_class.match_kinds:
        raise PeftFormatError(f"{source}: target_modules selects {layers[0]} (MultiheadAttention): "
                              f"{params_class.kind} on MultiheadAttention is not supported")
    if layers and _flag(config.get("lora_bias")):
        raise PeftFormatError(f"{source}: target_modules selects {layers[0]} (MultiheadAttention): "
                              "lora_bias on MultiheadAttention is not supported")
    return [f"{path}.{name}" for path in layers for name in attention.ADAPTED_WEIGHTS]


def _skip_attention_calls(rules: tuple[Rule, ...], weights: list[str]) -> tuple[Rule, ...]:
    """Under ``torch.export`` an attention layer's ``out_proj`` is a linear at the layer's own
    path; LoRA on the layer is on its weights (``_attention_weights``), not on that call."""
    layers = sorted({w.rpartition(".")[0] for w in weights if w.endswith(".in_proj_weight")})
    if not layers:
        return rules
    skip = tuple(f"^{re.escape(layer)}$" for layer in layers)
    return tuple(dataclasses.replace(r, where=dataclasses.replace(r.where, exclude=(*r.where.exclude, *skip)))
                 for r in rules)


def _parameters_regex(names: Any, model: torch.nn.Module, params_class: type, source: str) -> str:
    """PEFT's ``target_parameters``: a parameter whose full name is a name or ends with
    ``.name``; refused where PEFT's meaning is not ours (a variant, experts stored transposed)."""
    if "parameter" not in params_class.match_kinds:
        raise PeftFormatError(f"{source}: target_parameters is not supported with "
                              f"{params_class.kind} (PEFT allows it for plain LoRA only)")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise PeftFormatError(f"{source}: target_parameters must be a list of names, got {names!r}")
    regex = names_regex(list(names))
    for path, module in model.named_modules():
        if getattr(module, "is_transposed", False) and any(
                re.match(regex, f"{path}.{name}") for name, p in module.named_parameters(recurse=False) if p.dim() == 3):
            raise PeftFormatError(f"{source}: target_parameters at {path}: experts stored transposed "
                                  f"([experts, in, out], is_transposed) are not supported")
    return regex


def _common_and_exceptions(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value, and a PEFT pattern (``name`` or escaped path) for every other."""
    common = Counter(values.values()).most_common(1)[0][0]
    by_name: dict[str, set] = {}
    for path, value in values.items():
        by_name.setdefault(path.rsplit(".", 1)[-1], set()).add(value)
    exceptions = {}
    for path, value in values.items():
        name = path.rsplit(".", 1)[-1]
        if value != common:
            exceptions[name if len(by_name[name]) == 1 else re.escape(path)] = value
    return common, exceptions


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def adaptable_paths(program: Program) -> list[str]:
    """The module paths of every layer LoRA can adapt: linears, embeddings, convolutions."""
    found = [*program.sites, *find_embedding_sites(program.graph_module),
             *find_conv_sites(program.graph_module)]
    return [site.module_path for site in found]


def _attention_layers(program: Program) -> set[str]:
    """The paths of the attention layers whose weights ``program``'s graph reads."""
    return {site.attention for site in find_parameter_sites(program.graph_module) if site.attention}


_CONFIG_FIELDS = {"dropout": "lora_dropout", "lora_bias": "lora_bias", "mica": "init_lora_weights"}


def _one_value(params: dict[str, LoraParams], field: str) -> Any:
    """The one value PEFT's LoraConfig has for ``field`` (``mica``: whether ``init`` is MiCA)."""
    values = {(p.init == "mica") if field == "mica" else getattr(p, field) for p in params.values()}
    if len(values) > 1:
        raise PeftFormatError(f"PEFT's LoraConfig has one {_CONFIG_FIELDS[field]}; these rules use "
                              f"{sorted(values)}")
    return values.pop()


def rules_to_config(matches: list[Match], program: Program, use_dora: bool = False) -> dict[str, Any]:
    """The ``LoraConfig`` fields that select ``matches``' modules (and parameters:
    ``target_parameters``, their full names) with their rank and scale; trainable tokens'
    matches become ``trainable_token_indices``."""
    rows = [m for m in matches if isinstance(m.rule.params, trainable_tokens.TrainableTokensParams)]
    matches = [m for m in matches if m not in rows]
    params = {m.module_path: m.rule.params for m in matches}
    layers = {m.site.attention for m in matches if isinstance(m.site, ParameterSite) and m.site.attention}
    modules = sorted({*layers, *(m.module_path for m in matches if not isinstance(m.site, ParameterSite))})
    parameters = sorted(m.module_path for m in matches if isinstance(m.site, ParameterSite)
                        and not m.site.attention)
    rslora = all(p.use_rslora for p in params.values())
    r, rank_pattern = _common_and_exceptions({k: p.r for k, p in params.items()})
    alpha, alpha_pattern = _common_and_exceptions(
        {k: _number(p.scale * (p.r ** 0.5 if rslora else p.r)) for k, p in params.items()})
    dropout, lora_bias, mica = (_one_value(params, field) for field in ("dropout", "lora_bias", "mica"))
    known = [*adaptable_paths(program), *_attention_layers(program)]
    targets = targets_for(modules, program, known) if modules or not parameters else None
    return {"target_modules": targets, "target_parameters": parameters or None,
            "r": r, "lora_alpha": alpha,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": rslora,
            "lora_dropout": dropout, "bias": "none", "init_lora_weights": "mica" if mica else True,
            "lora_bias": lora_bias, **bd_lora.config_fields(params), **velora.config_fields(params),
            **kasa.config_fields(params),
            "use_dora": use_dora, "fan_in_fan_out": any(m.site.fan_in_fan_out for m in matches),
            trainable_tokens.CARRIED_FIELD: trainable_tokens.carried_value(rows),
            "layer_replication": [list(pair) for pair in program.info.layer_replication] or None}


def branch_of(record: AdapterNode) -> LowRankBranch | None:
    """The branch's A and B weights and scale, for the fuse passes (``AdapterKind.low_rank``);
    None for a weight update at a parameter read (no branch on an activation to fuse), or for a
    branch whose B has a bias (``lora_bias``), a block-diagonal factor (BD-LoRA), VeLoRA's
    training projection or KaSA's singular values and correction: not the plain branch the fuse
    passes rewrite."""
    detail = record.detail
    if isinstance(detail, lora_parameters.ParameterDetail) or detail.lora_bias is not None or \
            detail.blocks != (1, 1) or detail.velora or detail.kasa is not None:
        return None
    return LowRankBranch(detail.lora_A, detail.lora_B, detail.scale, detail.fan_in_fan_out)


def unit_scale_params(params: LoraParams, r: int) -> LoraParams:
    """``params`` for a branch of rank ``r`` and scale 1 (``alpha = r``, no rsLoRA): what
    ``fxpeft.combine`` writes a mix into (``Combines.params``).

    >>> unit_scale_params(LoraParams(r=4, alpha=16, use_rslora=True), 8).scale
    1.0
    """
    return dataclasses.replace(params, r=r, alpha=r, use_rslora=False, init="default")


KIND = AdapterKind(
    name="lora", params=LoraParams, splice=splice, merge=merge,
    components=(*LINEAR.names, *EMBEDDING.names, KASA_DIAG, *VELORA),
    peft=PeftFormat("LORA", rules_to_config, config_to_rules, LORA_FIELDS,
                    selector={"use_dora": False, "alora_invocation_tokens": False},
                    graph_fields=GRAPH_FIELDS),
    default_rule=True, low_rank=branch_of,
    combines=Combines(branch_of, unit_scale_params), carries=("trainable_tokens",),
    layer_replication=True)
