"""``fxpeft.generate``: greedy or sampled decoding of an adapted causal LM with a KV cache.

The prompt runs once through the decode graph (``fxpeft.generation.decode_graph``), which fills a static KV
cache; each new token then costs one single-token step. Batches may be left-padded: the 2-D
``attention_mask`` masks the padding and positions count only real tokens, as transformers'
``generate`` does, so greedy tokens equal HF/PEFT ``generate`` on the same adapter. Sampling
applies temperature, then top-k, then top-p (HF's order and defaults: 1.0, 50, 1.0) and draws
with ``torch.multinomial`` from ``generator`` (or the global generator, so a fixed
``torch.manual_seed`` reproduces a run).

Generation always runs the graph in eval mode (no dropout) and without gradients, whatever
``gm.training`` says; the active adapters (``set_adapter``, ``disable_adapters``) apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fxpeft.generation.decode_graph import (decoder_for, fill_cache, filled_tokens, set_prompt_state,
                                            virtual_tokens, without_kv_cache)
from fxpeft.capture.positions import default_positions
from fxpeft.errors import FxpeftError
from fxpeft.graph.gates import active_adapters
from fxpeft.graph.state import graph_state
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft.runtime import input_checks


def _token_ids(value: "int | Sequence[int] | None", device: torch.device) -> "torch.Tensor | None":
    if value is None:
        return None
    ids = [value] if isinstance(value, int) else list(value)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _check(input_ids: torch.Tensor, attention_mask: "torch.Tensor | None", max_new_tokens: int,
           temperature: float, top_k: "int | None", top_p: float) -> torch.Tensor:
    """The attention mask (ones when not given); a one-line ``FxpeftError`` for bad input."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise FxpeftError(f"fxpeft.generate: input_ids must be an integer tensor [batch, tokens], "
                          f"got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise FxpeftError(f"fxpeft.generate: attention_mask has shape {tuple(attention_mask.shape)}, "
                          f"input_ids {tuple(input_ids.shape)}; they must match")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise FxpeftError(f"fxpeft.generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature <= 0 or not 0 < top_p <= 1 or (top_k is not None and top_k < 0):
        raise FxpeftError(f"fxpeft.generate: need temperature > 0, 0 < top_p <= 1 and top_k >= 0; "
                          f"got {temperature}, {top_p}, {top_k}")
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()


def _in_front(gm: AdaptedModule) -> int:
    """Cache slots in front of the prompt: virtual tokens (prompt tuning) and filled entries
    (prefix tuning)."""
    return virtual_tokens(gm) + filled_tokens(gm)


def _check_prompt(gm: AdaptedModule, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """The prompt against the graph's capture (``fxpeft.runtime.input_checks``): not empty, ids
    in the vocabulary, and room for the new tokens in learned positions (GPT-2)."""
    spec = input_checks.input_spec(gm)
    if spec is None:
        return
    input_checks.check_ids(gm, spec, "input_ids", input_ids)
    total = input_ids.shape[1] + max_new_tokens + _in_front(gm)
    input_checks.check_length(spec, f"the prompt plus max_new_tokens={max_new_tokens}", total)


def warp(scores: torch.Tensor, temperature: float = 1.0, top_k: "int | None" = 50,
         top_p: float = 1.0) -> torch.Tensor:
    """Sampling scores: divided by ``temperature``; all but the ``top_k`` best, and the least
    likely tokens outside the ``top_p`` probability mass (always keeping the best), set to -inf.

    >>> warp(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), top_k=2).tolist()
    [[-inf, 3.0, 2.0, -inf]]
    >>> warp(torch.tensor([[0.0, 9.0, 0.0]]), top_k=None, top_p=0.5).tolist()
    [[-inf, 9.0, -inf]]
    """
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        dropped = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        dropped[..., -1] = False  # the most likely token always stays
        scores = scores.masked_fill(dropped.scatter(-1, order, dropped), float("-inf"))
    return scores


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: "int | None",
                top_p: float, generator: "torch.Generator | None") -> torch.Tensor:
    scores = logits.float()
    if not do_sample:
        return scores.argmax(-1)
    probs = warp(scores, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (padding gets 1), as transformers.

    >>> _positions(torch.tensor([[0, 1, 1]])).tolist()
    [[1, 0, 1]]
    """
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


Numbering = Callable[[torch.Tensor], torch.Tensor]


def numbering(gm: AdaptedModule, lengthened: bool) -> Numbering:
    """How the prefill numbers the positions of a ``[batch, slots]`` cache mask: as
    transformers' ``generate`` does (``_positions``: real tokens counted), unless virtual tokens
    are in front (``lengthened``, a kind with the ``lengthens`` capability): PEFT's ``generate``
    then drops ``position_ids``, so the model numbers them itself, as the graph's forward does
    for ``position_ids=None`` (``capture_info.positions``; GPT-2 and Llama count every slot,
    padding included). Forward and generate then agree on left-padded rows of models with
    absolute positions.

    >>> numbering(None, False)(torch.tensor([[0, 1, 1]])).tolist()
    [[1, 0, 1]]
    """
    info = getattr(gm, "capture_info", None)
    if not lengthened or info is None or info.positions is None:
        return _positions
    return lambda mask: default_positions(info.positions, mask, mask, info.config)


def _check_one_device(gm: torch.nn.Module) -> None:
    """Generation keeps one KV cache on one device: a graph split over devices is refused.

    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1).to("meta"))
    >>> _check_one_device(net)
    Traceback (most recent call last):
    ...
    fxpeft.errors.FxpeftError: fxpeft.generate: the graph's parameters are on several devices (cpu, meta); generation runs on one: move the graph there first, e.g. gm.to("cpu")
    """
    devices = sorted({str(p.device) for p in gm.parameters()})
    if len(devices) > 1:
        raise FxpeftError(f"fxpeft.generate: the graph's parameters are on several devices "
                          f"({', '.join(devices)}); generation runs on one: move the graph there "
                          f'first, e.g. gm.to("{devices[0]}")')


@torch.no_grad()
def generate(gm: AdaptedModule, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
             do_sample: bool = False, temperature: float = 1.0, top_k: "int | None" = 50,
             top_p: float = 1.0, eos_token_id: "int | Sequence[int] | None" = None,
             attention_mask: "torch.Tensor | None" = None, pad_token_id: "int | None" = None,
             generator: "torch.Generator | None" = None, streamer: Any = None,
             stopping_criteria: "Sequence[Callable] | None" = None) -> torch.Tensor:
    """Continue each row of ``input_ids`` by up to ``max_new_tokens`` tokens with a KV cache;
    returns ``[batch, prompt + new]`` token ids, as ``model.generate`` does.

    Greedy unless ``do_sample``. ``eos_token_id`` (default: the model config's; ``[]`` for none)
    ends a row, which is then filled with ``pad_token_id`` (default: the config's, else the first
    eos id) until every row has ended. Left-pad batches and pass their ``attention_mask``.
    As transformers: a ``streamer`` gets ``put(prompt)``, then ``put(tokens)`` per step, then
    ``end()``; each of ``stopping_criteria`` is called ``(ids so far, logits)`` after each step
    and ends the rows where it says True.

    >>> import torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                          num_attention_heads=2, vocab_size=32))
    >>> gm = fxpeft.rewrite(model, "lora_qv.toml")
    >>> ids = torch.tensor([[0, 5, 7], [3, 4, 6]]); mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    >>> fxpeft.generate(gm, ids, max_new_tokens=4, attention_mask=mask, eos_token_id=[]).shape
    torch.Size([2, 7])
    """
    mask = _check(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    _check_prompt(gm, input_ids, max_new_tokens)
    _check_one_device(gm)
    config = gm.capture_info.config if gm.capture_info is not None else None
    uncached = without_kv_cache(gm)
    decoder = None if uncached else decoder_for(
        gm, input_ids.shape[0], input_ids.shape[1] + max_new_tokens + _in_front(gm))
    virtual = _virtual_ids(gm, decoder)
    device = next((decoder or gm).parameters()).device
    ids, mask = input_ids.to(device), mask.to(device)
    eos = _token_ids(getattr(config, "eos_token_id", None) if eos_token_id is None else eos_token_id, device)
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (int(eos[0]) if eos is not None else 0)
    ending = Ending(eos, pad, list(stopping_criteria or ()), streamer, len(virtual))
    choose = lambda logits: _next_token(logits, do_sample, temperature, top_k, top_p, generator)  # noqa: E731
    ending.begin(ids)
    try:
        if decoder is None:
            return _decode_without_cache(gm, ids, mask, max_new_tokens, ending, choose)
        prefix = torch.tensor(virtual, dtype=ids.dtype, device=device).expand(ids.shape[0], -1)
        prompt, filled = torch.cat([prefix, ids], 1), fill_cache(decoder, gm)
        set_prompt_state(decoder, gm, prompt, filled)
        out = _decode(decoder, prompt, torch.cat([torch.ones_like(prefix), mask], 1),
                      max_new_tokens, ending, choose, filled, numbering(gm, bool(virtual)))
        return out[:, len(virtual):]  # as PEFT's generate: the virtual tokens are not returned
    finally:
        ending.end()


@dataclass
class Ending:
    """How rows end: at an ``eos`` token or where a stopping criterion says so; ended rows get
    ``pad``. It also feeds the ``streamer``. ``skip``: virtual tokens in front of the rows,
    which criteria and the streamer do not see."""

    eos: "torch.Tensor | None"
    pad: int
    criteria: list[Callable]
    streamer: Any = None
    skip: int = 0

    def begin(self, ids: torch.Tensor) -> None:
        if self.streamer is not None:
            self.streamer.put(ids.cpu())

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()

    def step(self, token: torch.Tensor, running: torch.Tensor, rows: Callable[[], torch.Tensor],
             logits: torch.Tensor) -> torch.Tensor:
        """``token`` for the rows still running (pad for the others); updates ``running``.
        ``rows()``: the ids so far, ``token`` included (built only when a criterion needs it)."""
        if self.eos is not None or self.criteria:
            token = torch.where(running, token, self.pad)
        if self.streamer is not None:
            self.streamer.put(token.cpu())
        if self.eos is not None:
            running &= ~torch.isin(token, self.eos)
        if self.criteria:
            ids = rows(token)[:, self.skip:]
            for criterion in self.criteria:
                running &= ~torch.as_tensor(criterion(ids, logits), device=running.device).bool()
        return token


def _virtual_ids(gm: AdaptedModule, decoder: "torch.nn.Module | None") -> list[int]:
    """The virtual token ids the prefill puts in front: those of the active adapter that
    lengthens the input (prompt tuning), if any."""
    if decoder is None:
        return []
    active = set(active_adapters(gm))
    return [i for adapter, ids in graph_state(decoder).virtual_tokens.items() if adapter in active for i in ids]


def _decode_without_cache(gm: AdaptedModule, ids: torch.Tensor, mask: torch.Tensor,
                          max_new_tokens: int, ending: Ending,
                          choose: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Each token from a full forward of the training graph (in eval mode): for adapters the
    cached decode graph cannot hold (``decode_graph.without_kv_cache``): several prompt-tuning
    adapters."""
    was_training = gm.training
    gm.eval()
    running = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    try:
        for _ in range(max_new_tokens):
            logits = gm(input_ids=ids, attention_mask=mask).logits[:, -1]
            token = ending.step(choose(logits), running, lambda t: torch.cat([ids, t[:, None]], 1), logits)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            if not running.any():
                break
    finally:
        gm.train(was_training)
    return ids


