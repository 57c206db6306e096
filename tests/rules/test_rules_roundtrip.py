"""Property tests: any valid rule set survives dump -> parse unchanged; bad values never escape
as anything but RuleError."""

import string

from hypothesis import given, settings
from hypothesis import strategies as st

import fxpeft
from fxpeft.rules import LoraParams, Rule, RuleSet, Where, parse_rules
from fxpeft.rules.dump import dump_rules

names = st.text(string.ascii_letters + string.digits + "_ .-", min_size=1, max_size=20)
regexes = st.lists(st.sampled_from([r"q_proj$", r"(^|\.)v_proj$", r"layers\.\d+\.mlp", "attn",
                                    r"\.query$", "'quoted'", 'say "hi"']), max_size=3)
params = st.builds(LoraParams, r=st.integers(1, 256),
                   alpha=st.one_of(st.integers(1, 512), st.floats(0.01, 512, allow_nan=False)),
                   dropout=st.floats(0, 0.99), use_rslora=st.booleans(),
                   init=st.sampled_from(["default", "random"]))
wheres = st.builds(Where, path=regexes, exclude=regexes,
                   layers=st.one_of(st.none(), st.lists(st.integers(0, 64), min_size=1, max_size=4)),
                   layer_range=st.one_of(st.none(), st.tuples(st.integers(0, 5), st.integers(5, 9))))
rules = st.lists(st.builds(Rule, where=wheres, params=params, name=names, optional=st.booleans()),
                 min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(rules)
def test_dump_then_parse_is_identity(built):
    ruleset = RuleSet(tuple(built))
    assert parse_rules(dump_rules(ruleset)).rules == ruleset.rules


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.sampled_from(["r", "alpha", "dropout", "use_rslora", "init", "rank"]),
                       st.one_of(st.integers(-3, 3), st.floats(-2, 2, allow_nan=False), st.text(max_size=3),
                                 st.booleans(), st.lists(st.integers(), max_size=2)), max_size=4))
def test_any_params_table_is_accepted_or_a_located_rule_error(table):
    body = "\n".join(f"{key} = {dump_value(value)}" for key, value in table.items())
    text = f'version = 1\n[[rule]]\nmatch = "linear"\nrewrite = "lora"\n[rule.params]\n{body}\n'
    try:
        parse_rules(text, source="prop.toml")
    except fxpeft.RuleError as err:
        assert err.file == "prop.toml" and err.line is not None and err.key.startswith("rule[0].params")


def dump_value(value):
    from fxpeft.rules.dump import _value
    return _value(value)


@given(st.text(min_size=1, max_size=12))
@settings(max_examples=200)
def test_any_rule_name_survives_dump_then_parse(name):
    ruleset = RuleSet((Rule(where=Where(path=["q_proj"]), name=name),))
    assert parse_rules(dump_rules(ruleset)).rules == ruleset.rules


def test_control_characters_and_del_are_escaped():
    """DEL (U+007F) once went out raw: the TOML was invalid and CI failed at random."""
    for name in ["\x7f", "a\x00b", 'q"\\', "\x1f\t\n"]:
        ruleset = RuleSet((Rule(where=Where(path=["q_proj"]), name=name),))
        text = dump_rules(ruleset)
        assert parse_rules(text).rules[0].name == name
