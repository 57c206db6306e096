"""LoRA on bare parameters (PEFT's ``target_parameters``) and on mixture-of-experts experts:
PEFT's two custom-model rows and tiny Qwen3-MoE and Mixtral (experts as 3-d parameters, the
``batched_mm`` experts implementation) both ways through folders, merge (equal to unmerged and
to PEFT's ``merge_and_unload``), the graph, identity at init, gradients only on adapters,
torch.compile(fullgraph=True) forward and backward, named adapters, a bf16 base, refusals (the
``eager`` experts implementation, which export cannot capture)."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fxpeft
from conftest import adapter_nodes, assert_only_adapters_get_grads, randomize_adapters
from fxpeft.errors import FxpeftError
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.kinds.lora import LoraParams
from fxpeft.rules import Rule, RuleSet, Where
from peft_models import MLP, MlpUsingParameters

aten = torch.ops.aten
ATOL = 1e-5
MOE_VOCAB = 64
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


# PEFT 0.21.2's tests/test_custom_models.py TEST_CASES rows for target_parameters.
CUSTOM_ROWS = {
    "MLP 1 using nn.Parameter LoRA": (MlpUsingParameters, {"target_parameters": ["lin0.weight"]}),
    "MLP 2 using nn.Parameter LoRA": (MLP, {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
}


def tiny_qwen3_moe(dtype=torch.float32):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=MOE_VOCAB, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, experts_implementation="batched_mm")
    return Qwen3MoeForCausalLM(config).to(dtype).eval()


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=MOE_VOCAB, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                           num_experts_per_tok=2, experts_implementation="batched_mm")
    return MixtralForCausalLM(config).eval()


MOE = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral}


def ids():
    return torch.randint(0, MOE_VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def peft_moe(make, **config):
    torch.manual_seed(3)
    return get_peft_model(make(), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                             target_parameters=EXPERTS, **config)).eval()


def expert_rules(**params) -> RuleSet:
    return RuleSet((Rule(match="parameter", where=Where(path=[r"experts\.(gate_up|down)_proj$"]),
                         params=LoraParams(r=2, alpha=4, **params)),))


# --- PEFT's custom-model rows --------------------------------------------------------------------

@pytest.mark.parametrize("row", list(CUSTOM_ROWS))
def test_peft_custom_rows_both_ways_and_merge(row, tmp_path):
    make, config = CUSTOM_ROWS[row]
    torch.manual_seed(0)
    base = make().eval()
    torch.manual_seed(1)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **config)).eval()
    x = torch.arange(90, dtype=torch.float32).view(9, 10) / 50
    expected = theirs(x).detach()
    theirs.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=ATOL)
    assert (expected - base(x)).abs().max() > 1e-3
    again = PeftModel.from_pretrained(copy.deepcopy(base), str(fxpeft.save(gm, tmp_path / "ours"))).eval()
    torch.testing.assert_close(again(x), expected, rtol=0, atol=ATOL)
    merged, peft_merged = fxpeft.merge(gm), theirs.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, rtol=0, atol=ATOL)
    for name in config["target_parameters"]:
        torch.testing.assert_close(merged.get_parameter(name), peft_merged.get_parameter(name), rtol=0, atol=1e-6)


def test_bare_parameter_graph_reads_the_adapted_weight():
    """The read of ``lin0.weight`` becomes ``W + scale * B @ (A * gate)``; the matmul reads it."""
    gm = fxpeft.rewrite(MlpUsingParameters(), RuleSet((Rule(match="parameter", where=Where(path=[r"lin0\.weight$"]),
                                                            params=LoraParams(r=4)),)))
    gm.graph.lint()
    (join,) = [n for n in adapter_nodes(gm) if n.meta["fxpeft_adapter"].bypass == 0]
    assert join.target == aten.add.Tensor and join.args[0].op == "get_attr" and join.args[0].target == "lin0.weight"
    assert [u.target for u in join.users] == [__import__("operator").matmul]
    assert {n.target for n in adapter_nodes(gm)} >= {aten.mm.default, aten.add.Tensor}
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == ["lin0.lora_A.weight", "lin0.lora_B.weight"]


# --- mixture of experts --------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(MOE))
def test_moe_experts_both_ways_and_merge(family, tmp_path):
    """PEFT's ``target_parameters`` on both expert stacks (plus ``q_proj``): its folder loads
    with its logits; ours loads back into PEFT; merge equals unmerged and PEFT's merge."""
    make = MOE[family]
    theirs = peft_moe(make, target_modules=["q_proj"])
    x, base = ids(), make()
    expected = logits(theirs, x)
    assert (expected - logits(base, x)).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(make(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(gm, x), expected, rtol=0, atol=ATOL)
    again = PeftModel.from_pretrained(make(), str(fxpeft.save(gm, tmp_path / "ours"))).eval()
    torch.testing.assert_close(logits(again, x), expected, rtol=0, atol=ATOL)
    merged, peft_merged = fxpeft.merge(gm), theirs.merge_and_unload()
    merged.graph.lint()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, x), expected, rtol=0, atol=ATOL)
    for name, param in peft_merged.named_parameters():
        if "experts" in name or "q_proj" in name:
            torch.testing.assert_close(merged.get_parameter(name), param, rtol=0, atol=1e-6)


