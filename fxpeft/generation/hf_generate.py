"""``gm.generate(**tokenizer_output, ...)``: transformers' ``generate`` call, with its
``GenerationConfig`` semantics, over fxpeft's KV-cached decode loop (``fxpeft.generate``).

The configuration is resolved as transformers resolves it: the ``generation_config`` passed (or
the model's own), updated by the keyword arguments, with transformers' global defaults for what
is still unset (``max_length=20``, ``top_k=50``, ...). Greedy search and multinomial sampling run,
with temperature, top-k and top-p applied in transformers' order, so a seeded sampling run draws
the same tokens as transformers' own. ``max_new_tokens`` / ``max_length``, ``eos_token_id``,
``pad_token_id``, ``stop_strings`` (with ``tokenizer=``), ``stopping_criteria`` and ``streamer``
act as in transformers. Any other setting that differs from transformers' default (beam search,
repetition penalties, ``num_return_sequences``, ``return_dict_in_generate``, ...) is a one-line
error naming it, never silently ignored.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fxpeft.errors import FxpeftError
from fxpeft.generation.decoding import generate
from fxpeft.registry import provide
from fxpeft.runtime.adapted_module import AdaptedModule

# The settings the decode loop honours; the others must keep transformers' default value.
HONOURED = frozenset({"do_sample", "temperature", "top_k", "top_p", "max_length", "max_new_tokens",
                      "eos_token_id", "pad_token_id", "stop_strings"})
# Settings that change nothing for greedy search or sampling from one causal LM with a cache:
# token ids the loop does not use, cache and compile choices, beam-only and assistant-only
# knobs (beam search itself is refused through num_beams), and outputs that only a
# return_dict_in_generate=True result would hold (refused through that flag).
NO_EFFECT = frozenset({"bos_token_id", "decoder_start_token_id", "transformers_version", "use_cache",
                       "cache_implementation", "cache_config", "compile_config", "disable_compile",
                       "max_cache_len", "early_stopping", "length_penalty", "num_assistant_tokens",
                       "num_assistant_tokens_schedule", "assistant_confidence_threshold",
                       "assistant_lookbehind", "target_lookbehind", "is_assistant", "assistant_early_exit",
                       "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                       "low_memory", "prefill_chunk_size", "continuous_batching_config"})
# Model inputs a tokenizer returns besides input_ids and attention_mask.
TOKENIZER_EXTRAS = ("token_type_ids",)


def resolved_config(gm: AdaptedModule, generation_config: Any, kwargs: dict[str, Any]) -> Any:
    """The ``GenerationConfig`` transformers would use: ``generation_config`` (default: the
    model's own, copied), updated by ``kwargs`` (an unknown keyword is an error), then its
    global defaults for what is unset.

    >>> from transformers import GenerationConfig
    >>> class Graph: generation_config = GenerationConfig(max_new_tokens=5)
    >>> config = resolved_config(Graph(), None, {"do_sample": True})
    >>> config.max_new_tokens, config.do_sample, config.top_k
    (5, True, 50)
    """
    from transformers import GenerationConfig
    config = copy.deepcopy(generation_config if generation_config is not None else gm.generation_config)
    if config is None:
        config = GenerationConfig()
    try:
        unknown = config.update(**kwargs)
    except ValueError as err:  # transformers validates the combination
        raise FxpeftError(f"generate: {(str(err).splitlines() or [type(err).__name__])[0]}") from None
    if unknown:
        raise FxpeftError(f"generate: unknown keyword {sorted(unknown)[0]!r} (not a model input or "
                          f"a GenerationConfig field)")
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    return config


def refuse_unsupported(config: Any) -> None:
    """A one-line error for the first setting of ``config`` that the decode loop cannot honour
    and that differs from transformers' default.

    >>> from transformers import GenerationConfig
    >>> refuse_unsupported(GenerationConfig(num_beams=4))
    Traceback (most recent call last):
    ...
    fxpeft.errors.FxpeftError: generate: num_beams=4 is not supported (beam search and other strategies); fxpeft decodes greedily or by sampling (do_sample, temperature, top_k, top_p, max_new_tokens, max_length, eos_token_id, pad_token_id, stop_strings, streamer, stopping_criteria)
    """
    from transformers import GenerationConfig
    defaults = GenerationConfig._get_default_generation_params()
    for name, value in sorted(vars(config).items()):
        if name.startswith("_") or name in HONOURED or name in NO_EFFECT:
            continue
        if value != defaults.get(name) and not (value is None or value == {} or value == []):
            raise FxpeftError(f"generate: {name}={value!r} is not supported (beam search and other "
                              f"strategies); fxpeft decodes greedily or by sampling (do_sample, "
                              f"temperature, top_k, top_p, max_new_tokens, max_length, eos_token_id, "
                              f"pad_token_id, stop_strings, streamer, stopping_criteria)")


def _new_tokens(config: Any, prompt: int) -> int:
    """``max_new_tokens``, or what ``max_length`` leaves after the prompt (as transformers)."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    left = config.max_length - prompt
    if left < 1:
        raise FxpeftError(f"generate: max_length={config.max_length} leaves no room after a "
                          f"{prompt}-token prompt; set max_new_tokens")
    return left


def _criteria(config: Any, stopping_criteria: Any, tokenizer: Any) -> list:
    found = list(stopping_criteria or ())
    if config.stop_strings is not None:
        if tokenizer is None:
            raise FxpeftError("generate: stop_strings needs tokenizer= (as transformers' generate)")
        from transformers import StopStringCriteria
        found.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
    return found


def _token_id_list(value: "int | list[int] | torch.Tensor | None") -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    return [value] if isinstance(value, int) else list(value)


@provide("generate")
def generate_hf(gm: AdaptedModule, input_ids: "torch.Tensor | None" = None, *,
                attention_mask: "torch.Tensor | None" = None, generation_config: Any = None,
                streamer: Any = None, stopping_criteria: Any = None, logits_processor: Any = None,
                tokenizer: Any = None, inputs: "torch.Tensor | None" = None,
                **kwargs: Any) -> torch.Tensor:
    """``gm.generate(**tokenizer(texts, padding=True, return_tensors="pt"), max_new_tokens=8)``:
    ``[batch, prompt + new]`` token ids, as transformers returns them.

    >>> import torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                          num_attention_heads=2, vocab_size=32))
    >>> gm = fxpeft.rewrite(model, "lora_qv.toml")
    >>> ids = torch.tensor([[0, 5, 7]]); mask = torch.tensor([[0, 1, 1]])
    >>> torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4),
    ...             model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4))
    True
    """
    ids = input_ids if input_ids is not None else inputs
    if ids is None:
        raise FxpeftError("generate: input_ids are needed (pass **tokenizer(texts, return_tensors='pt'))")
    extras = {name: kwargs.pop(name) for name in TOKENIZER_EXTRAS if name in kwargs}
    if any(value is not None and bool(torch.as_tensor(value).any()) for value in extras.values()):
        raise FxpeftError(f"generate: {next(iter(extras))} other than zeros is not supported by the "
                          f"decode graph")
    if logits_processor:
        raise FxpeftError("generate: logits_processor is not supported (the decode loop applies "
                          "temperature, top_k and top_p itself)")
    config = resolved_config(gm, generation_config, kwargs)
    refuse_unsupported(config)
    eos = _token_id_list(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return generate(gm, ids, _new_tokens(config, ids.shape[-1]), do_sample=bool(config.do_sample),
                    temperature=config.temperature, top_k=config.top_k or None, top_p=config.top_p,
                    eos_token_id=eos, attention_mask=attention_mask, pad_token_id=pad,
                    streamer=streamer, stopping_criteria=_criteria(config, stopping_criteria, tokenizer))
