"""IA3: ones at init, PEFT's names and shapes, PEFT parity both ways, merging by folding."""

import torch

import fxpeft
from conftest import emitted_base, nodes_with_target, token_batch, tiny_llama
from fxpeft.graph.gates import GATE_META
from fxpeft.names import ADAPTER_META
from peft_io import load_into, peft_adapted, save_from

aten = torch.ops.aten
SHAPES = {"self_attn.k_proj": (32, 1), "self_attn.v_proj": (32, 1), "mlp.down_proj": (1, 128)}


def _randomise(module, seed=4):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))


def test_identity_at_init_with_peft_names_and_shapes():
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, "ia3.toml")
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=0)
    trainable = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.{site}.ia3_l": shape for i in (0, 1)
                         for site, shape in SHAPES.items()}
    assert all(torch.equal(p, torch.ones_like(p)) for p in gm.parameters() if p.requires_grad)
    gm(ids, labels=ids).loss.backward()
    assert {n for n, p in gm.named_parameters() if p.grad is not None} == set(trainable)


def test_perturbed_vectors_scale_exactly_as_predicted():
    """l = 2 on k_proj's output and 0.5 on down_proj's input is the base model with k_proj's
    weight doubled and down_proj's weight halved."""
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, "ia3.toml")
    with torch.no_grad():
        gm.get_parameter("model.layers.1.self_attn.k_proj.ia3_l").fill_(2.0)
        gm.get_parameter("model.layers.0.mlp.down_proj.ia3_l").fill_(0.5)
    expected = tiny_llama()
    with torch.no_grad():
        expected.model.layers[1].self_attn.k_proj.weight.mul_(2.0)
        expected.model.layers[0].mlp.down_proj.weight.mul_(0.5)
        assert (expected(ids).logits - model(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(gm(ids).logits, expected(ids).logits, rtol=0, atol=1e-5)


def test_graph_scales_kv_outputs_and_down_proj_input():
    model = tiny_llama()
    base = emitted_base(model)
    gm = fxpeft.rewrite(model, "ia3.toml")
    gm.graph.lint()
    added = [n for n in gm.graph.nodes if ADAPTER_META in n.meta]
    gates = [n for n in gm.graph.nodes if GATE_META in n.meta]  # per site: the buffer, per sample
    assert len(added) == 5 * 6 and len(gates) == 2 * 6
    per_sample = 2  # once per graph: the adapter_names input and the Gates call
    assert len(gm.graph.nodes) == len(base.graph.nodes) + len(added) + len(gates) + per_sample
    for linear in nodes_with_target(gm, aten.linear.default):
        name = str(linear.args[1])
        if "down_proj" in name:  # the input is scaled
            assert linear.args[0].target == aten.mul.Tensor and ADAPTER_META in linear.args[0].meta
        if "k_proj" in name or "v_proj" in name:  # the output is scaled
            assert [u.target for u in linear.users] == [aten.mul.Tensor]
        if "q_proj" in name or "up_proj" in name:
            assert all(ADAPTER_META not in u.meta for u in linear.users)


def test_peft_ia3_loads_into_fxpeft_with_equal_logits(tmp_path):
    ids = token_batch()
    peft_model = peft_adapted(tiny_llama(), "ia3")
    _randomise(peft_model)
    peft_model.save_pretrained(tmp_path)
    gm = load_into(tiny_llama(), tmp_path)
    expected = peft_model(input_ids=ids).logits
    torch.testing.assert_close(gm(ids).logits, expected, rtol=0, atol=1e-5)
    assert (expected - tiny_llama()(ids).logits).abs().max() > 1e-3


def test_fxpeft_ia3_loads_into_peft_with_equal_logits(tmp_path):
    ids = token_batch()
    gm = fxpeft.rewrite(tiny_llama(), "ia3.toml")
    _randomise(gm, seed=9)
    save_from(gm, tmp_path)
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, gm(ids).logits, rtol=0, atol=1e-5)


def test_merge_gives_peft_merged_weights():
    ids = token_batch()
    model = tiny_llama()
    gm = fxpeft.rewrite(model, "ia3.toml")
    _randomise(gm)
    before = gm(ids).logits
    vectors = {n: p.detach().clone() for n, p in gm.named_parameters() if "ia3_l" in n}
    gm = fxpeft.merge(gm)
    torch.testing.assert_close(gm(ids).logits, before, rtol=0, atol=1e-5)
    assert not any("ia3_l" in n for n, _ in gm.named_parameters())
    peft_model = peft_adapted(tiny_llama(), "ia3")
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_(vectors[name.replace("base_model.model.", "").replace(".default", "")])
    merged = peft_model.merge_and_unload()
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(gm.get_parameter(name), merged.get_parameter(name), rtol=0, atol=0)
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight,
                       tiny_llama().model.layers[0].self_attn.k_proj.weight)  # original untouched


def test_fold_scales_output_bias_too():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    from fxpeft.rules import Rule, Where
    from fxpeft.kinds.ia3 import IA3Params
    gm = fxpeft.rewrite(net, [Rule(where=Where(path=["^0$"]), params=IA3Params()),
                              Rule(where=Where(path=["^1$"]), params=IA3Params(feedforward=True))])
    _randomise(gm)
    x = torch.randn(5, 3)
    before = gm(x)
    torch.testing.assert_close(fxpeft.merge(gm)(x), before, rtol=0, atol=1e-6)


def test_fxpeft_merge_folds_ia3():
    gm = fxpeft.rewrite(tiny_llama(), "ia3.toml")
    _randomise(gm)
    ids = token_batch()
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    assert len(merged.graph.nodes) == len(emitted_base(tiny_llama()).graph.nodes)
    assert not any("ia3_l" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)
