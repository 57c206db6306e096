"""Adapters on disk in HF PEFT's layout: ``fxpeft.save`` and ``fxpeft.load``.

A folder holds ``adapter_config.json`` (PEFT's config), ``adapter_model.safetensors`` (only the
adapter tensors, under PEFT's keys) and ``fxpeft_rules.toml`` (the rules that built the adapter,
so fxpeft rebuilds exactly the same graph; PEFT ignores the file). Formats per adapter kind come
from the kind registry (``AdapterKind.peft``). Reads are strict and only ever safetensors (never
pickle). The folder and its files are created like any other file the user writes: mode 0777 /
0666 less the umask.

Nothing lost, nothing silently wrong:

- ``save`` writes nothing until every file's content is known to read back exactly: the config
  as JSON (no NaN, no key that JSON would turn into a string), the rules as TOML that parses to
  the same rules. A config PEFT cannot express is a ``PeftFormatError`` naming the file.
- The safetensors metadata carries ``fxpeft_sha256``, a digest of every tensor's key, dtype,
  shape and bytes; ``load`` checks it when present, so a damaged fxpeft file is an error rather
  than other weights. (PEFT writes no digest; its files are checked for keys, dtypes and shapes.)
- Every problem with a folder is an ``fxpeft.FxpeftError`` (mostly ``AdapterFileError``) whose
  message names the file, and the key where there is one; the model is left as it was.

Atomic saves and consistent reads: ``fxpeft.io.folders``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import safetensors.torch
import torch
from safetensors.torch import save_file

from fxpeft.runtime.apply import program_of as _flat_program_of
from fxpeft.transforms.units import layer_modules, unit_sites
from fxpeft.graph.records import AdapterRecord, delete_adapter, record, set_trainable
from fxpeft.graph.params import is_adapter_parameter
from fxpeft.runtime.rewrite import add_adapter, rewrite
from fxpeft.errors import FxpeftError, MatchError, PassError, RuleError
from fxpeft.io.base_model import load_base, local_name
from fxpeft.io.folders import (CONFIG, RULES, WEIGHTS, AdapterFileError, _fsync, _read_folder,
                               replace_file, replace_folder)
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft import registry
from fxpeft.registry import AdapterKind, saved_components, values_from_file
from fxpeft.names import PEFT_PREFIX
from fxpeft.formats.peft_format import (INERT_FIELDS, PeftFormatError, neutral, check_fields,
                                        kind_for_config, kind_for_rewrite, to_peft_key)
from fxpeft.formats.peft_config import module_names, optional_rules
from fxpeft.io.file_contents import check_supported, without_base_copies
from fxpeft.capture.program import Program
from fxpeft.rules.dump import dump_rules
from fxpeft.rules.loader import parse_rules
from fxpeft.rules.schema import RuleSet

DIGEST = "fxpeft_sha256"
log = logging.getLogger("fxpeft")
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
               "ForConditionalGeneration": "SEQ_2_SEQ_LM", "Model": "FEATURE_EXTRACTION"}
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_short = _REPR.repr  # adversarial values can be huge; messages quote only their start


# --- save: the files' contents ------------------------------------------------------------------

def _kind_of(rules: RuleSet) -> AdapterKind:
    """The kind whose PEFT config describes the adapter: its only kind, or the one whose config
    carries all the others (``AdapterKind.carries``: LoRA's ``trainable_token_indices``)."""
    kinds = sorted({rule.rewrite for rule in rules.rules})
    found = [name for name in kinds if set(kinds) <= {name, *registry.get(name).carries}]
    if len(found) != 1:
        raise FxpeftError(f"an adapter mixing {' and '.join(kinds)} has no PEFT format; give each "
                          f"kind its own adapter (fxpeft.add_adapter)")
    return kind_for_rewrite(found[0])


def _described(kind: AdapterKind) -> set[str]:
    """The rewrites an adapter described by ``kind``'s config may hold."""
    return {kind.name, *kind.carries}


def _task_type(model_class: str) -> str | None:
    return next((t for suffix, t in _TASK_TYPES.items() if model_class.endswith(suffix)), None)


def config_header(program: Program, peft_type: str) -> dict[str, Any]:
    """The fields every ``adapter_config.json`` starts with: type, task and base model."""
    model_config = program.info.config
    return {"peft_type": peft_type, "task_type": _task_type(program.model_class),
            "base_model_name_or_path": local_name(getattr(model_config, "_name_or_path", None)),
            "revision": None, "inference_mode": True}


def program_of(gm: torch.nn.Module) -> Program:
    """``gm``'s ``Program``, with every linear layer indexed: a ``layer_units`` copy (FSDP2 per
    layer) keeps its layers' linears inside the layer modules."""
    if not layer_modules(gm):
        return _flat_program_of(gm)
    return Program(gm, gm.capture_info, unit_sites(gm))


def peft_config(program: Program, rec: AdapterRecord, kind: AdapterKind) -> dict[str, Any]:
    """The ``adapter_config.json`` content for one adapter."""
    config = config_header(program, kind.peft.peft_type)
    if rec.modules_to_save:  # only PEFT configs that know the field (not ADAPTION_PROMPT) get it
        config["modules_to_save"] = list(rec.modules_to_save)
    mine = [m for m in rec.matches if m.rule.rewrite in _described(kind)]
    return {**config, **kind.peft.to_config(mine, program)}


def is_sharded(tensor: torch.Tensor) -> bool:
    """A ``DTensor`` (FSDP2's parameters): each rank holds a shard.

    >>> is_sharded(torch.zeros(2))
    False
    """
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def peft_state_dict(gm: torch.nn.Module, adapter: str, kind: AdapterKind) -> dict[str, torch.Tensor]:
    """``adapter``'s tensors under PEFT's keys (copies, on the CPU). Sharded tensors (FSDP2) are
    gathered whole: a collective, so every rank must call this."""
    tensors = {}
    for name, tensor in gm.state_dict().items():
        key = to_peft_key(name, adapter, saved_components(kind), kind.peft.key_prefix) \
            if is_adapter_parameter(name) else None
        if key is not None:
            tensor = tensor.full_tensor() if is_sharded(tensor) else tensor
            tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return tensors


def has_sharded_adapters(gm: torch.nn.Module) -> bool:
    """Whether FSDP2 shards ``gm``'s adapters (its parameters are ``DTensor``s).

    >>> has_sharded_adapters(torch.nn.Linear(2, 2))
    False
    """
    return any(is_sharded(p) for name, p in gm.named_parameters() if is_adapter_parameter(name))


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's key, dtype, shape and bytes, in key order.

    >>> tensor_digest({"a": torch.zeros(2)}) == tensor_digest({"a": torch.zeros(2)})
    True
    >>> tensor_digest({"a": torch.zeros(2)}) == tensor_digest({"a": torch.zeros(2).double()})
    False
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode() + b"\0")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _as_json(value: Any) -> Any:
    """``value`` with tuples as lists: what JSON gives back for a faithful write."""
    if isinstance(value, dict):
        return {key: _as_json(item) for key, item in value.items()}
    return [_as_json(item) for item in value] if isinstance(value, (list, tuple)) else value


