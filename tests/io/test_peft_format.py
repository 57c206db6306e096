"""Adapters on disk in HF PEFT's format, both ways, and every bad-file case."""

import json

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import fxpeft
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from fxpeft.rules import Rule, Where

ATOL = 1e-5


def peft_logits(model, folder, ids):
    peft_model = PeftModel.from_pretrained(model, folder).eval()
    with torch.no_grad():
        return peft_model(ids).logits


def logits(gm, ids):
    with torch.no_grad():
        return gm(ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fxpeft_to_peft(tmp_path, family):
    make, rules = {"llama": (tiny_llama, "lora_qv"), "gpt2": (tiny_gpt2, "lora_all_linear")}[family]
    gm = fxpeft.rewrite(make(), rules, dropout=0.0)
    randomize_adapters(gm)
    folder = fxpeft.save(gm, tmp_path / "adapter")
    config = PeftConfig.from_pretrained(str(folder))
    assert config.peft_type == "LORA" and config.task_type == "CAUSAL_LM"
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert len(tensors) == len(fxpeft.adapter_state_dict(gm))
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
    if family == "llama":
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    ids = token_batch()
    torch.testing.assert_close(peft_logits(make(), str(folder), ids), logits(gm, ids), rtol=0, atol=ATOL)


def test_fxpeft_to_peft_rank_pattern_and_trained(tmp_path):
    rules = [Rule(where=Where(path=[r"\.q_proj$"]), params=fxpeft.rules.LoraParams(r=2, alpha=8)),
             Rule(where=Where(path=[r"\.(v_proj|up_proj)$"]), params=fxpeft.rules.LoraParams(r=4, alpha=4))]
    gm = fxpeft.rewrite(tiny_llama(), rules)
    randomize_adapters(gm)
    ids = token_batch()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        gm(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    gm.eval()
    folder = fxpeft.save(gm, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["r"] in (2, 4)
    torch.testing.assert_close(peft_logits(tiny_llama(), str(folder), ids), logits(gm, ids), rtol=0, atol=ATOL)


def test_bert_classifier_with_modules_to_save_both_ways(tmp_path):
    gm = fxpeft.rewrite(tiny_bert(), Rule(where=Where(path=[r"\.(query|value)$"])),
                        modules_to_save=["classifier"])
    randomize_adapters(gm)
    assert "classifier.modules_to_save.weight" in fxpeft.adapter_state_dict(gm)
    folder = fxpeft.save(gm, tmp_path / "bert")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in tensors
    ids = token_batch()
    expected = logits(gm, ids)
    torch.testing.assert_close(peft_logits(tiny_bert(), str(folder), ids), expected, rtol=0, atol=ATOL)
    (folder / "fxpeft_rules.toml").unlink()  # rebuilt from PEFT's config alone
    torch.testing.assert_close(logits(fxpeft.load(tiny_bert(), folder), ids), expected, rtol=0, atol=ATOL)


def test_peft_bert_seq_cls_to_fxpeft(tmp_path):
    peft_model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"],
                                                        r=4, lora_alpha=8, init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.5)
    peft_model.save_pretrained(tmp_path)
    ids = token_batch()
    gm = fxpeft.load(tiny_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(gm, ids), peft_model.eval()(ids).logits, rtol=0, atol=ATOL)


LLAMA_CONFIGS = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "dotted suffix": dict(target_modules=["self_attn.k_proj", "mlp.down_proj"]),
    "regex": dict(target_modules=r".*\.(q|o)_proj"),
    "all-linear": dict(target_modules="all-linear"),
    "exclude": dict(target_modules="all-linear", exclude_modules=["gate_proj"]),
    "exclude regex": dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.1\.self_attn\.q_proj"),
    "layers": dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    "layers pattern": dict(target_modules=["v_proj"], layers_to_transform=0, layers_pattern="layers"),
    "rank and alpha pattern": dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8,
                                   rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                   alpha_pattern={"up_proj": 3}),
    "rslora": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True),
}


@pytest.mark.parametrize("form", list(LLAMA_CONFIGS))
def test_peft_to_fxpeft_llama(tmp_path, form):
    config = LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 16, **LLAMA_CONFIGS[form]})
    peft_model = get_peft_model(tiny_llama(), config).eval()
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_llama(), tmp_path)
    ours = {n.removesuffix(".lora_A.weight") for n in fxpeft.adapter_state_dict(gm) if "lora_A" in n}
    theirs = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
              for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert ours == theirs
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(gm, ids), peft_model(ids).logits, rtol=0, atol=ATOL)


def test_peft_gpt2_to_fxpeft(tmp_path):
    peft_model = get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn", "c_fc"], r=4,
                                                        fan_in_fan_out=True, init_lora_weights=False))
    peft_model.eval().save_pretrained(tmp_path)
    gm = fxpeft.load(tiny_gpt2(), tmp_path)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(gm, ids), peft_model(ids).logits, rtol=0, atol=ATOL)


