"""LoRA on embeddings (``match = "embedding"``): PEFT's layout and numbers, both ways through the
folder format, on a tiny Llama's ``embed_tokens`` and a tiny BERT's ``word_embeddings``."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import fxpeft
from conftest import (REPO_ROOT, adapter_nodes, assert_only_adapters_get_grads, emitted_base,
                      lora_branch_count, randomize_adapters, tiny_bert, tiny_llama, token_batch, train)
from fxpeft.tools.cli import main
from fxpeft.graph.gates import GATE_META
from fxpeft.rules import LoraParams, Rule, Where

aten = torch.ops.aten
RULES = REPO_ROOT / "passes" / "lora_embeddings.toml"
ATOL = 1e-5  # fp32 through different but equivalent op orders (PEFT: matmul; fxpeft: linear)
MODELS = {"llama": (tiny_llama, "model.embed_tokens"),
          "bert": (tiny_bert, "bert.embeddings.word_embeddings")}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_embedding_lora(base, name):
    """PEFT's own LoRA on the embedding, random A and B (``init_lora_weights=False``)."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=[name], init_lora_weights=False)
    return get_peft_model(copy.deepcopy(base), config).eval()


def test_identity_at_init_peft_names_and_a_lookup_branch():
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, RULES)
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=0)
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    assert shapes == {"model.embed_tokens.lora_embedding_A": (8, 128),
                      "model.embed_tokens.lora_embedding_B": (64, 8)}
    assert not gm.get_parameter("model.embed_tokens.lora_embedding_A").any()  # PEFT: A zeros
    assert gm.get_parameter("model.embed_tokens.lora_embedding_B").std() > 0.5  # B normal
    gm.graph.lint()
    added = adapter_nodes(gm)
    lookups = [n for n in added if n.target == aten.embedding.default]
    assert len(lookups) == 1 and lora_branch_count(gm) == 1
    base_lookup = next(n for n in gm.graph.nodes if n.target == aten.embedding.default and n not in added)
    assert lookups[0].args[1] is base_lookup.args[1]  # the same token ids
    assert lookups[0].args[0].target == aten.t.default  # A.T as the table, as PEFT does
    assert [n.target for n in added if n.op == "call_function"].count(aten.linear.default) == 1
    gates = [n for n in gm.graph.nodes if GATE_META in n.meta]
    assert len(gm.graph.nodes) == len(emitted_base(tiny_llama()).graph.nodes) + len(added) + len(gates) + 2


def test_gradients_reach_only_the_adapter():
    gm = fxpeft.rewrite(tiny_llama(), RULES)
    randomize_adapters(gm)
    ids = token_batch()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)


def test_padding_idx_is_kept_by_the_adapter_lookup():
    """BERT's word embeddings have padding_idx 0: PEFT's lookup of A.T passes it on (no gradient
    for the padding row), and so does fxpeft's."""
    gm = fxpeft.rewrite(tiny_bert(), RULES)
    lookup = next(n for n in adapter_nodes(gm) if n.target == aten.embedding.default)
    assert lookup.args[2] == 0
    randomize_adapters(gm)
    ids = token_batch()
    ids[:, -2:] = 0
    gm(ids).logits.sum().backward()
    grad = gm.get_parameter("bert.embeddings.word_embeddings.lora_embedding_A").grad
    assert not grad[:, 0].any() and grad[:, ids[0, 0]].any()


@pytest.mark.parametrize("family", list(MODELS))
def test_peft_to_fxpeft(tmp_path, family):
    make, name = MODELS[family]
    peft_model = peft_embedding_lora(make(), name.rsplit(".", 1)[-1])
    peft_model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    # PEFT's save_embedding_layers="auto" copies the base weight of "embed_tokens" (not of BERT's
    # word_embeddings); fxpeft reads it, checks it, and drops it.
    assert (f"base_model.model.{name}.base_layer.weight" in keys) == (family == "llama")
    ids = token_batch()
    gm = fxpeft.load(make(), tmp_path)
    expected = logits(peft_model, ids)
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=ATOL)
    assert (expected - logits(make(), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(MODELS))
def test_fxpeft_to_peft(tmp_path, family):
    make, name = MODELS[family]
    # PEFT's SEQ_CLS models always expect the classifier's weights in the folder
    keep = ["classifier"] if family == "bert" else []
    gm = fxpeft.rewrite(make(), RULES, modules_to_save=keep)
    randomize_adapters(gm, seed=3)
    folder = fxpeft.save(gm, tmp_path / "adapter")
    keys = set(load_file(str(folder / "adapter_model.safetensors"))) - {
        f"base_model.model.classifier.{p}" for p in ("weight", "bias")}
    assert keys == {f"base_model.model.{name}.lora_embedding_A", f"base_model.model.{name}.lora_embedding_B"}
    ids = token_batch()
    expected = logits(gm, ids)
    peft_model = PeftModel.from_pretrained(make(), str(folder)).eval()
    torch.testing.assert_close(logits(peft_model, ids), expected, rtol=0, atol=ATOL)
    (folder / "fxpeft_rules.toml").unlink()  # rebuilt from PEFT's config alone
    torch.testing.assert_close(logits(fxpeft.load(make(), folder), ids), expected, rtol=0, atol=ATOL)


def test_a_changed_base_copy_is_refused(tmp_path):
    peft_model = peft_embedding_lora(tiny_llama(), "embed_tokens")
    peft_model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(weights))
    with pytest.raises(fxpeft.FxpeftError, match=rf"{weights}: {key}: PEFT's copy of the base weight differs"):
        fxpeft.load(tiny_llama(), tmp_path)


