"""Bottleneck adapters, as the AdapterHub ``adapters`` library (1.3) has them.

At a ``residual`` site (a sub-block's output projection ``h``, its residual add ``h + r`` and the
block's post-norm ``LN``, if any) an adapter ``A(z) = dropout(scaling * up(act(down(z))))``
(``down`` and ``up`` linears with biases, ``down`` to ``hidden // reduction_factor`` features)
computes what AdapterHub's ``Adapter`` / ``ParallelAdapter`` compute:

- sequential (``parallel = false``; Pfeiffer ``seq_bn`` with ``original_ln_before``, Houlsby
  ``double_seq_bn`` without): ``z = LN(h + r)`` with ``original_ln_before`` else ``z = h``; the
  adapter's residual is ``h`` (``residual_before_ln = true``), ``h + r`` (``"post_add"``) or
  ``z`` (``false``); ``out = A(z) + residual``; then ``LN(out + r)`` with ``original_ln_after``;
- parallel (``par_bn``): ``out = A(r) + h``, then ``LN(out + r)`` with ``original_ln_after``.

A pre-norm model (Llama) has no ``LN`` there: it is the identity, as in AdapterHub. The base's
add and norm stay; the adapted output replaces the base output through ``select_adapted(base,
adapted, gate)``, ``lerp`` bit-exact at both gate values, which is the removable node (it
bypasses to the base output) and makes switching and mixed batches data. Adapter ``"default"``
adds ``adapter_down`` / ``adapter_up`` (linears) at the projection's module, any other
``adapter_down_<name>`` / ``adapter_up_<name>``. The non-linearity (and the second pass through
the norm) keeps it from merging. The on-disk format is fxpeft's own, ``FXPEFT_BOTTLENECK``
(``docs/kinds.md``): AdapterHub's config fields, PEFT's folder layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpeft.capture.program import Program
from fxpeft.errors import FxpeftError, RuleError
from fxpeft.formats.peft_format import (PeftFormat, PeftFormatError, exclude_regexes, target_regex,
                                        targets_for)
from fxpeft.graph.dropout import dropout_target
from fxpeft.graph.gates import gate_node, reroute
from fxpeft.graph.params import attach_component
from fxpeft.kinds.lora import adapter_dtype, casts, record_nodes
from fxpeft.match.query import Match
from fxpeft.match.residual import ResidualSite, find_residual_sites
from fxpeft.names import adapter_node
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, Where, spec

aten = torch.ops.aten
DOWN, UP = "adapter_down", "adapter_up"
# AdapterHub's non_linearity names (transformers' get_activation) -> (aten op, its kwargs).
ACTIVATIONS = {"relu": (aten.relu.default, {}), "swish": (aten.silu.default, {}),
               "silu": (aten.silu.default, {}), "gelu": (aten.gelu.default, {}),
               "gelu_new": (aten.gelu.default, {"approximate": "tanh"}),
               "tanh": (aten.tanh.default, {}), "sigmoid": (aten.sigmoid.default, {}),
               "leakyrelu": (aten.leaky_relu.default, {})}
CANNOT_MERGE = ("a bottleneck adapter puts a non-linearity (and, with original_ln_before, a "
                "second pass through the layer norm) between the residual stream and its output; "
                "no base weight can absorb that")


def _residual_choice(value: Any) -> str | None:
    """AdapterHub's ``residual_before_ln``: true, false or ``"post_add"``.

    >>> _residual_choice("post_add") is None
    True
    >>> print(_residual_choice("after"))
    expected true, false or "post_add", got 'after'
    """
    if isinstance(value, bool) or value == "post_add":
        return None
    return f'expected true, false or "post_add", got {value!r}'


def _number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"expected a number, got {value!r}"
    return None


@dataclass(frozen=True)
class BottleneckParams(Params):
    """A bottleneck adapter; the defaults are AdapterHub's ``SeqBnConfig`` (Pfeiffer).

    >>> p = BottleneckParams(reduction_factor=4)
    >>> p.bottleneck(64), p.non_linearity, p.original_ln_before
    (16, 'relu', True)
    """

    kind = "bottleneck"
    match_kinds = ("residual",)
    reduction_factor: float = spec(16, checks.positive_number, "hidden size / bottleneck size")
    non_linearity: str = spec("relu", checks.one_of(*ACTIVATIONS), "activation in the bottleneck")
    parallel: bool = spec(False, checks.boolean, "read the residual stream in parallel (par_bn)")
    original_ln_before: bool = spec(True, checks.boolean, "adapt LN(h + r), not h (sequential)")
    original_ln_after: bool = spec(True, checks.boolean, "add r and apply LN after the adapter")
    residual_before_ln: Any = spec(True, _residual_choice, 'adapter residual: h, "post_add" or z')
    scaling: float = spec(1.0, _number, "factor on the adapter's output")
    dropout: float = spec(0.0, checks.probability, "dropout on the adapter's output")
    init: str = spec("bert", checks.one_of("bert", "mam_adapter", "houlsby"), "initialisation")
    autocast: bool = spec(True, checks.boolean, "fp32 adapters on fp16/bf16 bases")

    def bottleneck(self, hidden: int) -> int:
        """AdapterHub's ``int(hidden // reduction_factor)``, at least 1."""
        return max(1, int(hidden // self.reduction_factor))


@dataclass(frozen=True)
class BottleneckDetail:
    """The targets of one adapter's down and up linears."""

    down: str
    up: str


def _initialise(down: torch.nn.Linear, up: torch.nn.Linear, init: str) -> None:
    """AdapterHub's ``init_weights``: "bert" N(0, 0.02); "mam_adapter" kaiming-uniform down and
    zero up (identity at init); "houlsby" N(0, 0.01) truncated at 2 std. Biases zero."""
    with torch.no_grad():
        for layer in (down, up):
            torch.nn.init.zeros_(layer.bias)
            if init == "bert":
                layer.weight.normal_(0.0, 0.02)
            elif init == "houlsby":
                torch.nn.init.trunc_normal_(layer.weight, 0.0, 1e-2, -2e-2, 2e-2)
        if init == "mam_adapter":  # down keeps nn.Linear's kaiming-uniform(a=sqrt(5))
            torch.nn.init.zeros_(up.weight)


def _attach(job: SpliceInput) -> BottleneckDetail:
    site, params = job.site, job.params
    like = site.weight_like(job.gm)
    factory = {"dtype": adapter_dtype(params, like.dtype), "device": like.device}
    size = params.bottleneck(site.hidden_size)
    down = torch.nn.Linear(site.hidden_size, size, **factory)
    up = torch.nn.Linear(size, site.hidden_size, **factory)
    _initialise(down, up, params.init)
    return BottleneckDetail(attach_component(job.gm, site.module_path, DOWN, job.adapter, down),
                            attach_component(job.gm, site.module_path, UP, job.adapter, up))


def select_adapted(base: torch.Tensor, adapted: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``adapted`` where the gate is 1, ``base`` where it is 0, bit-exact at both (lerp's
    two-sided formula), in ``base``'s dtype.

    >>> b, a = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 7.0])
    >>> select_adapted(b, a, torch.tensor(1.0)).tolist(), select_adapted(b, a, torch.tensor(0.0)).tolist()
    ([5.0, 7.0], [1.0, 2.0])
    """
    return torch.lerp(base, adapted.to(base.dtype), gate.to(base.dtype))


def _adapter(job: SpliceInput, detail: BottleneckDetail, z: torch.fx.Node) -> torch.fx.Node:
    """``dropout(scaling * up(act(down(z))))`` in the adapter dtype, cast back to the base's."""
    graph, params = job.gm.graph, job.params
    base_dtype = job.site.weight_like(job.gm).dtype
    x = graph.call_function(aten.to.dtype, (z, torch.float32)) if casts(job) else z
    down = graph.call_module(detail.down, (x,))
    op, kwargs = ACTIVATIONS[params.non_linearity]
    up = graph.call_module(detail.up, (graph.call_function(op, (down,), kwargs),))
    out = graph.call_function(aten.mul.Tensor, (up, params.scaling))
    if params.dropout > 0:
        out = graph.call_module(dropout_target(job.gm), (out, params.dropout))
    return graph.call_function(aten.to.dtype, (out, base_dtype)) if casts(job) else out


def _post_norm(graph: torch.fx.Graph, site: ResidualSite, x: torch.fx.Node) -> torch.fx.Node:
    """The block's own norm on ``x`` (the same module or op and weights), or ``x`` without one."""
    norm = site.norm
    if norm is None:
        return x
    return graph.create_node(norm.op, norm.target, (x, *norm.args[1:]), dict(norm.kwargs))


def _adapted(job: SpliceInput, detail: BottleneckDetail) -> torch.fx.Node:
    """AdapterHub's ``pre_forward``, ``forward`` and ``post_forward`` for one adapter."""
    graph, site, params = job.gm.graph, job.site, job.params
    h, r = site.branch, site.residual
    if params.parallel:
        out = graph.call_function(aten.add.Tensor, (_adapter(job, detail, r), h))
    else:
        if params.residual_before_ln == "post_add" and not params.original_ln_before:
            raise FxpeftError(f"{site.module_path}: residual_before_ln = \"post_add\" needs "
                              f"original_ln_before = true (AdapterHub takes that residual after "
                              f"the block's add)")
        z = site.output if params.original_ln_before else h  # the base computes LN(h + r)
        residual = {True: h, False: z, "post_add": site.node}
        out = graph.call_function(aten.add.Tensor, (_adapter(job, detail, z),
                                                    residual[params.residual_before_ln]))
    if not params.original_ln_after:
        return out
    return _post_norm(graph, site, graph.call_function(aten.add.Tensor, (out, r)))


def splice(job: SpliceInput) -> Spliced:
    """The adapted output after the site's output; the site's readers read it instead."""
    detail, graph, base = _attach(job), job.gm.graph, job.site.output
    with graph.inserting_before(base.next):
        adapted = _adapted(job, detail)
        gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(f"{detail.down}.weight"), base)
        join = graph.call_function(select_adapted, (base, adapted, gate))
    added = record_nodes(job, base, join, "bottleneck", detail)
    others = {u for u in base.users if (rec := adapter_node(u)) is not None and not rec.removable}
    reroute(base, join, keep=set(added) | others)  # other adapters' branches keep the base
    return Spliced(added, [detail.down, detail.up])


