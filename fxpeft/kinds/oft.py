"""OFT (orthogonal fine-tuning; PEFT's ``OFTConfig``): a block-diagonal orthogonal rotation of a
layer's input, as PEFT 0.21.2 applies it.

Each site gets ``oft_R`` (``oft_embedding_R`` on an embedding), a module holding one ``weight``
``[blocks, b(b-1)/2]``: the upper triangles of ``blocks`` skew-symmetric ``b x b`` matrices
``Q`` (one shared block with ``block_share``). The Cayley map turns each into an orthogonal
``R = (I - Q)(I + Q)^-1``, or, with ``use_cayley_neumann``, its truncated Neumann series
``I + 2Q + 2Q^2 + ... + Q^k`` (PEFT's). PEFT rotates the *input*: a linear computes
``f(x R)`` with ``R = block_diag(R_1, ..., R_r)``; a 2-d convolution rotates the unfolded
``C*k*k`` patches of its input (stride 1, no padding) and folds them back, summing overlaps,
as PEFT does; an embedding rotates its *output*. ``coft`` (constrained OFT) projects ``Q``
back into a ball of radius ``eps / sqrt(blocks)`` before every use, writing the projection into
the parameter, as PEFT does. ``module_dropout`` is accepted and stored, and, as in PEFT 0.21.2,
applied nowhere (its forward never calls the dropout it builds).

The parameters start at zero, so ``R = I`` and the adapter is the identity at init. The input
(output, for an embedding) passes through ``lerp(x, rotate(x), gate)`` with the adapter's gate
(``fxpeft.graph.gates``): exactly ``x`` when off, exactly the rotated input when on, per sample
in mixed batches. That ``lerp`` is the removable node (its bypass is ``x``). Merge folds the
rotation into the weight: ``W R^T`` (``R W`` for GPT-2's ``[in, out]`` Conv1D, ``W R`` for an
embedding table), which only a 1x1 convolution has (PEFT's fold sums overlapping patches).

>>> import fxpeft
>>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(8, 3)),
...                     Rule(where=Where(path=["^0$"]), params=OftParams(block_size=4)))
>>> tuple(gm.get_parameter("0.oft_R.weight").shape)
(2, 6)
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpeft.capture.linear_sites import LinearSite
from fxpeft.capture.program import Program
from fxpeft.capture.quantized import weight_so_far
from fxpeft.errors import FxpeftError, RuleError
from fxpeft.formats.peft_format import (PeftFormat, PeftFormatError, exclude_regexes, layers_prefix,
                                        target_regex, targets_for)
from fxpeft.graph.gates import gate_node, reroute
from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch
from fxpeft.kinds.lora import adapter_dtype, adaptable_paths, record_nodes
from fxpeft.match.layer_sites import ConvSite, EmbeddingSite
from fxpeft.match.query import Match
from fxpeft.names import AdapterNode
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, Where, spec

ROTATION, EMBEDDING_ROTATION = "oft_R", "oft_embedding_R"


def non_negative_int(value: Any) -> str | None:
    """An error message unless ``value`` is an integer >= 0 (PEFT's "0: derive it").

    >>> non_negative_int(0) is None and non_negative_int(-1) is not None
    True
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"expected a non-negative integer, got {value!r}"
    return None


@dataclass(frozen=True)
class OftParams(Params):
    """OFT: ``r`` blocks of ``block_size`` (PEFT's ``oft_block_size``) per site; give exactly one
    of them (the other is 0), and each site derives the other from its input size, as PEFT does.

    >>> OftParams(r=4, block_size=0).r
    4
    >>> OftParams(r=4)
    Traceback (most recent call last):
    ...
    fxpeft.errors.RuleError: <rules>: params.block_size: You can only specify either r (4) or block_size (32), but not both simultaneously, because r x block_size == in_features (PEFT's OFTConfig: r and oft_block_size)
    """

    kind = "oft"
    match_kinds = ("linear", "conv", "embedding")
    r: int = spec(0, non_negative_int, "number of blocks (0: derived from block_size)")
    block_size: int = spec(32, non_negative_int, "block size (0: derived from r)")
    use_cayley_neumann: bool = spec(True, checks.boolean, "truncated Neumann series, not an inverse")
    num_cayley_neumann_terms: int = spec(5, checks.positive_int, "terms of that series")
    module_dropout: float = spec(0.0, checks.probability, "stored; PEFT 0.21.2 applies none")
    coft: bool = spec(False, checks.boolean, "constrained OFT: keep Q within eps")
    eps: float = spec(6e-5, checks.positive_number, "COFT's radius")
    block_share: bool = spec(False, checks.boolean, "one block shared by all blocks")
    init: str = spec("default", checks.one_of("default", "random"),
                     "zeros (identity), or normal(0, 0.1) (PEFT's init_weights=False)")
    autocast: bool = spec(True, checks.boolean, "fp32 adapters on fp16/bf16 bases")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r == 0 and self.block_size == 0:
            raise RuleError(f"Either r or block_size must be non-zero. Currently, r = {self.r} "
                            f"and block_size = {self.block_size} (PEFT's OFTConfig: r and "
                            f"oft_block_size)", key="params.r")
        if self.r != 0 and self.block_size != 0:
            raise RuleError(f"You can only specify either r ({self.r}) or block_size "
                            f"({self.block_size}), but not both simultaneously, because r x "
                            f"block_size == in_features (PEFT's OFTConfig: r and oft_block_size)",
                            key="params.block_size")


@dataclass(frozen=True)
class OftDetail:
    """What merge needs of one site: the rotation's and the weight's targets, the blocks, the
    series (``terms`` 0: the exact Cayley map), COFT's ``eps`` (None: off), and how the weight
    meets the rotation (``layout``: ``linear``, ``fan_in_fan_out``, ``conv``, ``embedding``)."""

    rotation: str
    weight: str
    blocks: int
    block_size: int
    block_share: bool
    terms: int
    eps: float | None
    layout: str
    kernel: tuple[int, ...] = ()
    groups: int = 1


class Rotation(torch.nn.Module):
    """PEFT's ``OFTRotationModule`` as saved: one ``weight`` of skew-symmetric upper triangles."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)


# --- the rotation, as graph call targets ---------------------------------------------------------

def skew(vector: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[n, b(b-1)/2]`` upper triangles to ``[n, b, b]`` skew-symmetric matrices.

    >>> skew(torch.tensor([[2.0]]), 2).tolist()
    [[[0.0, 2.0], [-2.0, 0.0]]]
    """
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vector.device)
    flat = vector.new_zeros(vector.shape[0], block_size * block_size)
    upper = flat.index_copy(1, rows * block_size + cols, vector).view(-1, block_size, block_size)
    return upper - upper.transpose(-2, -1)


