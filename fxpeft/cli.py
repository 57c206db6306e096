"""The ``fxpeft`` command line: check rule files, list bundled ones and adapter kinds, explain a
model.

    fxpeft rules                                 # the bundled rule files
    fxpeft kinds                                 # the adapter kinds (from the registry)
    fxpeft check my_rules.toml                   # validate; located errors, exit 1
    fxpeft explain smollm2 --rules lora_qv.toml  # what each rule matches in a model
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fxpeft.api import explain
from fxpeft.errors import FxpeftError
from fxpeft.kinds import registry
from fxpeft.models import load_smollm2
from fxpeft.rules.loader import bundled_rule_files, load_rules


def _load_model(name: str):  # noqa: ANN202 - a transformers model
    """``smollm2`` (the packaged SmolLM2) or a local transformers checkpoint folder."""
    if name == "smollm2":
        return load_smollm2()[0]
    from transformers import AutoModelForCausalLM, AutoModel
    try:
        return AutoModelForCausalLM.from_pretrained(name).eval()
    except ValueError:  # not a causal LM: the bare model still has every linear layer
        return AutoModel.from_pretrained(name).eval()


def _check(paths: Sequence[str]) -> int:
    failed = 0
    for path in paths:
        try:
            rules = load_rules(path)
        except FxpeftError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        summary = ", ".join(f"{r.name} ({r.match} -> {r.rewrite})" for r in rules.rules)
        print(f"{path}: ok: {summary}")
    return 1 if failed else 0


def _list_rules() -> int:
    for name in bundled_rule_files():
        rules = load_rules(name)
        print(f"{name}: {', '.join(r.name for r in rules.rules)}")
    return 0


def _list_kinds() -> int:
    for kind in registry.all_kinds():
        sites = ", ".join(kind.sites) or "by keyword"
        peft = kind.peft.peft_type if kind.peft else "-"
        merge = "merges" if callable(kind.merge) else f"cannot merge ({kind.merge})"
        print(f"{kind.name}: sites {sites}; PEFT {peft}; {merge}")
    return 0


def _explain(model: str, rules: str) -> int:
    print(explain(_load_model(model), rules))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxpeft", description="PEFT as a compiler pass.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate rule files")
    check.add_argument("paths", nargs="+")
    commands.add_parser("rules", help="list the bundled rule files")
    commands.add_parser("kinds", help="list the adapter kinds")
    explain = commands.add_parser("explain", help="show what rules match in a model")
    explain.add_argument("model", help="'smollm2' or a transformers checkpoint folder")
    explain.add_argument("--rules", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxpeft`` command.

    >>> main(["check", "lora_qv.toml"])
    lora_qv.toml: ok: attention q and v (linear -> lora)
    0
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.paths)
        if args.command == "rules":
            return _list_rules()
        if args.command == "kinds":
            return _list_kinds()
        return _explain(args.model, args.rules)
    except FxpeftError as err:
        print(f"fxpeft: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
