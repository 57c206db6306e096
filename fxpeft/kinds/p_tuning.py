"""P-tuning (PEFT's ``PromptEncoderConfig``, ``P_TUNING``): virtual tokens in front of the input
embeddings, as prompt tuning's, whose rows come out of a trained prompt encoder.

The encoder holds a table ``E`` of ``rows`` embeddings (``num_virtual_tokens`` times
``transformer_submodules``) and a head: PEFT's MLP (``Linear(dim, h) ReLU Linear(h, h) ReLU
Linear(h, dim)``) or its LSTM (a bidirectional ``LSTM(dim, h, encoder_num_layers,
dropout=encoder_dropout)`` then ``Linear(2h, 2h) ReLU Linear(2h, dim)``). The prompt is
``head(E)`` (PEFT's ``encoder(embedding(arange(rows)))``), computed once per forward by one
``call_module`` node of the graph, then placed exactly as prompt tuning places its prompt
(``fxpeft.kinds.prompt_tuning.prepend_prompt``: ids, mask and causal labels lengthened; the
gate switches the tokens on and off; mixed batches refused; no merge).

Files, as PEFT's: PEFT saves the *encoded* prompt as its one key ``prompt_embeddings`` and
drops the encoder; the saved config says ``inference_mode = true``, and PEFT loads such a
folder as a bare table whose rows are the prompt (``PromptEncoder`` without a head). So
``fxpeft.save`` writes the encoder's output (in eval mode, fp32), and ``fxpeft.load`` builds
that table-only encoder (its splice runs inside ``registry.values_from_file``) and fills it:
equal logits both ways. ``trainable=True`` then trains the prompt rows directly (PEFT's
``is_trainable=True`` puts a newly initialised head over them, which changes the outputs).
Resuming a training graph from such a folder (``restore``) is refused: the encoder is not in it.

Adapter ``"default"`` adds the root submodule ``prompt_encoder`` (others
``prompt_encoder_<name>``), fp32, whose parameters are named as PEFT's (``embedding.weight``,
``mlp_head.0.weight``, ``lstm_head.weight_ih_l0``), so its state dict loads into PEFT's
``PromptEncoder`` and back. The LSTM runs as the functional ``torch.lstm`` over the module's
own parameters (``torch.compile`` cannot trace an ``nn.LSTM`` module); its dropout follows the
graph's train/eval mode (``fxpeft.graph.dropout.TrainingFlag``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpeft.errors import RuleError
from fxpeft.formats.peft_format import PeftFormat, PeftFormatError
from fxpeft.graph.dropout import training_flag_target
from fxpeft.graph.params import attach_component
from fxpeft.graph.records import record
from fxpeft.graph.targets import fetch
from fxpeft.capture.program import Program
from fxpeft.kinds.prompt_tuning import (PROMPT, SHAPE_FIELDS, one_or_two, place_virtual,
                                        prepend_prompt, prompt_shape, shape_config, splice_virtual)
from fxpeft.match.query import Match
from fxpeft.registry import AdapterKind, Lengthens, SpliceInput, Spliced, initialising
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, spec

ENCODER = "prompt_encoder"
MLP_LAYERS = 2  # PEFT's MLP head always has two hidden layers (it ignores encoder_num_layers)


@dataclass(frozen=True)
class PTuningParams(Params):
    """P-tuning: ``num_virtual_tokens`` virtual tokens from a prompt encoder (``encoder``:
    ``"mlp"`` or ``"lstm"``, PEFT's ``encoder_reparameterization_type``) of width
    ``encoder_hidden_size``. ``encoder_num_layers`` and ``encoder_dropout`` shape the LSTM;
    PEFT's MLP has exactly two hidden layers and no dropout, so other values are refused.

    >>> PTuningParams(encoder="lstm", encoder_num_layers=1).encoder_hidden_size
    128
    >>> PTuningParams(encoder_num_layers=3)
    Traceback (most recent call last):
    ...
    fxpeft.errors.RuleError: <rules>: params.encoder_num_layers: the MLP encoder has PEFT's 2 hidden layers; encoder_num_layers = 3 applies to encoder = "lstm"
    """

    kind = "p_tuning"
    match_kinds = ("input_embedding",)
    num_virtual_tokens: int = spec(20, checks.positive_int, "virtual tokens before the input")
    encoder: str = spec("mlp", checks.one_of("mlp", "lstm"), "the prompt encoder's head")
    encoder_hidden_size: int = spec(128, checks.positive_int, "the encoder's hidden width")
    encoder_num_layers: int = spec(MLP_LAYERS, checks.positive_int, "LSTM layers")
    encoder_dropout: float = spec(0.0, checks.probability, "dropout between LSTM layers")
    transformer_submodules: int = spec(1, one_or_two, "PEFT's num_transformer_submodules")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder == "mlp" and self.encoder_num_layers != MLP_LAYERS:
            raise RuleError(f"the MLP encoder has PEFT's {MLP_LAYERS} hidden layers; encoder_num_layers "
                            f"= {self.encoder_num_layers} applies to encoder = \"lstm\"",
                            key="params.encoder_num_layers")
        if self.encoder == "mlp" and self.encoder_dropout:
            raise RuleError(f"the MLP encoder has no dropout (as PEFT's); encoder_dropout = "
                            f"{self.encoder_dropout} applies to encoder = \"lstm\"",
                            key="params.encoder_dropout")

    @property
    def rows(self) -> int:
        """Rows of the encoder's table and of the stored prompt (PEFT's ``total_virtual_tokens``)."""
        return self.num_virtual_tokens * self.transformer_submodules


# --- the encoder -----------------------------------------------------------------------------

class LstmHead(torch.nn.Module):
    """A bidirectional, batch-first LSTM's parameters, named and initialised as ``nn.LSTM``'s;
    ``forward`` runs the functional ``torch.lstm`` on them (``torch.compile`` traces that, not
    the module).

    >>> head = LstmHead(4, 3, layers=2, dropout=0.0)
    >>> head(torch.zeros(1, 5, 4), training=False).shape
    torch.Size([1, 5, 6])
    """

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        lstm = torch.nn.LSTM(dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True,
                             batch_first=True)
        self.hidden, self.layers, self.dropout = hidden, layers, dropout
        self.names = list(lstm._flat_weights_names)  # the order torch.lstm takes them in
        for name in self.names:
            self.register_parameter(name, getattr(lstm, name))

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        zeros = x.new_zeros(2 * self.layers, x.shape[0], self.hidden)
        weights = [getattr(self, name) for name in self.names]
        return torch.lstm(x, (zeros, zeros), weights, True, self.layers, self.dropout, training,
                          True, True)[0]


class PromptEncoder(torch.nn.Module):
    """PEFT's ``PromptEncoder``: ``embedding`` (``rows`` x ``dim``) through its head; without
    ``params`` (PEFT's inference form, what a saved folder holds) the table is the prompt.

    >>> encoder = PromptEncoder(3, 8, PTuningParams(encoder_hidden_size=4))
    >>> encoder(training=False).shape, PromptEncoder(3, 8, None)(training=False).shape
    (torch.Size([3, 8]), torch.Size([3, 8]))
    """

    def __init__(self, rows: int, dim: int, params: PTuningParams | None) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(rows, dim)
        self.encoder = None if params is None else params.encoder
        hidden = params.encoder_hidden_size if params is not None else 0
        if self.encoder == "lstm":
            self.lstm_head = LstmHead(dim, hidden, params.encoder_num_layers, params.encoder_dropout)
            self.mlp_head = _mlp(2 * hidden, 2 * hidden, dim, hidden_layers=1)
        elif self.encoder == "mlp":
            self.mlp_head = _mlp(dim, hidden, dim, hidden_layers=MLP_LAYERS)

    def forward(self, training: bool) -> torch.Tensor:
        """The prompt, ``(rows, dim)``: once per forward, for every sample."""
        x = self.embedding.weight  # embedding(arange(rows)), without the lookup
        if self.encoder is None:
            return x
        if self.encoder == "lstm":
            x = self.lstm_head(x[None], training)[0]
        return self.mlp_head(x)


def _mlp(dim: int, hidden: int, out: int, hidden_layers: int) -> torch.nn.Sequential:
    """``Linear ReLU`` per hidden layer, then the output ``Linear`` (PEFT's ``mlp_head``)."""
    layers: list[torch.nn.Module] = []
    for width in [dim] + [hidden] * (hidden_layers - 1):
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(hidden, out))


# --- the splice ------------------------------------------------------------------------------

def _encode(gm: torch.fx.GraphModule, graph: torch.fx.Graph, target: str) -> list[torch.fx.Node]:
    """The graph's flag, then the encoder's one call: the prompt (the encoder's LSTM dropout
    follows the graph's mode)."""
    flag = graph.call_module(training_flag_target(gm), ())
    encoded = graph.call_module(target, (flag,))
    encoded.prepend(flag)  # created after the same node, so in reverse order
    return [flag, encoded]


def splice(job: SpliceInput) -> Spliced:
    """Attach the encoder at the graph's root (PEFT's inference form, a bare table, while
    ``fxpeft.load`` fills it from a file), and put its prompt in front as prompt tuning does."""
    gm, site, params = job.gm, job.site, job.params

    def attach() -> str:
        weight = gm.get_parameter(site.weight_target)
        encoder = PromptEncoder(params.rows, site.embedding_dim, params if initialising() else None)
        return attach_component(gm, "", ENCODER, job.adapter, encoder.to(weight.device))
    return prepend_prompt(job, "p_tuning", "p-tuning", attach,
                          lambda graph, target: _encode(gm, graph, target))


def place_encoded(rows: torch.Tensor, ids: torch.Tensor, vocab: int,
                  encoder: PromptEncoder) -> torch.Tensor:
    """In a decode graph: the encoder's prompt where ids are virtual (``place_virtual``). Only
    the prefill has virtual ids, so the encoder runs once per ``generate``, not per token.

    >>> place_encoded(torch.zeros(1, 2, 8), torch.tensor([[1, 2]]), 4, None).abs().sum().item()
    0.0
    """
    if not bool((ids >= vocab).any()):
        return rows
    return place_virtual(rows, ids, vocab, encoder(training=False))


def decode_splice(decoder: torch.fx.GraphModule, adapter: str, rec: Any) -> range:
    """The encoder's prompt into a decode graph, as prompt tuning's (``splice_virtual``)."""
    return splice_virtual(decoder, adapter, rec, "p_tuning", place_encoded)


# --- PEFT's PromptEncoderConfig and its files -------------------------------------------------

PTUNING_FIELDS = SHAPE_FIELDS | {"encoder_reparameterization_type", "encoder_hidden_size",
                                 "encoder_num_layers", "encoder_dropout"}


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """``PromptEncoderConfig`` fields."""
    config = shape_config(matches, program, "p-tuning")
    params = matches[0].rule.params
    return {**config, "encoder_reparameterization_type": params.encoder.upper(),
            "encoder_hidden_size": params.encoder_hidden_size,
            "encoder_num_layers": params.encoder_num_layers,
            "encoder_dropout": params.encoder_dropout}


def _encoder_fields(config: dict[str, Any], source: str) -> dict[str, Any]:
    """PEFT's encoder fields as params; for the MLP, PEFT ignores layers and dropout."""
    kind = config.get("encoder_reparameterization_type") or "MLP"
    if kind not in ("MLP", "LSTM"):
        raise PeftFormatError(f"{source}: encoder_reparameterization_type = {kind!r}; PEFT's "
                              f"are MLP, LSTM")
    hidden = config.get("encoder_hidden_size")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise PeftFormatError(f"{source}: encoder_hidden_size must be a positive integer, got {hidden!r}")
    fields = {"encoder": kind.lower(), "encoder_hidden_size": hidden}
    if kind == "LSTM":
        fields.update(encoder_num_layers=config.get("encoder_num_layers", MLP_LAYERS),
                      encoder_dropout=config.get("encoder_dropout") or 0.0)
    return fields


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """The encoder's prompt at the model's input embedding, with PEFT's length, rows and head."""
    length, submodules = prompt_shape(config, model, source)
    params = PTuningParams(num_virtual_tokens=length, transformer_submodules=submodules,
                           **_encoder_fields(config, source))
    rule = Rule(name="peft p-tuning", match="input_embedding", params=params)
    return RuleSet((rule,), source=source)


def _encoder_of(gm: torch.nn.Module, adapter: str) -> PromptEncoder:
    (target,) = record(gm, adapter).attached
    return fetch(gm, target)


def save_state(gm: torch.nn.Module, adapter: str, config: dict[str, Any],
               tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What PEFT saves: the encoded prompt (eval mode, fp32) as ``prompt_embeddings``, no encoder."""
    with torch.no_grad():
        prompt = _encoder_of(gm, adapter)(training=False)
    return config, {PROMPT: prompt.detach().to("cpu", copy=True).contiguous()}


def load_state(gm: torch.nn.Module, adapter: str, config: dict[str, Any],
               tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The file's encoded prompt as the rows of the table-only encoder ``fxpeft.load`` builds."""
    if set(tensors) != {PROMPT}:
        raise PeftFormatError(f"{source}: a P_TUNING adapter file holds one tensor, {PROMPT} (the "
                              f"encoded prompt); this one holds {sorted(tensors)[:3]}")
    if _encoder_of(gm, adapter).encoder is not None:
        raise PeftFormatError(f"{source}: a P_TUNING folder holds the encoded prompt, not the "
                              f"encoder (PEFT drops it when saving), so adapter {adapter!r}'s "
                              f"encoder cannot be restored from it; fxpeft.load(model, folder) "
                              f"builds the saved prompt")
    return {f"{ENCODER}.embedding.weight": tensors[PROMPT]}


KIND = AdapterKind(
    name="p_tuning", params=PTuningParams, splice=splice,
    merge="p-tuning adds input positions (virtual tokens from its prompt encoder), which no "
          "weight can hold",
    components=(ENCODER,),
    peft=PeftFormat("P_TUNING", rules_to_config, config_to_rules, PTUNING_FIELDS, key_prefix="",
                    save_state=save_state, load_state=load_state),
    lengthens=Lengthens(tokens=lambda params: params.num_virtual_tokens, decode_splice=decode_splice))