def coft_project(vector: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """PEFT's ``_project_batch``: each block's ``Q`` scaled into the ball of radius
    ``eps / sqrt(blocks)`` (Frobenius norm of the full skew matrix)."""
    matrix = skew(vector, block_size)
    radius = eps / torch.sqrt(torch.tensor(float(matrix.shape[0])))
    norm = torch.linalg.matrix_norm(matrix, keepdim=True)
    projected = torch.where(norm <= radius, matrix, radius * (matrix / norm))
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vector.device)
    return projected[:, rows, cols]


def cayley(vector: torch.Tensor, block_size: int, terms: int) -> torch.Tensor:
    """Orthogonal ``[n, b, b]`` blocks: ``(I - Q)(I + Q)^-1`` (``terms`` 0), or PEFT's series
    ``I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m`` with ``m = max(3, terms - 1)`` (``I`` alone for
    one term, ``I + 2Q`` for two), in the parameter's dtype.

    >>> q = torch.tensor([[0.1]])
    >>> torch.allclose(cayley(q, 2, 0) @ cayley(q, 2, 0).mT, torch.eye(2)), cayley(q, 2, 1).tolist()
    (True, [[[1.0, 0.0], [0.0, 1.0]]])
    """
    matrix = skew(vector, block_size)
    eye = torch.eye(block_size, device=vector.device, dtype=vector.dtype).expand_as(matrix)
    if terms == 0:
        return torch.linalg.solve(eye + matrix, eye - matrix, left=False).to(vector.dtype)
    if terms == 1:
        return eye.clone()
    total, power = eye + 2 * matrix, matrix
    if terms > 2:
        for _ in range(2, max(3, terms - 1)):
            power = torch.bmm(power, matrix)
            total = total + 2 * power
        total = total + torch.bmm(power, matrix)
    return total


