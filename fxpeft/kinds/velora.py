"""VeLoRA (PEFT's ``velora_config``): LoRA whose A projection, in training, keeps only a
compressed copy of its input for the backward pass.

The forward and the merge are plain LoRA's. In training (train mode, gradients on) the down
projection is one graph node, ``project``, that calls ``CompressedDown``, an autograd function:
it splits each input row into ``groups`` sub-tokens of ``ceil(in / groups)`` features
(zero-padded), keeps per sub-token only its dot product with a unit vector ``embed``, and its
backward rebuilds the input as ``compressed * embed * scale`` for A's weight gradient (the input
gradient is LoRA's own). In eval, or without gradients, the node is a plain linear.

``embed`` is a buffer of the adapted layer, ``lora_velora_embed`` (``lora_velora_embed_<name>``
for another adapter), in the adapter dtype (fp32 on a half base, as PEFT casts it), saved under
PEFT's key; it never trains. Its ``init``: ``random``, a fixed random unit vector;
``batch_average``, before every training forward, the normalised mean of the batch's sub-tokens
(after the adapter dropout); ``batch_average_once``, that from the first training batch after the
adapter was built or loaded, then fixed (PEFT does not save that the vector was set, so a loaded
adapter sets it again; nor does fxpeft). Linear layers only, without DoRA, MiCA, BD-LoRA or
``target_parameters``, as in PEFT.

>>> import fxpeft
>>> from fxpeft.rules import LoraParams, Rule
>>> net = torch.nn.Sequential(torch.nn.Linear(6, 4))
>>> gm = fxpeft.rewrite(net, Rule(params=LoraParams(velora="batch_average_once", velora_groups=2)))
>>> gm.get_buffer("0.lora_velora_embed").shape
torch.Size([3])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx

from fxpeft.errors import FxpeftError
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.graph.dropout import training_flag_target
from fxpeft.names import adapter_component

CONFIG_FIELD = "velora_config"
INITS = ("batch_average", "batch_average_once", "random")


def group_size(in_features: int, groups: int) -> int:
    """Features per sub-token: ``ceil(in_features / groups)``.

    >>> group_size(10, 3)
    4
    """
    return math.ceil(in_features / groups)


def sub_tokens(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x``'s rows as ``(rows, groups, group_size)``, the last group zero-padded.

    >>> sub_tokens(torch.ones(2, 3), 2).tolist()
    [[[1.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]]
    """
    size = group_size(x.shape[-1], groups)
    padded = torch.nn.functional.pad(x, (0, groups * size - x.shape[-1]))
    return padded.reshape(-1, groups, size)