def _exact_json(config: dict[str, Any], path: Path) -> str:
    """``config`` as JSON text that reads back as the same values, or a ``PeftFormatError``."""
    for key, value in config.items():
        try:
            same = json.loads(json.dumps(value, allow_nan=False)) == _as_json(value)
        except (TypeError, ValueError) as err:  # NaN, infinity, objects JSON has no form for
            same = False
            why = f": {err}"
        else:
            why = ""
        if not same:
            raise PeftFormatError(f"{path}: {key} = {_short(value)} cannot be written as JSON "
                                  f"exactly{why}")
    return json.dumps(config, indent=2, sort_keys=True, allow_nan=False)


def _exact_rules(rules: RuleSet, path: Path) -> str:
    """The TOML rule text, checked to parse back to the same rules."""
    text = dump_rules(rules)
    if parse_rules(text, source=str(path)).rules != rules.rules:
        raise FxpeftError(f"{path}: the adapter's rules cannot be written exactly as TOML (a NaN "
                          f"or another value TOML reads back differently)")
    return text


def _writers(gm: AdaptedModule, adapter: str, directory: Path) -> dict[str, Callable[[Path], None]]:
    """What to write, per file name; everything is computed and checked before any write."""
    rec, program = record(gm, adapter), program_of(gm)
    kind = _kind_of(rec.rules)
    tensors = peft_state_dict(gm, adapter, kind)
    try:
        fields = peft_config(program, rec, kind)
        if kind.peft.save_state is not None:  # training state the files carry (AdaLoRA's ranks)
            fields, tensors = kind.peft.save_state(gm, adapter, fields, tensors)
        config = _exact_json(fields, directory / CONFIG)
    except PeftFormatError as err:
        if str(directory) in str(err):
            raise
        raise PeftFormatError(f"{directory / CONFIG}: {err}") from err
    # the graph's layers, which the folder must rebuild alone (an adapter added later leaves
    # the ranges out of its own rules: AdapterKind.layer_replication)
    layers = dataclasses.replace(rec.rules, layer_replication=program.info.layer_replication)
    rules = _exact_rules(layers, directory / RULES)
    metadata = {"format": "pt", DIGEST: tensor_digest(tensors)}
    return {WEIGHTS: lambda path: save_file(tensors, str(path), metadata=metadata),
            RULES: lambda path: path.write_bytes(rules.encode("utf-8")),
            CONFIG: lambda path: path.write_bytes(config.encode("utf-8"))}


