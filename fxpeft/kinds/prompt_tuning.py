"""Prompt tuning (PEFT's ``PromptTuningConfig``): learned virtual-token embeddings in front of
the input embeddings.

With ``P`` the learned prompt ``(num_virtual_tokens, hidden)`` and ``L`` its length, the splice
at the embedding of ``input_ids`` (the encoder's, for an encoder-decoder) makes the graph
compute PEFT's forward::

    embeds         = cat(P, embed(input_ids))          # (batch, L + seq, hidden)
    attention_mask = cat(ones(batch, L), attention_mask)
    labels         = cat(full(batch, L, -100), labels)  # causal LMs; seq2seq labels are decoder-side

Every size the captured graph derives from ``input_ids`` (the causal mask, the positions
``0 .. L + seq - 1``, GPT-2's view of the ids, reshapes) must count the virtual tokens, so the
first node puts ``L`` placeholder ids (0) in front of ``input_ids`` for all its readers; the
rows the lookup gives them are then replaced by the prompt at the embedding module's output
(after Gemma's scaling, as PEFT's prompts skip it). The splice refuses a model that reads
``input_ids`` for anything but sizes and the lookup. The logits, as PEFT's, cover ``L + seq``
positions. Each prompt adapter writes its rows at its own offset, the difference between the
embeddings' length and that of its own lengthened ids, so several active prompt adapters
stack, in the order they were added; PEFT has one active prompt.

Switching the adapter off removes the tokens, so its gate is not multiplied in: one node
reads the adapter's on/off state as a Python bool (``gate_flag``: the gates module's mirror of
the open gates, not the gate tensor), and each of the four nodes (ids, mask, embeddings,
labels) acts only while it is True and passes its input through unchanged when it is False,
so an off adapter runs exactly the base graph. These four are the removable nodes (each
bypasses to its input), so strip and ``delete_adapter`` remove the tokens too. As the sequence
length depends on the state, mixed batches (``adapter_names=``) are refused; under
``torch.compile`` the bool is a guarded Python value, so the graph compiles whole
(``fullgraph=True``) and the first switch to the other state compiles once, later ones hit the
cache. Merge is impossible: a prompt is no change of a weight.

Adapter ``"default"`` adds the root parameter ``prompt_embeddings`` (others
``prompt_embeddings_<name>``), saved as PEFT's single key ``prompt_embeddings``. It is fp32, as
PEFT's, and cast to the embeddings' dtype where it joins them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch
from fxpeft.match.input_embedding import (INPUT_IDS, InputEmbeddingSite, find_input_embeddings,
                                          id_readers, input_adapter, model_input)
from fxpeft.errors import PassError, RuleError
from fxpeft.graph.gates import gate_flag
from fxpeft.registry import AdapterKind, Lengthens, SpliceInput, Spliced, initialising
from fxpeft.match.query import Match
from fxpeft.names import ADAPTER_META, INPUTS_MODULE, OUTPUT_MODULE, AdapterNode, is_fxpeft_node
from fxpeft.formats.peft_format import PeftFormat, PeftFormatError
from fxpeft.capture.program import Program
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, spec

aten = torch.ops.aten
PROMPT = "prompt_embeddings"
IGNORE_INDEX = -100  # transformers' loss skips these label positions
MASK, DECODER_INPUTS = "attention_mask", ("decoder_input_ids", "decoder_attention_mask")
# Output classes whose labels PEFT pads (causal LMs) or leaves alone (seq2seq: decoder labels).
PADDED_LABELS, PLAIN_LABELS = ("CausalLMOutput",), ("Seq2SeqLMOutput",)


def _token_ids(value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return f"expected a list of token ids (non-negative integers), got {value!r}"


def one_or_two(value: Any) -> str | None:
    return None if value in (1, 2) and not isinstance(value, bool) else f"expected 1 or 2, got {value!r}"


def _optional_text(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {value!r}"


@dataclass(frozen=True)
class PromptTuningParams(Params):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings before the input embeddings.

    ``init``: ``"random"`` (standard normal, as PEFT's ``RANDOM``), ``"sample_vocab"`` (rows of
    the embedding matrix at random token ids) or ``"text"`` (the embeddings of ``init_ids``, or
    of ``init_text`` tokenized by the local tokenizer at ``tokenizer``; repeated or cut to
    length). ``transformer_submodules = 2`` (PEFT's default for seq2seq) stores a second block
    of rows that PEFT keeps but never uses, so the saved tensor has PEFT's shape.

    >>> PromptTuningParams(num_virtual_tokens=8, init="text", init_ids=[5, 6]).init_ids
    (5, 6)
    >>> PromptTuningParams(init="text")
    Traceback (most recent call last):
    ...
    fxpeft.errors.RuleError: <rules>: params.init: init = "text" needs init_ids, or init_text and tokenizer
    """

    kind = "prompt_tuning"
    match_kinds = ("input_embedding",)
    num_virtual_tokens: int = spec(20, checks.positive_int, "virtual tokens before the input")
    init: str = spec("random", checks.one_of("random", "sample_vocab", "text"), "initialisation")
    init_text: str = spec("", _optional_text, "text whose tokens initialise the prompt")
    tokenizer: str = spec("", _optional_text, "local tokenizer folder for init_text")
    init_ids: tuple[int, ...] = spec((), _token_ids, "token ids that initialise the prompt")
    transformer_submodules: int = spec(1, one_or_two, "PEFT's num_transformer_submodules")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init == "text" and not (self.init_ids or (self.init_text and self.tokenizer)):
            raise RuleError('init = "text" needs init_ids, or init_text and tokenizer', key="params.init")
        if self.init != "text" and (self.init_ids or self.init_text or self.tokenizer):
            raise RuleError(f'init_ids, init_text and tokenizer apply to init = "text", not '
                            f'"{self.init}"', key="params.init")

    @property
    def rows(self) -> int:
        """Rows of the stored prompt (PEFT's ``total_virtual_tokens``)."""
        return self.num_virtual_tokens * self.transformer_submodules