# --- fxpeft's own format: FXPEFT_BOTTLENECK ---------------------------------------------------

CONFIG_FIELDS = {"reduction_factor": "reduction_factor", "non_linearity": "non_linearity",
                 "is_parallel": "parallel", "original_ln_before": "original_ln_before",
                 "original_ln_after": "original_ln_after", "residual_before_ln": "residual_before_ln",
                 "scaling": "scaling", "dropout": "dropout", "init_weights": "init"}
FIELDS = frozenset({"target_modules", "exclude_modules", *CONFIG_FIELDS})


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """AdapterHub's ``BnConfig`` fields of the matched rules' params, and the adapted modules."""
    configs = {tuple((field, getattr(m.rule.params, name)) for field, name in CONFIG_FIELDS.items())
               for m in matches}
    if len(configs) > 1:
        raise PeftFormatError("FXPEFT_BOTTLENECK holds one bottleneck config per adapter; these "
                              "rules use several (give each its own adapter)")
    known = [s.module_path for s in find_residual_sites(program)]
    paths = sorted(m.module_path for m in matches)
    return {"target_modules": targets_for(paths, program, known), **dict(configs.pop())}


def _params(config: dict[str, Any], source: str) -> BottleneckParams:
    """The params the config's fields give; a bad value names its config field.

    >>> _params({"reduction_factor": 0}, "c.json")
    Traceback (most recent call last):
    ...
    fxpeft.formats.peft_format.PeftFormatError: c.json: reduction_factor = 0: expected a positive number, got 0
    """
    values = {name: config[field] for field, name in CONFIG_FIELDS.items() if field in config}
    try:
        return BottleneckParams(**values)
    except RuleError as err:  # its key is the params field: say the config's name for it
        name = (err.key or "").removeprefix("params.")
        field = next((f for f, n in CONFIG_FIELDS.items() if n == name), name)
        raise PeftFormatError(f"{source}: {field} = {config.get(field)!r}: {err.message}") from None


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """One rule on the residual sites of ``target_modules`` with the config's params."""
    where = Where(path=["^" + target_regex(config, model, source)], exclude=exclude_regexes(config))
    rule = Rule(name="fxpeft bottleneck", match="residual", optional=True,
                params=_params(config, source), where=where)
    return RuleSet((rule,), source=source)


KIND = AdapterKind(name="bottleneck", params=BottleneckParams, splice=splice, merge=CANNOT_MERGE,
                   components=(DOWN, UP),
                   peft=PeftFormat("FXPEFT_BOTTLENECK", rules_to_config, config_to_rules, FIELDS))
