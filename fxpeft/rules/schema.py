"""Typed, frozen rule objects. They validate themselves when built, never during a search."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fxpeft.errors import RuleError
from fxpeft import registry
from fxpeft.rules import checks


def spec(default: Any, check: checks.Check, doc: str) -> Any:
    """A validated dataclass field: ``check`` returns an error message or None."""
    return field(default=default, metadata={"check": check, "doc": doc})


def did_you_mean(word: str, choices: Any) -> str:
    """A ``did you mean ...?`` suffix, or "" when nothing is close.

    >>> did_you_mean("alpah", ["alpha", "r"])
    ' (did you mean "alpha"?)'
    """
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def check_fields(obj: Any, prefix: str) -> None:
    """Run every field's check; freeze lists into tuples. Raises RuleError naming the key."""
    for spec in dataclasses.fields(obj):
        value = getattr(obj, spec.name)
        problem = spec.metadata["check"](value) if "check" in spec.metadata else None
        if problem:
            raise RuleError(problem, key=f"{prefix}{spec.name}")
        if isinstance(value, list):
            object.__setattr__(obj, spec.name, tuple(value))


def known_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class Where:
    """Constraints on a match. Every given constraint must hold.

    ``path``: regexes searched (``re.search``) in the module path; any one may match.
    ``exclude``: regexes; a module path matching any of them is skipped.
    ``layers``: explicit layer indices; ``layer_range``: ``[first, last]`` inclusive,
    negative values count from the end (``[-2, -1]`` is the top two layers).
    ``module_type``: class names (``Linear``) or qualified names of the module.

    >>> Where(path=[r"\\.q_proj$"]).path
    ('\\\\.q_proj$',)
    """

    path: tuple[str, ...] = spec((), checks.regex_list, "module-path regexes (any)")
    exclude: tuple[str, ...] = spec((), checks.regex_list, "module-path regexes to skip")
    layers: tuple[int, ...] | None = spec(None, checks.int_list, "explicit layer indices")
    layer_range: tuple[int, int] | None = spec(None, checks.int_pair, "[first, last] layers")
    module_type: tuple[str, ...] = spec((), checks.string_list, "module class names")

    def __post_init__(self) -> None:
        check_fields(self, "where.")


@dataclass(frozen=True)
class Params:
    """Base of every kind's rule params (``[rule.params]``): frozen, validated when built.

    A kind's params class sets ``kind`` (its ``rewrite`` name) and ``match_kinds`` (the sites
    it applies to), and declares its fields with ``spec``.
    """

    kind: ClassVar[str] = ""
    match_kinds: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_fields(self, "params.")


def _default_params() -> Params:
    return registry.default_kind().params()  # a rule without params is the default kind's


@dataclass(frozen=True)
class Rule:
    """One rule: a match kind, ``where`` constraints, and a rewrite with its parameters.

    >>> Rule(match="linear", where=Where(path=["q_proj"])).rewrite
    'lora'
    """

    match: str = spec("linear", checks.text, "what to match")
    where: Where = field(default_factory=Where)
    params: Any = field(default_factory=_default_params)
    name: str = spec("", lambda v: None if isinstance(v, str) else "expected a string", "name")
    optional: bool = spec(False, checks.boolean, "may match nothing")

    def __post_init__(self) -> None:
        check_fields(self, "")
        kinds = registry.match_kinds()
        if self.match not in kinds:
            raise RuleError(f'unknown match kind "{self.match}"{did_you_mean(self.match, kinds)}'
                            f"; known: {', '.join(kinds)}", key="match")
        rewrites = registry.rewrite_kinds()
        if type(self.params) not in rewrites.values():
            raise RuleError(f"params must be one of {sorted(rewrites)} parameter objects, "
                            f"got {type(self.params).__name__}", key="params")
        if self.match not in self.params.match_kinds:
            raise RuleError(f'rewrite "{self.rewrite}" applies to {"/".join(self.params.match_kinds)}'
                            f' matches, not "{self.match}"', key="match")

    @property
    def rewrite(self) -> str:
        return self.params.kind