# --- the nodes: each prepends while the adapter is on, and passes through when it is off -----

def prepend_ids(ids: torch.Tensor, length: int, on: bool, limit: int | None) -> torch.Tensor:
    """``length`` placeholder ids (0) before ``ids`` while the adapter is on, for every reader of
    ``input_ids``: sizes come out right, and the prompt replaces the rows the lookup gives them.

    >>> prepend_ids(torch.tensor([[7, 8]]), 2, True, None).tolist()
    [[0, 0, 7, 8]]
    """
    if not on:
        return ids
    if limit is not None and ids.shape[1] + length > limit:
        raise ValueError(f"sequence length {ids.shape[1]} plus {length} virtual tokens exceeds "
                         f"the {limit} positions the model supports")
    return torch.cat((ids.new_zeros(ids.shape[0], length), ids), 1)


def prepend_mask(mask: torch.Tensor, length: int, on: bool) -> torch.Tensor:
    """Ones (attended) for the virtual tokens, in the mask's dtype.

    >>> prepend_mask(torch.tensor([[1, 0]]), 1, False).tolist()
    [[1, 0]]
    """
    return torch.cat((mask.new_ones(mask.shape[0], length), mask), 1) if on else mask


def prepend_labels(labels: torch.Tensor | None, length: int, on: bool) -> torch.Tensor | None:
    """``-100`` (no loss) at the virtual tokens; no labels stay None.

    >>> prepend_labels(torch.tensor([[3]]), 2, True).tolist()
    [[-100, -100, 3]]
    """
    if labels is None or not on:
        return labels
    return torch.cat((labels.new_full((labels.shape[0], length), IGNORE_INDEX), labels), 1)


def place_prompt(embeds: torch.Tensor, prompt: torch.Tensor, ids: torch.Tensor, length: int,
                 on: bool, sample_names: list[str] | None = None) -> torch.Tensor:
    """The first ``length`` prompt rows, cast to the embeddings' dtype, in place of the rows of
    this adapter's placeholder ids, which end where ``ids`` (its lengthened ids) begin. Per-sample
    adapter names are refused: samples would differ in length.

    >>> place_prompt(torch.zeros(1, 4, 2), torch.ones(3, 2), torch.zeros(1, 4), 2, True)[0, :, 0].tolist()
    [1.0, 1.0, 0.0, 0.0]
    """
    if not on:
        return embeds
    if sample_names is not None:
        raise ValueError("a prompt-tuning or p-tuning adapter is active: its virtual tokens lengthen every "
                         "sample, so adapters cannot be mixed per sample; call without adapter_names=")
    start = embeds.shape[1] - ids.shape[1]  # rows other prompt adapters put in front of ours
    rows = prompt[:length].to(embeds.dtype).expand(embeds.shape[0], -1, -1)
    return torch.cat((embeds[:, :start], rows, embeds[:, start + length:]), 1)


