"""``fxpeft.load(folder)`` without a model: the base is the local folder the adapter's
``base_model_name_or_path`` names (``fxpeft.save`` writes it, absolute, for a base loaded from a
folder), loaded with the folder's task type and the caller's loading options."""

import json

import pytest
import torch

import fxpeft
from conftest import randomize_adapters, tiny_llama, token_batch
from transformers import AutoModelForCausalLM


@pytest.fixture()
def base_folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _saved(base_folder, tmp_path):
    gm = fxpeft.rewrite(AutoModelForCausalLM.from_pretrained(base_folder).eval(), "lora_qv.toml")
    randomize_adapters(gm)
    return gm.eval(), fxpeft.save(gm, tmp_path / "adapter")


def test_a_folder_fxpeft_saved_loads_without_its_model(base_folder, tmp_path):
    gm, folder = _saved(base_folder, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_folder.resolve())
    loaded = fxpeft.load(folder)
    ids = token_batch(2, 8)
    torch.testing.assert_close(loaded(input_ids=ids).logits, gm(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert loaded.adapter_names == ["default"] and not loaded.training


def test_a_folder_peft_saved_loads_without_its_model(base_folder, tmp_path):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    ids = token_batch(2, 8)
    theirs = peft_model.eval()(input_ids=ids).logits
    torch.testing.assert_close(fxpeft.load(tmp_path / "peft")(input_ids=ids).logits, theirs,
                               rtol=1e-5, atol=1e-5)


def test_loading_options_reach_the_base_model(base_folder, tmp_path):
    _, folder = _saved(base_folder, tmp_path)
    loaded = fxpeft.load(folder, dtype=torch.bfloat16)
    assert loaded.get_parameter("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16


def test_a_base_that_is_no_local_folder_and_mixed_up_calls_are_one_line_errors(base_folder, tmp_path):
    gm, folder = _saved(base_folder, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    config = json.loads(before["adapter_config.json"])
    (tmp_path / "hub").mkdir()
    for name, wanted in [("meta-llama/Llama-3-8B", "is not a local folder"), (None, "is empty")]:
        (tmp_path / "hub" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": name}))
        (tmp_path / "hub" / "adapter_model.safetensors").write_bytes(before["adapter_model.safetensors"])
        with pytest.raises(fxpeft.FxpeftError, match=wanted) as error:
            fxpeft.load(tmp_path / "hub")
        assert "fxpeft.load(model, folder)" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(fxpeft.FxpeftError, match="the first argument is the base model"):
        fxpeft.load(folder, folder)
    with pytest.raises(fxpeft.FxpeftError, match="dtype load a base model"):
        fxpeft.load(tiny_llama(), folder, dtype=torch.bfloat16)
    with pytest.raises(fxpeft.FxpeftError, match="the adapter folder is missing"):
        fxpeft.load(tiny_llama())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_the_class_level_entry_point_is_load_by_folder_with_peft_keywords(base_folder, tmp_path):
    gm, folder = _saved(base_folder, tmp_path)
    loaded = fxpeft.AutoAdaptedModelForCausalLM.from_pretrained(folder, adapter_name="qv",
                                                               is_trainable=True, dtype=torch.bfloat16)
    assert loaded.adapter_names == ["qv"]
    assert all(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    assert next(p for n, p in loaded.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
    ids = token_batch(2, 8)
    torch.testing.assert_close(fxpeft.AutoAdaptedModel.from_pretrained(folder)(input_ids=ids).logits,
                               gm(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_the_class_refuses_a_folder_of_another_task_type_in_one_line(base_folder, tmp_path):
    _, folder = _saved(base_folder, tmp_path)
    before = (folder / "adapter_config.json").read_bytes()
    with pytest.raises(fxpeft.FxpeftError, match=r"adapter_config.json: task_type is 'CAUSAL_LM', but "
                       r"AutoAdaptedModelForSequenceClassification loads 'SEQ_CLS' adapters") as err:
        fxpeft.AutoAdaptedModelForSequenceClassification.from_pretrained(folder)
    assert "\n" not in str(err.value) and (folder / "adapter_config.json").read_bytes() == before