def check_replicable_kinds(rules: "tuple[Rule, ...]") -> None:
    """A ``RuleError`` unless every rule's kind may sit on replicated layers
    (``AdapterKind.layer_replication``) or is carried by a kind in ``rules`` that may.

    >>> check_replicable_kinds((Rule(where=Where(path=["q"])),))
    """
    kinds = {rule.rewrite for rule in rules}
    carried = {name for kind in kinds for name in registry.get(kind).carries
               if registry.get(kind).layer_replication}
    refused = sorted(k for k in kinds - carried if not registry.get(k).layer_replication)
    if refused:
        able = [k.name for k in registry.all_kinds() if k.layer_replication]
        raise RuleError(f"{refused[0]} adapters cannot be built on replicated layers (PEFT's "
                        f"layer_replication is LoRA's; here: {', '.join(able)})",
                        key="layer_replication")


@dataclass(frozen=True)
class RuleSet:
    """An ordered set of rules; a module claimed by an earlier rule is not matched by a later one.

    >>> RuleSet([Rule(where=Where(path=["q_proj"]))]).rules[0].name
    'rule[0]'
    """

    rules: tuple[Rule, ...]
    source: str = "<python>"
    version: int = 1
    allow_training_branches: bool = False  # the model's train-only ops (besides dropout) are safe
    allow_empty: bool = False  # selecting nothing (no match at all, an absent layer) is no error
    # PEFT's layer_replication: the layer stack rebuilt from [start, end) ranges before capture
    layer_replication: tuple[tuple[int, int], ...] = ()
    locator: Any = field(default=None, compare=False, repr=False)  # KeyLocator of the file text

    def __post_init__(self) -> None:
        for key in ("allow_training_branches", "allow_empty"):
            problem = checks.boolean(getattr(self, key))
            if problem:
                raise RuleError(problem, key=key)
        rules = tuple(self.rules)
        if not rules:
            raise RuleError("a rule set needs at least one rule", file=self.source, key="rule")
        named = tuple(r if r.name else dataclasses.replace(r, name=f"rule[{i}]")
                      for i, r in enumerate(rules))
        object.__setattr__(self, "rules", named)
        if self.layer_replication != ():  # an empty list is an error, not "none"
            self._check_layer_replication()

    def _check_layer_replication(self) -> None:
        """Ranges as PEFT's ``layer_replication`` takes them, for kinds whose adapters may sit
        on replicated layers (``AdapterKind.layer_replication``; PEFT: LoRA's config only)."""
        problem = checks.layer_ranges(self.layer_replication)
        if problem:
            raise RuleError(problem, key="layer_replication")
        object.__setattr__(self, "layer_replication",
                           tuple((int(a), int(b)) for a, b in self.layer_replication))
        check_replicable_kinds(self.rules)

    def located(self, key: str) -> str:
        """``file:line`` of a dotted key (``rule[0].where.layers``), or the source alone when the
        rules were not read from a file.

        >>> RuleSet([Rule(where=Where(path=["q"]))]).located("rule[0]")
        '<python>'
        """
        line = self.locator.line_of(key) if self.locator is not None else None
        return f"{self.source}:{line}" if line else self.source

    def with_params(self, **overrides: Any) -> "RuleSet":
        """A copy with ``overrides`` applied to every rule whose rewrite has those parameters.

        >>> RuleSet([Rule(where=Where(path=["q"]))]).with_params(r=16).rules[0].params.r
        16
        """
        if not overrides:
            return self
        accepted = {k for r in self.rules for k in known_keys(type(r.params))}
        for key in overrides:
            if key not in accepted:
                raise RuleError(f"no rule takes a parameter {key!r}{did_you_mean(key, accepted)}",
                                file=self.source, key=f"override.{key}")
        rules = [dataclasses.replace(r, params=dataclasses.replace(r.params, **{
            k: v for k, v in overrides.items() if k in known_keys(type(r.params))}))
            for r in self.rules]
        return dataclasses.replace(self, rules=tuple(rules))