def oft_rotation(weight: torch.Tensor, block_size: int, terms: int, eps: float | None) -> torch.Tensor:
    """The orthogonal blocks of one site; with COFT (``eps``) the parameter is first projected in
    place (no gradient), as PEFT's forward does."""
    if eps is not None:
        with torch.no_grad():
            weight.copy_(coft_project(weight, block_size, eps))
    return cayley(weight, block_size, terms)


def rotate_blocks(x: torch.Tensor, rotation: torch.Tensor, blocks: int) -> torch.Tensor:
    """``x``'s last dimension cut into ``blocks`` blocks, each times its orthogonal block (a
    shared one repeated), in the rotation's dtype."""
    x = x.to(rotation.dtype)
    if rotation.shape[0] != blocks:  # block_share
        rotation = rotation.expand(blocks, -1, -1)
    parts = x.reshape(*x.shape[:-1], blocks, rotation.shape[-1])
    return torch.einsum("...rk,rkc->...rc", parts, rotation).reshape(x.shape)


def rotate_patches(x: torch.Tensor, rotation: torch.Tensor, blocks: int, kernel: int) -> torch.Tensor:
    """PEFT's convolution rotation: the ``kernel x kernel`` patches of ``x`` (stride 1, no
    padding) as ``C*k*k`` vectors, rotated, then folded back to ``x``'s shape as PEFT 0.21.2 does
    it: its ``[B, C, H', W', k, k]`` tensor read as ``fold``'s ``[B, C*k*k, H'*W']``, overlaps
    added. That is the identity at ``R = I`` only for 1x1 kernels, or inputs of the kernel's
    size (one patch), as in PEFT."""
    batch, channels, height, width = x.shape
    rows, cols = height - kernel + 1, width - kernel + 1
    patches = x.unfold(2, kernel, 1).unfold(3, kernel, 1).permute(0, 2, 3, 1, 4, 5)
    rotated = rotate_blocks(patches.reshape(batch * rows * cols, -1), rotation, blocks)
    rotated = rotated.view(batch, rows, cols, channels, kernel, kernel).permute(0, 3, 1, 2, 4, 5)
    return torch.nn.functional.fold(rotated.reshape(batch, channels * kernel * kernel, rows * cols),
                                    (height, width), kernel)


