"""The fxpeft command line."""

from fxpeft.tools.cli import main


def test_check_accepts_bundled_and_reports_located_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[[rule]]\nmatch = "linear"\nrewrite = "lora"\n[rule.params]\nr = 0\n')
    assert main(["check", "lora_qv.toml", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "lora_qv.toml: ok" in out
    assert f"{bad}:6: rule[0].params.r: expected a positive integer" in err


def test_rules_lists_bundled_files(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    assert "lora_qv.toml" in out and "lora_all_linear.toml" in out


def test_explain_a_saved_checkpoint(tmp_path, capsys):
    from conftest import tiny_llama
    tiny_llama().save_pretrained(tmp_path / "model")
    assert main(["explain", str(tmp_path / "model"), "--rules", "lora_qv.toml"]) == 0
    assert "model.layers.1.self_attn.v_proj" in capsys.readouterr().out


def test_unknown_rule_file_is_an_error_not_a_traceback(capsys):
    assert main(["check", "nope.toml"]) == 1
    assert "no rule file 'nope.toml'" in capsys.readouterr().err


def test_kinds_lists_the_registry(capsys):
    from fxpeft import registry
    assert main(["kinds"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [k.name for k in registry.all_kinds()]
    assert any(line.startswith("adaption_prompt:") and "cannot merge" in line for line in lines)