def test_merge_equals_unmerged_and_peft_merged(tmp_path):
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, RULES)
    randomize_adapters(gm, seed=5)
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    assert len(merged.graph.nodes) == len(emitted_base(tiny_llama()).graph.nodes)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(ids).logits, gm(ids).logits, rtol=0, atol=ATOL)
    peft_merged = PeftModel.from_pretrained(tiny_llama(), str(fxpeft.save(gm, tmp_path / "a"))).merge_and_unload()
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(merged.get_parameter(name), peft_merged.get_parameter(name), rtol=0, atol=1e-6)
    assert torch.equal(model.get_parameter(name), tiny_llama().get_parameter(name))  # untouched


def test_a_tied_embedding_trains_but_does_not_merge():
    model = tiny_llama(tie_word_embeddings=True)
    gm = fxpeft.rewrite(model, RULES)
    randomize_adapters(gm)
    ids = token_batch()
    assert (gm(ids).logits - model(ids).logits).abs().max() > 1e-3  # only the input side changes
    with pytest.raises(fxpeft.FxpeftError, match="tied weights"):
        fxpeft.merge(gm)


def test_training_lowers_the_loss():
    model = tiny_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    gm = fxpeft.rewrite(model, RULES).train()
    ids = token_batch(4, 16)
    losses = train(gm, lambda g: g(input_ids=ids, labels=ids).loss)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())


def test_the_command_line_explains_an_embedding_rule(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "model")
    assert main(["explain", str(tmp_path / "model"), "--rules", str(RULES)]) == 0
    out = capsys.readouterr().out
    assert "token embeddings (lora): 1 match(es)" in out and "bound: embedding 128x64" in out
    assert main(["check", str(RULES), str(RULES.with_name("lora_conv.toml"))]) == 0


def test_bundled_rules_take_token_embeddings_only_and_explain_shows_them():
    report = fxpeft.explain(tiny_bert(), RULES)
    assert report.rules[0].matched == ["bert.embeddings.word_embeddings"]
    assert report.rules[0].reasons["bert.embeddings.position_embeddings"].startswith("path matches none")
    assert "bound: embedding 128x64" in str(report)
    every = Rule(match="embedding", where=Where(module_type=["Embedding"]), params=LoraParams())
    assert len(fxpeft.explain(tiny_bert(), every).rules[0].matched) == 3
    linear = Rule(match="linear", where=Where(path=["word_embeddings"]), params=LoraParams(), optional=True)
    assert fxpeft.explain(tiny_bert(), linear).rules[0].matched == []  # an embedding is no linear


def test_named_adapters_mixed_batches_fuse_and_save(tmp_path):
    ids = token_batch()
    gm = fxpeft.rewrite(tiny_llama(), RULES)
    fxpeft.add_adapter(gm, "other", RULES, r=4)
    randomize_adapters(gm)
    assert {"model.embed_tokens.lora_embedding_A_other", "model.embed_tokens.lora_embedding_B_other"} <= \
        set(fxpeft.adapter_state_dict(gm))
    first = gm(ids).logits
    gm.set_adapter("other")
    second = gm(ids).logits
    gm.set_adapter("default")
    with gm.disable_adapters():
        base = gm(ids).logits
    names = ["default", "other", "__base__"]
    mixed = gm(ids, adapter_names=names).logits
    for row, expected in enumerate((first, second, base)):
        torch.testing.assert_close(mixed[row], expected[row], rtol=0, atol=ATOL)
    torch.testing.assert_close(fxpeft.fuse(gm)(ids).logits, first, rtol=0, atol=ATOL)
    torch.testing.assert_close(fxpeft.fuse(gm, mixed=True)(ids, adapter_names=names).logits, mixed,
                               rtol=0, atol=ATOL)
    folder = fxpeft.save(gm, tmp_path / "other", adapter="other")
    torch.testing.assert_close(logits(fxpeft.load(tiny_llama(), folder), ids), second, rtol=0, atol=ATOL)


def test_bf16_base_gets_fp32_adapters_as_in_peft(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    peft_model = peft_embedding_lora(base, "embed_tokens")
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(base, tmp_path)
    assert {p.dtype for n, p in gm.named_parameters() if "lora" in n} == {torch.float32}
    ids = token_batch()
    torch.testing.assert_close(logits(gm, ids).float(), logits(peft_model, ids).float(), rtol=0, atol=ATOL)
