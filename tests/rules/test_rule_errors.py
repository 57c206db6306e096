"""Malformed rule files: each gives a located RuleError (file, line, dotted key), never a bare
KeyError / TypeError."""

import textwrap

import pytest

import fxpeft
from fxpeft.rules import load_rules

HEAD = 'version = 1\n[[rule]]\nmatch = "linear"\nrewrite = "lora"\n'

CASES = [
    # (file text, expected line, expected key, message fragment)
    ('version = 1\n[[rule]\nmatch = "linear"\n', 2, None, "not valid TOML"),
    ('verison = 1\n' + HEAD[12:], 1, "verison", 'did you mean "version"'),
    ('version = 2\n' + HEAD[12:], 1, "version", "unsupported rule-format version 2"),
    ('version = 1\n', None, "rule", "at least one [[rule]]"),
    ('version = 1\n[[rule]]\nrewrite = "lora"\n', 2, "rule[0].match", "missing required key"),
    ('version = 1\n[[rule]]\nmatch = "linear"\n', 2, "rule[0].rewrite", "missing required key"),
    (HEAD.replace('"lora"', '"lorra"'), 4, "rule[0].rewrite", 'did you mean "lora"'),
    (HEAD.replace('"linear"', '"linaer"'), 3, "rule[0].match", 'did you mean "linear"'),
    (HEAD + '[rule.params]\nr = "eight"\n', 6, "rule[0].params.r",
     'expected a positive integer, got "eight"'),
    (HEAD + '[rule.params]\nr = 0\n', 6, "rule[0].params.r", "positive integer"),
    (HEAD + '[rule.params]\nalpha = -1\n', 6, "rule[0].params.alpha", "positive number"),
    (HEAD + '[rule.params]\ndropout = 1.5\n', 6, "rule[0].params.dropout", "[0, 1)"),
    (HEAD + '[rule.params]\nr = 4\nalpah = 8\n', 7, "rule[0].params.alpah", 'did you mean "alpha"'),
    (HEAD + '[rule.where]\npath = ["q_proj", "("]\n', 6, "rule[0].where.path", "bad regular expression"),
    (HEAD + '[rule.where]\nlayer_range = [3]\n', 6, "rule[0].where.layer_range", "[first, last]"),
    (HEAD + '[rule.where]\nlayers = "0"\n', 6, "rule[0].where.layers", "list of integers"),
    (HEAD + '[rule.where]\npaths = ["q"]\n', 6, "rule[0].where.paths", 'did you mean "path"'),
    ('version = 1\nrule = [1, 2]\n', 2, "rule[0]", "expected a table"),
    (HEAD + 'params = 5\n', 5, "rule[0].params", "expected a table"),
    (HEAD + 'params = { r = 4, use_rslora = "yes" }\n', 5, "rule[0].params.use_rslora", "true or false"),
    (HEAD + 'optional = 1\n', 5, "rule[0].optional", "true or false"),
    (HEAD + '[rule.params]\ninit = "gauss"\n', 6, "rule[0].params.init", "one of"),
    (HEAD + HEAD[12:] + '[rule.params]\nr = -3\n', 9, "rule[1].params.r", "positive integer"),
    (HEAD + 'colour = "red"\n', 5, "rule[0].colour", "unknown key"),
]


@pytest.mark.parametrize("text,line,key,fragment", CASES)
def test_malformed_rule_file_is_located(tmp_path, text, line, key, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(fxpeft.RuleError) as caught:
        load_rules(str(path))
    error = caught.value
    assert (error.file, error.line, error.key) == (str(path), line, key)
    assert fragment in str(error)
    assert str(error).startswith(f"{path}:{line}:" if line else f"{path}:")


def test_error_text_names_file_line_and_key(tmp_path):
    path = tmp_path / "lora_qv.toml"
    path.write_text(HEAD + '[rule.params]\nr = "eight"\n')
    with pytest.raises(fxpeft.RuleError, match=r'lora_qv.toml:6: rule\[0\].params.r: expected a '
                                               r'positive integer, got "eight"'):
        load_rules(str(path))


def test_unknown_bundled_name_suggests_the_closest():
    with pytest.raises(fxpeft.RuleError, match='did you mean "lora_qv.toml"'):
        load_rules("lora_vq.toml")


def test_rules_built_in_python_validate_when_built():
    with pytest.raises(fxpeft.RuleError, match="params.r: expected a positive integer"):
        fxpeft.rules.LoraParams(r=0)
    with pytest.raises(fxpeft.RuleError, match="where.path: bad regular expression"):
        fxpeft.rules.Where(path=["("])


def test_unknown_override_is_a_rule_error(llama):
    with pytest.raises(fxpeft.RuleError, match='did you mean "alpha"'):
        fxpeft.rewrite(llama, "lora_qv.toml", alhpa=3)


def test_bundled_files_parse():
    for name in ("lora_qv.toml", "lora_all_linear.toml"):
        rules = load_rules(name)
        assert rules.rules[0].params.r == 8 and rules.rules[0].params.alpha == 16
        assert rules.rules[0].params.dropout == 0.05


def test_rule_file_never_executes_code(tmp_path):
    path = tmp_path / "evil.toml"
    path.write_text(textwrap.dedent(HEAD + '[rule.where]\npath = ["__import__(\'os\').system(\'x\')"]\n'))
    rules = load_rules(str(path))  # a regex that happens to contain code text: data, not code
    assert rules.rules[0].where.path[0].startswith("__import__")