def save(gm: AdaptedModule, directory: "str | Path", adapter: str = "default") -> Path:
    """Write ``adapter`` of ``gm`` to ``directory`` in PEFT's layout; returns the folder.

    The folder is replaced as a whole and atomically (see the module docstring): a reader sees
    the old adapter or the new one, never a mix, and nothing else is left next to it.

    >>> import tempfile, torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> folder = fxpeft.save(fxpeft.rewrite(model, "lora_qv"), tempfile.mkdtemp() + "/qv")
    >>> sorted(p.name for p in folder.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors', 'fxpeft_rules.toml']

    A graph sharded by FSDP2 (``fully_shard``): call ``save`` on every rank. Each gathers the
    adapter (a collective), rank 0 writes, and all return once the folder is complete.
    """
    _on_rank_zero(gm, adapter, Path(directory), replace_folder)
    return Path(directory)


def _on_rank_zero(gm: AdaptedModule, adapter: str, directory: Path,
                  write: Callable[[Path, dict[str, Callable[[Path], None]]], None]) -> None:
    """``write(directory, writers)``; for a sharded graph (FSDP2) every rank gathers the adapter
    (a collective), rank 0 writes, and all return once the files are complete."""
    sharded = has_sharded_adapters(gm)
    writers = _writers(gm, adapter, directory)
    if not sharded or torch.distributed.get_rank() == 0:
        write(directory, writers)
    if sharded:
        torch.distributed.barrier()  # no rank reads the folder before rank 0 has written it



# --- load: parsing ------------------------------------------------------------------------------