# --- the initial prompt ---------------------------------------------------------------------

def _text_ids(params: PromptTuningParams) -> list[int]:
    """``init_ids``, or ``init_text`` through the local tokenizer (never downloaded)."""
    if params.init_ids:
        return list(params.init_ids)
    from transformers import AutoTokenizer  # only "text" init needs it
    try:
        tokenizer = AutoTokenizer.from_pretrained(params.tokenizer, local_files_only=True)
    except (OSError, ValueError) as err:
        raise PassError(f"prompt tuning: cannot load the tokenizer {params.tokenizer!r} from local "
                        f"files: {str(err).splitlines()[0][:200]}; give init_ids instead") from None
    ids = list(tokenizer(params.init_text)["input_ids"])
    if not ids:
        raise PassError(f"prompt tuning: init_text {params.init_text!r} has no tokens")
    return ids


def embedded(gm: torch.fx.GraphModule, site: InputEmbeddingSite, ids: torch.Tensor) -> torch.Tensor:
    """What the embedding module returns for the token ``ids`` (1-D): the lookup's rows through
    the module's own ops after it (Gemma's scale), evaluated from the graph, as PEFT's init
    calls the module.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from fxpeft.capture.export import capture
    >>> from fxpeft.match.input_embedding import find_input_embeddings
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> program = capture(model); site = find_input_embeddings(program.graph_module)[0]
    >>> rows = embedded(program.graph_module, site, torch.tensor([3, 5]))
    >>> torch.equal(rows, model.get_input_embeddings().weight[[3, 5]])
    True
    """
    table = gm.get_parameter(site.weight_target).detach()
    values: dict[torch.fx.Node, Any] = {site.node: table[ids][None]}

    def value(node: torch.fx.Node) -> Any:
        if node not in values:
            if node.op == "get_attr":
                values[node] = fetch(gm, node.target)
            elif node.op == "call_function":
                values[node] = node.target(*torch.fx.node.map_arg(node.args, value),
                                           **torch.fx.node.map_arg(node.kwargs, value))
            else:
                raise PassError(f"{site.module_path}: the embedding module reads {node.name} "
                                f"({node.op}); its output for the init tokens cannot be computed")
        return values[node]

    with torch.no_grad():
        return value(site.output)[0]


def _initial_prompt(gm: torch.fx.GraphModule, site: InputEmbeddingSite,
                   params: PromptTuningParams) -> torch.Tensor:
    """The starting prompt, fp32 ``(rows, dim)``: standard normal, or what the embedding module
    gives for sampled token ids or for the init text's ids (repeated, then cut to length);
    zeros while ``fxpeft.load`` builds the adapter, which then fills it from the file."""
    rows, (vocab, dim) = params.rows, (site.num_embeddings, site.embedding_dim)
    device = gm.get_parameter(site.weight_target).device
    if not initialising():  # fxpeft.load fills it from the file: no tokenizer needed
        return torch.zeros(rows, dim, device=device)
    if params.init == "random":
        return torch.empty(rows, dim, device=device).normal_()
    if params.init == "sample_vocab":
        ids = torch.randint(0, vocab, (rows,), device=device)
    else:
        text = _text_ids(params)
        if max(text) >= vocab:
            raise PassError(f"prompt tuning: init token id {max(text)} is outside the "
                            f"vocabulary of {vocab}")
        ids = torch.tensor((text * math.ceil(rows / len(text)))[:rows], device=device)
    return embedded(gm, site, ids).float()


# --- the splice ------------------------------------------------------------------------------

def _output_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    return next(iter(gm.graph.find_nodes(op="call_module", target=OUTPUT_MODULE)), None)