def _decode(decoder: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
            ending: Ending, choose: Callable[[torch.Tensor], torch.Tensor], filled: int = 0,
            number: Numbering = _positions) -> torch.Tensor:
    """The prefill, then one cached step per token; rows stop at ``eos`` and are padded.
    ``filled``: cache slots already written (``fill_cache``), which every token attends to and
    positions count, as transformers' ``generate`` with a filled cache does. ``number``: the
    prefill's positions from the cache mask (``numbering``); each step adds one."""
    batch, prompt = ids.shape
    cache_mask = mask.new_zeros(batch, graph_state(decoder).cache_length)
    cache_mask[:, :filled] = 1
    cache_mask[:, filled:filled + prompt] = mask
    positions = number(cache_mask[:, :filled + prompt])[:, filled:]
    end = filled + prompt  # the prompt's end in the cache
    logits = decoder(ids, cache_mask, positions, torch.arange(filled, end, device=ids.device))
    running = torch.ones(batch, dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = ending.step(choose(logits[:, -1]), running,
                            lambda t: torch.cat([ids, *new, t[:, None]], 1), logits[:, -1])
        new.append(token[:, None])
        if step == max_new_tokens - 1 or not running.any():
            break
        cache_mask[:, end + step] = 1
        positions = positions[:, -1:] + 1
        logits = decoder(token[:, None], cache_mask, positions,
                         torch.tensor([end + step], device=ids.device))
    return torch.cat([ids, *new], dim=1)