@contextlib.contextmanager
def _located(path: Path) -> Iterator[None]:
    """Whatever goes wrong reading ``path`` becomes an error that names it."""
    try:
        yield
    except FxpeftError as err:
        if str(path) in str(err):
            raise
        detail = f"{err.key}: {err.message}" if isinstance(err, RuleError) and err.key else str(err)
        raise AdapterFileError(f"{path}: {detail}") from err
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError, re.error) as err:  # a config of unexpected shape, in code reading it
        raise AdapterFileError(f"{path}: cannot be read: {type(err).__name__}: {err}") from err


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range for a number")
    return number


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (else which value counts is a guess)."""
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            raise ValueError(f"key {_short(key)} appears more than once")
        table[key] = value
    return table


def _parse_config(data: bytes | None, path: Path) -> dict[str, Any]:
    if data is None:
        raise AdapterFileError(f"{path}: no such file; an adapter folder holds {CONFIG} and "
                               f"{WEIGHTS}")
    try:
        config = json.loads(data.decode("utf-8"), parse_constant=_no_constant,
                            parse_float=_finite, object_pairs_hook=_unique)
    except (ValueError, RecursionError) as err:  # JSON and UTF-8 errors are ValueErrors
        raise AdapterFileError(f"{path}: not valid JSON: {_short(str(err))}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _header_metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file that safetensors has already read."""
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + size]).get("__metadata__")
    return metadata if isinstance(metadata, dict) else {}


def _parse_weights(data: bytes | None, path: Path) -> dict[str, torch.Tensor]:
    if data is None:
        pickled = sorted(p.name for p in path.parent.glob("*.bin")) + \
            sorted(p.name for p in path.parent.glob("*.pt"))
        extra = f" ({', '.join(pickled)} is pickle, which fxpeft never reads)" if pickled else ""
        raise AdapterFileError(f"{path}: no such file{extra}")
    try:
        tensors = safetensors.torch.load(data)
        digest = _header_metadata(data).get(DIGEST)
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise AdapterFileError(f"{path}: not a readable safetensors file: {_short(str(err))}") from None
    if digest is not None and digest != tensor_digest(tensors):
        raise AdapterFileError(f"{path}: damaged: its tensors do not match the {DIGEST} "
                               f"written with them")
    return tensors


def _modules_to_save(config: dict[str, Any], path: Path) -> tuple[str, ...]:
    """PEFT's ``modules_to_save``: module names, never anything path-like."""
    try:
        return module_names(config, str(path))
    except PeftFormatError as err:
        raise AdapterFileError(str(err)) from None


def _rules(folder: Path, files: dict[str, bytes], config: dict[str, Any], kind: AdapterKind,
           model: torch.nn.Module) -> tuple[RuleSet, Path]:
    """The adapter's rules, and the file they came from."""
    if RULES not in files:
        if isinstance(model, AdaptedModule) and config.get("target_modules") == "all-linear":
            raise AdapterFileError(f"{folder / CONFIG}: target_modules = \"all-linear\" needs the "
                                   f"original model; fxpeft.load it there, not into a graph")
        with _located(folder / CONFIG):
            return optional_rules(kind.peft.to_rules(config, model, str(folder / CONFIG))), folder / CONFIG
    with _located(folder / RULES):
        rules = parse_rules(files[RULES].decode("utf-8"), source=str(folder / RULES))
    written = sorted({rule.rewrite for rule in rules.rules})
    if kind.name not in written or not set(written) <= _described(kind):  # PEFT rewrites only the JSON
        raise AdapterFileError(f"{folder / RULES} builds {', '.join(written)} adapters but "
                               f"{CONFIG} describes a {kind.name} adapter; {CONFIG} wins: "
                               f"delete {RULES} to load from {CONFIG} alone")
    return rules, folder / RULES


# --- load: building the adapter -----------------------------------------------------------------

def _build(model: torch.nn.Module, adapter: str, rules: RuleSet, keep: Sequence[str],
           source: Path, capture: dict[str, Any]) -> AdaptedModule:
    """The adapted graph; errors that come from the rules name the file they came from."""
    try:
        with values_from_file():  # _fill writes every adapter tensor next
            # a folder keeps PEFT's meaning: its modules_to_save may name absent heads ("score"),
            # and an adapter that adapts nothing is refused by _fill
            if isinstance(model, AdaptedModule):
                return add_adapter(model, adapter, rules, modules_to_save=keep, allow_empty=True)
            return rewrite(model, rules, adapter=adapter, modules_to_save=keep, allow_empty=True,
                           **capture)
    except (PassError, MatchError, RuleError) as err:
        if str(source) in str(err):
            raise
        raise AdapterFileError(f"{source}: the adapter it describes cannot be built: {err}") from err