def blend(x: torch.Tensor, rotated: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``lerp(x, rotated, gate)`` in the rotation's dtype, cast back to ``x``'s: exactly ``x`` at
    gate 0 and exactly the rotated tensor at gate 1 (lerp's two-sided formula)."""
    return torch.lerp(x.to(rotated.dtype), rotated, gate.to(rotated.dtype)).to(x.dtype)


# --- the splice -----------------------------------------------------------------------------------

def adjusted(features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``features`` nearest ``value`` (the
    lower one on a tie; ``features`` itself above it).

    >>> adjusted(64, 12), adjusted(10, 3), adjusted(8, 20)
    (8, 2, 8)
    """
    if value >= features:
        return features
    higher = value
    while higher <= features and features % higher:
        higher += 1
    lower = value
    while lower > 1 and features % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def blocks_for(features: int, params: OftParams, where: str) -> tuple[int, int]:
    """``(r, block_size)`` at a site with ``features`` inputs: the given one, adjusted to a
    divisor with PEFT's warning when it is not one, and the other derived from it."""
    name, value = ("block_size", params.block_size) if params.r == 0 else ("r", params.r)
    if features % value or value > features:
        new = adjusted(features, value)
        warnings.warn(f"{where}: Invalid `{name}` ({value})! Adjusted `{name}` to ({new}) "
                      f"(as PEFT's OFT does).")
        value = new
    return (features // value, value) if name == "block_size" else (value, features // value)


def _conv_features(site: ConvSite) -> int:
    """PEFT's ``in_channels * k * k``, for the 2-d convolutions its OFT supports."""
    where = site.module_path
    if site.dims != 2:
        raise FxpeftError(f"{where}: PEFT's OFT supports Conv2d, not conv{site.dims}d")
    if any(d > 1 for d in site.dilation):
        raise FxpeftError(f"{where}: Conv2d with dilation > 1 is not supported by OFT (as in PEFT)")
    if site.kernel_size[0] != site.kernel_size[1]:
        raise FxpeftError(f"{where}: OFT needs a square kernel (PEFT sizes the rotation by "
                          f"kernel_size[0]^2), got {list(site.kernel_size)}")
    return site.in_channels * site.kernel_size[0] ** 2


def _layout(job: SpliceInput) -> tuple[str, int]:
    site = job.site
    if isinstance(site, EmbeddingSite):
        return "embedding", site.embedding_dim
    if isinstance(site, ConvSite):
        return "conv", _conv_features(site)
    return ("fan_in_fan_out" if site.fan_in_fan_out else "linear"), site.in_features


def _attach(job: SpliceInput) -> tuple[OftDetail, str]:
    params, site = job.params, job.site
    layout, features = _layout(job)
    blocks, size = blocks_for(features, params, site.module_path)
    like = site.weight_like(job.gm)
    shape = (1 if params.block_share else blocks, size * (size - 1) // 2)
    weight = torch.zeros(shape, dtype=adapter_dtype(params, like.dtype), device=like.device)
    if params.init == "random":
        torch.nn.init.normal_(weight, mean=0.0, std=0.1)
    name = EMBEDDING_ROTATION if layout == "embedding" else ROTATION
    path = attach_component(job.gm, site.module_path, name, job.adapter, Rotation(weight))
    detail = OftDetail(f"{path}.weight", site.weight_target, blocks, size, params.block_share,
                       params.num_cayley_neumann_terms if params.use_cayley_neumann else 0,
                       params.eps if params.coft else None, layout,
                       tuple(getattr(site, "kernel_size", ())), getattr(site, "groups", 1))
    return detail, path


def _rotated(job: SpliceInput, detail: OftDetail, x: torch.fx.Node) -> torch.fx.Node:
    """Nodes computing ``blend(x, rotate(x), gate)``; returns the blend."""
    graph = job.gm.graph
    rotation = graph.call_function(oft_rotation, (graph.get_attr(detail.rotation), detail.block_size,
                                                  detail.terms, detail.eps))
    if detail.layout == "conv":
        rotated = graph.call_function(rotate_patches, (x, rotation, detail.blocks, detail.kernel[0]))
    else:
        rotated = graph.call_function(rotate_blocks, (x, rotation, detail.blocks))
    gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(detail.rotation), x)
    return graph.call_function(blend, (x, rotated, gate))


def splice(job: SpliceInput) -> Spliced:
    """Rotate the site's input before it (its output after it, for an embedding)."""
    detail, path = _attach(job)
    site, graph = job.site, job.gm.graph
    if detail.layout == "embedding":
        y = site.node
        with graph.inserting_before(y.next):
            total = _rotated(job, detail, y)
        added = record_nodes(job, y, total, "oft", detail)
        reroute(y, total, keep=set(added))
        return Spliced(added, [path])
    consumer = site.consumer if isinstance(site, LinearSite) else site.node
    first, x = consumer.prev, site.input
    with graph.inserting_before(consumer):
        total = _rotated(job, detail, x)
    consumer.replace_input_with(x, total)
    return Spliced(record_nodes(job, first, total, "oft", detail), [path])


# --- merge ----------------------------------------------------------------------------------------

def full_rotation(gm: torch.nn.Module, detail: OftDetail) -> torch.Tensor:
    """``block_diag(R_1, ..., R_r)`` in fp32 (COFT's projection applied, as PEFT's merge does)."""
    vector = fetch(gm, detail.rotation).detach().float()
    if detail.eps is not None:
        vector = coft_project(vector, detail.block_size, detail.eps)
    blocks = cayley(vector, detail.block_size, detail.terms)
    return torch.block_diag(*blocks.expand(detail.blocks, -1, -1))


def _merge_refusal(record: AdapterNode) -> str | None:
    detail = record.detail
    where = f"merge: the OFT adapter {record.adapter!r} at {record.module_path} cannot be merged"
    if detail.layout == "conv" and detail.groups > 1:
        return f"{where}: its convolution has groups = {detail.groups}"
    if detail.layout == "conv" and detail.kernel[0] > 1:
        return (f"{where}: on a {detail.kernel[0]}x{detail.kernel[0]} kernel the rotation acts on "
                f"overlapping input patches folded back by summing them (PEFT's forward), which no "
                f"weight reproduces; only 1x1 convolutions merge")
    return None


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """``W R^T`` (``R W`` for ``[in, out]`` weights, ``W R`` for embedding tables), in fp32, cast
    once."""
    refusal = _merge_refusal(record)
    if refusal:
        raise FxpeftError(refusal)
    detail: OftDetail = record.detail
    base = weight_so_far(gm, weights, detail.weight)
    weight, rotation = base.float(), full_rotation(gm, detail)
    if detail.layout == "embedding":
        merged = weight @ rotation
    elif detail.layout == "fan_in_fan_out":
        merged = rotation @ weight
    else:
        merged = (weight.flatten(1) @ rotation.T).reshape(weight.shape)
    weights[detail.weight] = merged.to(base.dtype)


# --- PEFT's OFTConfig -----------------------------------------------------------------------------

OFT_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                        "r", "oft_block_size", "module_dropout", "fan_in_fan_out", "bias",
                        "init_weights", "coft", "eps", "block_share", "use_cayley_neumann",
                        "num_cayley_neumann_terms"})
# PEFT's OFTConfig defaults, for fields a config leaves out.
_DEFAULTS = {"r": 0, "module_dropout": 0.0, "coft": False, "eps": 6e-5, "block_share": False,
             "use_cayley_neumann": True, "num_cayley_neumann_terms": 5, "init_weights": True}


def _check_config(config: dict[str, Any], source: str) -> None:
    if "oft_block_size" not in config:  # PEFT's OFTConfig.check_kwargs
        raise PeftFormatError(f"{source}: oft_block_size is missing: OFT has been updated since "
                              f"PEFT 0.14.0 and this adapter's weights are incompatible with it")
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{source}: bias = {config['bias']!r} is not supported (only \"none\")")
    if config.get("init_weights", True) not in (True, False):
        raise PeftFormatError(f"{source}: init_weights = {config['init_weights']!r} is not "
                              f"supported (PEFT's OFT takes true or false)")


def _params(config: dict[str, Any], source: str) -> OftParams:
    """The params a config says, PEFT's defaults for the fields it leaves out; a bad value is
    a ``PeftFormatError`` naming the field."""
    values = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS and v is not None}}
    try:
        return OftParams(r=values["r"], block_size=config["oft_block_size"],
                         use_cayley_neumann=values["use_cayley_neumann"],
                         num_cayley_neumann_terms=values["num_cayley_neumann_terms"],
                         module_dropout=values["module_dropout"], coft=values["coft"],
                         eps=values["eps"], block_share=values["block_share"],
                         init="default" if values["init_weights"] else "random")
    except RuleError as err:
        field = {"block_size": "oft_block_size", "init": "init_weights"}.get(
            err.key.removeprefix("params."), err.key.removeprefix("params."))
        raise PeftFormatError(f"{source}: {field}: {err.message}") from None


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """An ``OFTConfig`` as one rule per site kind (linears, convolutions, embeddings)."""
    _check_config(config, source)
    params = _params(config, source)
    path = "^" + layers_prefix(config) + target_regex(config, model, source)
    rules = [Rule(name=f"peft oft {site}", match=site, optional=True, params=params,
                  where=Where(path=[path], exclude=exclude_regexes(config)))
             for site in OftParams.match_kinds]
    return RuleSet(tuple(rules), source=source)