def test_moe_graph_identity_and_gradients():
    """Each expert stack's read gets one join (bmm of per-expert A and B); at init the outputs
    are the base's exactly; backward reaches only the adapters."""
    model = tiny_qwen3_moe()
    x = ids()
    gm = fxpeft.rewrite(model, expert_rules())
    gm.graph.lint()
    joins = [n for n in adapter_nodes(gm) if n.meta["fxpeft_adapter"].bypass == 0]
    assert sorted(j.args[0].target for j in joins) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(1) for p in ("gate_up_proj", "down_proj"))
    assert sum(n.target == aten.bmm.default for n in adapter_nodes(gm)) == 2
    assert all(u.target == aten.index.Tensor for j in joins for u in j.users)
    torch.testing.assert_close(logits(gm, x), logits(tiny_qwen3_moe(), x), rtol=0, atol=0)
    randomize_adapters(gm)
    gm.train()(input_ids=x).logits.sum().backward()
    assert_only_adapters_get_grads(gm)
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters() if "layers.0" in n and "lora_" in n}
    assert shapes == {"model.layers.0.mlp.experts.base_layer.lora_A.weight": (8, 16),  # gate_up: 4 experts x r 2
                      "model.layers.0.mlp.experts.base_layer.lora_B.weight": (16, 8),
                      "model.layers.0.mlp.experts.lora_A.weight": (8, 8),
                      "model.layers.0.mlp.experts.lora_B.weight": (16, 8)}


@pytest.mark.parametrize("family", list(MOE))
def test_moe_compiles_fullgraph(family):
    """One frame with ``fullgraph=True`` (no parametrisation hook to break it): eager's logits
    and gradients, which reach only the adapters."""
    from torch._dynamo.testing import CompileCounterWithBackend
    gm = fxpeft.rewrite(MOE[family](), expert_rules())
    randomize_adapters(gm)
    x = ids()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    out = torch.compile(gm.train(), backend=counter, fullgraph=True)(input_ids=x).logits
    assert counter.frame_count == 1
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad()
    eager = gm(input_ids=x).logits
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)
    eager.sum().backward()
    assert_only_adapters_get_grads(gm)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, gm.get_parameter(name).grad, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_moe_named_adapters(tmp_path):
    """Two adapters on the experts: switching (and the fused copy), the base under ``disable_adapters``, one saved
    alone, deleting one; mixed batches refused (one weight per step), as in PEFT."""
    gm = fxpeft.rewrite(tiny_qwen3_moe(), expert_rules())
    gm.add_adapter("other", expert_rules(init="random"))
    randomize_adapters(gm)
    x, outputs = ids(), {}
    for name in ("default", "other"):
        gm.set_adapter(name)
        outputs[name] = logits(gm.eval(), x)
        torch.testing.assert_close(logits(fxpeft.fuse(gm), x), outputs[name], rtol=0, atol=ATOL)
    assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3
    with gm.disable_adapters():
        torch.testing.assert_close(logits(gm, x), logits(tiny_qwen3_moe(), x), rtol=0, atol=0)
    alone = fxpeft.load(tiny_qwen3_moe(), fxpeft.save(gm, tmp_path / "other", adapter="other"))
    torch.testing.assert_close(logits(alone, x), outputs["other"], rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="adapt whole weights.*cannot be mixed per sample"):
        gm(input_ids=x, adapter_names=["default", "other", "__base__"])
    gm.delete_adapter("other")
    gm.set_adapter("default")
    assert not any("_other" in n for n, _ in gm.named_parameters())
    torch.testing.assert_close(logits(gm, x), outputs["default"], rtol=0, atol=ATOL)