def _comparable(value: Any) -> Any:
    """A config value as PEFT may rewrite it: lists in any order (PEFT keeps target_modules as a
    set), neutral values (None, False, empty) alike."""
    if neutral(value):
        return None
    if isinstance(value, (list, tuple, set)):
        return sorted(map(str, value))
    return value


def _check_rules_match_config(gm: AdaptedModule, adapter: str, kind: AdapterKind,
                              config: dict[str, Any], folder: Path, from_rules: bool = True) -> None:
    """What the graph's adapter is must be what ``adapter_config.json`` says. Loading
    (``from_rules``): ``fxpeft_rules.toml`` must build exactly that, as PEFT's ``save_pretrained``
    rewrites only the JSON, so an edited JSON with a stale TOML is refused. Resuming: the graph
    the weights go into must have been built with that config."""
    ours = peft_config(program_of(gm), record(gm, adapter), kind)
    compared = (kind.peft.fields | {"modules_to_save"}) - INERT_FIELDS - kind.peft.state_fields \
        - kind.peft.graph_fields
    for field in sorted(compared):
        if _comparable(ours.get(field)) != _comparable(config.get(field)):
            says = f"{folder / CONFIG}: says {field} = {config.get(field)!r}"
            if not from_rules:
                raise AdapterFileError(
                    f"{says}, but adapter {adapter!r} of this graph has {field} = "
                    f"{ours.get(field)!r}; resume into a graph built as the folder says "
                    f"(fxpeft.load(model, folder) builds one)")
            raise AdapterFileError(
                f"{says}, but {RULES}, saved with it, builds {field} = {ours.get(field)!r} on "
                f"this model; {CONFIG} is the source of truth (PEFT rewrites only it): if it was "
                f"edited on purpose, delete {RULES} to load from {CONFIG} alone")


def _module_path(key: str, components: tuple[str, ...]) -> str:
    """The module a PEFT key belongs to: ``...q_proj.lora_A.weight`` -> ``...q_proj`` (PEFT's
    copy of a base weight, ``...base_layer.weight``, belongs to the layer too)."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    cut = next((i for i, part in enumerate(parts) if part in (*components, "base_layer")),
               len(parts) - 1)
    return ".".join(parts[:cut])


def _check_modules(model: torch.nn.Module, kind: AdapterKind, tensors: dict[str, torch.Tensor],
                   folder: Path) -> None:
    """Weights for none of the modules ``model`` has mean the folder is another model's (GPT-2's
    ``c_attn`` in a Llama): said first, before anything is built or any field compared."""
    have = {path for path, _ in model.named_modules()}
    named = {path for key in tensors if key.startswith(PEFT_PREFIX)
             and (path := _module_path(key, saved_components(kind)))}
    foreign = sorted(named - have)
    if not foreign or len(foreign) < len(named):  # a stray key is "unexpected", said later
        return
    info = getattr(model, "capture_info", None)
    model_class = info.model_class if info is not None else type(model).__name__
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in have if p})
    close = difflib.get_close_matches(foreign[0].rsplit(".", 1)[-1], leaves, n=3, cutoff=0.3)
    raise AdapterFileError(
        f"{folder / WEIGHTS}: holds adapter weights for {foreign[0]}{more}, and {model_class} "
        f"has none of these modules: the folder was made for another model; closest module "
        f"names here: "
        f"{', '.join(close or leaves[:3]) or 'none'}")


def _expected(gm: torch.nn.Module, adapter: str, kind: AdapterKind) -> dict[str, str]:
    """PEFT key -> our parameter name, for every tensor ``adapter`` needs."""
    names = (n for n in gm.state_dict() if is_adapter_parameter(n))
    return {key: name for name in names
            if (key := to_peft_key(name, adapter, saved_components(kind), kind.peft.key_prefix)) is not None}


def _check_tensors(expected: dict[str, str], tensors: dict[str, torch.Tensor],
                   gm: torch.nn.Module, path: Path) -> None:
    """Same keys and shapes; a floating tensor of another floating dtype is cast on load, as
    PEFT does (its adapters for bf16 bases are saved in fp32)."""
    for label, keys in (("missing", sorted(set(expected) - set(tensors))),
                        ("unexpected", sorted(set(tensors) - set(expected)))):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise AdapterFileError(f"{path}: {label} key {keys[0]}{more}")
    state = gm.state_dict()
    for key, name in expected.items():
        want, got = state[name], tensors[key]
        if got.shape != want.shape or (got.dtype != want.dtype and not (
                got.dtype.is_floating_point and want.dtype.is_floating_point)):
            raise AdapterFileError(f"{path}: {key}: expected {want.dtype} {list(want.shape)}, "
                                   f"got {got.dtype} {list(got.shape)}")


def _covered(gm: AdaptedModule, adapter: str, kind: AdapterKind, tensors: dict[str, torch.Tensor],
             folder: Path, source: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The keys the graph expects and the file's adapter tensors, once every layer the file
    adapts has a site here (``check_supported``: the feature it needs, named) and the adapter
    adapts something (PEFT, too, refuses a config that adapts nothing)."""
    expected = _expected(gm, adapter, kind)
    tensors = without_base_copies(gm, adapter, tensors, folder / WEIGHTS)
    check_supported(program_of(gm), kind, set(expected), set(tensors), folder / WEIGHTS)
    if not expected:
        raise AdapterFileError(f"{source}: the adapter it describes matches no module of "
                               f"{program_of(gm).model_class}")
    return expected, tensors