def _pads_labels(gm: torch.fx.GraphModule, site: InputEmbeddingSite, what: str) -> bool:
    """Whether labels get ``-100`` in front (causal LMs) or not (seq2seq); other heads are
    refused: their labels or pooling do not follow the longer sequence."""
    output = _output_node(gm)
    name = gm.get_submodule(OUTPUT_MODULE).output_class if output is not None else "a plain graph"
    if input_adapter(gm.graph) is None or not name.startswith(PADDED_LABELS + PLAIN_LABELS):
        raise PassError(f"{site.module_path}: {what} supports causal and seq2seq LMs "
                        f"captured from transformers models, not {name}")
    return name.startswith(PADDED_LABELS)


def _check_inputs(gm: torch.fx.GraphModule, site: InputEmbeddingSite, ids: torch.fx.Node,
                  what: str) -> None:
    """Every input must be one the splice lengthens (or a decoder input), and ``input_ids``
    may feed only sizes and the lookup (the placeholder ids must never count as tokens)."""
    known = (INPUT_IDS, MASK, *DECODER_INPUTS)
    extra = [n for n in gm.get_submodule(INPUTS_MODULE).names if n not in known]
    if extra:
        raise PassError(f"{site.module_path}: {what} cannot lengthen the input {extra[0]} "
                        f"(PEFT drops it); capture the model without it")
    for user in id_readers(ids):
        if user is not site.node and user.target != aten.sym_size.int and not is_fxpeft_node(user):
            raise PassError(f"{site.module_path}: input_ids also feed {user.name} "
                            f"({user.target}), which virtual tokens would change")


def _lengthen(gm: torch.fx.GraphModule, node: torch.fx.Node, fn: Any, args: tuple) -> torch.fx.Node:
    """``fn(node, *args)`` right after ``node``, read by all of ``node``'s users."""
    with gm.graph.inserting_after(node):
        longer = gm.graph.call_function(fn, (node, *args))
    node.replace_all_uses_with(longer, delete_user_cb=lambda user: user is not longer)
    return longer


def _mask(gm: torch.fx.GraphModule, length: int, on: torch.fx.Node) -> list[torch.fx.Node]:
    mask = model_input(gm, MASK)
    return [] if mask is None else [_lengthen(gm, mask, prepend_mask, (length, on))]


def _labels(gm: torch.fx.GraphModule, length: int, on: torch.fx.Node) -> torch.fx.Node:
    """``-100`` before the labels the output adapter's loss reads (not the input adapter's)."""
    output = _output_node(gm)
    with gm.graph.inserting_before(output):
        padded = gm.graph.call_function(prepend_labels, (output.args[0], length, on))
    output.update_arg(0, padded)
    return padded


def _embeddings(gm: torch.fx.GraphModule, site: InputEmbeddingSite, prompt: list[torch.fx.Node],
                ids: torch.fx.Node, length: int, on: torch.fx.Node) -> list[torch.fx.Node]:
    """The per-sample adapter names (to refuse them) and the prompt's placement, with the
    ``prompt`` nodes (the last one gives the prompt) moved in right before it."""
    adapter = input_adapter(gm.graph)
    with gm.graph.inserting_after(adapter):
        names = gm.graph.call_function(operator.getitem, (adapter, -1))
    placed = _lengthen(gm, site.output, place_prompt, (prompt[-1], ids, length, on, names))
    for node in prompt:
        placed.prepend(node)  # in order, after the lookup and before the placement
    return [names, *prompt, placed]


