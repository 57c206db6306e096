"""What the ``fxpeft convert`` and ``fxpeft merge`` commands do, as functions.

- ``config_to_toml``: a PEFT ``adapter_config.json`` (or its folder) to the equivalent rule file,
  translated as ``fxpeft.load`` translates it. Only ``target_modules = "all-linear"`` needs the
  model (which linears are "all" depends on it).
- ``rules_to_config``: a rule file to ``adapter_config.json``. It always needs the model: the
  config names the modules the rules match there (as ``fxpeft.save`` writes it).
- ``save_merged``: a base model with an adapter folder folded in, saved as a plain transformers
  checkpoint that ``AutoModel*.from_pretrained`` loads without fxpeft.

Every output is written whole or not at all (a temporary sibling, then one rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from fxpeft.runtime.apply import require_matches
from fxpeft.graph.records import AdapterRecord
from fxpeft.capture.export import capture
from fxpeft.errors import FxpeftError
from fxpeft.match.query import match
from fxpeft.transforms.merge import merge_into
from fxpeft.formats.peft_config import rules_from_config
from fxpeft.rules.loader import load_rules
from fxpeft.io.folders import CONFIG, _read_folder, replace_file, write_new_folder
from fxpeft.io.serialize import (_exact_json, _exact_rules, _kind_of, _parse_config, load,
                                 peft_config)


def read_config(path: "str | Path") -> tuple[dict[str, Any], Path]:
    """The config of an adapter folder or an ``adapter_config.json`` file, and its path."""
    path = Path(path)
    if path.is_dir():
        folder, files = _read_folder(path)
        return _parse_config(files.get(CONFIG), folder / CONFIG), folder / CONFIG
    if not path.is_file():
        raise FxpeftError(f"{path}: no such file or adapter folder")
    return _parse_config(path.read_bytes(), path), path


def config_to_toml(path: "str | Path", model: "torch.nn.Module | None" = None) -> tuple[str, tuple[str, ...]]:
    """Rule-file text equivalent to a PEFT config, and the config's ``modules_to_save`` (which a
    rule file does not hold: pass them to ``fxpeft.rewrite``).

    >>> import json, tempfile
    >>> file = Path(tempfile.mkdtemp()) / "adapter_config.json"
    >>> _ = file.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4}))
    >>> text, keep = config_to_toml(file)
    >>> "rewrite = 'lora'" in text and "r = 4" in text, keep
    (True, ())
    """
    config, source = read_config(path)
    found = rules_from_config(config, model, str(source))
    return _exact_rules(found.rules, source), found.modules_to_save


def rules_to_config(rules: Any, model: torch.nn.Module) -> str:
    """``adapter_config.json`` text for the adapter ``rules`` build on ``model``: the modules they
    match there, as ``fxpeft.save`` would write them.

    >>> import fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> rule = fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["^0$"]))
    >>> import json; json.loads(rules_to_config(rule, net))["target_modules"]
    ['0']
    """
    ruleset = load_rules(rules)
    program = capture(model, None, (), ruleset.allow_training_branches)
    result = match(program, ruleset)
    require_matches(program, ruleset, result)
    config = peft_config(program, AdapterRecord(ruleset, result.matches), _kind_of(ruleset))
    return _exact_json(config, Path(CONFIG))


def write_text(path: "str | Path", text: str) -> Path:
    """Write (or replace) a text file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, lambda staging: staging.write_text(text, encoding="utf-8"))
    return path


def save_merged(model: torch.nn.Module, adapter: "str | Path", out: "str | Path",
                extra: "Callable[[Path], None] | None" = None) -> Path:
    """Load ``adapter`` onto ``model``, fold it into the weights and ``save_pretrained`` a
    plain checkpoint to the new folder ``out`` (``extra`` may add files, e.g. a tokenizer).
    ``model``'s weights are replaced by the merged ones."""
    out = Path(out)
    if os.path.lexists(out) and not (out.is_dir() and not any(out.iterdir())):
        raise FxpeftError(f"{out}: exists; the merged checkpoint goes to a new folder")
    gm = load(model, adapter)
    merge_into(model, gm)
    if out.is_dir():
        out.rmdir()  # an empty folder the user made: replaced by the complete one

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        if extra is not None:
            extra(staging)
    write_new_folder(out, write)
    return out
