"""transformers models at call time: the input adapter that maps a caller's keywords onto the
captured graph's inputs, the output adapter that rebuilds the HF output class, and the losses.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from fxpeft.capture.positions import default_positions


# Keyword arguments callers (the HF Trainer, generate) may pass that a captured graph can ignore.
IGNORED_KWARGS = frozenset({"num_items_in_batch", "return_dict", "use_cache", "return_loss"})


# What padding-free collators (TRL's, transformers' DataCollatorWithFlattening) add beside
# ``position_ids`` for varlen kernels: the same sequence boundaries, which the graph reads from
# ``position_ids``; accepted only with them.
PACKING_KWARGS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})


# Flags whose True the captured graph cannot honour (it returns what capture returned): an error.
UNCAPTURED_FLAGS = ("output_attentions", "output_hidden_states")


def _shift_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    shifted = labels.new_zeros(labels.shape)
    shifted[..., 1:] = labels[..., :-1].clone()
    shifted[..., 0] = start
    return shifted.masked_fill(shifted == -100, pad)


def check_sample_names(names: Any, batch: int, training: bool) -> "list[str] | torch.Tensor | None":
    """PEFT's ``adapter_names=`` (one adapter per sample: names, or the index tensor the graph's
    pre-hook made of them, ``fxpeft.graph.gates.index_sample_names``), checked; None when not given.

    >>> check_sample_names(["sql", "__base__"], 2, training=False)
    ['sql', '__base__']
    >>> check_sample_names(torch.tensor([0, -1]), 2, training=False)
    tensor([ 0, -1])
    >>> check_sample_names(["sql"], 2, training=False)
    Traceback (most recent call last):
    ...
    ValueError: adapter_names has 1 names for a batch of 2; give one per sample
    """
    if names is None:
        return None
    tensor = isinstance(names, torch.Tensor)
    if tensor and (names.dim() != 1 or names.is_floating_point()):
        raise ValueError(f"adapter_names as a tensor holds one adapter index per sample; got shape "
                         f"{tuple(names.shape)}, {names.dtype}")
    if not tensor and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"adapter_names must be a list of adapter names, one per sample; got {names!r}")
    if len(names) != batch:
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch}; give one "
                         f"per sample")
    if training:  # as PEFT: mixed batches are for inference
        raise ValueError("adapter_names= (mixed adapter batches) is inference only; call .eval() first")
    return names if tensor else list(names)


class InputAdapter(torch.nn.Module):
    """First node of an HF graph: fills optional inputs and rejects unknown keywords.

    ``attention_mask=None`` becomes all ones, ``token_type_ids=None`` zeros, ``position_ids=None``
    what the model computes itself (``fxpeft.capture.positions``; a batch of one row is expanded
    to the batch); for encoder-decoders, ``decoder_input_ids=None`` is ``labels`` shifted right, as transformers does. The last output is the checked
    per-sample ``adapter_names`` (an index tensor, or None), for the graph's gates (``fxpeft.graph.gates``).
    """

    def __init__(self, names: tuple[str, ...], model_class: str, config: Any, max_seq: int | None,
                 positions: str | None = None):
        super().__init__()
        self.names, self.model_class, self.max_seq = names, model_class, max_seq
        self.positions, self.config = positions, config
        self.start = getattr(config, "decoder_start_token_id", None)
        self.pad = getattr(config, "pad_token_id", None)
        self.has_adapters = True  # a merged graph's copy says False: names would pick nothing

    def _check_kwargs(self, kwargs: dict[str, Any], positions: Any) -> None:
        accepted = IGNORED_KWARGS | set(UNCAPTURED_FLAGS) | {"adapter_names"}
        if positions is not None:
            accepted = accepted | PACKING_KWARGS
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(f"{self.model_class} graph got unexpected inputs {unknown}; it was "
                            f"captured with {list(self.names)} (pass example_inputs= with them to "
                            f"capture them)")
        asked = [flag for flag in UNCAPTURED_FLAGS if kwargs.get(flag)]
        if asked:
            raise ValueError(f"{asked[0]}=True: the {self.model_class} graph returns only what "
                             f"capture returned (no hidden states or attention weights); run the "
                             f"base model for them")

    def _decoder_input_ids(self, labels: Any) -> torch.Tensor:
        """``labels`` shifted right, as transformers does; it needs both special tokens."""
        if labels is None:
            raise ValueError(f"{self.model_class} needs decoder_input_ids or labels")
        if self.start is None or self.pad is None:
            raise ValueError(f"{self.model_class}: the config has no "
                             f"{'decoder_start_token_id' if self.start is None else 'pad_token_id'}"
                             f", so decoder_input_ids cannot be built from labels; pass them")
        return _shift_right(labels, self.start, self.pad)

    def _position_ids(self, given: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if given is None:
            return default_positions(self.positions, ids, mask, self.config)
        return given.expand(ids.shape[0], -1) if given.shape[0] == 1 else given

    def forward(self, inputs: dict[str, Any], labels: Any, kwargs: dict[str, Any]) -> tuple:
        self._check_kwargs(kwargs, inputs.get("position_ids"))
        ids = inputs["input_ids"]
        if self.max_seq is not None and ids.shape[-1] > self.max_seq:
            raise ValueError(f"sequence length {ids.shape[-1]} exceeds the {self.max_seq} "
                             f"positions {self.model_class} supports")
        filled = dict(inputs)
        if filled.get("attention_mask") is None:
            filled["attention_mask"] = torch.ones_like(ids)
        if "position_ids" in filled:
            filled["position_ids"] = self._position_ids(filled["position_ids"], ids, filled["attention_mask"])
        if "token_type_ids" in filled and filled["token_type_ids"] is None:
            filled["token_type_ids"] = torch.zeros_like(ids)  # transformers' default: segment 0
        if "decoder_input_ids" in filled and filled["decoder_input_ids"] is None:
            filled["decoder_input_ids"] = self._decoder_input_ids(labels)
        if kwargs.get("adapter_names") is not None and not self.has_adapters:
            raise TypeError(f"this {self.model_class} graph has no adapters (it was merged); "
                            f"adapter_names= has nothing to choose from")
        names = check_sample_names(kwargs.get("adapter_names"), ids.shape[0], self.training)
        return (*(filled[n] for n in self.names), names)


def _causal_loss(out: Any, labels: torch.Tensor, config: Any, kwargs: dict) -> torch.Tensor:
    from transformers.loss.loss_utils import ForCausalLMLoss
    return ForCausalLMLoss(out.logits, labels, vocab_size=out.logits.shape[-1],
                           num_items_in_batch=kwargs.get("num_items_in_batch"))


def _token_loss(out: Any, labels: torch.Tensor, config: Any, kwargs: dict) -> torch.Tensor:
    from transformers.loss.loss_utils import ForMaskedLMLoss
    return ForMaskedLMLoss(out.logits, labels, vocab_size=out.logits.shape[-1],
                           num_items_in_batch=kwargs.get("num_items_in_batch"))


def _sequence_loss(out: Any, labels: torch.Tensor, config: Any, kwargs: dict) -> torch.Tensor:
    from transformers.loss.loss_utils import ForSequenceClassificationLoss
    return ForSequenceClassificationLoss(labels, out.logits, config)


# Output class name prefix -> how transformers computes that head's loss.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "CausalLMOutput": _causal_loss,
    "Seq2SeqLMOutput": _token_loss,
    "MaskedLMOutput": _token_loss,
    "TokenClassifierOutput": _token_loss,
    "SequenceClassifierOutput": _sequence_loss,
}


def loss_for(output_class: str) -> Callable[..., torch.Tensor] | None:
    return next((fn for prefix, fn in LOSSES.items() if output_class.startswith(prefix)), None)


class OutputAdapter(torch.nn.Module):
    """Last node of an HF graph: rebuilds the model's output dataclass and adds ``loss``."""

    def __init__(self, spec: pytree.TreeSpec, config: Any, model_class: str) -> None:
        super().__init__()
        self.spec, self.config, self.model_class = spec, config, model_class
        self.output_class = getattr(spec.type, "__name__", str(spec.type))
        self.loss = loss_for(self.output_class)
        # transformers' name for a loss that shifts labels: the HF Trainer reads ``loss_type`` to
        # count a batch's target tokens (``num_items_in_batch``) as ``labels[..., 1:]``.
        self.loss_type = "ForCausalLM" if self.loss is _causal_loss else None

    def forward(self, labels: Any, kwargs: dict[str, Any], *flat: Any, loss: Any = None) -> Any:
        """``loss``: computed already (a fused LM-head loss), so not from the logits."""
        out = pytree.tree_unflatten(list(flat), self.spec)
        if loss is not None:
            return type(out)(loss=loss, **out)
        if labels is None:
            return out
        if self.loss is None:
            raise ValueError(f"fxpeft cannot compute a loss for {self.model_class} "
                             f"({self.output_class}); call without labels and use .logits")
        return type(out)(loss=self.loss(out, labels, self.config, kwargs), **out)
