"""Trainable tokens (PEFT's ``TrainableTokens``, alone or as LoRA's ``trainable_token_indices``):
a few rows of an embedding table train, the rest stay frozen.

At an ``embedding`` site every read of the table ``W`` becomes ``index_copy(W, 0, idx, rows)``
with ``rows = where(gate, delta, W[idx])``: ``delta`` (PEFT's ``trainable_tokens_delta``,
``[len(idx), dim]``) holds the chosen rows' new values and starts as their base values, so the
adapter is the identity at init and only ``delta`` gets gradients. Every op reading ``W`` sees
the new rows, so an output embedding tied to the input embedding (one parameter read twice)
follows, as PEFT ties its ``lm_head`` wrapper to the embedding's. The ``index_copy`` is the
removable node (bypass to ``W``); merge writes the rows into ``W``.

Saved keys are PEFT's: ``<embedding>.trainable_tokens_delta`` for a ``TRAINABLE_TOKENS``
config, which also repeats it under each tied module (``lm_head.trainable_tokens_delta``), and
``<embedding>.token_adapter.trainable_tokens_delta`` when a ``LoraConfig`` carries the rows
(``AdapterKind.carries``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpeft.capture.quantized import weight_so_far
from fxpeft.errors import FxpeftError
from fxpeft.formats.peft_format import PeftFormat, PeftFormatError, full_regex, names_regex
from fxpeft.graph.gates import check_sample_names, gate_node
from fxpeft.graph.targets import fetch, place
from fxpeft.match.query import Match
from fxpeft.names import ADAPTER_META, GATE_META, AdapterNode, adapter_component, is_fxpeft_node
from fxpeft.registry import AdapterKind, SpliceInput, Spliced, initialising
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, Where, spec

aten = torch.ops.aten
DELTA = "trainable_tokens_delta"
INDEX = "trainable_tokens_index"  # holds the rows' ids: a buffer, never saved (the config holds them)
WRAPPER = "token_adapter"  # PEFT's module between the embedding and the rows in a LoRA adapter
CARRIED_FIELD = "trainable_token_indices"
HALF_DTYPES = (torch.float16, torch.bfloat16)  # tables whose rows train in fp32 (lora.py imports us)


def _string(value: Any) -> str | None:
    """A string, empty allowed (empty: none)."""
    return None if isinstance(value, str) else f"expected a string, got {value!r}"


def _names(value: Any) -> str | None:
    return None if value in ((), []) else checks.string_list(value)


@dataclass(frozen=True)
class TrainableTokensParams(Params):
    """Rows of an embedding that train (PEFT's ``token_indices``).

    >>> TrainableTokensParams(token_indices=(0, 3)).token_indices
    (0, 3)
    """

    kind = "trainable_tokens"
    match_kinds = ("embedding",)
    token_indices: tuple[int, ...] = spec((0,), checks.int_list, "the token ids whose rows train")
    init: bool = spec(True, checks.boolean, "rows start as the base's (false: random, PEFT's "
                                            "init_weights = false)")
    wrapper: str = spec("", _string, "PEFT's module prefix of the saved rows (token_adapter "
                                         "when a LoraConfig carries them)")
    tied: tuple[str, ...] = spec((), _names,
                                 "modules tied to the embedding whose keys repeat the rows "
                                 "(PEFT's TRAINABLE_TOKENS file)")
    peft_target: str = spec("", _string, "the name PEFT's config gave the embedding")


@dataclass(frozen=True)
class TokensDetail:
    """What merge needs: the table, the rows' parameter and their ids."""

    weight: str
    delta: str
    index: str
    indices: tuple[int, ...]


def _rows(job: SpliceInput, weight: torch.Tensor) -> torch.Tensor:
    indices = list(job.params.token_indices)
    if len(set(indices)) != len(indices) or not all(0 <= i < weight.shape[0] for i in indices):
        raise FxpeftError(f"{job.site.module_path}: token_indices {indices} must be distinct rows "
                          f"of its {weight.shape[0]} embeddings")
    dtype = torch.float32 if weight.dtype in HALF_DTYPES else weight.dtype  # PEFT's autocast
    if job.params.init or not initialising():
        return weight.detach()[indices].to(dtype)
    return torch.randn(len(indices), weight.shape[1], dtype=dtype, device=weight.device)


def _attach(job: SpliceInput) -> tuple[TokensDetail, list[str]]:
    """The rows (at PEFT's path, repeated under tied modules) and their ids (a buffer)."""
    site, params, adapter = job.site, job.params, job.adapter
    weight = fetch(job.gm, site.weight_target)
    delta = torch.nn.Parameter(_rows(job, weight))
    name = adapter_component(DELTA, adapter)
    home = ".".join(p for p in (site.module_path, params.wrapper) if p)
    targets = []
    for path in (home, *params.tied):  # a tied head export kept no module of gets a plain one
        targets.append(f"{path}.{name}" if path else name)
        place(job.gm, targets[-1], delta)
    holder = torch.nn.Module()  # a module, so the adapter's attached targets hold no integer parameter
    holder.register_buffer("ids", torch.tensor(params.token_indices, dtype=torch.long,
                                               device=weight.device), persistent=False)
    index = adapter_component(INDEX, adapter)
    index_target = f"{home}.{index}" if home else index
    place(job.gm, index_target, holder)
    return TokensDetail(site.weight_target, targets[0], f"{index_target}.ids", params.token_indices), \
        [*targets, index_target]


def _reads(gm: torch.fx.GraphModule, site: Any) -> list[torch.fx.Node]:
    """The graph's reads of the table: its ``get_attr``s, or (a ``symbolic_trace`` leaf) the
    embedding module's call."""
    if site.kind == "module":
        return [site.node]
    return [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == site.weight_target
            and not is_fxpeft_node(n)]


def _new_table(job: SpliceInput, table: torch.fx.Node, detail: TokensDetail) -> list[torch.fx.Node]:
    """``index_copy(W, 0, idx, where(gate, delta, W[idx]))`` after ``table`` (``W``); the
    last node is the new table, the one before it the gate's ``gt``."""
    graph, weight = job.gm.graph, fetch(job.gm, detail.weight)
    with graph.inserting_before(table.next):
        index, delta = graph.get_attr(detail.index), graph.get_attr(detail.delta)
        gate = gate_node(job.gm, job.adapter, weight)
    casts = []
    if fetch(job.gm, detail.delta).dtype != weight.dtype:  # fp32 rows on a half table, as PEFT
        with graph.inserting_after(delta):
            casts = [graph.call_function(aten._to_copy.default, (delta,), {"dtype": weight.dtype})]
    with graph.inserting_before(gate.next):
        old = graph.call_function(aten.index_select.default, (table, 0, index))
        on = graph.call_function(aten.gt.Scalar, (gate, 0))
        rows = graph.call_function(aten.where.self, (on, casts[0] if casts else delta, old))
        new = graph.call_function(aten.index_copy.default, (table, 0, index, rows))
    return [index, delta, *casts, old, on, rows, new]


def _lookup(job: SpliceInput, call: torch.fx.Node, detail: TokensDetail) -> list[torch.fx.Node]:
    """A module call: ``where(gate, embedding(new table, ids), call)``, so removal keeps the
    call."""
    graph, site = job.gm.graph, job.site
    with graph.inserting_before(call.next):
        table = graph.get_attr(detail.weight)
    added = [table, *_new_table(job, table, detail)]
    with graph.inserting_before(added[-1].next):
        lookup = graph.call_function(aten.embedding.default, (added[-1], call.args[0], site.padding_idx,
                                                              site.scale_grad_by_freq, site.sparse))
        chosen = graph.call_function(aten.where.self, (added[-3], lookup, call))
    call.replace_all_uses_with(chosen, delete_user_cb=lambda user: user is not chosen)
    return [*added, lookup, chosen]


def _route(job: SpliceInput, read: torch.fx.Node, detail: TokensDetail) -> list[torch.fx.Node]:
    """One read of ``W`` yields the new table (a call of the module: looks it up)."""
    if read.op == "call_module":
        added, bypass = _lookup(job, read, detail), 2
    else:
        added, bypass = _new_table(job, read, detail), 0
        read.replace_all_uses_with(added[-1], delete_user_cb=lambda user: user not in added)
    for node in added:
        node.meta[ADAPTER_META] = AdapterNode("trainable_tokens", job.adapter, job.site.module_path,
                                              bypass if node is added[-1] else None, detail)
    return added


def splice(job: SpliceInput) -> Spliced:
    """Give the adapter trainable rows of the table; every read of the table yields them."""
    reads = _reads(job.gm, job.site)
    if not reads:
        raise FxpeftError(f"trainable_tokens: the graph never reads {job.site.weight_target!r}")
    detail, attached = _attach(job)
    nodes = [added for read in reads for added in _route(job, read, detail)]
    check_sample_names(job.gm)  # one table for the whole batch: adapter_names= is refused
    return Spliced([n for n in nodes if GATE_META not in n.meta], attached)


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """The rows replace the table's (PEFT's ``index_copy``)."""
    detail = record.detail
    base = weight_so_far(gm, weights, detail.weight)
    index = torch.tensor(detail.indices, dtype=torch.long, device=base.device)
    weights[detail.weight] = base.index_copy(0, index, fetch(gm, detail.delta).detach().to(base))


# --- PEFT's configs -----------------------------------------------------------------------------

def input_embedding_name(model: Any) -> str:
    """PEFT's default target: the path of ``model.get_input_embeddings()``, else
    ``embed_tokens``.

    >>> input_embedding_name(torch.nn.Linear(2, 2))
    'embed_tokens'
    """
    get = getattr(model, "get_input_embeddings", None)
    try:
        found = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        found = None
    return next((name for name, module in model.named_modules() if module is found and name),
                "embed_tokens")


def _tied_heads(model: Any) -> tuple[str, ...]:
    """Modules whose weight is the input embedding's where the config ties them (PEFT's tied
    ``TrainableTokensLayer``s)."""
    config = getattr(model, "config", None)
    get_in, get_out = (getattr(model, f"get_{s}_embeddings", None) for s in ("input", "output"))
    if not getattr(config, "tie_word_embeddings", False) or not callable(get_in) or not callable(get_out):
        return ()
    head, embedding = get_out(), get_in()
    if head is None or embedding is None or getattr(head, "weight", None) is not embedding.weight:
        return ()
    return tuple(name for name, module in model.named_modules() if module is head and name)


def _indices(value: Any, source: str, field: str) -> tuple[int, ...]:
    if checks.int_list(value) is not None:
        raise PeftFormatError(f"{source}: {field} must be a non-empty list of token ids, got {value!r}")
    return tuple(value)


def _rule(regex: str, params: TrainableTokensParams, source: str) -> Rule:
    return Rule(name=f"peft trainable tokens {params.peft_target or '*'}", match="embedding",
                params=params, where=Where(path=[regex]))


def carried_rules(value: Any, model: Any, source: str, keep: Any) -> tuple[Rule, ...]:
    """A ``LoraConfig``'s ``trainable_token_indices`` (a list for the input embedding, or a
    dict per module name) as rules; the rows are saved under PEFT's ``token_adapter``."""
    if value is None:
        return ()
    targets = value if isinstance(value, dict) else {input_embedding_name(model): value}
    rules = []
    for name, indices in targets.items():
        if name in (keep or []):
            raise PeftFormatError(f"{source}: {CARRIED_FIELD}: {name} is also in modules_to_save; "
                                  f"train it fully or by rows, not both (as in PEFT)")
        params = TrainableTokensParams(token_indices=_indices(indices, source, CARRIED_FIELD),
                                       wrapper=WRAPPER,
                                       peft_target=name if isinstance(value, dict) else "")
        rules.append(_rule(names_regex([name]), params, source))
    return tuple(rules)


def _by_module(matches: list[Match]) -> dict[str, TrainableTokensParams]:
    return {m.module_path: m.rule.params for m in matches}


def carried_value(matches: list[Match]) -> Any:
    """``trainable_token_indices`` for a ``LoraConfig``: a list when rules name no module
    (PEFT's list form), else a dict per PEFT name (or module path); None without rows.

    >>> carried_value([])
    """
    found = _by_module(matches)
    if not found:
        return None
    if len(found) == 1 and not next(iter(found.values())).peft_target:
        return list(next(iter(found.values())).token_indices)
    return {p.peft_target or path: list(p.token_indices) for path, p in sorted(found.items())}


def config_to_rules(config: dict[str, Any], model: Any, source: str) -> RuleSet:
    """A ``TrainableTokensConfig``: its ``token_indices`` at ``target_modules`` (default: the
    input embedding), repeated under a tied output embedding as PEFT saves it."""
    target = config.get("target_modules")
    if target is None:
        target = input_embedding_name(model)
    if isinstance(target, list) and all(isinstance(t, str) for t in target) and target:
        regex, name = names_regex(target), ",".join(target)
    elif isinstance(target, str):
        regex, name = full_regex(target), target
    else:
        raise PeftFormatError(f"{source}: target_modules must be a module name, a list of names "
                              f"or a regular expression, got {target!r}")
    init = config.get("init_weights", True)
    params = TrainableTokensParams(token_indices=_indices(config.get("token_indices"), source, "token_indices"),
                                   init=True if init is None else init, tied=_tied_heads(model),
                                   peft_target=name)
    return RuleSet((_rule(regex, params, source),), source=source)


def rules_to_config(matches: list[Match], program: Any) -> dict[str, Any]:
    """The ``TrainableTokensConfig`` fields: one set of rows (PEFT's config has one)."""
    params = {(p.token_indices, p.init) for p in _by_module(matches).values()}
    if len(params) != 1:
        raise PeftFormatError(f"PEFT's TrainableTokensConfig has one token_indices; these rules "
                              f"use {sorted(params)}")
    indices, init = params.pop()
    names = {p.peft_target for p in _by_module(matches).values()}
    paths = sorted(_by_module(matches))
    target = names.pop() if len(names) == 1 and "" not in names else \
        "|".join(re.escape(p) for p in paths)
    if "," in target:  # the config's list form
        target = target.split(",")
    return {"token_indices": list(indices), "target_modules": target, "init_weights": init}


KIND = AdapterKind(
    name="trainable_tokens", params=TrainableTokensParams, splice=splice, merge=merge,
    components=(DELTA, INDEX),
    peft=PeftFormat("TRAINABLE_TOKENS", rules_to_config, config_to_rules,
                    frozenset({"token_indices", "target_modules", "init_weights"})),
    no_weight_delta="trainable tokens replace whole rows of the embedding table (new token "
                    "embeddings), which vLLM-style LoRA servers do not load")
