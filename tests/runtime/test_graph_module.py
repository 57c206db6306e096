"""The adapted GraphModule: call signature, shapes, padding, train/eval and dropout."""

import pytest
import torch

import fxpeft
from fxpeft.runtime.emit import sdpa_dropout_p
from conftest import nodes_with_target, randomize_adapters, tiny_bert, tiny_llama, token_batch

aten = torch.ops.aten


@pytest.fixture(scope="module")
def pair():
    model = tiny_llama(attention_dropout=0.1)
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    randomize_adapters(gm)
    return model, gm


def test_returns_the_base_output_type(pair):
    model, gm = pair
    out = gm(token_batch())
    assert type(out) is type(model(token_batch())) and out.loss is None
    assert gm(token_batch(), labels=token_batch()).loss.dim() == 0


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 5), (5, 3), (2, 64)])
def test_other_batch_and_sequence_sizes(pair, batch, seq):
    model, gm = pair
    base = fxpeft.rewrite(model, "lora_qv.toml")  # B = 0: equals the base model
    ids = token_batch(batch, seq)
    torch.testing.assert_close(base(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    assert gm(ids).logits.shape == (batch, seq, model.config.vocab_size)


def test_padding_mask_is_honoured(pair):
    model, _ = pair
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    ids, mask = token_batch(2, 8), torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    torch.testing.assert_close(gm(ids, attention_mask=mask).logits,
                               model(ids, attention_mask=mask).logits, rtol=0, atol=1e-6)


def test_eval_is_deterministic_and_train_is_not(pair):
    _, gm = pair
    ids = token_batch()
    gm.train()
    assert not torch.equal(gm(ids).logits, gm(ids).logits)
    gm.eval()
    torch.testing.assert_close(gm(ids).logits, gm(ids).logits, rtol=0, atol=0)


def test_every_dropout_follows_the_mode_as_data(pair):
    _, gm = pair
    assert not nodes_with_target(gm, aten.dropout.default)  # all routed through the module
    drops = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "fxpeft_dropout"]
    sdpa = nodes_with_target(gm, aten.scaled_dot_product_attention.default)
    assert drops and sdpa
    p_nodes = {sdpa_dropout_p(n) for n in sdpa}
    assert all(isinstance(p, torch.fx.Node) and p.target == "fxpeft_dropout_attention" for p in p_nodes)
    assert [p.args[0] for p in p_nodes] == pytest.approx([0.1] * len(p_nodes))
    for mode in (True, False):
        gm.train(mode)
        assert gm.fxpeft_dropout.training is mode and gm.fxpeft_dropout_attention.training is mode
        assert gm.fxpeft_dropout_attention(0.1) == (0.1 if mode else 0.0)
    gm.eval()


def test_mode_switch_never_regenerates_code(pair, monkeypatch):
    _, gm = pair
    calls = []
    monkeypatch.setattr(type(gm), "recompile", lambda self: calls.append(1))
    for mode in (True, False, True, False):
        gm.train(mode)
    assert calls == []


def test_base_dropout_is_owned_too():
    model = tiny_bert()  # hidden dropout 0.1 inside the base model
    gm = fxpeft.rewrite(model, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=[r"\.query$"])))
    ids = token_batch()
    gm.eval()
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=0)
    gm.train()
    assert not torch.equal(gm(ids).logits, gm(ids).logits)
    gm.eval()


def test_unknown_keyword_is_a_clear_error(pair):
    _, gm = pair
    with pytest.raises(TypeError, match="unexpected inputs \\['pixel_values'\\]"):
        gm(token_batch(), pixel_values=torch.zeros(1))


def test_too_long_sequence_is_a_clear_error():
    model = tiny_bert()
    gm = fxpeft.rewrite(model, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=[r"\.query$"])))
    with pytest.raises(ValueError, match="exceeds the 256 positions"):
        gm(token_batch(1, 300))


def test_mode_switches_under_torch_compile_compile_once_per_mode():
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters
    gm = fxpeft.rewrite(tiny_llama(attention_dropout=0.1), "lora_qv.toml")  # dropout 0.05 too
    ids = token_batch()
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    compiled = torch.compile(gm, backend=backend, dynamic=True)
    frames = []
    for mode in (True, False, True, False, True):
        gm.train(mode)
        out = compiled(ids, labels=ids)
        out.loss.backward() if mode else None
        frames.append(backend.frame_count)
    assert frames[0] >= 1 and frames[1] > frames[0]  # one compile per mode
    assert frames[2:] == [frames[1]] * 3  # later switches hit the cache
    gm.eval()
    eager = gm(ids).logits
    torch.testing.assert_close(compiled(ids).logits, eager, rtol=0, atol=1e-5)
    torch._dynamo.reset()


def test_deepcopy_gives_an_independent_graph_whose_records_name_its_own_nodes(tmp_path):
    """A reference model or an EMA copy: ``copy.deepcopy`` of an adapted graph (it failed on
    export's fake tensors, reached through the nodes the adapter records name)."""
    import copy
    from fxpeft.graph.records import adapter_records
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    gm.add_adapter("b", "lora_qv", dropout=0.0)
    randomize_adapters(gm)
    twin = copy.deepcopy(gm)
    ids = token_batch()
    torch.testing.assert_close(twin(ids).logits, gm(ids).logits, rtol=0, atol=0)
    ours = dict(gm.named_parameters())
    assert all(param is not ours[name] for name, param in twin.named_parameters())
    for record in adapter_records(twin).values():
        assert all(m.candidate.node.graph is twin.graph for m in record.matches)
    twin.train()(ids, labels=ids).loss.backward()  # a step on the copy leaves the original as it was
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if param.grad is not None:
                param.sub_(param.grad)
    assert not gm.get_parameter("model.layers.0.self_attn.q_proj.lora_B.weight").equal(
        twin.get_parameter("model.layers.0.self_attn.q_proj.lora_B.weight"))
    twin.set_adapter("b")
    assert gm.active_adapters == ["default"] and twin.active_adapters == ["b"]
    assert (fxpeft.save(twin, tmp_path / "twin") / "adapter_model.safetensors").is_file()
    assert fxpeft.generate(twin.eval(), ids[:1, :4], max_new_tokens=2).shape == (1, 6)
    fused = fxpeft.fuse(gm.eval())
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(fused)(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)


def test_rewrite_generates_the_code_once_after_its_passes(monkeypatch):
    """``rewrite`` builds the module without code and generates it once, after the passes
    changed the graph (it used to be generated at emit too)."""
    from torch.fx.graph_module import GraphModule
    generated = []
    original = GraphModule.recompile
    monkeypatch.setattr(GraphModule, "recompile", lambda self: generated.append(type(self).__name__)
                        or original(self))
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv")
    assert generated.count(type(gm).__name__) == 1
    ids = token_batch()
    assert gm(ids).logits.shape[:2] == ids.shape
