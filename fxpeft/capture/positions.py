"""``position_ids`` as a graph input: what a model computes when the caller gives none, and
whether it keeps packed sequences apart.

transformers models differ in both. Llama-like decoders, GPT-2 and BERT count ``0..L-1``; OPT
counts from the attention mask; RoBERTa from the tokens that are not padding. Llama-like models
and BERT build a block-diagonal mask from restarting ``position_ids`` when no ``attention_mask``
is given (a padding-free packed batch, ``masking_utils``); OPT does not. Capture asks the eager
model both questions on a tiny example, so the graph does what the model does, never a guess.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Optional

import torch


def _counting(ids: torch.Tensor, mask: torch.Tensor, config: Any) -> torch.Tensor:
    return torch.arange(ids.shape[-1], device=ids.device).expand(ids.shape[0], -1)


def _from_mask(ids: torch.Tensor, mask: torch.Tensor, config: Any) -> torch.Tensor:
    return (torch.cumsum(mask, dim=1) * mask - 1).long()


def _from_tokens(ids: torch.Tensor, mask: torch.Tensor, config: Any) -> torch.Tensor:
    pad = getattr(config, "pad_token_id", None)
    real = ids.ne(-1 if pad is None else pad).long()
    return torch.cumsum(real, dim=1) * real + (0 if pad is None else pad)


# The defaults transformers models compute for ``position_ids=None``, tried in this order.
DEFAULTS: dict[str, Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]] = {
    "counting": _counting, "attention_mask": _from_mask, "tokens": _from_tokens}


def default_positions(name: str, ids: torch.Tensor, mask: torch.Tensor, config: Any) -> torch.Tensor:
    """The ``position_ids`` the model computes itself when given none (``DEFAULTS[name]``).

    >>> default_positions("attention_mask", torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1]]), None)
    tensor([[-1,  0,  1,  2]])
    """
    return DEFAULTS[name](ids, mask, config)


def takes_positions(model: torch.nn.Module) -> bool:
    """Whether the model's ``forward`` takes ``position_ids`` (by signature)."""
    return "position_ids" in inspect.signature(model.forward).parameters


def _run(model: torch.nn.Module, **inputs: Any) -> Optional[torch.Tensor]:
    """The backbone's last hidden state (one row per token, where a classifier's logits pool
    them), as capture sees the model: no KV cache (with one, transformers never packs). Not
    ``output_hidden_states``, which leaves transformers' recording hooks on the layers."""
    backbone = getattr(model, "base_model", model)
    if "use_cache" in inspect.signature(backbone.forward).parameters:
        inputs["use_cache"] = False
    with torch.no_grad():
        out = backbone(**inputs)
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if isinstance(hidden, torch.Tensor) else None


def _probe_inputs(model: torch.nn.Module, example: dict[str, Any]) -> dict[str, Any]:
    """The example's first row twice, the second left-padded by one token (a mask-counted or
    token-counted default then differs from plain counting)."""
    ids = example["input_ids"][:1].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        ids[1, 0] = pad
    extra = {k: v[:1].repeat(2, *([1] * (v.dim() - 1))) for k, v in example.items()
             if k not in ("input_ids", "attention_mask", "position_ids") and isinstance(v, torch.Tensor)}
    return {"input_ids": ids, "attention_mask": mask, **extra}


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return a is not None and b is not None and a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


def _which_default(model: torch.nn.Module, inputs: dict[str, Any]) -> Optional[str]:
    own = _run(model, **inputs)
    for name, fill in DEFAULTS.items():
        positions = fill(inputs["input_ids"], inputs["attention_mask"], model.config)
        try:
            theirs = _run(model, **inputs, position_ids=positions)
        except (IndexError, RuntimeError):  # positions this model's embedding has no row for
            continue
        if _same(own, theirs):
            return name
    return None


def _keeps_packed_apart(model: torch.nn.Module, inputs: dict[str, Any]) -> bool:
    """Whether, with no attention mask, tokens after a restart of ``position_ids`` ignore those
    before it: changing the first sequence leaves the second one's outputs as they were. Both
    versions run as the two rows of one batch (rows never mix: one forward, not two)."""
    ids = inputs["input_ids"][:1]
    half = ids.shape[-1] // 2
    positions = torch.cat([torch.arange(half), torch.arange(ids.shape[-1] - half)])[None].to(ids.device)
    other = ids.clone()
    other[:, :half] = (other[:, :half] + 1) % max(int(getattr(model.config, "vocab_size", 2) or 2), 2)
    extra = {k: v[:1].repeat(2, *([1] * (v.dim() - 1))) for k, v in inputs.items()
             if k not in ("input_ids", "attention_mask")}
    both = _run(model, input_ids=torch.cat([ids, other]), position_ids=positions.repeat(2, 1), **extra)
    return both is not None and torch.allclose(both[0, half:], both[1, half:], atol=1e-5)


def probe(model: torch.nn.Module, example: dict[str, Any]) -> tuple[Optional[str], bool]:
    """``(default, packs)``: the name in ``DEFAULTS`` of what ``model`` computes for
    ``position_ids=None`` (None: none of them, so the graph does not take ``position_ids``), and
    whether it keeps packed sequences apart when no attention mask is given. Runs the model
    (eval mode, no grad) a few times on a two-row example; the model's mode is restored.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                          num_attention_heads=2, vocab_size=32))
    >>> probe(model, {"input_ids": torch.randint(0, 32, (2, 8))})
    ('counting', True)
    """
    with _evaluating(model), _one_thread():
        inputs = _probe_inputs(model, example)
        default = _which_default(model, inputs)
        return default, default is not None and _keeps_packed_apart(model, inputs)


def probe_default(model: torch.nn.Module, example: dict[str, Any]) -> Optional[str]:
    """``probe``'s first answer alone (what ``model`` computes for ``position_ids=None``), for a
    graph captured without ``position_ids``: it computes that default inside, and
    ``fxpeft.generate`` numbers a prefill's positions as it does when tokens are put in front.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    >>> probe_default(model, {"input_ids": torch.randint(0, 32, (2, 8))})
    'counting'
    """
    with _evaluating(model), _one_thread():
        return _which_default(model, _probe_inputs(model, example))


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside; its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch's intra-op threads cut to one inside (restored after): the probe's matmuls are a
    few rows each, and waking a thread pool for each cost ten times the work on a busy 2-core
    machine (0.59 s against 0.055 s for the probe of SmolLM2's two-layer copy). The setting is
    torch's, process-wide: torch work on another Python thread meanwhile runs on one thread too.

    >>> with _one_thread():
    ...     torch.get_num_threads()
    1
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
