"""KaSA (PEFT's ``kasa_config``): LoRA on a linear whose base weight loses its ``r`` smallest
singular components, with a learnable diagonal ``lora_diag`` between A and B:
``y = x (W - U_d S_d Vh_d)^T + scale * B(diag(lora_diag) A x)``.

PEFT truncates the base weight in place when the adapter is added. fxpeft leaves the base
weight alone: the graph subtracts the dropped part as a frozen low-rank correction,
``(x Vh_d^T) (U_d S_d)^T``, whose factors it computes from the base weight's SVD in fp32 when
the adapter is spliced (two non-persistent buffers, ``(out, r)`` and ``(r, in)``: neither trained
nor saved, as PEFT saves no truncation either). The correction is gated with the adapter, so a
disabled or stripped adapter gives the untouched base (PEFT's disabled adapter keeps the
truncated one). Merge folds both into W, as PEFT's ``merge_and_unload`` does.

``lora_diag`` starts ``randn(r)`` and B at zeros, so at init the output is the truncated
model's, as PEFT's is. Linear layers only (not Conv1D's ``fan_in_fan_out``), ``r`` below
``min(in, out)``, without DoRA, BD-LoRA or MiCA, and not mixed with non-KaSA LoRA adapters on
one model: as in PEFT. ``kasa_loss`` is PEFT's ``_get_kasa_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from fxpeft.capture.quantized import base_weight
from fxpeft.errors import FxpeftError
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.graph.gates import active_adapters
from fxpeft.graph.records import adapter_records
from fxpeft.graph.targets import fetch
from fxpeft.names import ADAPTER_META, adapter_component

CONFIG_FIELD = "kasa_config"
DROPPED = ("kasa_dropped_us", "kasa_dropped_vh")  # the correction's factors (buffers, not saved)
DEFAULTS = {"beta": 1e-4, "gamma": 1e-3}  # PEFT's KasaConfig

aten = torch.ops.aten


@dataclass(frozen=True)
class KasaDetail:
    """The targets of ``lora_diag`` and of the dropped part's factors ``U_d S_d`` and ``Vh_d``,
    and the auxiliary loss's coefficients."""

    diag: str
    dropped_us: str
    dropped_vh: str
    beta: float
    gamma: float


def non_negative(value: Any) -> str | None:
    """An error message unless ``value`` is a number >= 0 (KaSA's loss coefficients).

    >>> non_negative(0.0) is None, non_negative(-1)
    (True, 'expected a number >= 0, got -1')
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return f"expected a number >= 0, got {value!r}"
    return None


def dropped_part(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_d S_d, Vh_d)``, fp32, for the ``r`` smallest singular values of ``weight``
    ``(out, in)``: what PEFT's KaSA drops from it.

    >>> us, vh = dropped_part(torch.diag(torch.tensor([3., 2., 1.])), 1)
    >>> (us @ vh).diagonal().abs().tolist()
    [0.0, 0.0, 1.0]
    """
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    kept = s.shape[0] - r
    return u[:, kept:] * s[kept:], vh[kept:]


def check_site(site: Any, params: Any, linear: bool) -> None:
    """Refuse, by name, what PEFT's KaSA does not have."""
    where = f"{site.module_path}: KaSA"
    if not linear:
        raise FxpeftError(f"{where} applies to linear layers only (as in PEFT)")
    if site.fan_in_fan_out:
        raise FxpeftError(f"{where} does not support fan_in_fan_out layers such as Conv1D (as in PEFT)")
    for flag, name in ((params.kind != "lora", "DoRA"), (params.block_diagonal != "none", "BD-LoRA"),
                       (params.init == "mica", "MiCA")):
        if flag:
            raise FxpeftError(f"{where} does not combine with {name} (as in PEFT)")
    smaller = min(site.in_features, site.out_features)
    if params.r >= smaller:
        raise FxpeftError(f"{where} needs r < min(in_features, out_features) = {smaller} (as in PEFT), "
                          f"got r = {params.r}")


def check_mixing(gm: torch.nn.Module, adapter: str, params: Any) -> None:
    """PEFT refuses KaSA and non-KaSA LoRA adapters on one model (KaSA changes its base)."""
    uses = bool(getattr(params, "kasa", False))
    for name, rec in adapter_records(gm).items():
        lora_rules = [rule for rule in rec.rules.rules if hasattr(rule.params, "kasa")]
        if name != adapter and lora_rules and any(r.params.kasa for r in lora_rules) is not uses:
            raise FxpeftError(f"adapter {adapter!r} {'uses' if uses else 'does not use'} KaSA but adapter "
                              f"{name!r} {'does not' if uses else 'does'}: KaSA does not mix with other "
                              f"LoRA adapters on one model (as in PEFT)")


def attach(gm: torch.fx.GraphModule, site: Any, params: Any, adapter: str, dtype: torch.dtype,
           diag_name: str) -> tuple[KasaDetail, str, list[str]]:
    """Attach the singular values ``diag_name`` (``randn(r)``, as PEFT) and the dropped part's
    factors (frozen buffers, the adapter dtype) at the site's module; returns the detail, the
    parameter's target and the buffers' targets."""
    owner, path = gm.get_submodule(site.module_path), site.module_path
    weight = base_weight(gm, site.weight_target)
    names = [adapter_component(base, adapter) for base in (diag_name, *DROPPED)]
    if names[0] not in owner._parameters:  # a module called at two sites shares them (one SVD)
        owner.register_parameter(names[0], torch.nn.Parameter(torch.randn(params.r, dtype=dtype,
                                                                          device=weight.device)))
        factors = [t.to(dtype) for t in dropped_part(weight, params.r)]
        for name, factor in zip(names[1:], factors):
            owner.register_buffer(name, factor, persistent=False)
    diag, us, vh = (f"{path}.{name}" if path else name for name in names)
    return KasaDetail(diag, us, vh, params.kasa_beta, params.kasa_gamma), diag, [us, vh]


