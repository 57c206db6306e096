"""The decode graph of an adapted causal LM: the model captured with a static KV cache, carrying
the same adapters, made by the same rules, *sharing* the training graph's adapter parameters and
gates. Training, then generating, then training again needs no copy; ``set_adapter`` and
``disable_adapters`` on the training graph switch the decode graph too.

How it is obtained: the ``AdaptedModule`` keeps no HF model, only the model's tensors (under the
model's own names) and its config (``capture_info``). On first use the model class
(``transformers.<capture_info.model_class>``) is built on the meta device from that config, each
of its parameters and buffers is pointed at the graph's own tensor (shared, not copied), and a
subclass whose forward reads and writes a ``StaticCache`` held as buffers is exported with
``torch.export`` (dynamic sequence length: one graph runs the prefill and every decoding step).
Only the first and last layer of each kind are exported (the first and last where the layers are
identical; each layer's cache tensors go with it) and the others are copies of their kind's last one's
subgraph (``fxpeft.capture.replicate``, as ``rewrite`` captures): the same graph, node for node, for a
fraction of the export time (SmolLM2's first ``generate``: 2.0 s, against 6.1 s).
Each adapter record (``fxpeft.graph.records.AdapterRecord``) is matched again against that graph and
the kinds' passes splice it; every target they attached, and the gate module, is then replaced by
the training graph's object. Decode graphs are cached per training graph, batch size, cache length
(rounded up to ``LENGTH_STEP``), device, dtype and adapter set, so ``add_adapter`` or
``delete_adapter`` rebuilds them and the first ``generate`` of a shape pays the export.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
from typing import Any, Hashable, Iterator

import torch
import torch.fx

from fxpeft.capture import cache as capture_cache, replicate
from fxpeft.runtime.apply import apply_adapter, program_of
from fxpeft import registry
from fxpeft.graph.records import adapter_records
from fxpeft.graph.targets import fetch, has_target, place
from fxpeft.capture.export import collector_paused, replication_enabled, tidy_export
from fxpeft.runtime.emit import emit
from fxpeft.errors import FxpeftError
from fxpeft.graph.state import GraphState, graph_state, set_graph_state
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft.match.query import match
from fxpeft.graph.gates import active_adapters
from fxpeft.names import GATES
from fxpeft.capture.linear_sites import find_linear_sites
from fxpeft.capture.program import CaptureInfo, Program
from fxpeft.runtime.passes import DECODING, run_pipeline, select
from fxpeft.transforms.fuse import GRAPH_PASSES
from fxpeft.transforms.gqa import gqa_in_sdpa

log = logging.getLogger("fxpeft")
LENGTH_STEP = 16  # cache lengths round up to a multiple, so prompts of similar length share a graph;
# small, because every step attends over the whole cache
_CACHE_PREFIX = "fxpeft_kv"


def cache_length(tokens: int) -> int:
    """The cache length a graph is built for: ``tokens`` rounded up to ``LENGTH_STEP``.

    >>> cache_length(1), cache_length(16), cache_length(17)
    (16, 16, 32)
    """
    return -(-tokens // LENGTH_STEP) * LENGTH_STEP


def decoder_for(gm: AdaptedModule, batch: int, length: int) -> AdaptedModule:
    """The decode graph of ``gm`` for ``batch`` sequences of up to ``length`` tokens (cached).

    It is called ``decoder(input_ids, attention_mask, position_ids, cache_position)`` and returns
    the last position's logits; ``attention_mask`` is ``[batch, cache length]`` (1 where a token
    is, 0 for padding and for positions not yet written)."""
    device = next(gm.parameters()).device
    dtype = gm.base_dtype() or torch.float32  # the cache's: adapters may be fp32 on a bf16 base
    key = (batch, cache_length(length), dtype, device,
           tuple((name, id(rec)) for name, rec in adapter_records(gm).items()))
    return graph_state(gm).decoders.get_or_build(key, lambda: _built_keeping_the_random_state(gm, batch, key[1], dtype, device))


def _built_keeping_the_random_state(gm: AdaptedModule, batch: int, length: int, dtype: torch.dtype,
                                    device: torch.device) -> AdaptedModule:
    """Building splices (and so initialises) adapters whose tensors are then the training
    graph's: it must not move the caller's random state, or a seeded sampling run would draw
    differently on a graph's first generate than on later ones."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), collector_paused():
        return _build(gm, batch, length, dtype, device)


