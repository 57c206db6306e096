"""BD-LoRA (PEFT's ``use_bdlora``): LoRA on a linear whose A or B is block-diagonal, so that a
server sharding the layer over ``blocks`` devices needs no communication for the adapter.

The block-diagonal factor is stored as PEFT stores it, its blocks stacked: A as
``(r, in / blocks)``, B as ``(out, r / blocks)``, under the plain ``lora_A.weight`` /
``lora_B.weight`` keys. The graph expands it to the dense block-diagonal matrix
(``block_diagonal``) before the usual projection, which computes PEFT's blockwise product
exactly (the off-diagonal zeros add nothing). A block-diagonal A starts kaiming-uniform
(``a = 0``), a block-diagonal B at zeros whatever the ``init``, as in PEFT. Linear layers only, without DoRA,
``lora_bias`` or MiCA, as in PEFT.

In a ``LoraConfig``, ``use_bdlora = {"target_modules_bd_a": [...], "target_modules_bd_b": [...],
"nblocks": N}`` picks the layers by substring of their full module name, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

from fxpeft.errors import FxpeftError
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.rules.schema import RuleSet

CONFIG_FIELD = "use_bdlora"


def block_diagonal(weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """The dense matrix whose diagonal holds ``weight``'s ``blocks`` row blocks.

    >>> block_diagonal(torch.ones(4, 1), 2)
    tensor([[1., 0.],
            [1., 0.],
            [0., 1.],
            [0., 1.]])
    """
    return torch.block_diag(*weight.chunk(blocks, dim=0))


def check_site(site: Any, params: Any, linear: bool) -> None:
    """Refuse, by name, what PEFT's BD-LoRA does not have or cannot split into ``blocks``."""
    where, blocks = f"{site.module_path}: BD-LoRA", params.blocks
    if not linear:
        raise FxpeftError(f"{where} applies to linear layers only (as in PEFT)")
    for flag, name in ((params.kind != "lora", "DoRA"), (params.lora_bias, "lora_bias"),
                       (params.init == "mica", "MiCA")):
        if flag:
            raise FxpeftError(f"{where} does not combine with {name} (as in PEFT)")
    sides = (site.in_features, params.r) if params.block_diagonal == "A" else (params.r, site.out_features)
    if any(size % blocks for size in sides):
        raise FxpeftError(f"{where}: the block-diagonal {params.block_diagonal} is {sides[1]} x "
                          f"{sides[0]}, which {blocks} blocks do not divide")


def make_pair(site: Any, params: Any, factory: dict[str, Any]) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """A and B with the block-diagonal one stored as its stacked blocks, PEFT's initialisation."""
    blocks, r = params.blocks, params.r
    if params.block_diagonal == "A":
        lora_a = torch.nn.Linear(site.in_features // blocks, r, bias=False, **factory)
        torch.nn.init.kaiming_uniform_(lora_a.weight)
        lora_b = torch.nn.Linear(r, site.out_features, bias=False, **factory)
        if params.init == "default":  # zeros, as plain LoRA's B ("random": PEFT's init False)
            torch.nn.init.zeros_(lora_b.weight)
        return lora_a, lora_b
    lora_a = torch.nn.Linear(site.in_features, r, bias=False, **factory)
    torch.nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    lora_b = torch.nn.Linear(r // blocks, site.out_features, bias=False, **factory)
    torch.nn.init.zeros_(lora_b.weight)
    return lora_a, lora_b


def blocks_of(params: Any) -> tuple[int, int]:
    """How many diagonal blocks A and B have (1: a plain matrix)."""
    side = getattr(params, "block_diagonal", "none")
    return (params.blocks if side == "A" else 1, params.blocks if side == "B" else 1)


# --- PEFT's use_bdlora ------------------------------------------------------------------------

def _bd_config(config: dict[str, Any], source: str) -> dict[str, Any] | None:
    raw = config.get(CONFIG_FIELD)
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise PeftFormatError(f"{source}: {CONFIG_FIELD} must be a mapping, got {raw!r}")
    for key in ("target_modules_bd_a", "target_modules_bd_b"):
        names = raw.get(key) or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PeftFormatError(f"{source}: {CONFIG_FIELD}.{key} must be a list of names, got {names!r}")
    blocks = raw.get("nblocks", 1)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise PeftFormatError(f"{source}: {CONFIG_FIELD}.nblocks must be an integer >= 1, got {blocks!r}")
    return raw


def _containing(names: list[str]) -> str:
    """A lookahead for PEFT's test ``pattern in module_name``."""
    return "(?=.*(?:" + "|".join(re.escape(n) for n in names) + "))"


def with_block_diagonal(rules: RuleSet, config: dict[str, Any], source: str, is_lora: bool) -> RuleSet:
    """PEFT's ``use_bdlora`` over rules made from the rest of the config: the linear rules again,
    first, for the layers whose name contains a ``target_modules_bd_a`` (then ``_bd_b``)
    pattern, with that factor block-diagonal; everything else stays plain LoRA."""
    raw = _bd_config(config, source)
    if raw is None:
        return rules
    if not is_lora:
        raise PeftFormatError(f"{source}: {CONFIG_FIELD} with use_dora is not a combination PEFT "
                              f"supports (nor fxpeft)")
    added = []
    for side, key in (("A", "target_modules_bd_a"), ("B", "target_modules_bd_b")):
        names = raw.get(key) or []
        if not names:
            continue
        for rule in (r for r in rules.rules if r.match == "linear"):
            paths = [f"^{_containing(names)}{p.removeprefix('^')}" for p in rule.where.path]
            params = dataclasses.replace(rule.params, block_diagonal=side, blocks=raw.get("nblocks", 1))
            added.append(dataclasses.replace(rule, name=f"{rule.name} bd-{side}", params=params,
                                             where=dataclasses.replace(rule.where, path=paths)))
    return dataclasses.replace(rules, rules=(*added, *rules.rules))


def config_fields(params: dict[str, Any]) -> dict[str, Any]:
    """``use_bdlora`` for LoRA params by module path: full module names as PEFT's substring
    patterns, refused where a pattern would also pick a layer that is not block-diagonal."""
    sides = {path: p.block_diagonal for path, p in params.items()
             if getattr(p, "block_diagonal", "none") != "none"}
    if not sides:
        return {CONFIG_FIELD: None}
    blocks = {params[path].blocks for path in sides}
    if len(blocks) > 1:
        raise PeftFormatError(f"PEFT's {CONFIG_FIELD} has one nblocks; these rules use {sorted(blocks)}")
    for path, side in sides.items():
        clash = next((other for other in params if path in other and sides.get(other) != side), None)
        if clash is not None:
            raise PeftFormatError(f"PEFT's {CONFIG_FIELD} picks layers by substring: {path!r} would "
                                  f"also pick {clash!r}, which is not block-diagonal {side}")
    return {CONFIG_FIELD: {"target_modules_bd_a": sorted(p for p, s in sides.items() if s == "A"),
                           "target_modules_bd_b": sorted(p for p, s in sides.items() if s == "B"),
                           "nblocks": blocks.pop(), "match_strict": False}}