def _one(values: set, field: str) -> Any:
    if len(values) > 1:
        raise PeftFormatError(f"PEFT's OFTConfig has one {field}; these rules use "
                              f"{sorted(values, key=repr)}")
    return values.pop()


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """The ``OFTConfig`` fields selecting ``matches``' modules with their params (one set of
    params per adapter, as PEFT's config has)."""
    params = _one({m.rule.params for m in matches}, "set of OFT parameters")
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    return {"target_modules": targets_for(sorted(m.module_path for m in matches), program,
                                          adaptable_paths(program)),
            "r": params.r, "oft_block_size": params.block_size,
            **{k: fields[k] for k in ("module_dropout", "coft", "eps", "block_share",
                                      "use_cayley_neumann", "num_cayley_neumann_terms")},
            "bias": "none", "init_weights": params.init == "default",
            # PEFT warns that a Neumann-series adapter older than 0.18.0 has another series; the
            # series here is 0.18.0's and later, as in the version these semantics follow.
            "peft_version": "0.21.2",
            "fan_in_fan_out": any(getattr(m.site, "fan_in_fan_out", False) for m in matches)}


KIND = AdapterKind(name="oft", params=OftParams, splice=splice, merge=merge,
                   components=(ROTATION, EMBEDDING_ROTATION),
                   peft=PeftFormat("OFT", rules_to_config, config_to_rules, OFT_FIELDS))
