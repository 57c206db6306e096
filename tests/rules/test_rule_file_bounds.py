"""What a rule file may hold (issue 24, item 6): past 100k rules or 16 MB a file is refused with
a located one-line error, and ``fxpeft check`` of a big valid file prints a summary line, not
every rule."""

import pytest

from fxpeft.errors import RuleError
from fxpeft.rules import loader, load_rules, parse_rules
from fxpeft.tools.cli import main


def test_a_file_past_the_rule_bound_is_refused_at_the_first_rule_too_many(tmp_path):
    path = tmp_path / "many.toml"
    path.write_text("version = 1\n" + "[[rule]]\n" * (loader.MAX_RULES + 1))
    with pytest.raises(RuleError) as error:
        load_rules(path)
    assert str(error.value) == (f"{path}:{loader.MAX_RULES + 2}: rule[{loader.MAX_RULES}]: "
                                f"{loader.MAX_RULES + 1} rules, past the {loader.MAX_RULES} a rule "
                                f"file may hold (select with regexes: one path pattern matches many "
                                f"modules)")


def test_the_bound_itself_is_allowed():
    loader._check_rule_count({"rule": [{}] * loader.MAX_RULES})  # no error


def test_a_file_past_the_size_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "huge.toml"
    path.write_text("# padding\n" * (loader.MAX_BYTES // 10 + 1))
    monkeypatch.setattr(type(path), "read_text", lambda *a, **k: pytest.fail("read a huge file"))
    with pytest.raises(RuleError, match=rf"^{path}: 16.0 MB, past the 16 MB a rule file may hold"):
        load_rules(path)


def test_text_past_the_size_bound_is_refused_too():
    with pytest.raises(RuleError, match="^<big>: 16.0 MB, past the 16 MB"):
        parse_rules("#" * (loader.MAX_BYTES + 1), source="<big>")


def _rules(count: int) -> str:
    return "version = 1\n" + "".join(
        f'[[rule]]\nname = "rule {i}"\nmatch = "linear"\nrewrite = "lora"\noptional = true\n'
        f"[rule.where]\npath = ['^layer{i}$']\n" for i in range(count))


def test_check_of_a_big_file_prints_a_summary_not_every_rule(tmp_path, capsys):
    path = tmp_path / "big.toml"
    path.write_text(_rules(1000))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == (f"{path}: ok: 1000 rules (1000 linear -> lora); first: rule 0, rule 1, rule 2, "
                   f"rule 3, rule 4, rule 5, rule 6, rule 7, ... and 992 more\n")


def test_check_of_a_small_file_still_names_each_rule(tmp_path, capsys):
    path = tmp_path / "small.toml"
    path.write_text(_rules(2))
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok: rule 0 (linear -> lora), rule 1 (linear -> lora)\n"
