"""Prefix tuning (PEFT's ``PrefixTuningConfig``): learned keys and values in front of every
layer's attention.

With ``P`` the learned table ``(num_virtual_tokens, num_layers * 2 * kv_heads * head_dim)``
(PEFT's ``prompt_embeddings``), layer ``l`` reads its keys from block ``2l`` and its values from
block ``2l + 1``, each split into ``kv_heads`` heads of ``head_dim``, as PEFT's ``get_prompt``
lays out its past key values. At each attention op (``match = "attention_op"``: the SDPA node,
whatever projections feed it, GPT-2's fused ``c_attn`` too) the splice makes the graph compute
PEFT's forward, where the prefix is a KV cache the prompt starts after::

    keys      = cat(prefix_keys(l),   keys)      # after RoPE: cache entries get none
    values    = cat(prefix_values(l), values)
    attn_mask = cat(ones(..., L), attn_mask)     # every query, padding rows too, sees the prefix
                                                 # (a sliding layer: while L + i - j < window)
    positions = positions + L                    # (once per graph) transformers counts the cache;
                                                 # a negative one (OPT's padding, -1) stays

The positions do count the prefix: on transformers 5.25, PEFT's forward hands the model a cache
of ``L`` entries and no ``position_ids``, so the model numbers the tokens ``L .. L + seq - 1``
(with ``position_ids`` given, PEFT adds ``L`` to them); ``tests/kinds/test_prefix_tuning.py``
checks the logits against PEFT's. On grouped-query models the prefix has ``kv_heads`` heads, as
PEFT's ``num_key_value_heads`` handling sizes it, and is repeated onto the query heads the way
the keys it joins are (``repeat_kv``), so a graph whose SDPA groups its heads itself (the decode
graph's ``enable_gqa``) gets it unrepeated.

With ``projection = n`` (PEFT's ``prefix_projection`` with ``encoder_hidden_size = n``) the table
is computed once per forward by PEFT's reparametrisation MLP ``Linear(d, n), Tanh, Linear(n,
L*2*d)`` from ``num_virtual_tokens`` learned rows of width ``d = kv_heads * head_dim``; both
train. PEFT saves only the table this gives (``prompt_embeddings``) and loads it as a plain table
(in inference mode), so ``fxpeft.load`` builds the plain table for such a folder too (the rules
keep ``projection``, so the config round-trips) and ``fxpeft.save`` writes the MLP's output.

The on/off gate never changes shapes: an off adapter's prefix columns are masked out, so the
softmax gives them exactly zero weight, and its position shift is multiplied by zero. Hence
mixed batches (``adapter_names=``) work per sample, and switching under ``torch.compile``
recompiles nothing. Merge is impossible: the prefix is attended to, not a change of a weight.

``fxpeft.generate`` writes the prefix into the decode graph's KV cache once, before the prefill
(capability ``fills_cache``); the decode graph itself carries no splice of this kind.

Adapter ``"default"`` adds the root parameter ``prefix_embeddings`` (others
``prefix_embeddings_<name>``), or with a projection ``prefix_tokens`` and the module
``prefix_encoder``; all fp32, cast to the keys' dtype where they join them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpeft.capture.program import Program, layer_index
from fxpeft.errors import PassError
from fxpeft.formats.peft_format import PeftFormat, PeftFormatError
from fxpeft.graph.gates import GATE_META, gate_node, reroute
from fxpeft.graph.params import attach_component
from fxpeft.match.attention import SdpaSite
from fxpeft.match.input_embedding import model_input
from fxpeft.match.query import Match
from fxpeft.names import ADAPTER_META, AdapterNode, adapter_component, adapter_node
from fxpeft.registry import AdapterKind, FillsCache, SpliceInput, Spliced, initialising
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, spec

aten = torch.ops.aten
NAME = "prefix_tuning"
TABLE, TOKENS, ENCODER = "prefix_embeddings", "prefix_tokens", "prefix_encoder"
PEFT_KEY = "prompt_embeddings"  # PEFT's one saved key: the table, with or without projection
TABLE_DETAIL, SHIFT_DETAIL = "table", "positions"


def _non_negative(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else f"expected a non-negative integer, got {value!r}"


@dataclass(frozen=True)
class PrefixTuningParams(Params):
    """Prefix tuning (PEFT's ``PrefixTuningConfig``): ``num_virtual_tokens`` learned keys and
    values in front of every layer's attention.

    >>> PrefixTuningParams().num_virtual_tokens, PrefixTuningParams().projection
    (20, 0)
    """

    kind = NAME
    match_kinds = ("attention_op",)
    num_virtual_tokens: int = spec(20, checks.positive_int, "prefix length (cache entries per layer)")
    projection: int = spec(0, _non_negative, "hidden size of PEFT's reparametrisation MLP "
                           "(prefix_projection with encoder_hidden_size); 0: none")
    init: str = spec("random", checks.one_of("random", "zero"),
                     "random (standard normal, PEFT's default) or zero (PEFT's init_weights)")


# --- the model's attention shape, as PEFT reads it from the config -----------------------------

@dataclass(frozen=True)
class Dims:
    """What sizes the table: layers, k/v heads and head size (PEFT's ``num_layers``,
    ``num_attention_heads`` and ``token_dim // num_attention_heads`` after its GQA handling)."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """PEFT's ``token_dim``: one layer's keys (or values) per token."""
        return self.kv_heads * self.head_dim


def config_dims(config: Any) -> Dims:
    """``Dims`` of a transformers config.

    >>> from transformers import LlamaConfig
    >>> config_dims(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
    ...                         num_hidden_layers=3))
    Dims(layers=3, kv_heads=2, head_dim=16)
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Dims(config.num_hidden_layers, kv_heads, head_dim)


def graph_dims(gm: torch.nn.Module, where: str) -> Dims:
    """``Dims`` of the model ``gm`` was captured from."""
    config = getattr(getattr(gm, "capture_info", None), "config", None)
    if config is None:
        raise PassError(f"{where}: prefix tuning needs a graph captured from a transformers model "
                        f"(its config sizes the prefix)")
    return config_dims(config)


# --- what the graph computes (called from the graph) -------------------------------------------

def prefix_entries(table: torch.Tensor, slot: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Block ``slot`` of the table ``(tokens, blocks * kv_heads * head_dim)`` as
    ``(kv_heads, tokens, head_dim)`` (PEFT's layout: block ``2l`` keys, ``2l + 1`` values).

    >>> prefix_entries(torch.arange(8.).reshape(1, 8), 1, 2, 2).tolist()
    [[[4.0, 5.0]], [[6.0, 7.0]]]
    """
    return table.unflatten(-1, (-1, kv_heads, head_dim))[:, slot].transpose(0, 1)


def prepend_prefix(states: torch.Tensor, table: torch.Tensor, slot: int, kv_heads: int) -> torch.Tensor:
    """``states`` (keys or values, ``(batch, heads, seq, head_dim)``) with block ``slot`` of the
    table in front, in their dtype, its ``kv_heads`` repeated onto ``heads`` as ``repeat_kv``.

    >>> prepend_prefix(torch.zeros(2, 4, 3, 2), torch.ones(5, 8), 1, 2).shape
    torch.Size([2, 4, 8, 2])
    """
    entries = prefix_entries(table, slot, kv_heads, states.shape[-1])
    entries = entries.repeat_interleave(states.shape[1] // kv_heads, dim=0).to(states.dtype)
    return torch.cat([entries.expand(states.shape[0], -1, -1, -1), states], dim=2)


def prepend_columns(mask: torch.Tensor, tokens: int, on: torch.Tensor,
                    window: int | None = None) -> torch.Tensor:
    """The SDPA mask with ``tokens`` prefix columns in front: attended to (True, or 0 for an
    additive mask) where the gate ``on`` (0-d, or per sample) is on, masked out where it is off.
    With a sliding ``window``, query row ``i`` (cache position ``tokens + i``) sees prefix entry
    ``j`` only while ``tokens + i - j < window``, as transformers' window over the cache.

    >>> prepend_columns(torch.tensor([[[[True, False]]]]), 1, torch.tensor(1.)).tolist()
    [[[[True, True, False]]]]
    >>> prepend_columns(torch.zeros(2, 1, 1, 1), 1, torch.tensor([1., 0.]).reshape(2, 1, 1, 1))[:, 0, 0, 0].tolist()
    [0.0, -3.4028234663852886e+38]
    >>> prepend_columns(torch.ones(1, 1, 2, 2, dtype=torch.bool), 2, torch.tensor(1.), 3)[0, 0].tolist()
    [[True, True, True, True], [False, True, True, True]]
    """
    batch = max(mask.shape[0], on.shape[0] if on.dim() else 1)
    mask = mask.expand(batch, *mask.shape[1:])
    seen = (on != 0).reshape(-1, *[1] * (mask.dim() - 1)).expand(batch, *mask.shape[1:-1], tokens)
    if window is not None:
        rows = torch.arange(mask.shape[-2], device=mask.device)[:, None]
        seen = seen & (tokens + rows - torch.arange(tokens, device=mask.device) < window)
    if mask.dtype != torch.bool:
        seen = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(
            ~seen, torch.finfo(mask.dtype).min)
    return torch.cat([seen.to(mask.device), mask], dim=-1)


def shift_positions(positions: torch.Tensor, tokens: int, on: torch.Tensor) -> torch.Tensor:
    """``positions + tokens`` where the gate ``on`` is on (transformers counts the cache), except
    negative ones: padding that a model numbers from the attention mask (OPT's ``-1``) stays
    ``-1`` behind the cache, since transformers counts only the mask's ones.

    >>> shift_positions(torch.tensor([[0, 1], [-1, 0]]), 3, torch.tensor([[1.], [1.]])).tolist()
    [[3, 4], [-1, 3]]
    >>> shift_positions(torch.tensor([[0, 1], [0, 1]]), 3, torch.tensor([[1.], [0.]])).tolist()
    [[3, 4], [0, 1]]
    """
    return positions + ((on != 0) & (positions >= 0)).to(positions.dtype) * tokens


def layer_window(config: Any, layer: int) -> int | None:
    """The sliding window of ``layer``'s attention (``config.layer_types`` where it names them,
    else the model's ``sliding_window``); None for full attention.

    >>> from transformers import Gemma3TextConfig, LlamaConfig
    >>> config = Gemma3TextConfig(num_hidden_layers=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    >>> layer_window(config, 0), layer_window(config, 1), layer_window(LlamaConfig(), 0)
    (16, None, None)
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return window if types[layer] == "sliding_attention" else None
    return window if window and getattr(config, "use_sliding_window", True) else None


# --- the splice ------------------------------------------------------------------------------

def _new_parameters(params: PrefixTuningParams, dims: Dims, device: torch.device
                    ) -> dict[str, "torch.nn.Parameter | torch.nn.Module"]:
    """The plain table (PEFT's ``embedding``), or rows and the MLP with a projection. While
    ``fxpeft.load`` builds the adapter, always the plain table: the file holds only that."""
    rows, total = params.num_virtual_tokens, 2 * dims.layers * dims.width
    if not params.projection or not initialising():
        table = torch.empty(rows, total, device=device)
        table.zero_() if params.init == "zero" else table.normal_()  # nn.Embedding's init
        return {TABLE: torch.nn.Parameter(table)}
    encoder = torch.nn.Sequential(torch.nn.Linear(dims.width, params.projection), torch.nn.Tanh(),
                                  torch.nn.Linear(params.projection, total)).to(device)
    if params.init == "zero":
        torch.nn.init.zeros_(encoder[-1].weight)
        torch.nn.init.zeros_(encoder[-1].bias)
    return {TOKENS: torch.nn.Parameter(torch.empty(rows, dims.width, device=device).normal_()),
            ENCODER: encoder}


def _found(gm: torch.fx.GraphModule, adapter: str, detail: str) -> torch.fx.Node | None:
    """The node of ``adapter`` this kind added once per graph (the table, the position shift)."""
    return next((n for n in gm.graph.nodes if (r := adapter_node(n)) is not None
                 and r.kind == NAME and r.adapter == adapter and r.detail == detail), None)


def _first_node(graph: torch.fx.Graph) -> torch.fx.Node:
    return next(n for n in graph.nodes if n.op != "placeholder")


def _table(gm: torch.fx.GraphModule, params: PrefixTuningParams, dims: Dims, adapter: str,
           device: torch.device) -> tuple[torch.fx.Node, list[torch.fx.Node], list[str]]:
    """The adapter's table node (added once, at the top); the nodes and targets it added."""
    found = _found(gm, adapter, TABLE_DETAIL)
    if found is not None:
        rows = _table_tensor(gm, found).shape[0]
        if rows != params.num_virtual_tokens:
            raise PassError(f"adapter {adapter!r}: one prefix of {rows} tokens serves every layer; "
                            f"a rule asks for {params.num_virtual_tokens}")
        return found, [], []
    targets = {base: attach_component(gm, "", base, adapter, value)
               for base, value in _new_parameters(params, dims, device).items()}
    graph = gm.graph
    with graph.inserting_before(_first_node(graph)):
        if TABLE in targets:
            nodes = [graph.get_attr(targets[TABLE])]
        else:
            rows = graph.get_attr(targets[TOKENS])
            nodes = [rows, graph.call_module(targets[ENCODER], (rows,))]
    return nodes[-1], nodes, list(targets.values())


def _shift(gm: torch.fx.GraphModule, site: SdpaSite, tokens: int, adapter: str,
           like: torch.Tensor) -> list[torch.fx.Node]:
    """Once per adapter: its readers see ``position_ids`` shifted by the prefix length."""
    if _found(gm, adapter, SHIFT_DETAIL) is not None:
        return []
    positions = model_input(gm, "position_ids")
    if positions is None:
        raise PassError(f"{site.module_path}: prefix tuning needs position_ids as a graph input "
                        f"(they count the prefix); capture the model with them")
    with gm.graph.inserting_before(positions.next):  # in order, right after the positions
        on = gate_node(gm, adapter, like, positions)
        shifted = gm.graph.call_function(shift_positions, (positions, tokens, on))
    reroute(positions, shifted)
    return [shifted]


def _sdpa_inputs(site: SdpaSite) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    """The key, value and mask nodes the attention op reads; refuses a mask-less (causal) op,
    whose causality a longer key sequence would shift."""
    node = site.node
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    if not isinstance(mask, torch.fx.Node) or causal:
        raise PassError(f"{site.module_path}: prefix tuning needs an attention op with an explicit "
                        f"mask (found is_causal={causal!r}, attn_mask={mask!r})")
    return node.args[1], node.args[2], mask


def _set_mask(node: torch.fx.Node, mask: torch.fx.Node) -> None:
    if len(node.args) > 3:
        node.update_arg(3, mask)
    else:
        node.update_kwarg("attn_mask", mask)


def splice(job: SpliceInput) -> Spliced:
    """The table (once), the position shift (once), then at this attention op the prefix keys,
    values and mask columns of its layer."""
    gm, site, params, adapter = job.gm, job.site, job.params, job.adapter
    dims, layer = graph_dims(gm, site.module_path), layer_index(site.module_path)
    if layer is None or layer >= dims.layers:
        raise PassError(f"{site.module_path}: prefix tuning needs the attention of a numbered "
                        f"layer below {dims.layers}")
    key, value, mask = _sdpa_inputs(site)
    device = key.meta["val"].device if "val" in key.meta else torch.device("cpu")
    table, added, attached = _table(gm, params, dims, adapter, device)
    like = _table_tensor(gm, table)
    added += _shift(gm, site, params.num_virtual_tokens, adapter, like)
    graph, node = gm.graph, site.node
    with graph.inserting_before(node):
        keys = graph.call_function(prepend_prefix, (key, table, 2 * layer, dims.kv_heads))
        values = graph.call_function(prepend_prefix, (value, table, 2 * layer + 1, dims.kv_heads))
        on = gate_node(gm, adapter, like, key)
        window = layer_window(gm.capture_info.config, layer)
        columns = graph.call_function(prepend_columns, (mask, params.num_virtual_tokens, on, window))
    node.update_arg(1, keys)
    node.update_arg(2, values)
    _set_mask(node, columns)
    for added_node in (*added, keys, values, columns):
        detail = (TABLE_DETAIL if added_node is table else
                  SHIFT_DETAIL if added_node.target is shift_positions else None)
        removable = added_node.target in (prepend_prefix, prepend_columns, shift_positions)
        added_node.meta[ADAPTER_META] = AdapterNode(NAME, adapter, site.module_path,
                                                    0 if removable else None, detail)
    return Spliced([n for n in (*added, keys, values, columns) if GATE_META not in n.meta], attached)


def _table_tensor(gm: torch.fx.GraphModule, table: torch.fx.Node) -> torch.Tensor:
    """The parameter behind the table node (the rows, with a projection): the gate's device."""
    return gm.get_parameter((table.args[0] if table.op == "call_module" else table).target)


# --- the KV cache of fxpeft.generate: the prefix written once ------------------------------------

def current_table(gm: torch.nn.Module, adapter: str) -> torch.Tensor:
    """``adapter``'s table as its parameters give it now (through the MLP, with a projection)."""
    names = {base: adapter_component(base, adapter) for base in (TABLE, TOKENS, ENCODER)}
    if hasattr(gm, names[TABLE]):
        return getattr(gm, names[TABLE]).detach()
    with torch.no_grad():
        return getattr(gm, names[ENCODER])(getattr(gm, names[TOKENS]))


def cache_entries(gm: torch.nn.Module, adapter: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the prefix keys and values ``(kv_heads, tokens, head_dim)`` (``FillsCache``)."""
    dims, table = graph_dims(gm, f"adapter {adapter!r}"), current_table(gm, adapter)
    return {layer: tuple(prefix_entries(table, 2 * layer + part, dims.kv_heads, dims.head_dim)
                         for part in (0, 1)) for layer in range(dims.layers)}


# --- PEFT's PrefixTuningConfig and its one key ----------------------------------------------------

PREFIX_FIELDS = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                           "num_attention_heads", "num_layers", "encoder_hidden_size",
                           "prefix_projection", "init_weights"})


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """``PrefixTuningConfig`` fields; PEFT puts a prefix in every layer, with one length."""
    params = {m.rule.params for m in matches}
    dims = graph_dims(program.graph_module, "prefix tuning")
    layers = sorted(m.candidate.layer for m in matches)
    if len(params) != 1 or layers != list(range(dims.layers)):
        raise PeftFormatError(f"PEFT's prefix tuning has one prefix in each of the {dims.layers} "
                              f"layers; these rules put {len(params)} kinds in layers {layers}")
    (param,) = params
    return {"num_virtual_tokens": param.num_virtual_tokens, "token_dim": dims.width,
            "num_transformer_submodules": 1, "num_attention_heads": dims.kv_heads,
            "num_layers": dims.layers, "prefix_projection": bool(param.projection),
            "encoder_hidden_size": param.projection or dims.width,
            "init_weights": "zero" if param.init == "zero" else None}


def _positive(config: dict[str, Any], key: str, source: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PeftFormatError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _check_sizes(config: dict[str, Any], dims: Dims, source: str) -> None:
    """The file's sizes, where it gives them, must be the model's (its table is laid out by them)."""
    model = {"token_dim": dims.width, "num_attention_heads": dims.kv_heads, "num_layers": dims.layers}
    for key, value in model.items():
        if config.get(key) is not None and config[key] != value:
            raise PeftFormatError(f"{source}: {key} = {config[key]!r}, but the model's prefix needs "
                                  f"{value} (token_dim {dims.width}, {dims.kv_heads} k/v heads, "
                                  f"{dims.layers} layers)")


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """A prefix at every attention op, with PEFT's length, projection and init. The sizes
    (``token_dim``, heads, layers) are the model's: a file for other sizes fails the check that
    compares the rebuilt config with it."""
    length = _positive(config, "num_virtual_tokens", source)
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise PeftFormatError(f"{source}: num_transformer_submodules = "
                              f"{config['num_transformer_submodules']!r}: fxpeft's prefix tuning "
                              f"serves decoder models (1)")
    init = config.get("init_weights")
    if init not in (None, "zero"):
        raise PeftFormatError(f"{source}: init_weights = {init!r}; PEFT's are None and 'zero'")
    _check_sizes(config, config_dims(getattr(model, "config", None) or model.capture_info.config), source)
    projection = _positive(config, "encoder_hidden_size", source) if config.get("prefix_projection") else 0
    params = PrefixTuningParams(num_virtual_tokens=length, projection=projection,
                                init="zero" if init == "zero" else "random")
    return RuleSet((Rule(name="peft prefix tuning", match="attention_op", params=params),), source=source)


def save_state(gm: torch.fx.GraphModule, adapter: str, config: dict[str, Any],
               tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's one key: the table, computed through the MLP where there is one."""
    return config, {PEFT_KEY: current_table(gm, adapter).to("cpu", copy=True).contiguous()}


def load_state(gm: torch.fx.GraphModule, adapter: str, config: dict[str, Any],
               tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The file's table as the graph's plain table; a graph holding the MLP cannot take it."""
    if not hasattr(gm, adapter_component(TABLE, adapter)):
        raise PeftFormatError(f"{source}: the file holds the prefix table the projection MLP "
                              f"gave; adapter {adapter!r} of this graph holds the MLP, which "
                              f"cannot be recovered from it (fxpeft.load builds the plain table)")
    return {TABLE if key == PEFT_KEY else key: tensor for key, tensor in tensors.items()}


KIND = AdapterKind(
    name=NAME, params=PrefixTuningParams, splice=splice,
    merge="prefix tuning adds attended keys and values (a softmax over them), which no weight can hold",
    components=(TABLE, TOKENS, ENCODER),
    peft=PeftFormat("PREFIX_TUNING", rules_to_config, config_to_rules, PREFIX_FIELDS,
                    save_state=save_state, load_state=load_state, key_prefix=""),
    fills_cache=FillsCache(tokens=lambda params: params.num_virtual_tokens, entries=cache_entries))