def test_moe_bf16_base_both_ways(tmp_path):
    """On a bf16 base the adapters are fp32 (PEFT's autocast) and ``ΔW`` is added in bf16."""
    theirs = peft_moe(lambda: tiny_qwen3_moe(torch.bfloat16))
    x = ids()
    theirs.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(tiny_qwen3_moe(torch.bfloat16), tmp_path / "peft")
    assert {p.dtype for n, p in gm.named_parameters() if "lora_" in n} == {torch.float32}
    out = logits(gm, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, logits(theirs, x), rtol=0, atol=1e-2)
    again = PeftModel.from_pretrained(tiny_qwen3_moe(torch.bfloat16), str(fxpeft.save(gm, tmp_path / "ours")))
    torch.testing.assert_close(logits(again.eval(), x), out, rtol=0, atol=1e-2)


# --- refusals ------------------------------------------------------------------------------------

def test_dropout_on_a_parameter_is_refused():
    with pytest.raises(FxpeftError, match="cannot have dropout"):
        fxpeft.rewrite(MlpUsingParameters(), RuleSet((Rule(match="parameter", where=Where(path=["lin0.weight"]),
                                                           params=LoraParams(dropout=0.1)),)))


@pytest.mark.parametrize("model", [MlpUsingParameters, MLP], ids=["bare parameter", "nn.Linear weight"])
@pytest.mark.parametrize("options, message", [
    ({"lora_bias": True}, "lin0.weight: LoRA on a parameter takes no lora_bias or MiCA"),
    ({"init": "mica"}, "lin0.weight: LoRA on a parameter takes no lora_bias or MiCA"),
    ({"kasa": True}, "lin0.weight: KaSA applies to linear layers only"),
    ({"velora": "random"}, "lin0.weight: VeLoRA applies to linear layers only")])
def test_what_peft_s_parameter_wrapper_lacks_is_refused_on_every_parameter(model, options, message):
    """PEFT's parameter wrapper refuses these for any targeted parameter, a whole linear's weight
    included; so does fxpeft, whichever way the graph reads the parameter."""
    rules = RuleSet((Rule(match="parameter", where=Where(path=["lin0.weight"]),
                          params=LoraParams(r=2, **options)),))
    with pytest.raises(FxpeftError, match=message):
        fxpeft.rewrite(model(), rules)


def test_transposed_experts_are_refused():
    """Experts stored ``[experts, in, out]`` (``is_transposed``, GPT-OSS) are refused by name."""
    from fxpeft.kinds.lora import config_to_rules
    model = MlpUsingParameters()
    model.lin0.is_transposed = True
    model.lin0.weight = torch.nn.Parameter(torch.randn(2, 10, 20))
    with pytest.raises(PeftFormatError, match="lin0: experts stored transposed"):
        config_to_rules({"target_parameters": ["lin0.weight"], "r": 2}, model, "cfg")


def test_eager_experts_are_refused_with_the_implementations_that_export():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from fxpeft.errors import CaptureError
    config = Qwen3MoeConfig(vocab_size=MOE_VOCAB, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, experts_implementation="eager")
    with pytest.raises(CaptureError, match="experts_implementation='batched_mm'"):
        fxpeft.rewrite(Qwen3MoeForCausalLM(config), expert_rules())


def test_target_parameters_with_dora_is_refused():
    from fxpeft.kinds.dora import KIND
    with pytest.raises(PeftFormatError, match="target_parameters is not supported with dora"):
        KIND.peft.to_rules({"target_parameters": ["lin0.weight"], "use_dora": True}, MLP(), "cfg")