def prepend_prompt(job: SpliceInput, kind: str, what: str, attach: Callable[[], str],
                   read: Callable[[torch.fx.Graph, str], list[torch.fx.Node]]) -> Spliced:
    """The splice of a kind whose prompt goes in front of the input embeddings: the checks,
    then ``attach()`` (the adapter's parameters; returns their target), then ids, mask and
    (causal) labels lengthened and the prompt placed wherever the adapter's gate is on.
    ``read(graph, target)`` adds the nodes that compute the ``(rows, dim)`` prompt, the last
    one giving it (p-tuning computes it through its encoder); ``what`` names the kind in errors."""
    gm, site, params, adapter = job.gm, job.site, job.params, job.adapter
    pads = _pads_labels(gm, site, what)
    ids = model_input(gm, INPUT_IDS)
    _check_inputs(gm, site, ids, what)
    weight = gm.get_parameter(site.weight_target)
    target = attach()
    with gm.graph.inserting_after(input_adapter(gm.graph)):
        on = gate_flag(gm, adapter, weight)  # a Python bool: the adapter refuses mixed batches
    length = params.num_virtual_tokens
    limit = gm.capture_info.max_seq if gm.capture_info is not None else None
    longer = _lengthen(gm, ids, prepend_ids, (length, on, limit))
    with gm.graph.inserting_after(site.output):
        prompt = read(gm.graph, target)
    added = [longer, *_mask(gm, length, on), *_embeddings(gm, site, prompt, longer, length, on)]
    if pads:
        added.append(_labels(gm, length, on))
    for node in added:
        interior = node in prompt or node.target is operator.getitem
        node.meta[ADAPTER_META] = AdapterNode(kind, adapter, site.module_path, None if interior else 0)
    return Spliced(added, [target])


def splice(job: SpliceInput) -> Spliced:
    """Attach the prompt at the graph's root; lengthen ids, mask and (causal) labels and put
    the prompt in the embeddings wherever the adapter's gate is on."""
    def attach() -> str:
        prompt = torch.nn.Parameter(_initial_prompt(job.gm, job.site, job.params))
        return attach_component(job.gm, "", PROMPT, job.adapter, prompt)
    return prepend_prompt(job, "prompt_tuning", "prompt tuning", attach,
                          lambda graph, target: [graph.get_attr(target)])


# --- the decode graph: virtual tokens as ids past the vocabulary, prefilled once ----------------

def place_virtual(rows: torch.Tensor, ids: torch.Tensor, vocab: int, prompt: torch.Tensor) -> torch.Tensor:
    """In a decode graph: where an id is ``vocab + i`` (a virtual token), prompt row ``i`` (in
    the rows' dtype) instead of the embedding module's row; other rows pass unchanged.

    >>> place_virtual(torch.zeros(1, 3, 2), torch.tensor([[5, 4, 1]]), 4, torch.ones(2, 2))[0, :, 0].tolist()
    [1.0, 1.0, 0.0]
    """
    row = prompt[(ids - vocab).clamp(0, prompt.shape[0] - 1)].to(rows.dtype)
    return torch.where((ids >= vocab)[..., None], row, rows)


def splice_virtual(decoder: torch.fx.GraphModule, adapter: str, record: Any, kind: str,
                   place: Callable[..., torch.Tensor] = place_virtual) -> range:
    """The prompt of ``record`` (an ``AdapterRecord``; its attached target already shared into
    ``decoder``) into a decode graph: ``fxpeft.generate`` prefills the virtual tokens
    as ids ``vocab .. vocab + length - 1`` in front of the prompt (once: the KV cache keeps them);
    the lookup reads them clamped and ``place(rows, ids, vocab, attached)`` (``place_virtual``)
    puts the prompt rows in their place at the embedding module's output (after Gemma's scale,
    as in the training graph). Returns the virtual token ids."""
    site = find_input_embeddings(decoder)[0]
    ids, vocab = site.node.args[1], site.num_embeddings
    (target,), length = record.attached, record.rules.rules[0].params.num_virtual_tokens
    with decoder.graph.inserting_before(site.node):
        clamped = decoder.graph.call_function(aten.clamp.default, (ids, None, vocab - 1))
    site.node.update_arg(1, clamped)
    with decoder.graph.inserting_after(site.output):
        prompt = decoder.graph.get_attr(target)
    placed = _lengthen(decoder, site.output, place, (ids, vocab, prompt))
    placed.prepend(prompt)
    for node in (clamped, prompt, placed):
        node.meta[ADAPTER_META] = AdapterNode(kind, adapter, site.module_path, None)
    return range(vocab, vocab + length)


def decode_splice(decoder: torch.fx.GraphModule, adapter: str, record: Any) -> range:
    """Prompt tuning's prompt into a decode graph (``splice_virtual``)."""
    return splice_virtual(decoder, adapter, record, "prompt_tuning")


