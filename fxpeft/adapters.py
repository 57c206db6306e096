"""Which parameters belong to adapters. Passes register the name components they create.

A parameter is an adapter parameter when any component of its dotted name is registered:
``model.layers.0.self_attn.q_proj.lora_A.weight`` has ``lora_A``.
"""

from __future__ import annotations

import torch

_ADAPTER_NAMES: set[str] = {"lora_A", "lora_B"}


def register_adapter_names(*names: str) -> None:
    """Declare module or parameter names that a pass adds (e.g. ``"ia3_l"``)."""
    _ADAPTER_NAMES.update(names)


def is_adapter_parameter(name: str) -> bool:
    """Whether the parameter or buffer called ``name`` belongs to an adapter.

    >>> is_adapter_parameter("model.q_proj.lora_A.weight"), is_adapter_parameter("model.q_proj.weight")
    (True, False)
    """
    return any(part in _ADAPTER_NAMES for part in name.split("."))


def freeze_base(gm: torch.nn.Module) -> None:
    """Only adapter parameters require grad."""
    for name, param in gm.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))


def adapter_state_dict(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of ``gm``, by module path (``...q_proj.lora_A.weight``).

    >>> adapter_state_dict(torch.nn.Linear(2, 2))
    {}
    """
    return {name: t.detach() for name, t in gm.state_dict().items() if is_adapter_parameter(name)}


def adapter_component(base: str, adapter: str) -> str:
    """The name component ``base`` (``lora_A``) takes for ``adapter``: the default adapter keeps
    PEFT's plain name, others get their name appended, so several adapters share one module.

    >>> adapter_component("lora_A", "default"), adapter_component("lora_A", "sql")
    ('lora_A', 'lora_A_sql')
    """
    return base if adapter == "default" else f"{base}_{adapter}"
