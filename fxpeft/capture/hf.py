"""What capture knows about transformers models: whether a model is one, its example inputs
and their dynamic shapes. (``position_ids``: ``fxpeft.capture.positions``; call-time input and output adapters: ``fxpeft.runtime.hf_io``.)"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from fxpeft.capture.positions import takes_positions
from fxpeft.capture.program import HfFace


def is_hf_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _input_device(model: torch.nn.Module) -> torch.device:
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters(), torch.zeros(())).device


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Inputs for capture, synthesised from the model's config, on the device of its input
    embeddings (a split model's first device), since export bakes the devices it sees.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                   num_attention_heads=2, vocab_size=32)
    >>> sorted(example_inputs(LlamaForCausalLM(cfg)))
    ['attention_mask', 'input_ids', 'position_ids']
    """
    config = model.config
    vocab = getattr(config, "vocab_size", None) or 2
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(_input_device(model))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.clone()
    if _takes_token_types(model):  # BERT-like: what its tokenizer returns, optional at call time
        inputs["token_type_ids"] = torch.zeros_like(ids)
    if takes_positions(model):  # packed batches: capture keeps it if the model's default is known
        inputs["position_ids"] = torch.arange(seq, device=ids.device).repeat(batch, 1)
    return inputs


def _takes_token_types(model: torch.nn.Module) -> bool:
    return "token_type_ids" in inspect.signature(model.forward).parameters and \
        (getattr(model.config, "type_vocab_size", 0) or 0) > 0


def dynamic_shapes(inputs: dict[str, Any]) -> dict[str, Any]:
    """Dynamic batch and sequence dimensions for every 2-D (or wider) tensor input."""
    dynamic = torch.export.Dim.DYNAMIC
    return {name: ({0: dynamic, 1: dynamic} if isinstance(t, torch.Tensor) and t.dim() >= 2 else None)
            for name, t in inputs.items()}




def face_of(model: torch.nn.Module) -> HfFace:
    """The HF face of ``model``: its own ``generation_config``, ``main_input_name``, the paths of
    its input and output embeddings, and whether its class can generate.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                          num_attention_heads=2, vocab_size=32))
    >>> face = face_of(model)
    >>> face.input_embeddings, face.output_embeddings, face.can_generate, face.generation_config is model.generation_config
    ('model.embed_tokens', 'lm_head', True, True)
    """
    paths = {id(module): name for name, module in model.named_modules()}
    embeddings = [getattr(model, f"get_{side}_embeddings", lambda: None)() for side in ("input", "output")]
    can_generate = getattr(type(model), "can_generate", lambda: False)()
    return HfFace(getattr(model, "generation_config", None), getattr(model, "main_input_name", "input_ids"),
                  *(paths.get(id(module)) if module is not None else None for module in embeddings),
                  bool(can_generate) and not getattr(model.config, "is_encoder_decoder", False))