def _build(gm: AdaptedModule, batch: int, length: int, dtype: torch.dtype,
           device: torch.device) -> AdaptedModule:
    model = _bound_model(gm)
    decoder = emit(_export(_with_static_cache(model, batch, length, dtype, device), batch, length))
    set_graph_state(decoder, GraphState(role="decoder", cache_length=length))
    with _one_recompile(decoder):
        grouped = gqa_in_sdpa(decoder)  # before splicing: the adapters' nodes see the same SDPA nodes
        for adapter, record in adapter_records(gm).items():
            _splice_like(decoder, gm, adapter, record)
        if hasattr(gm, GATES):
            decoder.add_module(GATES, getattr(gm, GATES))  # one set of on/off switches for both graphs
        _slim(decoder)
    log.info("fxpeft decode graph: batch %d, cache length %d, %d adapters, %d SDPA with GQA", batch,
             length, len(adapter_records(gm)), grouped)
    return decoder.eval()


@contextlib.contextmanager
def _one_recompile(decoder: AdaptedModule) -> Iterator[None]:
    """Regenerate ``decoder``'s code once, at the end: every pass recompiles after its change,
    and for a 30-layer graph each costs tens of milliseconds; nothing runs it in between."""
    decoder.recompile = lambda: None  # an instance attribute hides the method
    try:
        yield
    finally:
        del decoder.recompile
    decoder.recompile()


def slim_passes() -> list:
    """After splicing, the decode graph asks for the passes that slim a graph that never trains
    (``eval_only``): it drops what only training needs, folds what PEFT computes per step, and
    joins tiny ops (a single-token step is mostly per-op dispatch besides the weights' matmuls).
    None of them drops an adapter: the gates still switch them.

    >>> [p.name for p in slim_passes()]
    ['drop_dropout', 'fold_lora_scale', 'fuse_lora_a', 'strip_leftovers', 'fuse_rms_norm']
    """
    return select(GRAPH_PASSES, {"slims"}, DECODING)


def _slim(decoder: AdaptedModule) -> None:
    run_pipeline(decoder, slim_passes(), DECODING, recompile=False)
    decoder.graph.lint()


def _model_class(gm: AdaptedModule) -> type:
    info = gm.capture_info
    import transformers
    cls = getattr(transformers, getattr(info, "model_class", "") or "", None)
    if info is None or info.frontend != "export" or cls is None or info.config is None:
        raise FxpeftError(f"{type(gm).__name__}: generation needs a graph captured from a "
                          f"transformers causal LM (fxpeft.rewrite(model, ...)); this one was "
                          f"captured from {getattr(info, 'model_class', 'an unknown model')}")
    if not hasattr(cls, "generate") or getattr(info.config, "is_encoder_decoder", False):
        raise FxpeftError(f"{info.model_class} is not a causal LM with a KV cache; fxpeft.generate "
                          f"decodes causal LMs (LlamaForCausalLM, ...)")
    return cls


def _bound_model(gm: AdaptedModule) -> torch.nn.Module:
    """The model class built on the meta device, its tensors replaced by ``gm``'s own."""
    if any(site.kind == "quantized" for site in find_linear_sites(gm)):
        raise FxpeftError("fxpeft.generate does not support quantized (bitsandbytes) graphs yet")
    cls = _model_class(gm)
    with torch.device("meta"):
        model = cls(gm.capture_info.config)
    shared = _shared_tensors(model, gm)
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    table[name] = shared[id(tensor)]
    return model.eval()


