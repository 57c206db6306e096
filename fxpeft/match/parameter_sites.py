"""The ``parameter`` match kind: where the graph reads a bare parameter.

A captured graph reads every parameter through a ``get_attr`` node; whatever op then uses it (a
matmul of ``x @ W``, the ``index`` + ``bmm`` of a mixture-of-experts layer's stacked experts,
an attention's packed ``in_proj_weight``) sees the tensor that node yields. A ``ParameterSite``
is that read, for a 2-d or 3-d parameter of the model (not of an adapter): a kind that adapts
a weight itself (PEFT's ``target_parameters``) rewrites what the read yields, so every op
reading the parameter sees the adapted weight. Its ``module_path`` is the parameter's full name
(``model.layers.0.mlp.experts.gate_up_proj``), which rules' ``path`` patterns match.

A ``torch.nn.Linear`` kept whole as a ``call_module`` (``symbolic_trace``'s leaf) reads its
``weight`` inside the call: its site is that call (``ParameterSite.module_call``); LoRA on that
weight is LoRA on the linear (the same ``W + scale * B @ A``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx

from fxpeft.capture import attention
from fxpeft.capture.linear_sites import WeightedSite
from fxpeft.capture.program import layer_index
from fxpeft.graph.targets import fetch
from fxpeft.names import is_fxpeft_node
from fxpeft.registry import is_adapter_parameter

PARAMETER_TYPE = "torch.nn.Parameter"


@dataclass(frozen=True)
class ParameterSite(WeightedSite):
    """The first read (``get_attr``) of a 2-d or 3-d model parameter; ``reads`` are all of its
    reads, in graph order (one, in an exported graph). ``owner`` is the path of the module
    holding it and ``name`` its name there; ``index`` is its place among the owner's own
    parameters (registration order)."""

    node: torch.fx.Node
    module_path: str
    owner: str
    name: str
    index: int
    shape: tuple[int, ...]
    reads: tuple[torch.fx.Node, ...]
    module_type: str = PARAMETER_TYPE
    module_call: bool = False
    attention: str = ""
    fan_in_fan_out = False

    @property
    def adapter_owner(self) -> str:
        """Where adapters of this parameter live: its owner, or, for a weight an attention layer
        reads (``attention``, its path), PEFT's place (``fxpeft.capture.attention``)."""
        return attention.adapter_owner(self.attention, self.owner) if self.attention else self.owner

    @property
    def delta_factor(self) -> float:
        """The multiple of its LoRA delta PEFT applies (``fxpeft.capture.attention``)."""
        return attention.delta_factor(self.attention, self.owner) if self.attention else 1.0

    @property
    def weight_target(self) -> str:
        return self.module_path

    @property
    def layer(self) -> int | None:
        return layer_index(self.module_path)

    def describe(self) -> str:
        return f"parameter {'x'.join(map(str, self.shape))}"


def _model_parameter(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.nn.Parameter | None:
    if node.op != "get_attr" or is_fxpeft_node(node) or is_adapter_parameter(node.target):
        return None
    value = fetch(gm, node.target)
    return value if isinstance(value, torch.nn.Parameter) and value.dim() in (2, 3) else None


def _site(gm: torch.fx.GraphModule, reads: list[torch.fx.Node]) -> ParameterSite:
    target = reads[0].target if reads[0].op == "get_attr" else f"{reads[0].target}.weight"
    owner, _, name = target.rpartition(".")
    own = list(gm.get_submodule(owner)._parameters)
    return ParameterSite(reads[0], target, owner, name, own.index(name),
                         tuple(fetch(gm, target).shape), tuple(reads),
                         attention=reads[0].meta.get(attention.ATTENTION_LAYER, ""))


def _linear_weight_calls(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """``weight`` target -> the ``call_module`` nodes of a ``torch.nn.Linear`` that read it."""
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and not is_fxpeft_node(node) and \
                isinstance(gm.get_submodule(node.target), torch.nn.Linear):
            calls.setdefault(f"{node.target}.weight" if node.target else "weight", []).append(node)
    return calls


def find_parameter_sites(gm: torch.fx.GraphModule) -> list[ParameterSite]:
    """Every 2-d or 3-d model parameter the graph reads, in the order of first reads.

    >>> class Scale(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.weight = torch.nn.Parameter(torch.ones(3, 2))
    ...     def forward(self, x):
    ...         return x @ self.weight
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(Scale()))
    >>> [(s.module_path, s.owner, s.name, s.shape) for s in find_parameter_sites(gm)]
    [('0.weight', '0', 'weight', (3, 2))]
    """
    reads: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if _model_parameter(gm, node) is not None:
            reads.setdefault(node.target, []).append(node)
    sites = [_site(gm, found) for found in reads.values()]
    calls = _linear_weight_calls(gm)
    sites += [replace(_site(gm, [found[0]]), reads=tuple(found), module_call=True)
              for target, found in calls.items() if target not in reads and len(found) == 1]
    return sites