def test_fxpeft_round_trip_rebuilds_the_same_graph(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), "lora_all_linear", r=4, dropout=0.0)
    randomize_adapters(gm)
    gm.eval()
    loaded = fxpeft.load(tiny_llama(), fxpeft.save(gm, tmp_path / "a"), trainable=True)
    assert [n.target for n in loaded.graph.nodes] == [n.target for n in gm.graph.nodes]
    assert fxpeft.trainable_parameters(loaded) == fxpeft.trainable_parameters(gm)
    ids = token_batch()
    torch.testing.assert_close(logits(loaded, ids), logits(gm, ids), rtol=0, atol=0)


# --- bad files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "a"
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", r=2)
    randomize_adapters(gm)
    fxpeft.save(gm, folder)
    return folder


def _copy(saved, tmp_path, rules=False):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ["adapter_config.json", "adapter_model.safetensors"] + (["fxpeft_rules.toml"] if rules else []):
        (folder / name).write_bytes((saved / name).read_bytes())
    return folder


def _edit_tensors(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_config(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD = {
    "no config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json: no such file"),
    "not json": (lambda f: (f / "adapter_config.json").write_text("{r: 8,"), "adapter_config.json: not valid JSON"),
    "not an object": (lambda f: (f / "adapter_config.json").write_text("[1]"), "expected a JSON object"),
    "corrupt weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10\x00garbage"),
                        "adapter_model.safetensors: not a readable safetensors"),
    "pickle only": (lambda f: ((f / "adapter_model.safetensors").rename(f / "adapter_model.bin")),
                    "pickle, which fxpeft never reads"),
    "missing key": (lambda f: _edit_tensors(f, lambda t: t.pop(KEY)), f"missing key {KEY}"),
    "unexpected key": (lambda f: _edit_tensors(f, lambda t: t.update({"base_model.model.extra.lora_A.weight":
                                                                      torch.zeros(1)})),
                       "unexpected key base_model.model.extra.lora_A.weight"),
    "shape": (lambda f: _edit_tensors(f, lambda t: t.update({KEY: torch.zeros(3, 64)})), f"{KEY}: expected"),
    "dtype": (lambda f: _edit_tensors(f, lambda t: t.update({KEY: t[KEY].to(torch.int32)})), "got torch.int32"),
    "dora": (lambda f: _edit_config(f, use_dora=True), "missing key base_model.model.model.layers.0."
                                                       "self_attn.q_proj.lora_magnitude_vector"),
    "qalora": (lambda f: _edit_config(f, use_qalora=True), "use_qalora = True is not supported"),
    "bias": (lambda f: _edit_config(f, bias="all"), "bias = 'all' is not supported"),
    "peft type": (lambda f: _edit_config(f, peft_type="HRA"), "peft_type 'HRA' is not supported"),
    "pissa": (lambda f: _edit_config(f, init_lora_weights="pissa"), "changes the base weights"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_folder_is_a_located_error(saved, tmp_path, case):
    break_it, message = BAD[case]
    folder = _copy(saved, tmp_path)
    break_it(folder)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxpeft.FxpeftError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        fxpeft.load(model, folder)
    assert str(folder) in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failed_load_into_a_graph_leaves_it_unchanged(saved, tmp_path):
    folder = _copy(saved, tmp_path, rules=True)
    _edit_tensors(folder, lambda t: t.pop(KEY))
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv")
    nodes, params = len(gm.graph.nodes), set(dict(gm.named_parameters()))
    with pytest.raises(fxpeft.AdapterFileError, match="missing key"):
        fxpeft.load(gm, folder, adapter="second")
    assert gm.adapter_names == ["default"] and len(gm.graph.nodes) == nodes
    assert set(dict(gm.named_parameters())) == params


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import fxpeft.io.serialize as serialize
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv")

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(serialize, "save_file", crash)
    with pytest.raises(OSError):
        fxpeft.save(gm, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_a_rules_file_of_another_kind_than_the_config_is_refused(saved, tmp_path):
    """PEFT rewrites only adapter_config.json; a stale fxpeft_rules.toml must not win."""
    folder = _copy(saved, tmp_path, rules=True)
    _edit_config(folder, use_dora=True)
    with pytest.raises(fxpeft.AdapterFileError, match="builds lora adapters but adapter_config.json "
                                                     "describes a dora adapter"):
        fxpeft.load(tiny_llama(), folder)


def test_an_edited_config_with_a_stale_rules_file_is_refused(saved, tmp_path):
    """PeftModel.save_pretrained rewrites only the JSON: an edited alpha must not be ignored."""
    folder = _copy(saved, tmp_path, rules=True)
    _edit_config(folder, lora_alpha=64)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxpeft.AdapterFileError, match="says lora_alpha = 64, but fxpeft_rules.toml, "
                                                     "saved with it, builds lora_alpha = 16.*delete "
                                                     "fxpeft_rules.toml"):
        fxpeft.load(model, folder)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (folder / "fxpeft_rules.toml").unlink()
    assert fxpeft.load(model, folder).adapter_names == ["default"]


def test_a_config_peft_rewrote_with_the_same_values_loads_with_its_rules(saved, tmp_path):
    folder = _copy(saved, tmp_path, rules=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    _edit_config(folder, target_modules=list(reversed(config["target_modules"])), revision=None)
    assert fxpeft.load(tiny_llama(), folder).adapter_names == ["default"]
