"""LoRA's ``layer_replication`` (PEFT 0.21.2): the layer stack rebuilt from ranges before capture,
every copy sharing its source layer's parameters (one tensor) and carrying a LoRA of its own.
PEFT's decoder-matrix row (tiny Llama, ``[[0, 1], [0, 2], [1, 2]]``: layers 0 0 1 1): logits
both ways through folders, greedy generate with a 4-layer KV cache equal to PEFT's; identity at
init, graph.lint(), gradients per copy on adapters only, named adapters, merge refused as PEFT
means to, compile fullgraph, a bf16 base, the user's model untouched; the rule-file spelling,
the capture cache key, and bad input refused in one located line."""

import copy
import json

import pytest
import torch

import fxpeft
from fxpeft.capture import cache as capture_cache
from fxpeft.capture.layer_copies import replicated_model
from fxpeft.generation.decode_graph import decoder_for
from fxpeft.graph.state import graph_state
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.rules import parse_rules
from fxpeft.rules.dump import dump_rules
from conftest import (VOCAB, assert_only_adapters_get_grads, lora_branch_count, randomize_adapters,
                      tiny_gpt2, tiny_llama, tiny_qwen2, token_batch)
from kind_checks import ATOL, bf16_llama, check_compiles_whole, logits, perturb

RANGES = [[0, 1], [0, 2], [1, 2]]  # PEFT's test_lora_layer_replication: layers 0 0 1 1
SOURCES = [0, 0, 1, 1]


def lora_config(**extra):
    from peft import LoraConfig
    return LoraConfig(target_modules=["down_proj", "up_proj"], layer_replication=copy.deepcopy(RANGES),
                      task_type="CAUSAL_LM", **extra)


def peft_replicated(base=None, **extra):
    """PEFT's replicated LoRA of ``base`` (a tiny Llama), its adapters moved off their init."""
    from peft import get_peft_model
    model = get_peft_model(base if base is not None else tiny_llama(), lora_config(**extra)).eval()
    perturb(model, "lora_", seed=1)
    return model


def batch():
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3], ids[0, :3] = 0, 0
    return ids, mask


def test_peft_row_both_ways_and_generate_with_the_replicated_cache(tmp_path):
    from peft import PeftModel
    ids, mask = batch()
    theirs = peft_replicated()
    expected = logits(theirs, ids, attention_mask=mask)
    theirs.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(tiny_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(gm, ids, attention_mask=mask), expected, rtol=0, atol=ATOL)
    assert "model.layers.3.mlp.down_proj.lora_A.weight" in fxpeft.adapter_state_dict(gm)
    folder = fxpeft.save(gm, tmp_path / "ours")
    assert json.loads((folder / "adapter_config.json").read_text())["layer_replication"] == RANGES
    back = PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
    torch.testing.assert_close(logits(back, ids, attention_mask=mask), expected, rtol=0, atol=ATOL)
    ours = fxpeft.generate(gm, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    with torch.no_grad():
        peft_tokens = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                      min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, peft_tokens)
    decoder = decoder_for(gm, 2, 15)  # the one generate built (the cache rounds 15 to 16)
    assert len(graph_state(gm).decoders) == 1
    assert sum(1 for name, _ in decoder.named_buffers() if "_keys_" in name) == len(SOURCES)


def test_graph_shares_each_base_weight_and_starts_as_the_replicated_base():
    from peft import get_peft_model
    base = tiny_llama()
    gm = fxpeft.rewrite(base, lora_config())
    gm.graph.lint()
    assert lora_branch_count(gm) == 2 * len(SOURCES)
    for index, source in enumerate(SOURCES):
        for name in ("mlp.up_proj.weight", "self_attn.q_proj.weight"):
            assert gm.get_parameter(f"model.layers.{index}.{name}") is \
                base.get_parameter(f"model.layers.{source}.{name}")
    reads = [n.target for n in gm.graph.find_nodes(op="get_attr") if n.target.endswith("up_proj.weight")]
    assert len(reads) == len(SOURCES)
    assert len({gm.get_parameter(t).data_ptr() for t in reads}) == 2  # one tensor per source layer
    adapter = sum(t.numel() for t in fxpeft.adapter_state_dict(gm).values())
    assert fxpeft.trainable_parameters(gm) == (adapter, adapter + sum(p.numel() for p in base.parameters()))
    ids = token_batch()
    reference = get_peft_model(tiny_llama(), lora_config()).eval()  # PEFT's replicated base at init
    torch.testing.assert_close(logits(gm.eval(), ids), logits(reference, ids), rtol=0, atol=ATOL)
    with gm.disable_adapters():
        torch.testing.assert_close(logits(gm, ids), logits(reference, ids), rtol=0, atol=ATOL)


