"""Adapters on disk in HF PEFT's layout: ``fxpeft.save`` and ``fxpeft.load``.

A folder holds ``adapter_config.json`` (PEFT's config), ``adapter_model.safetensors`` (only the
adapter tensors, under PEFT's keys) and ``fxpeft_rules.toml`` (the rules that built the adapter,
so fxpeft rebuilds exactly the same graph; PEFT ignores the file). Formats per adapter kind come
from the kind registry (``AdapterKind.peft``). Writes go to a temporary folder and are renamed into place; reads
are strict and only ever safetensors (never pickle).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from fxpeft.adapt import program_of
from fxpeft.adapter_set import AdapterRecord, delete_adapter, record
from fxpeft.adapters import is_adapter_parameter
from fxpeft.api import add_adapter, rewrite
from fxpeft.errors import FxpeftError
from fxpeft.graph_module import AdaptedModule
from fxpeft.kinds.registry import AdapterKind
from fxpeft.peft_format import check_fields, kind_for_config, kind_for_rewrite, to_peft_key
from fxpeft.program import Program
from fxpeft.rules.dump import dump_rules
from fxpeft.rules.loader import load_rules
from fxpeft.rules.schema import RuleSet

CONFIG, WEIGHTS, RULES = "adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml"
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
               "ForConditionalGeneration": "SEQ_2_SEQ_LM", "Model": "FEATURE_EXTRACTION"}


class AdapterFileError(FxpeftError, ValueError):
    """An adapter folder that cannot be read or does not fit the model; names file and key."""


# --- save ---------------------------------------------------------------------------------------

def _kind_of(rules: RuleSet) -> AdapterKind:
    kinds = sorted({rule.rewrite for rule in rules.rules})
    if len(kinds) != 1:
        raise FxpeftError(f"an adapter mixing {' and '.join(kinds)} has no PEFT format; give each "
                          f"kind its own adapter (fxpeft.add_adapter)")
    return kind_for_rewrite(kinds[0])


def _task_type(model_class: str) -> str | None:
    return next((t for suffix, t in _TASK_TYPES.items() if model_class.endswith(suffix)), None)


def peft_config(program: Program, rec: AdapterRecord, kind: AdapterKind) -> dict[str, Any]:
    """The ``adapter_config.json`` content for one adapter."""
    model_config = program.info.config
    config = {"peft_type": kind.peft.peft_type, "task_type": _task_type(program.model_class),
              "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
              "revision": None, "inference_mode": True}
    if rec.modules_to_save:  # only PEFT configs that know the field (not ADAPTION_PROMPT) get it
        config["modules_to_save"] = list(rec.modules_to_save)
    mine = [m for m in rec.matches if m.rule.rewrite == kind.name]
    return {**config, **kind.peft.to_config(mine, program)}


def peft_state_dict(gm: torch.nn.Module, adapter: str, kind: AdapterKind) -> dict[str, torch.Tensor]:
    """``adapter``'s tensors under PEFT's keys (copies, on the CPU)."""
    tensors = {}
    for name, tensor in gm.state_dict().items():
        key = to_peft_key(name, adapter, kind.components) if is_adapter_parameter(name) else None
        if key is not None:
            tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return tensors


def _write_atomically(directory: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write every file into a temporary folder, then rename into place (config last)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        for name, write in writers.items():
            write(staging / name)
        if not directory.exists():
            os.rename(staging, directory)
            return
        for name in writers:
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_json(data: dict[str, Any]) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(data, indent=2, sort_keys=True), "utf-8")


def save(gm: AdaptedModule, directory: "str | Path", adapter: str = "default") -> Path:
    """Write ``adapter`` of ``gm`` to ``directory`` in PEFT's layout; returns the folder.

    >>> import tempfile, torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> folder = fxpeft.save(fxpeft.rewrite(model, "lora_qv"), tempfile.mkdtemp() + "/qv")
    >>> sorted(p.name for p in folder.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors', 'fxpeft_rules.toml']
    """
    rec, program = record(gm, adapter), program_of(gm)
    kind = _kind_of(rec.rules)
    tensors = peft_state_dict(gm, adapter, kind)
    writers = {WEIGHTS: lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
               RULES: lambda path: path.write_text(dump_rules(rec.rules), "utf-8"),
               CONFIG: _write_json(peft_config(program, rec, kind))}
    _write_atomically(Path(directory), writers)
    return Path(directory)


# --- load ---------------------------------------------------------------------------------------

def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: no such file; an adapter folder holds {CONFIG} and "
                               f"{WEIGHTS}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS
    if not path.is_file():
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        extra = f" ({', '.join(pickled)} is pickle, which fxpeft never reads)" if pickled else ""
        raise AdapterFileError(f"{path}: no such file{extra}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise AdapterFileError(f"{path}: not a readable safetensors file: {err}") from None


def _rules(directory: Path, config: dict[str, Any], kind: AdapterKind,
           model: torch.nn.Module) -> RuleSet:
    if (directory / RULES).is_file():
        rules = load_rules(directory / RULES)
        written = sorted({rule.rewrite for rule in rules.rules})
        if written != [kind.name]:  # PEFT rewrites only the JSON; it is the source of truth
            raise AdapterFileError(f"{directory / RULES} builds {', '.join(written)} adapters but "
                                   f"{CONFIG} describes a {kind.name} adapter; {CONFIG} wins: "
                                   f"delete {RULES} to load from {CONFIG} alone")
        return rules
    if isinstance(model, AdaptedModule) and config.get("target_modules") == "all-linear":
        raise AdapterFileError(f"{directory / CONFIG}: target_modules = \"all-linear\" needs the "
                               f"original model; fxpeft.load it there, not into a graph")
    return kind.peft.to_rules(config, model, str(directory / CONFIG))


def _expected(gm: torch.nn.Module, adapter: str, kind: AdapterKind) -> dict[str, str]:
    """PEFT key -> our parameter name, for every tensor ``adapter`` needs."""
    names = (n for n in gm.state_dict() if is_adapter_parameter(n))
    return {key: name for name in names
            if (key := to_peft_key(name, adapter, kind.components)) is not None}


def _check_tensors(expected: dict[str, str], tensors: dict[str, torch.Tensor],
                   gm: torch.nn.Module, path: Path) -> None:
    for label, keys in (("missing", sorted(set(expected) - set(tensors))),
                        ("unexpected", sorted(set(tensors) - set(expected)))):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise AdapterFileError(f"{path}: {label} key {keys[0]}{more}")
    state = gm.state_dict()
    for key, name in expected.items():
        want, got = state[name], tensors[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise AdapterFileError(f"{path}: {key}: expected {want.dtype} {list(want.shape)}, "
                                   f"got {got.dtype} {list(got.shape)}")


def _fill(gm: AdaptedModule, adapter: str, kind: AdapterKind, tensors: dict[str, torch.Tensor],
          path: Path) -> None:
    expected = _expected(gm, adapter, kind)
    _check_tensors(expected, tensors, gm, path)
    state = gm.state_dict()
    with torch.no_grad():
        for key, name in expected.items():
            state[name].copy_(tensors[key])


def load(model: torch.nn.Module, directory: "str | Path", adapter: str = "default",
         trainable: bool = False) -> AdaptedModule:
    """Rebuild an adapted graph from a PEFT (or fxpeft) adapter folder and load its weights.

    ``model`` is the base model (a new graph is captured) or an ``AdaptedModule`` (the adapter
    is added, inactive, next to those it has). With ``trainable=False`` nothing requires grad
    and the graph is in eval mode. On any error the model is left as it was.

    >>> import tempfile, torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> folder = fxpeft.save(fxpeft.rewrite(model, "lora_qv"), tempfile.mkdtemp() + "/qv")
    >>> fxpeft.load(model, folder).adapter_names
    ['default']
    """
    directory = Path(directory)
    config = _read_config(directory)
    kind = kind_for_config(config, str(directory / CONFIG))
    check_fields(config, kind, str(directory / CONFIG))
    rules, tensors = _rules(directory, config, kind, model), _read_weights(directory)
    keep = config.get("modules_to_save") or ()
    grown = isinstance(model, AdaptedModule)
    gm = add_adapter(model, adapter, rules, modules_to_save=keep) if grown else \
        rewrite(model, rules, adapter=adapter, modules_to_save=keep)
    try:
        _fill(gm, adapter, kind, tensors, directory / WEIGHTS)
    except FxpeftError:
        if grown:
            delete_adapter(gm, adapter)
        raise
    if not trainable:
        _freeze_adapter(gm, adapter, kind)
        if not grown:  # a graph the caller already holds keeps its mode
            gm.eval()
    return gm


def _freeze_adapter(gm: torch.nn.Module, adapter: str, kind: AdapterKind) -> None:
    """Only ``adapter``'s tensors stop requiring grad; other adapters keep theirs."""
    for name, param in gm.named_parameters():
        if to_peft_key(name, adapter, kind.components) is not None:
            param.requires_grad_(False)