def _fill(gm: AdaptedModule, adapter: str, kind: AdapterKind, tensors: dict[str, torch.Tensor],
          folder: Path, source: Path, consistent: Callable[[], None]) -> None:
    """Check, in the order that blames the right thing, then copy: the config
    (``consistent``) before keys and shapes (the caller has checked the modules)."""
    expected, tensors = _covered(gm, adapter, kind, tensors, folder, source)
    consistent()
    _check_tensors(expected, tensors, gm, folder / WEIGHTS)
    state = gm.state_dict()
    with torch.no_grad():
        for key, name in expected.items():
            copy_whole_into(state[name], tensors[key])


def copy_whole_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy the whole tensor ``whole`` into ``target``; a sharded ``target`` (FSDP2) takes only
    its own shard (every rank holds ``whole``, so no rank sends anything).

    >>> target = torch.zeros(2); copy_whole_into(target, torch.ones(2)); target
    tensor([1., 1.])
    """
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor
        whole = distribute_tensor(whole.to(target.device), target.device_mesh, target.placements,
                                  src_data_rank=None)
    target.copy_(whole)


def _fill_with_state(gm: AdaptedModule, adapter: str, kind: AdapterKind, config: dict[str, Any],
                     tensors: dict[str, torch.Tensor], folder: Path, source: Path,
                     consistent: Callable[[], None] = lambda: None) -> None:
    """The training state the files carry (AdaLoRA's ranks), then the weights; a file this
    graph cannot hold is refused before its state is read."""
    if kind.peft.load_state is not None:
        _covered(gm, adapter, kind, tensors, folder, source)
        with _located(folder / CONFIG):
            tensors = kind.peft.load_state(gm, adapter, config, tensors, str(folder / CONFIG))
    _fill(gm, adapter, kind, tensors, folder, source, consistent)


def _read_config(directory: Path) -> tuple[Path, dict[str, bytes], dict[str, Any], AdapterKind]:
    """The folder read, its files, its parsed and checked config, and the kind it describes."""
    folder, files = _read_folder(directory)
    config = _parse_config(files.get(CONFIG), folder / CONFIG)
    with _located(folder / CONFIG):
        kind = kind_for_config(config, str(folder / CONFIG))
        check_fields(config, kind, str(folder / CONFIG))
    return folder, files, config, kind


def load(model: "torch.nn.Module | str | Path", directory: "str | Path | None" = None,
         adapter: str = "default", trainable: bool = False, *, example_inputs: Any = None,
         leaf_modules: Sequence[type] = (), **base_options: Any) -> AdaptedModule:
    """Rebuild an adapted graph from a PEFT (or fxpeft) adapter folder and load its weights.

    ``load(model, folder)``: ``model`` is the base model (a new graph is captured, with
    ``example_inputs`` and ``leaf_modules`` as ``fxpeft.rewrite`` takes them) or an
    ``AdaptedModule`` (the adapter is added, inactive, next to those it has).
    ``load(folder, **base_options)``: the base model is the local folder the adapter's
    ``base_model_name_or_path`` names, loaded with ``from_pretrained(base, **base_options)``
    (``dtype``, ``quantization_config``, ``device_map``); a folder is never taken for a model,
    nor a model for a folder. With ``trainable=False`` nothing requires grad and
    the graph is in eval mode. On any error the model is left as it was; a problem with the
    folder is an ``FxpeftError`` naming the file (and key).

    >>> import tempfile, torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> folder = fxpeft.save(fxpeft.rewrite(model, "lora_qv"), tempfile.mkdtemp() + "/qv")
    >>> fxpeft.load(model, folder).adapter_names
    ['default']
    """
    model, directory, read = _base_and_folder(model, directory, base_options)
    grown = isinstance(model, AdaptedModule)
    if grown and (example_inputs is not None or leaf_modules):
        raise FxpeftError("example_inputs and leaf_modules apply to capturing a base model; "
                          "this model is already an fxpeft graph, which is not captured again")
    if grown and has_sharded_adapters(model):
        return _load_onto_sharded(model, directory, adapter, trainable)
    folder, files, config, kind = read or _read_config(directory)
    keep = _modules_to_save(config, folder / CONFIG)
    rules, source = _rules(folder, files, config, kind, model)
    tensors = _parse_weights(files.get(WEIGHTS), folder / WEIGHTS)
    _check_modules(model, kind, tensors, folder)  # another model's folder: said before building
    capture = {"example_inputs": example_inputs, "leaf_modules": leaf_modules}
    gm = _build(model, adapter, rules, keep, source, capture)
    def consistent() -> None:
        if source == folder / RULES:
            _check_rules_match_config(gm, adapter, kind, config, folder)
    try:
        _fill_with_state(gm, adapter, kind, config, tensors, folder, source, consistent)
    except FxpeftError:
        if grown:
            delete_adapter(gm, adapter)
        raise
    if not trainable:
        set_trainable(gm, [adapter], False)
        if not grown:  # a graph the caller already holds keeps its mode
            gm.eval()
    return gm


def _load_onto_sharded(gm: AdaptedModule, directory: Path, adapter: str, trainable: bool) -> AdaptedModule:
    """``load`` onto a graph FSDP2 shards (``shard_layers``, or ``fully_shard`` on the graph):
    its adapters are fixed (FSDP2 grouped and sharded every parameter when it wrapped them), so
    the folder fills the adapter ``adapter`` it already has, each rank keeping its shard of every
    tensor, as ``restore`` does; with ``trainable=False`` that adapter is frozen."""
    if adapter not in gm.adapter_names:
        raise FxpeftError(f"fxpeft.load: this graph is sharded by FSDP2, which fixed its adapters "
                          f"({', '.join(gm.adapter_names)}) when it sharded them, so {adapter!r} cannot "
                          f"be added; load it onto the unsharded graph (fxpeft.load(gm, folder, "
                          f"adapter={adapter!r})), then shard that graph (shard_layers)")
    restore(gm, directory, adapter)  # every rank reads the folder and keeps its own shard
    if not trainable:
        set_trainable(gm, [adapter], False)
    return gm


def _base_and_folder(model: Any, directory: Any, options: dict[str, Any]) -> tuple[Any, Path, Any]:
    """``load(model, folder)`` as given; ``load(folder)`` with the base the folder names (and
    the folder as read, so it is read once)."""
    if isinstance(model, (str, os.PathLike)):
        if directory is not None:
            raise FxpeftError(f"fxpeft.load({str(model)!r}, {str(directory)!r}): the first argument "
                              f"is the base model, or the adapter folder alone (its base is loaded "
                              f"from base_model_name_or_path)")
        read = _read_config(Path(model))
        return load_base(read[2], read[0] / CONFIG, options), Path(model), read
    if not isinstance(model, torch.nn.Module):
        raise FxpeftError(f"fxpeft.load: the first argument is the base model (an nn.Module) or an "
                          f"adapter folder, got {type(model).__name__}")
    if directory is None:
        raise FxpeftError("fxpeft.load(model, folder): the adapter folder is missing")
    if options:
        raise FxpeftError(f"fxpeft.load: {', '.join(sorted(options))} load a base model, which "
                          f"only fxpeft.load(folder) does; this call was given the model")
    return model, Path(directory), None


# --- adapter files among other files (the HF Trainer's checkpoint folders) ----------------------

def write_into(gm: AdaptedModule, directory: "str | Path", adapter: str = "default") -> Path:
    """Write ``adapter``'s files (as ``save`` does) into ``directory``, keeping the other files
    there: a Trainer checkpoint also holds the optimizer's state. Each file is replaced
    atomically and the config comes last, but unlike ``save`` the set is not swapped in as one.
    A sharded graph (FSDP2): call on every rank, as ``save``.

    >>> import tempfile, torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "optimizer.pt").write_bytes(b"")
    >>> sorted(p.name for p in write_into(fxpeft.rewrite(model, "lora_qv"), folder).iterdir())
    ['adapter_config.json', 'adapter_model.safetensors', 'fxpeft_rules.toml', 'optimizer.pt']
    """
    _on_rank_zero(gm, adapter, Path(directory), _write_files)
    return Path(directory)


def _write_files(directory: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in sorted(writers, key=lambda name: name == CONFIG):  # a config means complete
        replace_file(directory / name, writers[name])
    _fsync(directory)


def restore(gm: AdaptedModule, directory: "str | Path", adapter: str = "default") -> None:
    """Copy the weights of the adapter folder ``directory`` into ``gm``'s adapter ``adapter``,
    which must be the adapter the folder describes (same kind, config and keys): resuming from
    a checkpoint. Trainable state and parameter objects stay as they are (an optimizer holds
    them); on any error nothing is changed.

    >>> import tempfile, torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> gm = fxpeft.rewrite(model, "lora_qv")
    >>> folder = fxpeft.save(gm, tempfile.mkdtemp() + "/qv")
    >>> other = fxpeft.rewrite(model, "lora_qv")
    >>> restore(other, folder)
    >>> all(torch.equal(a, b) for a, b in zip(fxpeft.adapter_state_dict(gm).values(),
    ...                                       fxpeft.adapter_state_dict(other).values()))
    True
    """
    folder, files, config, kind = _read_config(Path(directory))
    ours = _kind_of(record(gm, adapter).rules)
    if ours is not kind:
        raise AdapterFileError(f"{folder / CONFIG}: describes a {kind.name} adapter, but adapter "
                               f"{adapter!r} of this graph is {ours.name}")
    tensors = _parse_weights(files.get(WEIGHTS), folder / WEIGHTS)
    _check_modules(gm, kind, tensors, folder)  # another model's folder, before its fields
    _check_rules_match_config(gm, adapter, kind, config, folder, from_rules=False)
    _fill_with_state(gm, adapter, kind, config, tensors, folder, folder / CONFIG)