def _shared_tensors(model: torch.nn.Module, gm: AdaptedModule) -> dict[int, torch.Tensor]:
    """For each tensor of ``model`` (tied ones once), ``gm``'s tensor under one of its names."""
    found: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                full = f"{prefix}.{name}" if prefix else name
                if tensor is not None and has_target(gm, full):
                    found[id(tensor)] = fetch(gm, full)
                names.setdefault(id(tensor), full)
    missing = [names[i] for i in names if i not in found and i != id(None)]
    if missing:
        raise FxpeftError(f"the graph has no tensor for {missing[:3]} of {type(model).__name__}; "
                          f"cannot build its decode graph")
    return found


def _with_static_cache(model: torch.nn.Module, batch: int, length: int, dtype: torch.dtype,
                       device: torch.device) -> torch.nn.Module:
    """A shell of ``model`` whose forward runs one step against a ``StaticCache`` it holds. The
    cache's tensors are the shell's buffers ``fxpeft_kv_keys_<layer>``, ``fxpeft_kv_values_<layer>``
    and ``fxpeft_kv_length`` (export sees them as constants; ``_name_cache_tensors`` gives the
    graph these names), so each decode graph owns its cache."""
    from transformers import StaticCache
    from transformers.configuration_utils import get_head_shapes
    config = model.config.get_text_config()
    cache = StaticCache(config=config, max_cache_len=length)
    cache.layers = [_step_layer()(length) for _ in cache.layers]  # sliding layers branch on data
    cache.early_initialization(batch, *get_head_shapes(config), dtype, device)
    shared_length = cache.layers[0].cumulative_length
    shell = copy.copy(model)
    shell._buffers = dict(model._buffers)
    # the step's forward and the cache it writes are the shell class's own (copies share them)
    shell.__class__ = type(f"Decode{type(model).__name__}", (type(model),),
                           {"forward": _step, "decode_cache": cache})
    for index, layer in enumerate(cache.layers):
        layer.cumulative_length = shared_length
        for part in ("keys", "values"):
            shell.register_buffer(f"{_CACHE_PREFIX}_{part}_{index}", getattr(layer, part), persistent=False)
    shell.register_buffer(f"{_CACHE_PREFIX}_length", shared_length, persistent=False)
    return shell


@functools.cache
def _step_layer() -> type:
    """A static cache layer that writes at the step's ``cache_position`` (``_step`` hands it
    over), where transformers' own counts a length of its own: so every layer of the graph reads
    the same input, and the layers are one subgraph that ``fxpeft.capture.replicate`` can copy. (Built on
    first use: importing fxpeft does not import transformers.)"""
    from transformers.cache_utils import StaticLayer

    def update(self: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.positions, key_states)
        self.values.index_copy_(2, self.positions, value_states)
        return self.keys, self.values
    return type("StepLayer", (StaticLayer,), {"update": update, "__module__": __name__})


