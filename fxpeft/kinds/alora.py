"""Activated LoRA (aLoRA; PEFT's ``LoraConfig(alora_invocation_tokens=[...])``).

A LoRA branch on a linear that applies only from the *last* occurrence of the invocation token
sequence on, row by row: ``y + mask * scale * B(gate * A(dropout(x)))``, where ``mask[b, t]`` is
1 for the positions at or after the start of the last occurrence of ``invocation_tokens`` in row
``b`` of ``input_ids`` and 0 elsewhere; a row without the sequence is the base model's
everywhere, as in PEFT (``calculate_alora_offsets``: no offset, no adapted token). The tokens
before the invocation compute exactly what the base model computes, so their KV cache is the
base model's.

The mask is computed in the graph from the model's ``input_ids`` (one node per site, so
``torch.compile`` and export see it), never from outside state. A decode graph
(``fxpeft.generate``) runs the prompt once and then one token per step, and its steps no longer
see the prompt: there the mask is ``cache_position >= start[b]``, ``start`` being the row's
invocation start in the KV cache, which ``fxpeft.generate`` writes before the prefill through
this kind's ``prompt_state`` capability. That is PEFT's ``generate``: offsets from the prompt,
every generated token adapted in a row that had the invocation, none in a row that had not.

aLoRA does not merge: no weight applies to some tokens and not to others (PEFT refuses too).
It adapts linears only (PEFT refuses convolutions and embeddings). Without ``input_ids``
(``inputs_embeds`` only) the adapter is off, as PEFT disables it.

>>> params = AloraParams(r=4, alpha=8, invocation_tokens=[7, 8])
>>> params.invocation_tokens, params.scale
((7, 8), 2.0)
>>> invocation_mask(torch.tensor([[7, 8, 1, 7, 8, 2], [1, 2, 3, 4, 5, 6]]), (7, 8)).int().tolist()
[[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpeft.errors import FxpeftError
from fxpeft.formats.peft_format import PeftFormat, PeftFormatError
from fxpeft.graph.state import graph_state
from fxpeft.graph.targets import place
from fxpeft.graph.gates import reroute
from fxpeft.kinds.lora import (GRAPH_FIELDS, LINEAR, LORA_FIELDS, LoraParams, adapter_input, attach_lora, casts,
                               config_to_rules, join, low_rank, record_nodes, rules_to_config)
from fxpeft.match.input_embedding import INPUT_IDS, model_input
from fxpeft.match.query import Match
from fxpeft.capture.program import Program
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.rules import checks
from fxpeft.rules.schema import RuleSet, spec

aten = torch.ops.aten
CONFIG_FIELD = "alora_invocation_tokens"
START_BUFFER = "alora_start"  # a decode graph's per-row invocation start, per adapter
NOT_FOUND = torch.iinfo(torch.long).max  # the start of a row without the invocation: never


@dataclass(frozen=True)
class AloraParams(LoraParams):
    """LoRA's params and ``invocation_tokens``, the token ids from whose last occurrence on the
    adapter applies.

    >>> AloraParams(invocation_tokens=[3]).match_kinds
    ('linear',)
    """

    kind = "alora"
    match_kinds = ("linear",)
    invocation_tokens: tuple[int, ...] | None = spec(None, checks.int_list,
                                                    "token ids that switch the adapter on")


def invocation_starts(ids: torch.Tensor, tokens: tuple[int, ...]) -> torch.Tensor:
    """Per row of ``ids`` ``[batch, tokens]``, where the last occurrence of ``tokens`` starts
    (``NOT_FOUND`` where it does not occur).

    >>> invocation_starts(torch.tensor([[5, 1, 5, 1], [2, 2, 2, 2]]), (5, 1)).tolist()[0]
    2
    """
    length = ids.shape[1]
    hits = torch.ones_like(ids, dtype=torch.bool)
    for offset, token in enumerate(tokens):  # token ``offset`` of the sequence at i + offset
        shifted = torch.nn.functional.pad(ids[:, offset:], (0, min(offset, length)), value=-1)
        hits = hits & (shifted == token)
    positions = torch.arange(length, device=ids.device).expand_as(ids)
    last = torch.where(hits, positions, -1).amax(dim=1)
    return torch.where(last >= 0, last, NOT_FOUND)


def invocation_mask(ids: torch.Tensor, tokens: tuple[int, ...]) -> torch.Tensor:
    """``[batch, tokens]``: True from the start of the last occurrence of ``tokens`` on (PEFT's
    ``calculate_alora_offsets`` and its mask)."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return positions[None, :] >= invocation_starts(ids, tokens)[:, None]