def unit(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` in fp32 scaled to norm 1; all ones (normalised) where it is all zeros.
    Branch-free, so a compiled graph does not break on the test.

    >>> unit(torch.tensor([3.0, 4.0])).tolist(), unit(torch.zeros(4)).tolist()
    ([0.6000000238418579, 0.800000011920929], [0.5, 0.5, 0.5, 0.5])
    """
    vector = vector.float()
    norm = torch.linalg.vector_norm(vector)
    ones = torch.ones_like(vector)
    zero = norm == 0
    return torch.where(zero, ones, vector) / torch.where(zero, torch.linalg.vector_norm(ones), norm)


def batch_vector(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The unit mean of ``x``'s sub-tokens (``batch_average``'s vector).

    >>> batch_vector(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), 2).tolist()
    [1.0, 0.0]
    """
    rows = sub_tokens(x.detach(), groups)
    return unit(rows.reshape(-1, rows.shape[-1]).mean(dim=0))


class CompressedDown(torch.autograd.Function):
    """``x @ W.T``, whose backward gives ``W`` the gradient of the input rebuilt from its
    compression onto ``embed`` (times ``scale``), and ``x`` its exact gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, embed: torch.Tensor,
                groups: int, scale: float) -> torch.Tensor:
        compressed = sub_tokens(x, groups) @ embed.to(x.dtype)  # (rows, groups)
        ctx.save_for_backward(compressed, weight, embed)
        ctx.shape, ctx.scale = x.shape, scale
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        compressed, weight, embed = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_rows @ weight.to(grad.dtype)).reshape(ctx.shape).to(compressed.dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = compressed.to(grad.dtype).unsqueeze(-1) * embed.to(grad.dtype)
            rebuilt = rebuilt.flatten(1)[:, :ctx.shape[-1]] * ctx.scale
            grad_w = (grad_rows.T @ rebuilt).to(weight.dtype)
        return grad_x, grad_w, None, None, None


def _vector_for_step(x: torch.Tensor, embed: torch.Tensor, is_set: torch.Tensor,
                     groups: int, init: str) -> torch.Tensor:
    """The vector this training step compresses with; ``embed`` and ``is_set`` take it."""
    if init == "random":
        return embed
    with torch.no_grad():
        vector = batch_vector(x, groups).to(embed.dtype)
        if init == "batch_average_once":
            vector = torch.where(is_set, embed, vector)
            is_set.fill_(True)
        embed.copy_(vector)
    return vector


def project(x: torch.Tensor, weight: torch.Tensor, embed: torch.Tensor, is_set: torch.Tensor,
            training: bool, groups: int, scale: float, init: str) -> torch.Tensor:
    """VeLoRA's A projection: in training (``training`` and gradients on) ``CompressedDown``
    after the step's update of ``embed``; otherwise the plain ``x @ W.T``.

    >>> x, w = torch.ones(2, 4), torch.ones(3, 4)
    >>> project(x, w, torch.zeros(2), torch.tensor(False), False, 2, 1.0, "random").tolist()
    [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
    """
    if not (training and torch.is_grad_enabled()):
        return torch.nn.functional.linear(x, weight)
    vector = _vector_for_step(x, embed, is_set, groups, init)
    return CompressedDown.apply(x, weight, vector, groups, scale)


# --- the splice ------------------------------------------------------------------------------

def check_site(site: Any, params: Any, linear: bool) -> None:
    """Refuse, by name, what PEFT's VeLoRA does not have."""
    where = f"{site.module_path}: VeLoRA"
    if not linear:
        raise FxpeftError(f"{where} applies to linear layers only (as in PEFT; not to an "
                          f"embedding, a convolution or target_parameters)")
    for flag, name in ((params.kind != "lora", params.kind), (params.init == "mica", "MiCA"),
                       (params.block_diagonal != "none", "BD-LoRA"), (params.kasa, "KaSA")):
        if flag:
            raise FxpeftError(f"{where} does not combine with {name} (as in PEFT)")


def attach(gm: torch.nn.Module, site: Any, params: Any, adapter: str, dtype: torch.dtype,
           components: tuple[str, str]) -> list[str]:
    """The layer's ``embed`` in ``dtype`` (a random unit vector for ``random``, zeros otherwise,
    as PEFT) and its not-saved ``set`` flag, named by the kind's ``components``; kept if a
    shared layer has them."""
    owner, device = gm.get_submodule(site.module_path), site.weight_like(gm).device
    embed_name, set_name = (adapter_component(c, adapter) for c in components)
    if embed_name not in owner._buffers:
        size = group_size(site.in_features, params.velora_groups)
        embed = torch.zeros(size, dtype=dtype, device=device)
        if params.velora == "random":
            embed = unit(torch.randn(size, dtype=dtype, device=device)).to(dtype)
        owner.register_buffer(embed_name, embed)
        owner.register_buffer(set_name, torch.tensor(False, device=device), persistent=False)
    return [f"{site.module_path}.{embed_name}", f"{site.module_path}.{set_name}"]


def down(gm: torch.fx.GraphModule, x: torch.fx.Node, weight: torch.fx.Node, targets: list[str],
         params: Any) -> torch.fx.Node:
    """The ``project`` node: A's projection of ``x`` by ``weight``, reading the graph's mode."""
    graph = gm.graph
    embed, is_set = (graph.get_attr(t) for t in targets)
    training = graph.call_module(training_flag_target(gm), ())
    return graph.call_function(project, (x, weight, embed, is_set, training, params.velora_groups,
                                         params.velora_scale, params.velora))


# --- PEFT's velora_config ----------------------------------------------------------------------

def params_fields(config: dict[str, Any], source: str, is_lora: bool) -> dict[str, Any]:
    """LoRA params fields from PEFT's ``velora_config`` (``{}`` without it).

    >>> params_fields({"velora_config": {"num_groups": 2, "init_type": "random"}}, "c", True)
    {'velora': 'random', 'velora_groups': 2, 'velora_scale': 1.0}
    """
    raw = config.get(CONFIG_FIELD)
    if not raw:
        return {}
    if not is_lora:
        raise PeftFormatError(f"{source}: {CONFIG_FIELD} with another LoRA variant (DoRA, aLoRA) "
                              f"is not a combination PEFT supports (nor fxpeft)")
    if not isinstance(raw, dict):
        raise PeftFormatError(f"{source}: {CONFIG_FIELD} must be a mapping, got {raw!r}")
    fields = {"velora": raw.get("init_type", "batch_average"),
              "velora_groups": raw.get("num_groups", 64), "velora_scale": raw.get("scale", 1.0)}
    if fields["velora"] not in INITS:
        raise PeftFormatError(f"{source}: {CONFIG_FIELD}.init_type must be one of {list(INITS)}, "
                              f"got {fields['velora']!r}")
    for key, field in (("num_groups", "velora_groups"), ("scale", "velora_scale")):
        value = fields[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
                key == "num_groups" and not isinstance(value, int)):
            raise PeftFormatError(f"{source}: {CONFIG_FIELD}.{key} must be positive, got {value!r}")
    return fields


def config_fields(params: dict[str, Any]) -> dict[str, Any]:
    """``velora_config`` for LoRA params by module path: one for all, as PEFT has one.

    >>> config_fields({})
    {'velora_config': None}
    """
    found = {(p.velora, p.velora_groups, p.velora_scale) if getattr(p, "velora", "none") != "none"
             else None for p in params.values()}
    if len(found) > 1:
        raise PeftFormatError(f"PEFT's LoraConfig has one {CONFIG_FIELD}; these rules use VeLoRA "
                              f"on some layers only, or with different settings")
    value = found.pop() if found else None
    if value is None:
        return {CONFIG_FIELD: None}
    return {CONFIG_FIELD: {"init_type": value[0], "num_groups": value[1], "scale": value[2]}}
