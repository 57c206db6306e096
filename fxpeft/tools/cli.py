"""The ``fxpeft`` command line: check rule files, list bundled ones and adapter kinds, explain a
model, convert between PEFT configs and rule files, merge an adapter into a checkpoint, draw a
layer.

    fxpeft rules                                 # the bundled rule files
    fxpeft kinds                                 # the adapter kinds (from the registry)
    fxpeft check my_rules.toml                   # validate; located errors, exit 1
    fxpeft explain smollm2 --rules lora_qv.toml  # what each rule matches in a model
    fxpeft convert ADAPTER_FOLDER --out rules.toml                       # PEFT config -> rules
    fxpeft convert rules.toml --model smollm2 --out adapter_config.json  # rules -> PEFT config
    fxpeft merge smollm2 ADAPTER_FOLDER OUT      # a plain merged transformers checkpoint
    fxpeft graph smollm2 --rules lora_qv.toml --layer 0 --out layer0.svg
    fxpeft export smollm2 ADAPTER_FOLDER OUT --for vllm --max-rank 64  # a plain LoRA for servers

MODEL is ``smollm2`` (the packaged SmolLM2) or a transformers checkpoint folder. Every failure
is one line on stderr and a non-zero exit: 1 for bad input, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any, Sequence

from fxpeft.runtime.rewrite import explain, rewrite
from fxpeft.errors import FxpeftError
from fxpeft import registry
from fxpeft.helpers.models import load_smollm2
from fxpeft.tools.plots import draw_layer
from fxpeft.rules.loader import bundled_rule_files, load_rules
from fxpeft.io.export_lora import export_lora
from fxpeft.io.serialize import load
from fxpeft.tools.convert import config_to_toml, rules_to_config, save_merged, write_text

_MESSAGE_LIMIT = 400  # characters of a foreign error message (transformers', torch's) shown


class UsageError(Exception):
    """A bad command line (argparse's complaint), reported in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage too: two lines
        raise UsageError(f"{self.prog}: {message}")


def _checkpoint_folder(name: str) -> Path:
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise FxpeftError(f"{name}: not 'smollm2' nor a transformers checkpoint folder "
                          f"(no config.json)")
    return folder


def _load_model(name: str) -> Any:  # a transformers model
    """``smollm2`` (the packaged SmolLM2) or a local transformers checkpoint folder."""
    return _load_model_and_tokenizer(name)[0]


def _load_model_and_tokenizer(name: str) -> tuple[Any, Any]:
    """The model, and its tokenizer where the folder has one (tiny test models have none)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # stderr is for the one-line error
    if name == "smollm2":
        return load_smollm2()
    folder = _checkpoint_folder(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    except ValueError:  # not a causal LM: the bare model still has every linear layer
        model = AutoModel.from_pretrained(folder).eval()
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(folder) if has_tokenizer else None


def _check(paths: Sequence[str]) -> int:
    failed = 0
    for path in paths:
        try:
            rules = load_rules(path)
        except FxpeftError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok: {rule_summary(rules)}")
    return 1 if failed else 0


SHOWN_RULES = 8  # ``check`` names this many rules; a bigger file gets counts, not a listing


def rule_summary(rules: Any) -> str:
    """What ``fxpeft check`` says of a valid file: its rules by name, or for a big file the
    count per ``match -> rewrite`` and the first few names (never the whole file on one line).

    >>> from fxpeft.rules import Rule, RuleSet, Where
    >>> rule_summary(RuleSet(tuple(Rule(name=f"r{i}", where=Where(path=["q"])) for i in range(10))))
    '10 rules (10 linear -> lora); first: r0, r1, r2, r3, r4, r5, r6, r7, ... and 2 more'
    """
    if len(rules.rules) <= SHOWN_RULES:
        return ", ".join(f"{r.name} ({r.match} -> {r.rewrite})" for r in rules.rules)
    kinds = collections.Counter(f"{r.match} -> {r.rewrite}" for r in rules.rules)
    counts = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    first = ", ".join(r.name for r in rules.rules[:SHOWN_RULES])
    return (f"{len(rules.rules)} rules ({counts}); first: {first}, ... and "
            f"{len(rules.rules) - SHOWN_RULES} more")


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


def _explain(args: argparse.Namespace) -> int:
    print(explain(_load_model(args.model), args.rules))
    return 0


def _is_peft_config(source: str) -> bool:
    """An adapter folder or a ``.json`` file converts to rules; anything else is a rule file."""
    return Path(source).is_dir() or source.endswith(".json")


def _emit(text: str, out: str | None) -> None:
    if out is None:
        print(text)
    else:
        print(f"wrote {write_text(out, text)}")


def _convert(args: argparse.Namespace) -> int:
    model = _load_model(args.model) if args.model else None
    if not _is_peft_config(args.source):
        if model is None:
            raise FxpeftError(f"{args.source}: a rule file becomes a PEFT config for one model "
                              f"(the modules it matches there): give --model smollm2|FOLDER")
        _emit(rules_to_config(args.source, model), args.out)
        return 0
    text, keep = config_to_toml(args.source, model)
    _emit(text, args.out)
    if keep:  # a rule file has no place for them; say so rather than drop them silently
        print(f"note: modules_to_save = {list(keep)} is not part of a rule file; pass "
              f"modules_to_save={list(keep)} to fxpeft.rewrite (and allow_empty=True if a name "
              f"is absent from the model, as PEFT's 'score' is on BERT)", file=sys.stderr)
    return 0


def _merge(args: argparse.Namespace) -> int:
    model, tokenizer = _load_model_and_tokenizer(args.model)
    extra = tokenizer.save_pretrained if tokenizer is not None else None
    print(f"wrote {save_merged(model, args.adapter, args.out, extra)} (a plain checkpoint: "
          f"AutoModel*.from_pretrained reads it)")
    return 0


def _graph(args: argparse.Namespace) -> int:
    gm = rewrite(_load_model(args.model), args.rules)
    print(f"wrote {draw_layer(gm, args.layer, args.out, detail=args.detail)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    gm = load(_load_model(args.model), args.adapter)
    done = export_lora(gm, args.out, max_rank=args.max_rank)
    print(done.table())
    print(f"wrote {done.folder} (plain LoRA for {args.target}: r = lora_alpha = {done.r}; worst "
          f"relative Frobenius error of dW {done.worst:.3g})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxpeft", description="PEFT as a compiler pass.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = commands.add_parser("check", help="validate rule files")
    check.add_argument("paths", nargs="+")
    commands.add_parser("rules", help="list the bundled rule files")
    commands.add_parser("kinds", help="list the adapter kinds")
    model_help = "'smollm2' or a transformers checkpoint folder"
    explain = commands.add_parser("explain", help="show what rules match in a model")
    explain.add_argument("model", help=model_help)
    explain.add_argument("--rules", required=True)
    convert = commands.add_parser("convert", help="PEFT adapter_config.json (or its folder) to "
                                                  "a rule file, or a rule file to adapter_config.json")
    convert.add_argument("source", help="an adapter folder or .json file; or a rule file")
    convert.add_argument("--model", help=f"{model_help}; needed for rules -> config, and for "
                                         f"target_modules = \"all-linear\"")
    convert.add_argument("--out", help="file to write (default: print)")
    merge = commands.add_parser("merge", help="fold an adapter into a model; save a plain checkpoint")
    merge.add_argument("model", help=model_help)
    merge.add_argument("adapter", help="a PEFT or fxpeft adapter folder")
    merge.add_argument("out", help="a new folder for the merged checkpoint")
    graph = commands.add_parser("graph", help="draw one layer's graph before and after rewriting")
    graph.add_argument("model", help=model_help)
    graph.add_argument("--rules", required=True)
    graph.add_argument("--layer", type=int, default=0, help="layer index (negative: from the end)")
    graph.add_argument("--out", required=True, help="picture to write: .svg, .png or .pdf")
    graph.add_argument("--detail", action="store_true",
                       help="draw every aten node, before and after, instead of the modules")
    export = commands.add_parser("export", help="write an adapter as a plain LoRA folder that "
                                                "vLLM-style servers load")
    export.add_argument("model", help=model_help)
    export.add_argument("adapter", help="a PEFT or fxpeft adapter folder")
    export.add_argument("out", help="the folder to write")
    export.add_argument("--for", dest="target", choices=["vllm"], default="vllm",
                        help="the server whose rules the folder follows")
    export.add_argument("--max-rank", type=int, default=64,
                        help="the server's max_lora_rank (1, 8, 16, 32, 64, 128, 256, 320, 512)")
    return parser


_COMMANDS = {"check": lambda a: _check(a.paths), "rules": lambda a: _list_rules(),
             "kinds": lambda a: _list_kinds(), "explain": _explain, "convert": _convert,
             "merge": _merge, "graph": _graph, "export": _export}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT - 1] + "\u2026"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxpeft`` command.

    >>> main(["check", "lora_qv.toml"])
    lora_qv.toml: ok: attention q and v (linear -> lora)
    0
    """
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(f"{err} (see --help)", file=sys.stderr)
        return 2
    try:
        return _COMMANDS[args.command](args)
    except FxpeftError as err:
        print(f"fxpeft {args.command}: {_one_line(err)}", file=sys.stderr)
    except Exception as err:  # transformers', torch's: still one line, named by type
        print(f"fxpeft {args.command}: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