def test_each_copy_trains_its_own_adapter_against_one_frozen_weight():
    gm = fxpeft.rewrite(tiny_llama(), lora_config()).train()
    randomize_adapters(gm)
    ids = token_batch()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)
    shared = gm.get_parameter("model.layers.0.mlp.down_proj.weight")
    assert shared is gm.get_parameter("model.layers.1.mlp.down_proj.weight")
    assert not shared.requires_grad and shared.grad is None
    first, second = (gm.get_parameter(f"model.layers.{i}.mlp.down_proj.lora_B.weight").grad for i in (0, 1))
    assert (first - second).abs().max() > 1e-6


def test_the_users_model_is_untouched():
    base = tiny_llama()
    config = base.config.to_dict()
    before = [p for p in base.parameters()]
    fxpeft.rewrite(base, lora_config())
    replicated_model(base, ((0, 2), (0, 2)), "<test>")
    assert len(base.model.layers) == 2 and base.config.to_dict() == config
    assert [layer.self_attn.layer_idx for layer in base.model.layers] == [0, 1]
    assert [p for p in base.parameters()] == before and all(not hasattr(p, "lora_A") for p in before)


def test_per_layer_config_lists_follow_the_copies():
    """Qwen2's ``layer_types`` is remapped to the new order (PEFT 0.21.2 leaves it at the old
    length, and its replicated Qwen2 fails with an IndexError in forward)."""
    base = tiny_qwen2(layer_types=["sliding_attention", "full_attention"], use_sliding_window=True,
                      sliding_window=4)
    copy_ = replicated_model(base, tuple(map(tuple, RANGES)), "<test>")
    assert copy_.config.layer_types == [base.config.layer_types[i] for i in SOURCES]
    assert base.config.layer_types == ["sliding_attention", "full_attention"]
    gm = fxpeft.rewrite(base, lora_config()).eval()
    ids = token_batch()
    torch.testing.assert_close(logits(gm, ids), logits(copy_, ids), rtol=0, atol=ATOL)


def test_only_per_layer_config_lists_are_remapped():
    """Only the named per-layer fields follow the copies: a list of layer indices, or any other
    list that happens to have one entry per layer, keeps its value."""
    base = tiny_llama()
    base.config.kv_source_layers = [1, 0]
    base.config.custom_pair = ["a", "b"]
    copy_ = replicated_model(base, tuple(map(tuple, RANGES)), "<test>")
    assert copy_.config.kv_source_layers == [1, 0] and copy_.config.custom_pair == ["a", "b"]
    assert copy_.config.num_hidden_layers == len(SOURCES)


def test_named_adapters_on_replicated_layers(tmp_path):
    """A second LoRA without ``layer_replication`` sits on the replicated layers, as in PEFT
    (``add_adapter`` there keeps the stack); other ranges, or a kind PEFT has no replication
    for, are refused in one line."""
    from peft import LoraConfig
    theirs = peft_replicated()
    theirs.add_adapter("other", LoraConfig(target_modules=["q_proj"]))
    perturb(theirs, "lora_", seed=2)
    theirs.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(tiny_llama(), tmp_path / "peft")
    fxpeft.load(gm, tmp_path / "peft" / "other", adapter="other")
    assert "model.layers.3.self_attn.q_proj.lora_A_other.weight" in dict(gm.named_parameters())
    ids = token_batch()
    for name in ("default", "other"):
        theirs.set_adapter(name)
        gm.set_adapter(name)
        torch.testing.assert_close(logits(gm.eval(), ids), logits(theirs, ids), rtol=0, atol=ATOL)
    alone = fxpeft.load(tiny_llama(), fxpeft.save(gm, tmp_path / "other", adapter="other")).eval()
    torch.testing.assert_close(logits(alone, ids), logits(theirs, ids), rtol=0, atol=ATOL)
    with pytest.raises(fxpeft.FxpeftError, match=r"layer_replication = \[\[0, 2\]\] differs") as other:
        fxpeft.add_adapter(gm, "third", parse_rules(
            'layer_replication = [[0, 2]]\n[[rule]]\nmatch = "linear"\nrewrite = "lora"\n'))
    with pytest.raises(fxpeft.RuleError, match=r"ia3 adapters cannot be built on replicated layers") as ia3:
        fxpeft.add_adapter(gm, "third", parse_rules('[[rule]]\nmatch = "linear"\nrewrite = "ia3"\n'))
    assert "\n" not in str(other.value) + str(ia3.value) and gm.adapter_names == ["default", "other"]


