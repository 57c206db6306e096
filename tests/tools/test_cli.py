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


# What ``fxpeft kinds`` says of each built-in kind, written out (not read from the registry the
# command prints): a kind that changes its sites, PEFT type or merge must change this too.
BUILTIN_KINDS = [
    "lora: sites linear, embedding, conv, parameter; PEFT LORA; merges",
    "ia3: sites linear, conv; PEFT IA3; merges",
    "adaption_prompt: sites attention; PEFT ADAPTION_PROMPT; cannot merge (adaption prompts are",
    "modules_to_save: sites by keyword; PEFT -; merges",
    "dora: sites linear, embedding, conv; PEFT LORA; merges",
    "adalora: sites linear, conv; PEFT ADALORA; merges",
    "prompt_tuning: sites input_embedding; PEFT PROMPT_TUNING; cannot merge (prompt tuning adds",
    "vera: sites linear; PEFT VERA; merges",
    "loha: sites linear, conv; PEFT LOHA; merges",
    "bottleneck: sites residual; PEFT FXPEFT_BOTTLENECK; cannot merge (a bottleneck adapter puts",
    "oft: sites linear, conv, embedding; PEFT OFT; merges",
    "boft: sites linear; PEFT BOFT; merges",
    "p_tuning: sites input_embedding; PEFT P_TUNING; cannot merge (p-tuning adds",
    "lokr: sites linear, conv; PEFT LOKR; merges",
    "prefix_tuning: sites attention_op; PEFT PREFIX_TUNING; cannot merge (prefix tuning adds",
    "alora: sites linear; PEFT LORA; cannot merge (aLoRA applies only from the invocation",
    "trainable_tokens: sites embedding; PEFT TRAINABLE_TOKENS; merges",
]


def test_kinds_lists_every_kind_with_its_sites_peft_type_and_merge(capsys):
    assert main(["kinds"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(BUILTIN_KINDS)
    for line, expected in zip(lines, BUILTIN_KINDS):
        assert line.startswith(expected), line


def test_export_for_vllm_writes_the_folder_and_prints_each_modules_error(tmp_path, capsys):
    import fxpeft
    from conftest import tiny_llama
    from export_cases import adapted
    tiny_llama().save_pretrained(tmp_path / "model")
    fxpeft.save(adapted("dora"), tmp_path / "dora")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "dora"), str(tmp_path / "out"),
                 "--for", "vllm", "--max-rank", "8"]) == 0
    out = capsys.readouterr().out
    v_proj = next(line for line in out.splitlines() if line.startswith("model.layers.1.self_attn.v_proj"))
    assert v_proj.split()[1] == "32" and float(v_proj.split()[3]) > 0.1  # full rank, truncated to 8
    assert "plain LoRA for vllm: r = lora_alpha = 8" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    fxpeft.save(adapted("modules_to_save"), tmp_path / "keep")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "keep"), str(tmp_path / "no")]) == 1
    assert "fxpeft export: export_lora: the modules_to_save adapter 'default' at lm_head" in \
        capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert main(["export", "x", "y", "z", "--for", "tgi"]) == 2
