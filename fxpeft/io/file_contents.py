"""What a PEFT adapter file may hold beyond the adapter's own tensors, and what it may need that
fxpeft cannot do. ``fxpeft.load`` asks these before it fills any tensor.

- PEFT's copies of base weights. When LoRA targets an embedding (``embed_tokens``, or
  ``lm_head``), PEFT's ``save_embedding_layers="auto"`` also saves that layer's base weight as
  ``<path>.base_layer.weight``, for models whose vocabulary was resized. fxpeft loads adapters
  onto an unchanged base, so such a copy must equal the model's weight, and is then dropped.
  fxpeft never writes these copies: its folders hold only adapter tensors, and PEFT loads them
  without (a missing base copy is not an error there).
- Layers the adapter's kind cannot adapt. A key of a module that fxpeft's kind has no site for
  (LoRA on a ``Conv3d``, DoRA on an embedding) is an error naming that feature, not an
  "unexpected key".
"""

from __future__ import annotations

from typing import Any

import torch

from fxpeft.graph.records import record
from fxpeft.graph.targets import fetch
from fxpeft.registry import AdapterKind
from fxpeft.match.query import candidates
from fxpeft.names import PEFT_PREFIX
from fxpeft.graph.targets import owning_module
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.capture.program import Program

BASE_COPY = "base_layer.weight"  # PEFT's key suffix for a saved base weight


def base_copy_keys(matches: list[Any]) -> dict[str, str]:
    """PEFT key of the base-weight copy PEFT may save for each matched layer -> the weight's
    graph target.

    >>> from types import SimpleNamespace as S
    >>> base_copy_keys([S(module_path="model.embed_tokens", site=S(weight_target="model.embed_tokens.weight"))])
    {'base_model.model.model.embed_tokens.base_layer.weight': 'model.embed_tokens.weight'}
    """
    return {f"{PEFT_PREFIX}{m.module_path}.{BASE_COPY}": m.site.weight_target for m in matches
            if getattr(m.site, "weight_target", None)}


def without_base_copies(gm: torch.nn.Module, adapter: str, tensors: dict[str, torch.Tensor],
                        path: Any) -> dict[str, torch.Tensor]:
    """``tensors`` less PEFT's copies of the adapted layers' base weights, each checked to equal
    the model's own (``PeftFormatError`` naming the key otherwise)."""
    copies = base_copy_keys(record(gm, adapter).matches)
    for key in sorted(set(copies) & set(tensors)):
        want, got = fetch(gm, copies[key]).detach(), tensors[key]
        if got.shape != want.shape or not torch.equal(got.to(want.dtype), want):
            raise PeftFormatError(
                f"{path}: {key}: PEFT's copy of the base weight differs from the model's "
                f"{copies[key]} ({list(got.shape)} vs {list(want.shape)}); the adapter was trained "
                f"on a changed (resized?) base layer, and fxpeft loads adapters onto an unchanged base")
    return {key: value for key, value in tensors.items() if key not in copies}


def _module_of(gm: torch.nn.Module, key: str) -> str | None:
    """The longest dotted prefix of a PEFT key that names a (non-root) module of ``gm``."""
    if not key.startswith(PEFT_PREFIX):
        return None
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    for end in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:end])
        try:
            if isinstance(fetch(gm, path), torch.nn.Module):
                return path
        except AttributeError:
            continue
    return None


def _module_type(gm: torch.fx.GraphModule, path: str) -> str:
    """The class name of the module at ``path``: from the graph's module stacks (export), else
    the module itself (symbolic_trace)."""
    for node in gm.graph.nodes:
        found = owning_module(node)
        if found is not None and found[0] == path:
            return found[1].rsplit(".", 1)[-1]
    return type(gm.get_submodule(path)).__name__


def check_supported(program: Program, kind: AdapterKind, expected: set[str], found: set[str],
                    path: Any) -> None:
    """Unexpected keys of a layer ``kind`` has no site for: a ``PeftFormatError`` naming the
    feature the file needs (``LORA on Conv3d``), rather than "unexpected key". When an expected
    key is missing too, the file does not fit this model, and that error says more."""
    if expected - found:
        return
    gm = program.graph_module
    sites = {c.module_path for site in kind.sites for c in candidates(program, site)}
    for key in sorted(found - expected):
        module = _module_of(gm, key)
        if module is None or module in sites:
            continue
        feature = f"{kind.peft.peft_type} ({kind.name}) on {_module_type(gm, module)}"
        raise PeftFormatError(
            f"{path}: {key}: the adapter needs {feature} at {module}, which fxpeft does not support; "
            f"its {kind.name} adapters apply to {', '.join(kind.sites) or 'no'} layers")