def test_merge_is_refused_by_name():
    gm = fxpeft.rewrite(tiny_llama(), lora_config())
    for merge in (fxpeft.merge, lambda g: fxpeft.merge_into(tiny_llama(), g)):
        with pytest.raises(fxpeft.FxpeftError, match=r"merge: cannot merge adapters when the base "
                           r"model's layers are replicated \(layer_replication = \[\[0, 1\], "):
            merge(gm)


def test_compiles_fullgraph_and_fuses():
    gm = fxpeft.rewrite(tiny_llama(), lora_config())
    randomize_adapters(gm)
    ids = token_batch()
    torch.testing.assert_close(logits(fxpeft.fuse(gm).eval(), ids), logits(gm.eval(), ids), rtol=0, atol=ATOL)
    check_compiles_whole(gm, ids)


def test_dora_on_replicated_layers_both_ways(tmp_path):
    from peft import PeftModel
    theirs = peft_replicated(use_dora=True)
    theirs.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(tiny_llama(), tmp_path / "peft").eval()
    ids = token_batch()
    torch.testing.assert_close(logits(gm, ids), logits(theirs, ids), rtol=0, atol=ATOL)
    assert "model.layers.3.mlp.up_proj.lora_magnitude_vector" in fxpeft.adapter_state_dict(gm)
    back = PeftModel.from_pretrained(tiny_llama(), str(fxpeft.save(gm, tmp_path / "ours"))).eval()
    torch.testing.assert_close(logits(back, ids), logits(theirs, ids), rtol=0, atol=ATOL)


def test_bf16_base_both_ways(tmp_path):
    from peft import PeftModel
    theirs = peft_replicated(bf16_llama())
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    theirs.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(bf16_llama(), tmp_path / "peft").eval()
    ids = token_batch()
    out = logits(gm, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, logits(theirs, ids), rtol=0, atol=1e-2)
    back = PeftModel.from_pretrained(bf16_llama(), str(fxpeft.save(gm, tmp_path / "ours"))).eval()
    torch.testing.assert_close(logits(back, ids), out, rtol=0, atol=1e-2)


def test_rule_file_spelling_round_trips(tmp_path):
    text = ('layer_replication = [[0, 1], [0, 2], [1, 2]]\n[[rule]]\nmatch = "linear"\n'
            'rewrite = "lora"\n[rule.where]\npath = ["mlp\\\\.(up|down)_proj$"]\n')
    rules = parse_rules(text, source="rep.toml")
    assert rules.layer_replication == ((0, 1), (0, 2), (1, 2))
    assert parse_rules(dump_rules(rules)).layer_replication == rules.layer_replication
    gm = fxpeft.rewrite(tiny_llama(), rules)
    assert lora_branch_count(gm) == 8 and gm.capture_info.config.num_hidden_layers == 4


def test_capture_cache_tells_replicated_from_plain_stacks():
    """A 2-layer model replicated to 3 layers has a plain 3-layer model's config and structure;
    the parameters its copies share tell them apart."""
    inputs = {"input_ids": token_batch()}
    copy_ = replicated_model(tiny_llama(), ((0, 2), (1, 2)), "<test>")
    plain = tiny_llama(num_hidden_layers=3)
    assert copy_.config.to_json_string() == plain.config.to_json_string()
    assert capture_cache.shared_names(copy_) and not capture_cache.shared_names(plain)
    assert capture_cache.cache_key(copy_, inputs) != capture_cache.cache_key(plain, inputs)
    assert capture_cache.cache_key(copy_, inputs) == capture_cache.cache_key(
        replicated_model(tiny_llama(), ((0, 2), (1, 2)), "<test>"), inputs)


