"""The rule parser against adversarial input: whatever the text, the result is a RuleSet or a
located ``fxpeft.RuleError``, never another exception. Run deterministically in CI (the
hypothesis profile in conftest.py)."""

import importlib.resources

from hypothesis import given, settings
from hypothesis import strategies as st

import fxpeft
from fxpeft.rules import parse_rules
from fxpeft.rules.dump import _value
from fxpeft.rules.loader import bundled_rule_files

BUNDLED = [importlib.resources.files("fxpeft.bundled_rules").joinpath(name).read_text("utf-8")
           for name in bundled_rule_files()]
KEYS = ["version", "description", "rule", "name", "match", "rewrite", "optional", "where", "params",
        "path", "exclude", "layers", "layer_range", "module_type", "r", "alpha", "dropout",
        "use_rslora", "init", "feedforward", "adapter_len", "gate", "allow_training_branches", "x"]
scalars = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.booleans())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=8)


def parses_or_rule_error(text: str) -> None:
    try:
        parse_rules(text, source="fuzz.toml")
    except fxpeft.RuleError as err:
        assert err.file == "fuzz.toml"


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_any_text(text):
    parses_or_rule_error(text)


@settings(max_examples=300)
@given(st.sampled_from(BUNDLED), st.integers(0, 10_000), st.integers(0, 7), st.booleans())
def test_bundled_files_truncated_or_bit_flipped(text, where, bit, truncate):
    data = bytearray(text.encode("utf-8"))
    where %= len(data)
    if truncate:
        del data[where:]
    else:
        data[where] ^= 1 << bit
    parses_or_rule_error(data.decode("utf-8", errors="replace"))


def _toml(table: dict, prefix: str = "") -> str:
    lines = [f"{k} = {_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for key, sub in ((k, v) for k, v in table.items() if isinstance(v, dict)):
        lines += [f"[{prefix}{key}]", _toml(sub, f"{prefix}{key}.")]
    return "\n".join(lines)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=5),
       st.dictionaries(st.sampled_from(KEYS), values, max_size=5))
def test_random_tables_in_a_rule(rule, top):
    body = "\n".join(f"{k} = {_value(v)}" for k, v in top.items() if not isinstance(v, (dict, list)))
    tables = [f"[rule.{k}]\n{_toml(v)}" for k, v in rule.items() if isinstance(v, dict)]
    plain = {k: v for k, v in rule.items() if not isinstance(v, dict)}
    try:
        text = f"{body}\n[[rule]]\n{_toml(plain)}\n" + "\n".join(tables)
    except fxpeft.RuleError:
        return  # a value TOML cannot hold (a lone surrogate): the dumper refuses it
    parses_or_rule_error(text)
