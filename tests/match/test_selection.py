"""Nothing silently less than asked (issue 24, item 1): a selector that selects nothing is a
one-line ``MatchError`` naming the selector, the file:line it came from and the closest names,
and the model is unchanged; ``allow_empty`` (file key or keyword) allows it explicitly."""

from __future__ import annotations

import re

import pytest
import torch

import fxpeft
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from fxpeft.graph.records import adapter_records
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.tools.convert import config_to_toml

ALL_OPTIONAL = '''version = 1

[[rule]]
name = "gpt2 attention"
match = "linear"
rewrite = "lora"
optional = true
[rule.where]
path = ['(^|\\.)c_attn$']

[[rule]]
name = "gpt2 embeddings"
match = "embedding"
rewrite = "lora"
optional = true
[rule.where]
path = ['(^|\\.)wte$']
'''


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    return ({name: tensor.clone() for name, tensor in model.state_dict().items()},
            {name: p.requires_grad for name, p in model.named_parameters()})


def assert_unchanged(model: torch.nn.Module, before) -> None:
    tensors, flags = before
    state = model.state_dict()
    assert state.keys() == tensors.keys()
    assert all(torch.equal(state[name], tensors[name]) for name in state)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def refused(model, rules, match: str, **kwargs) -> str:
    """The MatchError (or subclass of FxpeftError) ``rewrite`` raises; the model unchanged."""
    before = snapshot(model)
    with pytest.raises(fxpeft.FxpeftError, match=match) as err:
        fxpeft.rewrite(model, rules, **kwargs)
    assert_unchanged(model, before)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_rules_that_together_adapt_nothing_are_an_error(llama, tmp_path):
    path = tmp_path / "gpt2_only.toml"
    path.write_text(ALL_OPTIONAL)
    message = refused(llama, path, "adapt nothing in LlamaForCausalLM")
    assert f"{path}: the rules adapt nothing" in message
    assert f"'gpt2 attention' ({path}:3)" in message and f"'gpt2 embeddings' ({path}:11)" in message
    assert re.search(r"closest module names: .*k_proj", message), message
    assert "allow_empty = true" in message and "allow_empty=True" in message


def test_allow_empty_allows_it_by_keyword_and_by_file_key(llama, tmp_path):
    path = tmp_path / "gpt2_only.toml"
    path.write_text(ALL_OPTIONAL)
    gm = fxpeft.rewrite(llama, path, allow_empty=True)
    assert fxpeft.trainable_parameters(gm)[0] == 0
    path.write_text("allow_empty = true\n" + ALL_OPTIONAL)
    assert fxpeft.trainable_parameters(fxpeft.rewrite(llama, path))[0] == 0
    with pytest.raises(fxpeft.RuleError, match=r"allow_empty: expected true or false"):
        fxpeft.rules.parse_rules('allow_empty = "yes"\n' + ALL_OPTIONAL, "x.toml")


def test_a_converted_gpt2_folder_adapts_nothing_in_a_llama(tmp_path, llama):
    """``fxpeft convert`` writes all-optional rules (linear, embedding, conv per LoRA folder):
    on the model they were made for they still adapt; on another model, the error."""
    gpt2 = tiny_gpt2()
    folder = fxpeft.save(fxpeft.rewrite(gpt2, "lora_all_linear.toml"), tmp_path / "gpt2")
    text, _ = config_to_toml(folder / "adapter_config.json", gpt2)
    assert text.count("optional = true") == text.count("[[rule]]") >= 2
    rules = fxpeft.rules.parse_rules(text, source="converted.toml")
    assert fxpeft.trainable_parameters(fxpeft.rewrite(gpt2, rules))[0] > 0
    message = refused(llama, rules, "the rules adapt nothing in LlamaForCausalLM")
    assert "converted.toml:" in message


def test_a_typo_in_modules_to_save_is_an_error():
    bert = tiny_bert()
    message = refused(bert, "lora_all_linear.toml", r"modules_to_save=\['classifier', 'classifer'\]: "
                      r"'classifer' names no module of BertForSequenceClassification",
                      modules_to_save=["classifier", "classifer"])
    assert "closest module names: classifier" in message
    gm = fxpeft.rewrite(bert, "lora_all_linear.toml", modules_to_save=["classifier", "classifer"],
                        allow_empty=True)
    assert any("classifier.modules_to_save" in name for name, _ in gm.named_parameters())


def test_a_peft_config_keeps_peft_s_absent_heads():
    """PEFT's SEQ_CLS folders list ``["classifier", "score"]``: a config keeps PEFT's meaning."""
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "target_modules": ["query", "value"],
              "r": 4, "lora_alpha": 8, "modules_to_save": ["classifier", "score"]}
    gm = fxpeft.rewrite(tiny_bert(), config)
    assert any("classifier.modules_to_save" in name for name, _ in gm.named_parameters())


def test_a_layer_the_model_lacks_is_an_error(llama, tmp_path):
    path = tmp_path / "layers.toml"
    path.write_text('[[rule]]\nmatch = "linear"\nrewrite = "lora"\n[rule.where]\n'
                    'path = ["q_proj$"]\nlayers = [0, 7]\n')
    message = refused(llama, path, "no layer 7")
    assert message.startswith(f"{path}:6: rule 'rule[0]': layers = [0, 7], but LlamaForCausalLM "
                              f"has layers 0-1: no layer 7"), message
    gm = fxpeft.rewrite(llama, path, allow_empty=True)  # allowed: layer 0 only
    assert [m.module_path for m in adapter_records(gm)["default"].matches] == \
        ["model.layers.0.self_attn.q_proj"]


def test_ia3_feedforward_modules_outside_target_modules_is_an_error(llama):
    config = {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj"],
              "feedforward_modules": ["down_proj"]}
    message = refused(llama, config, "feedforward_modules")
    assert "'down_proj' is not in target_modules = ['k_proj', 'v_proj']" in message
    with pytest.raises(PeftFormatError):
        fxpeft.rewrite(llama, config)
    ok = dict(config, target_modules=["k_proj", "v_proj", "down_proj"])
    assert fxpeft.trainable_parameters(fxpeft.rewrite(llama, ok))[0] > 0


@pytest.mark.parametrize("name, kind", [("input_layernorm", "LlamaRMSNorm"),
                                        ("embed_tokens", "Embedding")])
def test_a_linear_rule_at_another_kind_of_layer_says_what_it_is(llama, tmp_path, name, kind):
    path = tmp_path / "norm.toml"
    path.write_text(f'[[rule]]\nmatch = "linear"\nrewrite = "lora"\n[rule.where]\npath = ["{name}$"]\n')
    message = refused(llama, path, "matched nothing in LlamaForCausalLM")
    assert message.startswith(f"{path}:1: rule 'rule[0]' (match = 'linear')"), message
    assert f"{name}" in message and f"exists ({kind}), but it is not a linear layer" in message
    report = str(fxpeft.explain(llama, path))
    assert f"exists ({kind}), but it is not a linear layer" in report, report


def test_a_rule_that_matches_nothing_names_its_line(llama, tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('version = 1\n\n[[rule]]\nmatch = "linear"\nrewrite = "lora"\n'
                    '[rule.where]\npath = ["q_prj$"]\n')
    message = refused(llama, path, "matched nothing")
    assert message.startswith(f"{path}:3: rule 'rule[0]'") and "closest module names: q_proj" in message
