"""Adapter parameters: which they are, how a splice attaches them, and freezing the base.

A parameter is an adapter parameter when a component of its dotted name is a registered kind's
component (``model.layers.0.self_attn.q_proj.lora_A.weight`` has ``lora_A``), for any adapter.
"""

from __future__ import annotations


import torch
import torch.fx

from fxpeft.errors import PassError
from fxpeft.registry import is_adapter_parameter
from fxpeft.names import adapter_component

__all__ = ["adapter_component", "adapter_state_dict", "attach_component", "freeze_base",
           "is_adapter_parameter"]


def freeze_base(gm: torch.nn.Module) -> None:
    """Base parameters stop requiring grad; adapter parameters are left as they are."""
    for name, param in gm.named_parameters():
        if not is_adapter_parameter(name):
            param.requires_grad_(False)


def adapter_state_dict(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of ``gm``, by module path (``...q_proj.lora_A.weight``).

    >>> adapter_state_dict(torch.nn.Linear(2, 2))
    {}
    """
    return {name: t.detach() for name, t in gm.state_dict().items() if is_adapter_parameter(name)}


def attach_component(gm: torch.nn.Module, path: str, base: str, adapter: str,
                     value: "torch.nn.Module | torch.nn.Parameter") -> str:
    """Add ``value`` (a submodule or a parameter) to the module at ``path`` as ``adapter``'s
    component ``base`` (``adapter_component``); returns its target. If the module already has
    it (a module called at two sites), the existing one is kept and shared, as PEFT does.

    >>> import fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> attach_component(net, "0", "ia3_l", "sql", torch.nn.Parameter(torch.ones(2, 1)))
    '0.ia3_l_sql'
    >>> is_adapter_parameter("0.ia3_l_sql")
    True
    """
    name = adapter_component(base, adapter)
    owner = gm.get_submodule(path)
    if name in owner._modules or name in owner._parameters:
        return f"{path}.{name}" if path else name
    if hasattr(owner, name):
        raise PassError(f"{path}.{name} exists and is not an adapter component")
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.add_module(name, value)
    return f"{path}.{name}" if path else name