def _step(self: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
          position_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """One forward against the held cache, writing at ``cache_position``; last logits only."""
    cache = self.decode_cache
    cache.layers[0].cumulative_length.copy_(cache_position[0])  # one tensor, shared by the layers
    for layer in cache.layers:
        layer.positions = cache_position
    forward = type(self).__mro__[1].forward
    out = forward(self, input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids, use_cache=True, logits_to_keep=1,
                  **{cache_keyword(forward): cache})
    return out.logits


def cache_keyword(forward: Any) -> str:
    """The keyword that hands ``forward`` its KV cache: transformers 5.25 names it ``cache``,
    5.23 ``past_key_values``. Read from the signature, because a wrong name falls silently into
    ``**kwargs`` and the cache is never written.

    >>> cache_keyword(lambda input_ids, past_key_values=None, **kwargs: None)
    'past_key_values'
    >>> cache_keyword(lambda input_ids, cache=None, **kwargs: None)
    'cache'
    """
    parameters = inspect.signature(forward).parameters
    for keyword in ("cache", "past_key_values"):
        if keyword in parameters:
            return keyword
    raise FxpeftError(f"{getattr(forward, '__qualname__', forward)} takes no KV cache "
                      f"(neither 'cache' nor 'past_key_values'); cannot build its decode graph")


def _export(shell: torch.nn.Module, batch: int, length: int) -> Program:
    device = next(shell.parameters()).device
    tokens = min(8, length - 1)
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    steps = torch.arange(tokens, device=device)
    seq = torch.export.Dim("tokens", min=1, max=length - 1)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": steps.expand(batch, tokens),
              "cache_position": steps}
    shapes = {"input_ids": {1: seq}, "attention_mask": None, "position_ids": {1: seq},
              "cache_position": {0: seq}}
    key = capture_cache.cache_key(shell, inputs) if capture_cache.enabled() else None
    program = capture_cache.lookup(key, shell) if key is not None else None
    if program is None:
        program = _replicated(shell, inputs, shapes) or _exported(shell, inputs, shapes)
        if key is not None:
            capture_cache.store(key, shell, program)
    program.sites = find_linear_sites(program.graph_module)
    return program


def _replicated(shell: torch.nn.Module, inputs: dict[str, torch.Tensor],
                shapes: dict[str, Any]) -> Program | None:
    """The decode graph built from an export of each kind's first and last layers (``fxpeft.capture.
    replicate``'s plan, as ``rewrite`` captures), or None where that is not shown to be the graph a
    full export gives."""
    if not replication_enabled():
        return None
    try:
        stack = replicate.find_layer_stack(shell)
        if len(shell.decode_cache.layers) != len(stack.layers):
            raise replicate.NotReplicable(f"{len(shell.decode_cache.layers)} cache layers for "
                                          f"{len(stack.layers)} layers")
        stack = dataclasses.replace(stack, root_names=tuple(f"{_CACHE_PREFIX}_{part}_{{}}"
                                                            for part in ("keys", "values")))
        plan = replicate.plan_layers(shell, stack)
        program = replicate.captured_once(
            shell, lambda shallow: _exported(_shallow_cache(shallow, plan.held), inputs, shapes), stack, plan)
    except (replicate.NotReplicable, FxpeftError) as why:
        log.debug("fxpeft decode graph: exported whole, not replicated: %s", why)
        return None
    log.debug("fxpeft decode graph: replicated from %d of %d layers (%d kinds)", len(plan.held),
              len(stack.layers), len(set(plan.kinds)))
    return program


def _shallow_cache(shallow: torch.nn.Module, held: tuple[int, ...]) -> torch.nn.Module:
    """``shallow`` (``replicate.shallow_model`` of a decode shell, holding layers ``held``) with
    the cache tensors of each held layer under its shallow position's names, as it holds the
    layers themselves: the layer at position ``i`` (real index ``held[i]``) reads
    ``fxpeft_kv_keys_<i>``.

    >>> shallow = torch.nn.Module()
    >>> for layer in range(7):
    ...     shallow.register_buffer(f"fxpeft_kv_keys_{layer}", torch.full((1,), layer))
    ...     shallow.register_buffer(f"fxpeft_kv_values_{layer}", torch.full((1,), layer))
    >>> shallow.register_buffer("fxpeft_kv_length", torch.zeros(1))
    >>> held = _shallow_cache(shallow, (0, 5, 6))._buffers
    >>> [(name, int(tensor)) for name, tensor in held.items() if "keys" in name]
    [('fxpeft_kv_keys_0', 0), ('fxpeft_kv_keys_1', 5), ('fxpeft_kv_keys_2', 6)]
    """
    full = {name: shallow._buffers.pop(name) for name in list(shallow._buffers)
            if name.startswith(_CACHE_PREFIX)}
    for position, layer in enumerate(held):  # in the full shell's order: layer by layer
        for part in ("keys", "values"):
            shallow._buffers[f"{_CACHE_PREFIX}_{part}_{position}"] = full[f"{_CACHE_PREFIX}_{part}_{layer}"]
    shallow._buffers[f"{_CACHE_PREFIX}_length"] = full[f"{_CACHE_PREFIX}_length"]
    return shallow