def _masked(branch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``branch`` (``[batch, tokens, out]``, or ``[batch * tokens, out]`` where the layer ran on
    flattened rows, GPT-2's ``Conv1D``) times ``mask`` ``[batch, tokens]``."""
    mask = mask.reshape(-1, 1) if branch.dim() == 2 else mask.reshape(*mask.shape, *([1] * (branch.dim() - 2)))
    return branch * mask.to(branch.dtype)


def activated(branch: torch.Tensor, ids: "torch.Tensor | None", tokens: tuple[int, ...]) -> torch.Tensor:
    """The training graph's aLoRA branch: zero before the invocation (everywhere without
    ``input_ids``, as PEFT disables aLoRA there).

    >>> activated(torch.ones(1, 3, 2), torch.tensor([[4, 9, 4]]), (9,))[0, :, 0].tolist()
    [0.0, 1.0, 1.0]
    """
    if ids is None:
        return branch * 0
    return _masked(branch, invocation_mask(ids, tokens))


def activated_in_cache(branch: torch.Tensor, cache_position: torch.Tensor,
                       start: torch.Tensor) -> torch.Tensor:
    """A decode graph's aLoRA branch: on for the cache positions from each row's ``start`` on.

    >>> activated_in_cache(torch.ones(2, 1, 1), torch.tensor([5]), torch.tensor([3, 9]))[:, 0, 0].tolist()
    [1.0, 0.0]
    """
    return _masked(branch, cache_position[None, :] >= start[:, None])


def _start_target(adapter: str) -> str:
    return f"{START_BUFFER}_{adapter}"


def _mask_node(job: SpliceInput, up: torch.fx.Node) -> torch.fx.Node:
    """The branch masked: by ``input_ids`` in a training graph, by the cache position and the
    prompt's starts in a decode graph (``prompt_state`` writes them)."""
    graph = job.gm.graph
    if graph_state(job.gm).role == "decoder":
        start = _start_target(job.adapter)
        if not hasattr(job.gm, start):
            place(job.gm, start, torch.full((1,), NOT_FOUND, dtype=torch.long))
        position = model_input(job.gm, "cache_position")
        return graph.call_function(activated_in_cache, (up, position, graph.get_attr(start)))
    return graph.call_function(activated, (up, model_input(job.gm, INPUT_IDS), job.params.invocation_tokens))


def _check(job: SpliceInput) -> None:
    path = job.site.module_path
    if job.params.invocation_tokens is None:
        raise FxpeftError(f"{path}: aLoRA needs params.invocation_tokens (the token ids that switch it on)")
    if job.params.init == "mica":
        raise FxpeftError(f"{path}: aLoRA takes no MiCA init (PEFT has no such variant)")
    if model_input(job.gm, INPUT_IDS) is None:
        raise FxpeftError(f"{path}: aLoRA finds its invocation in the model's input_ids, and this "
                          f"graph has no input_ids input")


def splice(job: SpliceInput) -> Spliced:
    """LoRA's branch at a linear, times the invocation mask, added to ``y``."""
    _check(job)
    detail, attached = attach_lora(job)
    graph, y = job.gm.graph, job.site.node
    with graph.inserting_before(y.next):
        up = low_rank(job, detail, adapter_input(job))
        scaled = graph.call_function(aten.mul.Tensor, (up, detail.scale))
        total = join(graph, y, _mask_node(job, scaled), casts(job))
    reroute(y, total)
    return Spliced(record_nodes(job, y, total, "alora", detail), attached)


def prompt_state(decoder: torch.nn.Module, adapter: str, params: Any, ids: torch.Tensor,
                 filled: int) -> None:
    """Before the prefill of ``ids`` (written at cache slots ``filled`` on): each row's
    invocation start in the cache, which the decode graph's steps compare their cache position
    with (``AdapterKind.prompt_state``)."""
    starts = invocation_starts(ids, params.invocation_tokens)
    place(decoder, _start_target(adapter), torch.where(starts == NOT_FOUND, starts, starts + filled))


# --- PEFT's LoraConfig with alora_invocation_tokens ----------------------------------------------

def _tokens(config: dict[str, Any], source: str) -> tuple[int, ...]:
    tokens = config.get(CONFIG_FIELD)
    problem = checks.int_list(tokens)
    if problem:
        raise PeftFormatError(f"{source}: {CONFIG_FIELD}: {problem}")
    return tuple(tokens)


def to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """LoRA's rules (``target_modules`` and patterns) with the invocation tokens."""
    tokens = _tokens(config, source)
    rules = config_to_rules(config, model, source, params_class=AloraParams)
    return dataclasses.replace(rules, rules=tuple(
        dataclasses.replace(rule, params=dataclasses.replace(rule.params, invocation_tokens=tokens))
        for rule in rules.rules))


def to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """LoRA's fields and the one ``alora_invocation_tokens`` PEFT's config has."""
    tokens = {m.rule.params.invocation_tokens for m in matches}
    if len(tokens) > 1:
        raise PeftFormatError(f"PEFT's LoraConfig has one {CONFIG_FIELD}; these rules use {sorted(tokens)}")
    return {**rules_to_config(matches, program), CONFIG_FIELD: list(tokens.pop())}


KIND = AdapterKind(
    name="alora", params=AloraParams, splice=splice,
    merge="aLoRA applies only from the invocation tokens on, which no merged weight can "
          "express (PEFT does not merge aLoRA either)",
    components=LINEAR.names,
    peft=PeftFormat("LORA", to_config, to_rules, LORA_FIELDS | {CONFIG_FIELD},
                    selector={"use_dora": False, CONFIG_FIELD: True}, graph_fields=GRAPH_FIELDS),
    prompt_state=prompt_state, layer_replication=True)