# --- PEFT's PromptTuningConfig ----------------------------------------------------------------

# What every PEFT prompt-learning config says about the prompt's shape (``prompt_shape``).
SHAPE_FIELDS = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                          "num_attention_heads", "num_layers"})
PROMPT_FIELDS = SHAPE_FIELDS | {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path"}
_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "sample_vocab", "TEXT": "text"}


def shape_config(matches: list[Match], program: Program, what: str) -> dict[str, Any]:
    """The ``SHAPE_FIELDS`` of the one prompt ``matches`` add. PEFT fills heads and layers from
    the model config (it uses them for prefix tuning only)."""
    if len(matches) != 1:
        raise PeftFormatError(f"PEFT's {what} has one prompt; these rules add {len(matches)}")
    params, site, config = matches[0].rule.params, matches[0].site, program.info.config
    return {"num_virtual_tokens": params.num_virtual_tokens, "token_dim": site.embedding_dim,
            "num_transformer_submodules": params.transformer_submodules,
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_layers": getattr(config, "num_hidden_layers", None)}


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """``PromptTuningConfig`` fields. Text init from ``init_ids`` alone has no PEFT form
    (PEFT's TEXT needs a tokenizer), so it is written as ``RANDOM``: the saved prompt, not the
    init, is what loading uses."""
    config = shape_config(matches, program, "prompt tuning")
    params = matches[0].rule.params
    text = params.init == "text" and bool(params.init_text and params.tokenizer)
    init = "TEXT" if text else "RANDOM" if params.init == "text" else params.init.upper()
    return {**config, "prompt_tuning_init": init,
            "prompt_tuning_init_text": params.init_text if text else None,
            "tokenizer_name_or_path": params.tokenizer if text else None}


def _positive(config: dict[str, Any], key: str, source: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PeftFormatError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _check_token_dim(config: dict[str, Any], model: torch.nn.Module, source: str) -> None:
    """``token_dim`` must be the model's embedding width (checked where the model says it)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    width = getattr(embeddings, "embedding_dim", None)
    if config.get("token_dim") is not None and width is not None and config["token_dim"] != width:
        raise PeftFormatError(f"{source}: token_dim = {config['token_dim']!r}, but the model's "
                              f"embeddings are {width} wide")


def prompt_shape(config: dict[str, Any], model: torch.nn.Module, source: str) -> tuple[int, int]:
    """A prompt-learning config's ``num_virtual_tokens`` and ``num_transformer_submodules``,
    checked (``token_dim`` too, against the model's embeddings)."""
    length = _positive(config, "num_virtual_tokens", source)
    submodules = config.get("num_transformer_submodules") or (
        2 if config.get("task_type") == "SEQ_2_SEQ_LM" else 1)  # PEFT's default
    if submodules not in (1, 2):
        raise PeftFormatError(f"{source}: num_transformer_submodules = {submodules!r}, expected 1 or 2")
    _check_token_dim(config, model, source)
    return length, submodules


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """The prompt at the model's input embedding, with PEFT's length, rows and init."""
    init = config.get("prompt_tuning_init") or "RANDOM"
    if init not in _INITS:
        raise PeftFormatError(f"{source}: prompt_tuning_init = {init!r}; PEFT's are {', '.join(_INITS)}")
    length, submodules = prompt_shape(config, model, source)
    text = {"init_text": config.get("prompt_tuning_init_text") or "",
            "tokenizer": config.get("tokenizer_name_or_path") or ""} if init == "TEXT" else {}
    params = PromptTuningParams(num_virtual_tokens=length, init=_INITS[init],
                                transformer_submodules=submodules, **text)
    rule = Rule(name="peft prompt tuning", match="input_embedding", params=params)
    return RuleSet((rule,), source=source)


KIND = AdapterKind(
    name="prompt_tuning", params=PromptTuningParams, splice=splice,
    merge="prompt tuning adds input positions (virtual tokens), which no weight can hold",
    components=(PROMPT,),
    peft=PeftFormat("PROMPT_TUNING", rules_to_config, config_to_rules, PROMPT_FIELDS, key_prefix=""),
    lengthens=Lengthens(tokens=lambda params: params.num_virtual_tokens, decode_splice=decode_splice))