def scaled_down(graph: torch.fx.Graph, detail: KasaDetail, down: torch.fx.Node) -> torch.fx.Node:
    """``diag(lora_diag) A x``: the rank-r tensor scaled by the learnable singular values."""
    return graph.call_function(aten.mul.Tensor, (down, graph.get_attr(detail.diag)))


def less_dropped(graph: torch.fx.Graph, detail: KasaDetail, x: torch.fx.Node, branch: torch.fx.Node,
                 gated: Callable[[torch.fx.Node], torch.fx.Node]) -> torch.fx.Node:
    """``branch - gate * (x Vh_d^T) (U_d S_d)^T``: the base's dropped part taken off (``x``
    without the adapter's dropout: it is the base's input), gated on the rank-r tensor."""
    down = gated(graph.call_function(aten.linear.default, (x, graph.get_attr(detail.dropped_vh))))
    dropped = graph.call_function(aten.linear.default, (down, graph.get_attr(detail.dropped_us)))
    return graph.call_function(aten.sub.Tensor, (branch, dropped))


def delta(gm: torch.nn.Module, detail: KasaDetail, lora_a: torch.Tensor, lora_b: torch.Tensor,
          scale: float) -> torch.Tensor:
    """``scale * B diag(lora_diag) A - U_d S_d Vh_d`` in fp32: what merge adds to W."""
    diag = fetch(gm, detail.diag).detach().float()
    us, vh = (fetch(gm, t).detach().float() for t in (detail.dropped_us, detail.dropped_vh))
    return (lora_b.float() * diag) @ lora_a.float() * scale - us @ vh


def kasa_loss(gm: torch.nn.Module, adapters: "str | list[str] | None" = None) -> "torch.Tensor | float":
    """PEFT's ``_get_kasa_loss``: over the KaSA layers of ``adapters`` (the active ones by
    default), ``beta * sum(lora_diag ** 2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)``, in
    fp32; ``0.0`` where there is none. Add it to the task loss, as the KaSA paper does.

    >>> import fxpeft
    >>> rule = fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"]),
    ...                          params=fxpeft.rules.LoraParams(r=2, kasa=True))
    >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 4)), rule)
    >>> float(kasa_loss(gm)) > 0, kasa_loss(gm, "other")
    (True, 0.0)
    """
    wanted = active_adapters(gm) if adapters is None else [adapters] if isinstance(adapters, str) else adapters
    seen: dict[str, Any] = {}
    for node in gm.graph.nodes:
        record = node.meta.get(ADAPTER_META)
        detail = getattr(getattr(record, "detail", None), "kasa", None)
        if detail is not None and record.adapter in wanted:
            seen.setdefault(detail.diag, (record.detail, detail))  # a shared module counts once, as in PEFT
    total: "torch.Tensor | float" = 0.0
    for lora, detail in seen.values():
        total = total + _layer_loss(fetch(gm, detail.diag), fetch(gm, lora.lora_A), fetch(gm, lora.lora_B),
                                    detail)
    return total


def _layer_loss(diag: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                detail: KasaDetail) -> torch.Tensor:
    eye = torch.eye(diag.shape[0], device=diag.device)
    a, b = lora_a.float(), lora_b.float()
    orthogonal = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
    return detail.beta * (diag.float() ** 2).sum() + detail.gamma * orthogonal


# --- PEFT's kasa_config -----------------------------------------------------------------------

def params_fields(config: dict[str, Any], source: str) -> dict[str, Any]:
    """LoRA params for a ``LoraConfig``'s ``kasa_config`` (none when it is unset).

    >>> params_fields({"kasa_config": {"beta": 0.5}}, "adapter_config.json")
    {'kasa': True, 'kasa_beta': 0.5, 'kasa_gamma': 0.001}
    """
    raw = config.get(CONFIG_FIELD)
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - set(DEFAULTS):
        raise PeftFormatError(f"{source}: {CONFIG_FIELD} must be a mapping with beta and gamma, got {raw!r}")
    values = {**DEFAULTS, **raw}
    for key, value in values.items():
        if non_negative(value):
            raise PeftFormatError(f"{source}: {CONFIG_FIELD}.{key}: {non_negative(value)}")
    return {"kasa": True, "kasa_beta": values["beta"], "kasa_gamma": values["gamma"]}


def config_fields(params: dict[str, Any]) -> dict[str, Any]:
    """``kasa_config`` for LoRA params by module path: PEFT's config has one, for every layer."""
    values = {(p.kasa, p.kasa_beta, p.kasa_gamma) if p.kasa else (False,) for p in params.values()}
    if len(values) > 1:
        raise PeftFormatError(f"PEFT's LoraConfig has one {CONFIG_FIELD}, for every layer; these rules "
                              f"use KaSA on some layers only, or with other beta / gamma")
    value = values.pop() if values else (False,)
    return {CONFIG_FIELD: {"beta": value[1], "gamma": value[2]} if value[0] else None}
