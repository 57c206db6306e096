"""fxpeft LoRA equals PEFT's LoRA numerically, with the same trainable-parameter counts."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fxpeft
from conftest import tiny_gpt2, tiny_llama, token_batch
from fxpeft.rules import LoraParams, Rule, Where


def copy_peft_lora_into(gm: torch.nn.Module, peft_model: torch.nn.Module) -> int:
    """Copy PEFT's lora_A/B (adapter "default") onto fxpeft's parameters of the same module path."""
    ours = dict(gm.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, value in peft_model.named_parameters():
            if ".lora_" not in name:
                continue
            target = name.removeprefix("base_model.model.").replace(".default.", ".")
            ours[target].copy_(value)
            copied += 1
    return copied


def assert_matches_peft(base: torch.nn.Module, config: LoraConfig, rules, copies: int, **overrides) -> None:
    """fxpeft with PEFT's (non-zero) LoRA weights gives PEFT's logits and parameter counts."""
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    gm = fxpeft.rewrite(base, rules, **overrides)
    assert copy_peft_lora_into(gm, peft_model) == copies
    ids = token_batch()
    torch.testing.assert_close(gm(ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert fxpeft.trainable_parameters(gm) == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_llama_matches_peft(use_rslora):
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        init_lora_weights=False, use_rslora=use_rslora)
    assert_matches_peft(tiny_llama(), config, "lora_qv.toml", 8, dropout=0.0, use_rslora=use_rslora)


def test_gpt2_conv1d_matches_peft():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                        init_lora_weights=False)
    rule = Rule(where=Where(path=[r"c_attn$"]), params=LoraParams(r=4, alpha=8))
    assert_matches_peft(tiny_gpt2(), config, rule, 4)


def test_all_linear_selects_the_same_modules_as_peft():
    base = tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules="all-linear"))
    theirs = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A")
                    for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    ours = fxpeft.explain(base, "lora_all_linear.toml").rules[0].matched
    assert sorted(ours) == theirs and "lm_head" not in ours


def test_print_trainable_parameters_line_is_peft_s(capsys):
    get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
                   ).print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    fxpeft.trainable_parameters(fxpeft.rewrite(tiny_llama(), "lora_qv.toml"), print_line=True)
    assert capsys.readouterr().out.strip() == theirs
