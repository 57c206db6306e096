"""Turn TOML rule files into validated ``RuleSet`` objects, with located errors."""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import tomllib
from pathlib import Path
from typing import Any, Iterable

from fxpeft.errors import RuleError
from fxpeft.rules.locate import KeyLocator, LazyKeyLocator
from fxpeft.registry import rewrite_kinds
from fxpeft.rules.schema import Rule, RuleSet, Where, did_you_mean, known_keys

TOP_KEYS = ("version", "description", "allow_training_branches", "allow_empty", "layer_replication",
            "rule")
RULE_KEYS = ("name", "match", "rewrite", "optional", "where", "params")
SUPPORTED_VERSIONS = (1,)
# What one rule file may hold: past these a file is refused before it is parsed or validated
# (matching is linear in rules x sites; 10k rules apply in about 1.5 s on the tiny Llama).
MAX_RULES = 100_000
MAX_BYTES = 16 * 2**20


def bundled_rule_files() -> list[str]:
    """Names of the rule files shipped with fxpeft.

    >>> "lora_qv.toml" in bundled_rule_files()
    True
    """
    root = importlib.resources.files("fxpeft.bundled_rules")
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".toml"))


def load_rules(rules: "str | Path | RuleSet | Rule | Iterable[Rule]") -> RuleSet:
    """Accept a path, a bundled name (``"lora_qv.toml"`` or ``"lora_qv"``), or rule objects.

    >>> load_rules("lora_qv").rules[0].params.r
    8
    """
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, Rule):
        return RuleSet((rules,))
    if isinstance(rules, (str, Path)):
        return _load_file(rules)
    try:
        items = list(rules)
    except TypeError:  # None, a model, a number: not rules at all
        items = None
    if items is None or not all(isinstance(r, Rule) for r in items):
        raise RuleError(f"rules= takes a path, a bundled rule-file name (e.g. \"lora_qv.toml\"), a "
                        f"RuleSet or Rule objects, got {type(rules).__name__} {rules!r:.60}")
    return RuleSet(tuple(items))


def _load_file(name: "str | Path") -> RuleSet:
    path = Path(name)
    if path.is_file():
        _check_size(path.stat().st_size, str(path))
        return parse_rules(path.read_text(encoding="utf-8"), source=str(path))
    bundled = bundled_rule_files()
    wanted = path.name if path.name.endswith(".toml") else f"{path.name}.toml"
    if str(name) in (wanted, wanted[:-5]) and wanted in bundled:
        text = importlib.resources.files("fxpeft.bundled_rules").joinpath(wanted).read_text("utf-8")
        return parse_rules(text, source=wanted)
    raise RuleError(f"no rule file {str(name)!r}: not a file, nor a bundled rule file"
                    f"{did_you_mean(wanted, bundled)}; bundled: {', '.join(bundled)}", file=str(name))


def parse_rules(text: str, source: str = "<string>") -> RuleSet:
    """Parse and validate TOML rule text. Every error is a located ``RuleError``.

    >>> parse_rules('version = 1\\n[[rule]]\\nmatch = "linear"\\nrewrite = "lora"\\n'
    ...             '[rule.where]\\npath = ["q_proj"]\\n').rules[0].where.path
    ('q_proj',)
    """
    _check_size(len(text.encode("utf-8", "surrogatepass")), source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        line = re.search(r"line (\d+)", str(err))
        raise RuleError(f"not valid TOML: {err}", file=source,
                        line=int(line.group(1)) if line else None) from None
    try:
        _check_rule_count(data)
        return dataclasses.replace(_build_rule_set(data, source), locator=LazyKeyLocator(text))
    except RuleError as err:
        if err.file is not None:
            raise
        raise RuleError(err.message, file=source, line=KeyLocator(text).line_of(err.key or ""),
                        key=err.key) from None


def _check_size(size: int, source: str) -> None:
    """A rule file of more than ``MAX_BYTES`` is refused before it is read.

    >>> _check_size(17 * 2**20, "huge.toml")
    Traceback (most recent call last):
    ...
    fxpeft.errors.RuleError: huge.toml: 17.0 MB, past the 16 MB a rule file may hold (split it, or select with regexes: one path pattern matches many modules)
    """
    if size > MAX_BYTES:
        raise RuleError(f"{size / 2**20:.1f} MB, past the {MAX_BYTES // 2**20} MB a rule file may "
                        f"hold (split it, or select with regexes: one path pattern matches many "
                        f"modules)", file=source)


def _check_rule_count(data: dict) -> None:
    rules = data.get("rule")
    if isinstance(rules, list) and len(rules) > MAX_RULES:
        raise RuleError(f"{len(rules)} rules, past the {MAX_RULES} a rule file may hold (select "
                        f"with regexes: one path pattern matches many modules)",
                        key=f"rule[{MAX_RULES}]")


def _reject_unknown(table: dict, allowed: Iterable[str], prefix: str) -> None:
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            raise RuleError(f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}",
                            key=f"{prefix}{key}")


def _expect_table(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise RuleError(f"expected a table, got {type(value).__name__} {value!r}", key=key)
    return value


def _build_rule_set(data: dict, source: str) -> RuleSet:
    _reject_unknown(data, TOP_KEYS, "")
    version = data.get("version", 1)
    if version not in SUPPORTED_VERSIONS:
        raise RuleError(f"unsupported rule-format version {version!r}; this fxpeft reads "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))}", key="version")
    rules = data.get("rule")
    if not isinstance(rules, list) or not rules:
        raise RuleError("expected at least one [[rule]] table", key="rule")
    built = tuple(_build_rule(_expect_table(r, f"rule[{i}]"), f"rule[{i}].") for i, r in enumerate(rules))
    return RuleSet(built, source=source, version=version,
                   allow_training_branches=data.get("allow_training_branches", False),
                   allow_empty=data.get("allow_empty", False),
                   layer_replication=data.get("layer_replication", ()))


def _build_rule(table: dict, prefix: str) -> Rule:
    _reject_unknown(table, RULE_KEYS, prefix)
    kinds = rewrite_kinds()
    if "match" not in table:
        raise RuleError("missing required key (e.g. match = \"linear\")", key=f"{prefix}match")
    if "rewrite" not in table:
        raise RuleError(f"missing required key; one of: {', '.join(kinds)}", key=f"{prefix}rewrite")
    kind = table["rewrite"]
    if not isinstance(kind, str) or kind not in kinds:  # a TOML list or table is no kind's name
        raise RuleError(f"unknown rewrite {kind!r}{did_you_mean(kind, kinds)}; known: {', '.join(kinds)}",
                        key=f"{prefix}rewrite")
    where = _build(Where, table.get("where", {}), prefix, "where")
    params = _build(kinds[kind], table.get("params", {}), prefix, "params")
    fields = {k: table[k] for k in ("name", "match", "optional") if k in table}
    return _construct(Rule, dict(fields, where=where, params=params), prefix)


def _build(cls: type, value: Any, rule_prefix: str, table_name: str) -> Any:
    table = _expect_table(value, f"{rule_prefix}{table_name}")
    _reject_unknown(table, known_keys(cls), f"{rule_prefix}{table_name}.")
    return _construct(cls, table, rule_prefix)


def _construct(cls: type, kwargs: dict, rule_prefix: str) -> Any:
    """Build a dataclass; its own RuleError key (``params.r``) gets this rule's prefix."""
    try:
        return cls(**kwargs)
    except RuleError as err:
        raise RuleError(err.message, key=f"{rule_prefix}{err.key}") from None
