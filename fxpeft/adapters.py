"""Which parameters belong to adapters. Passes register the name components they create.

A parameter is an adapter parameter when any component of its dotted name is registered:
``model.layers.0.self_attn.q_proj.lora_A.weight`` has ``lora_A``.
"""

from __future__ import annotations

import torch

from fxpeft.errors import PassError

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
    """Base parameters stop requiring grad. Adapter parameters keep their own setting: new ones
    train, and an adapter loaded for inference stays frozen when another is added."""
    for name, param in gm.named_parameters():
        if not is_adapter_parameter(name):
            param.requires_grad_(False)


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


def attach_component(gm: torch.nn.Module, path: str, base: str, adapter: str,
                     value: "torch.nn.Module | torch.nn.Parameter") -> str:
    """Add ``value`` (a submodule or a parameter) to the module at ``path`` as ``adapter``'s
    component ``base`` (``adapter_component``), registered as an adapter name; returns its target.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> attach_component(net, "0", "ia3_l", "sql", torch.nn.Parameter(torch.ones(2, 1)))
    '0.ia3_l_sql'
    >>> is_adapter_parameter("0.ia3_l_sql")
    True
    """
    name = adapter_component(base, adapter)
    owner = gm.get_submodule(path)
    if hasattr(owner, name):  # a second rule or adapter would silently share (or clobber) it
        raise PassError(f"{path} already has {name!r}: adapter {adapter!r} was applied to it twice")
    register_adapter_names(name)
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.add_module(name, value)
    return f"{path}.{name}" if path else name