@pytest.mark.parametrize("text, message", [
    ('layer_replication = [[0, 3]]', r"rep.toml:1: layer_replication: range \[0, 3\] is outside the 2 layers "
                                      r"of LlamaForCausalLM"),
    ('layer_replication = [[2, 1]]', r"rep.toml:1: layer_replication: expected \[start, end\] pairs of "
                                      r"integers with 0 <= start < end, got \[2, 1\]"),
    ('layer_replication = [[0, "2"]]', r"rep.toml:1: layer_replication: expected \[start, end\] pairs"),
    ('layer_replication = []', r"rep.toml:1: layer_replication: expected a non-empty list"),
    ('layer_replication = [[0, 1]]\n[[rule]]\nmatch = "linear"\nrewrite = "ia3"',
     r"rep.toml:1: layer_replication: ia3 adapters cannot be built on replicated layers"),
])
def test_bad_ranges_are_one_located_line(tmp_path, text, message):
    if "[[rule]]" not in text:
        text += '\n[[rule]]\nmatch = "linear"\nrewrite = "lora"\n'
    path = tmp_path / "rep.toml"
    path.write_text(text)
    with pytest.raises(fxpeft.RuleError) as refused:
        fxpeft.rewrite(tiny_llama(), str(path))
    assert "\n" not in str(refused.value)
    assert __import__("re").search(message, str(refused.value).replace(str(tmp_path) + "/", "")), refused.value


def test_a_model_without_a_layer_list_and_a_bad_config_are_refused(tmp_path):
    with pytest.raises(fxpeft.RuleError, match=r"layer_replication: GPT2LMHeadModel has no layer list "
                       r"PEFT replicates") as gpt2:
        fxpeft.rewrite(tiny_gpt2(), {"peft_type": "LORA", "target_modules": ["c_fc"],
                                     "layer_replication": [[0, 1]]})
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "target_modules": ["up_proj"], "layer_replication": [[1, 1]]}))
    with pytest.raises(PeftFormatError, match=r"adapter_config.json: layer_replication: "
                       r"expected \[start, end\] pairs") as config:
        fxpeft.load(tiny_llama(), tmp_path)
    assert "\n" not in str(gpt2.value) + str(config.value)


def test_captures_own_replication_copies_the_replicated_stack(monkeypatch, caplog):
    """Copies of one layer share tensors under one name: capture exports two of the five layers
    and copies their subgraph, node for node the whole export, each copy reading its source's
    one tensor."""
    import logging
    from fxpeft.capture.export import capture
    monkeypatch.setenv("FXPEFT_CAPTURE_CACHE", "0")
    model = replicated_model(tiny_llama(num_hidden_layers=3), ((0, 3), (1, 3)), "<test>")  # 0 1 2 1 2
    programs = {}
    for replicated in ("1", "0"):
        monkeypatch.setenv("FXPEFT_REPLICATE", replicated)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="fxpeft"):
            programs[replicated] = capture(model)
        assert any("replicated from 2 of its 5 layers" in r.message for r in caplog.records) == (replicated == "1")
    fast, full = programs["1"], programs["0"]
    assert _computation(fast, model) == _computation(full, model)
    fast.graph.lint()
    assert fast.graph_module.get_parameter("model.layers.3.mlp.up_proj.weight") is \
        model.model.layers[1].mlp.up_proj.weight


def _computation(program, model):
    """Each node's op, target and arguments, a parameter read named by its tensor (its first
    name in ``model``): export reads a shared tensor under any of its names (layer 1 may read
    ``model.layers.3.input_layernorm.weight``) and places the reads in its own order."""
    from torch.fx.node import map_aggregate
    from fxpeft.graph.targets import fetch
    first = {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers()):
        first.setdefault(id(tensor), name)
    gm = program.graph_module
    reads = {n: first.get(id(fetch(gm, n.target)), n.target) for n in program.graph.find_nodes(op="get_attr")}
    kept = [n for n in program.graph.nodes if n not in reads]
    position = {node: i for i, node in enumerate(kept)}

    def arg(a):
        if not isinstance(a, torch.fx.Node):
            return a
        return reads[a] if a in reads else ("node", position[a])
    return [(n.op, str(n.target), map_aggregate(n.args, arg), map_aggregate(n.kwargs, arg)) for n in kept]