def _exported(shell: torch.nn.Module, inputs: dict[str, torch.Tensor], shapes: dict[str, Any]) -> Program:
    try:
        exported = torch.export.export(shell, (), inputs, dynamic_shapes=shapes, strict=False)
    except Exception as err:  # torch.export raises many types; all mean "could not capture"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise FxpeftError(f"could not capture the decode graph of {type(shell).__name__} with a "
                          f"static KV cache: {reason}") from err
    root = exported.module()
    tidy_export(root)
    _name_cache_tensors(root, shell)
    return Program(root, CaptureInfo(type(shell).__mro__[1].__name__, "export", training=False))


def _name_cache_tensors(root: torch.fx.GraphModule, shell: torch.nn.Module) -> None:
    """Point the graph's reads of the cache at the shell's buffer names: export lifts them as
    numbered constants (``model.layers.3.self_attn.lifted_tensor_9``), since the layers reach
    them through the cache object, not as module attributes."""
    names = {id(t): name for name, t in shell._buffers.items() if name.startswith(_CACHE_PREFIX)}
    cache = {id(t) for layer in shell.decode_cache.layers for t in (layer.keys, layer.values)}
    reads = {n.target: n for n in root.graph.find_nodes(op="get_attr")}
    for node in list(root.graph.find_nodes(op="get_attr")):
        value = fetch(root, node.target)
        name = names.get(id(value))
        if name is None and id(value) in cache:  # only a shallow shell names some
            raise replicate.NotReplicable(f"{node.target} is the cache of a layer the shallow "
                                          f"model does not hold")
        if name is None or node.target == name:
            continue
        if name in reads:
            node.replace_all_uses_with(reads[name])
        else:
            place(root, name, value)
            with root.graph.inserting_before(node):
                reads[name] = root.graph.get_attr(name)
            node.replace_all_uses_with(reads[name])
        owner, _, attribute = node.target.rpartition(".")
        delattr(fetch(root, owner), attribute)
        root.graph.erase_node(node)
    root.recompile()


def without_kv_cache(gm: AdaptedModule) -> dict[str, str]:
    """Adapters of ``gm`` the KV-cached decode graph cannot hold, with the reason; then
    ``fxpeft.generate`` decodes with the training graph. That is when several adapters lengthen
    the input (prompt tuning, ``AdapterKind.lengthens``): the training graph stacks their
    virtual tokens, the decode graph holds one adapter's.

    >>> import torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> without_kv_cache(fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"]))))
    {}
    """
    lengthening = {adapter: rule.rewrite for adapter, record in adapter_records(gm).items()
                   for rule in record.rules.rules if registry.get(rule.rewrite).lengthens is not None}
    if len(lengthening) < 2:
        return {}
    return {adapter: f"{kind}: {len(lengthening)} adapters lengthen the input; the decode graph "
            f"holds one" for adapter, kind in lengthening.items()}


def virtual_tokens(gm: AdaptedModule) -> int:
    """How many virtual tokens the active adapters that lengthen the input (prompt tuning) put
    in front of a prompt: what the decode graph's KV cache must hold besides the tokens."""
    active = set(active_adapters(gm))
    return sum(lengthens.tokens(rule.params) for adapter, record in adapter_records(gm).items()
               if adapter in active for rule in record.rules.rules
               if (lengthens := registry.get(rule.rewrite).lengthens) is not None)


