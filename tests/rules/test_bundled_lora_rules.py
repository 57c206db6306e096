"""Fixtures for the bundled LoRA rule files: what each matches and what it must not."""

import pytest

import fxpeft
from conftest import tiny_bert, tiny_gpt2, tiny_llama


def matched(model, rules):
    return fxpeft.explain(model, rules).rules[0].matched


def test_lora_qv_on_llama():
    paths = matched(tiny_llama(), "lora_qv.toml")
    assert paths == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]


def test_lora_qv_must_not_match_other_projections(tmp_path):
    paths = matched(tiny_llama(), "lora_qv.toml")
    assert not any(p.endswith(("k_proj", "o_proj", "lm_head")) or ".mlp." in p for p in paths)


def test_lora_qv_names_the_gpt2_alternative():
    with pytest.raises(fxpeft.MatchError, match="closest module names: .*c_attn"):
        fxpeft.rewrite(tiny_gpt2(), "lora_qv.toml")


def test_all_linear_on_gpt2_skips_only_the_head():
    paths = matched(tiny_gpt2(), "lora_all_linear.toml")
    assert len(paths) == 2 * 4 and "lm_head" not in paths  # c_attn, c_proj, c_fc, mlp.c_proj
    assert {p.rsplit(".", 1)[-1] for p in paths} == {"c_attn", "c_proj", "c_fc"}


def test_all_linear_on_bert_skips_the_classifier():
    paths = matched(tiny_bert(), "lora_all_linear.toml")
    assert "classifier" not in paths and "bert.encoder.layer.0.attention.self.query" in paths
