"""PEFT config objects (and their plain dicts) as rules: ``fxpeft.rewrite(model, LoraConfig(...))``
builds what loading the folder PEFT saves for that config builds, and fails the same way."""

import re

import pytest
import torch
from peft import AdaptionPromptConfig, FourierFTConfig, IA3Config, LoraConfig, get_peft_model
from peft.tuners.lora.config import MontecloraConfig

import fxpeft
from conftest import assert_only_adapters_get_grads, randomize_adapters, tiny_llama, token_batch
from fxpeft.formats.peft_format import PeftFormatError

ATOL = 1e-5  # fp32 on the same weights; only summation order may differ

CONFIGS = {
    "lora": lambda: LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8,
                               rank_pattern={"up_proj": 2}, init_lora_weights=False),
    "lora all-linear": lambda: LoraConfig(target_modules="all-linear", r=2, lora_alpha=4,
                                          exclude_modules=["gate_proj"], init_lora_weights=False),
    "dora": lambda: LoraConfig(target_modules=["q_proj", "down_proj"], r=2, lora_alpha=4,
                               use_dora=True, init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"], init_ia3_weights=False),
    "adaption prompt": lambda: AdaptionPromptConfig(adapter_len=3, adapter_layers=1,
                                                    task_type="CAUSAL_LM"),
    "lora dict": lambda: {"peft_type": "LORA", "target_modules": ["k_proj", "o_proj"], "r": 2,
                          "lora_alpha": 2, "layers_to_transform": [1]},
}


def _peft_folder(tmp_path, config):
    """PEFT's adapter for ``config`` on a tiny Llama, with non-zero weights, saved."""
    if isinstance(config, dict):
        config = LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(), config).eval()
    with torch.no_grad():  # PEFT initialises some adapters to identity: move every one
        for name, param in peft_model.named_parameters():
            if any(part in name for part in ("lora_", "ia3_", "adaption_")):
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(tmp_path)
    return peft_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("form", list(CONFIGS))
def test_rewrite_from_a_config_equals_loading_its_peft_folder(tmp_path, form):
    peft_model = _peft_folder(tmp_path, CONFIGS[form]())
    from_folder = fxpeft.load(tiny_llama(), tmp_path)
    from_config = fxpeft.rewrite(tiny_llama(), CONFIGS[form]()).eval()
    from_config.graph.lint()
    folder_state, config_state = (fxpeft.adapter_state_dict(g) for g in (from_folder, from_config))
    assert sorted(config_state) == sorted(folder_state) and folder_state
    assert {k: v.shape for k, v in config_state.items()} == {k: v.shape for k, v in folder_state.items()}
    assert [n.target for n in from_config.graph.nodes] == [n.target for n in from_folder.graph.nodes]
    from_config.load_state_dict(folder_state, strict=False)  # the same adapter weights
    ids = token_batch()
    expected = _logits(from_folder, ids)
    torch.testing.assert_close(_logits(from_config, ids), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=0, atol=ATOL)


def test_a_lora_config_starts_as_identity_and_trains_only_adapters():
    model = tiny_llama()
    ids = token_batch()
    before = _logits(model, ids)
    gm = fxpeft.rewrite(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    lora_nodes = [n for n in gm.graph.nodes if n.meta.get("fxpeft_adapter") is not None]
    assert {n.meta["fxpeft_adapter"].module_path for n in lora_nodes} == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}
    torch.testing.assert_close(_logits(gm.eval(), ids), before, rtol=0, atol=0)
    assert fxpeft.trainable_parameters(gm)[0] == 2 * (64 * 4 + 64 * 4 + 4 * 64 + 32 * 4)  # layers x (q: A, B; v: A, B)
    randomize_adapters(gm)  # B = 0 at init gives A no gradient
    gm.train()(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)


def test_overrides_and_explain_take_configs_too():
    config = {"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4, "lora_alpha": 8}
    gm = fxpeft.rewrite(tiny_llama(), config, r=2)
    assert fxpeft.adapter_state_dict(gm)["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 64)
    matched = fxpeft.explain(tiny_llama(), LoraConfig(target_modules=["q_proj"])).rules[0].matched
    assert matched == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


UNSUPPORTED = {
    "fourierft": lambda: FourierFTConfig(target_modules=["q_proj"]),
    "monteclora": lambda: LoraConfig(target_modules=["q_proj"], monteclora_config=MontecloraConfig()),
    "bias": lambda: LoraConfig(target_modules=["q_proj"], bias="all"),
    "dict field": lambda: {"peft_type": "LORA", "target_modules": ["q_proj"], "use_dora": True,
                           "bias": "lora_only"},
}


@pytest.mark.parametrize("form", list(UNSUPPORTED))
def test_unsupported_fields_fail_as_the_folder_does(tmp_path, form):
    config = UNSUPPORTED[form]()
    if isinstance(config, dict):
        (tmp_path / "adapter_config.json").write_text(__import__("json").dumps(config))
        source = "<LORA config dict>"
    else:
        config.save_pretrained(tmp_path)
        source = type(config).__name__
    with pytest.raises(PeftFormatError) as from_folder:
        fxpeft.load(tiny_llama(), tmp_path)
    with pytest.raises(PeftFormatError) as from_config:
        fxpeft.rewrite(tiny_llama(), config)
    folder_message = str(from_folder.value).replace(str(tmp_path / "adapter_config.json"), source)
    assert str(from_config.value) == folder_message
    assert "not supported" in folder_message


@pytest.mark.parametrize("config, message", [
    ({"target_modules": ["q_proj"]}, r"a PEFT config needs a peft_type"),
    ({"peft_type": "LORA", "target_modules": ["nothing_here"]},
     r"<LORA config dict>: the adapter it describes matches no module of LlamaForCausalLM"),
    ({"peft_type": "LORA", "target_modules": ["q_proj"], "lora_alpha": float("nan")},
     r"not a PEFT config that JSON can hold"),
])
def test_bad_configs_are_named_errors(config, message):
    with pytest.raises(fxpeft.FxpeftError, match=message):
        fxpeft.rewrite(tiny_llama(), config)


def test_modules_to_save_come_from_the_config_once():
    from conftest import tiny_bert
    config = LoraConfig(target_modules=["query"], modules_to_save=["classifier"])
    gm = fxpeft.rewrite(tiny_bert(), config)
    assert "classifier.modules_to_save.weight" in fxpeft.adapter_state_dict(gm)
    with pytest.raises(fxpeft.FxpeftError, match=re.escape("modules_to_save is ['classifier'] in the "
                                                           "config and ['pooler'] in the call")):
        fxpeft.rewrite(tiny_bert(), config, modules_to_save=["pooler"])