def _cache_fillers(gm: AdaptedModule) -> Iterator[tuple[str, registry.FillsCache, int]]:
    """The active adapters of ``gm`` whose kind fills the KV cache (prefix tuning,
    ``AdapterKind.fills_cache``): name, capability and slots, in the order they were added."""
    active = set(active_adapters(gm))
    for adapter, record in adapter_records(gm).items():
        fills = [(registry.get(rule.rewrite).fills_cache, rule.params) for rule in record.rules.rules]
        fills = [(capability, params) for capability, params in fills if capability is not None]
        if adapter in active and fills:
            yield adapter, fills[0][0], fills[0][0].tokens(fills[0][1])


def filled_tokens(gm: AdaptedModule) -> int:
    """How many KV-cache slots the active adapters that fill the cache take in front of a
    prompt (``fill_cache`` writes them)."""
    return sum(tokens for _, _, tokens in _cache_fillers(gm))


def fill_cache(decoder: AdaptedModule, gm: AdaptedModule) -> int:
    """Write the keys and values of ``gm``'s active adapters that fill the KV cache into
    ``decoder``'s cache, from slot 0, the same for every row (once per ``generate``, before
    the prefill); returns the slots filled."""
    start = 0
    for adapter, fills, tokens in _cache_fillers(gm):
        for layer, entries in fills.entries(gm, adapter).items():
            for part, entry in zip(("keys", "values"), entries):
                cache = fetch(decoder, f"{_CACHE_PREFIX}_{part}_{layer}")
                cache[:, :, start:start + tokens] = entry.to(cache.device, cache.dtype)
        start += tokens
    return start


def set_prompt_state(decoder: AdaptedModule, gm: AdaptedModule, ids: torch.Tensor, filled: int) -> None:
    """Before the prefill of ``ids`` (at cache slots ``filled`` on): the per-row state of the
    adapters whose kind reads the prompt's tokens (``AdapterKind.prompt_state``: aLoRA's
    invocation start), which the decode steps, seeing one token, cannot find themselves."""
    for adapter, record in adapter_records(gm).items():
        for rule in record.rules.rules:  # an adapter's rules share their state (written again)
            prompt_state = registry.get(rule.rewrite).prompt_state
            if prompt_state is not None:
                prompt_state(decoder, adapter, rule.params, ids, filled)


def _splice_like(decoder: AdaptedModule, gm: AdaptedModule, adapter: str, record: Any) -> None:
    """Splice ``adapter`` into ``decoder`` by its rules, then share ``gm``'s parameters (a kind
    that lengthens the input splices its own way, ``Lengthens.decode_splice``; one that fills
    the KV cache is not spliced: ``fill_cache`` writes its entries)."""
    if any(registry.get(rule.rewrite).fills_cache is not None for rule in record.rules.rules):
        return
    lengthen = {registry.get(rule.rewrite).lengthens for rule in record.rules.rules} - {None}
    if lengthen:
        for target in record.attached:
            place(decoder, target, fetch(gm, target))
        graph_state(decoder).virtual_tokens[adapter] = lengthen.pop().decode_splice(decoder, adapter, record)
        return
    program = program_of(decoder)
    result = match(program, record.rules)
    wanted = sorted(m.module_path for m in record.matches)
    if sorted(m.module_path for m in result.matches) != wanted:
        raise FxpeftError(f"adapter {adapter!r}: its rules match other modules in the decode graph "
                          f"({sorted(m.module_path for m in result.matches)[:3]}) than in the "
                          f"training graph ({wanted[:3]})")
    apply_adapter(program, record.rules, result, adapter, record.modules_to_save)
    for target in adapter_records(decoder)[adapter].attached:
        place(decoder, target, fetch(gm, target))


def forget(gm: torch.nn.Module) -> None:
    """Drop ``gm``'s cached decode graphs (their KV caches)."""
    graph_state(gm).decoders.clear()


def cached_keys(gm: torch.nn.Module) -> list[Hashable]:
    return list(graph_state(gm).decoders)
