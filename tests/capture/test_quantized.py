"""QLoRA: bitsandbytes 4-bit (nf4, fp4, with and without double quantization) and 8-bit bases,
loaded from a local checkpoint with ``BitsAndBytesConfig``.

Tolerance against PEFT: 1e-5. Both sides run the base layer through the same bitsandbytes
kernel on the same packed storage (fxpeft's op calls ``bitsandbytes::gemm_4bit``, and for 8-bit
the dequantize-then-matmul route bitsandbytes takes on CPU in train mode), and add an fp32 LoRA
branch with the same A and B, so only summation order can differ. PEFT runs in train mode with
dropout 0: in eval mode under no_grad, bitsandbytes repacks 4-bit weights for CPU inference and
rounds their scales to bf16 (shifting outputs by ~5e-3), which would compare two bases.
"""

import logging

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

import fxpeft  # noqa: E402
from conftest import (CUDA_MARKS, assert_only_adapters_get_grads, loss_and_grads, randomize_adapters,  # noqa: E402
                      tiny_llama, token_batch, train)
from fxpeft.capture.quantized import QUANTIZED_OPS  # noqa: E402
from fxpeft.transforms.activations import silu_and_mul  # noqa: E402
from fxpeft.transforms.causal_mask import masked_or_causal_sdpa  # noqa: E402

SCHEMES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]


def on_gpu(*values):
    """A parameter set that runs on CUDA (and is skipped, saying why, without a GPU)."""
    return pytest.param(*values, "cuda", marks=CUDA_MARKS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return folder


def load(checkpoint, scheme: str, compute=torch.float32, device: str = "cpu") -> LlamaForCausalLM:
    config = BitsAndBytesConfig(**SCHEMES[scheme], bnb_4bit_compute_dtype=compute)
    return LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=config, device_map=device).train()


def logits(model, ids, **kwargs):
    return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_quantized_layer_is_one_op_and_one_linear_site(checkpoint, scheme):
    model = load(checkpoint, scheme)
    layer_type = type(model.model.layers[0].self_attn.q_proj)
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    op = QUANTIZED_OPS["linear_8bit" if scheme == "int8" else "linear_4bit"]
    ops = gm.graph.find_nodes(op="call_function", target=op)
    assert len(ops) == LINEARS_PER_LAYER * 2
    assert type(model.model.layers[0].self_attn.q_proj) is layer_type  # restored after capture
    program = fxpeft.runtime.apply.program_of(gm)
    sites = {s.module_path: s for s in program.sites}
    q = sites["model.layers.0.self_attn.q_proj"]
    assert (q.kind, q.in_features, q.out_features) == ("quantized", 64, 64)
    assert q.module_type == f"{layer_type.__module__}.{layer_type.__qualname__}"
    # The packed storage is shared with the model, not copied or dequantized.
    stored = gm.get_parameter(q.weight_target)
    assert stored.dtype in (torch.uint8, torch.int8)
    assert stored.data_ptr() == model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert not any(type(p).__module__.startswith("bitsandbytes") for p in gm.parameters())
    gm.graph.lint()
    peft_model = get_peft_model(load(checkpoint, scheme), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert fxpeft.trainable_parameters(gm) == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rules", ["lora_qv.toml", "dora_qv.toml", "ia3.toml"])
def test_identity_at_init_and_gradients_only_on_adapters(checkpoint, scheme, rules, device):
    """Both in eval mode (8-bit takes LLM.int8() there, as bitsandbytes does). On CUDA the base
    may differ from the model's own layers by kernel rounding (4-bit, ~1e-7); the adapters
    themselves add exactly 0."""
    model, ids = load(checkpoint, scheme, device=device).eval(), token_batch().to(device)
    expected = logits(model, ids).detach()
    gm = fxpeft.rewrite(model, rules).eval()
    tolerance = 0 if device == "cpu" else 1e-6
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=tolerance)
    with gm.disable_adapters():
        base = logits(gm, ids).detach()
    torch.testing.assert_close(logits(gm, ids), base, rtol=0, atol=0)
    randomize_adapters(gm)
    gm.train()(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)


def peft_lora(model):
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"]))
    randomize_adapters(peft_model, seed=3)
    return peft_model


@pytest.mark.parametrize("scheme,compute,device", [
    ("nf4", torch.float32, "cpu"), ("fp4-double", torch.float32, "cpu"), ("int8", torch.float32, "cpu"),
    ("nf4-double", torch.bfloat16, "cpu"), on_gpu("nf4", torch.float32), on_gpu("fp4-double", torch.float32),
    on_gpu("nf4-double", torch.bfloat16), on_gpu("int8", torch.float32)])
def test_a_peft_qlora_folder_loads_with_parity_and_fxpeft_folders_load_in_peft(checkpoint, scheme,
                                                                               compute, device, tmp_path):
    """With bf16 compute both sides run the base in bf16 and the fp32 LoRA branch on the
    layer's fp32 input, so the tolerance stays 1e-5. 8-bit in both modes on both devices:
    ``test_8bit_computes_as_bitsandbytes_in_each_mode``."""
    ids = token_batch().to(device)
    peft_model = peft_lora(load(checkpoint, scheme, compute, device))
    peft_model.save_pretrained(tmp_path / "peft")
    expected = logits(peft_model, ids).detach()
    gm = fxpeft.load(load(checkpoint, scheme, compute, device), tmp_path / "peft").train()
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=1e-5)
    fxpeft.save(gm, tmp_path / "ours")
    back = PeftModel.from_pretrained(load(checkpoint, scheme, compute, device), tmp_path / "ours").train()
    torch.testing.assert_close(logits(back, ids), expected, rtol=0, atol=1e-5)


MODES = {"train": True, "eval": False}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_8bit_computes_as_bitsandbytes_in_each_mode(checkpoint, mode, device, tmp_path):
    """bitsandbytes dequantizes an 8-bit weight on a CPU in training (``MatMul8bitFp``) and
    runs LLM.int8() otherwise (``MatMul8bitLt``: eval on a CPU, both modes on CUDA), which
    differ by ~5e-3 on this model: identity at init and PEFT parity hold in the same mode."""
    training, ids = MODES[mode], token_batch().to(device)
    model = load(checkpoint, "int8", device=device).train(training)
    expected = logits(model, ids).detach()
    gm = fxpeft.rewrite(model, "lora_qv.toml").train(training)
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=1e-5 if device == "cuda" else 0)
    other = logits(load(checkpoint, "int8", device=device).train(not training), ids).detach()
    torch.testing.assert_close(logits(gm.train(not training), ids), other, rtol=0,
                               atol=1e-5 if device == "cuda" else 0)  # the mode is data
    peft_model = peft_lora(load(checkpoint, "int8", device=device)).train(training)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = fxpeft.load(load(checkpoint, "int8", device=device), tmp_path / "peft").train(training)
    torch.testing.assert_close(logits(loaded, ids), logits(peft_model, ids).detach(), rtol=0, atol=1e-5)


def test_the_8bit_route_follows_the_mode_without_new_code(checkpoint):
    gm = fxpeft.rewrite(load(checkpoint, "int8"), "lora_qv.toml")
    code = gm.code
    ids = token_batch()
    train_out = logits(gm.train(), ids).detach()
    eval_out = logits(gm.eval(), ids).detach()
    assert gm.code == code
    assert (train_out - eval_out).abs().max() > 1e-4  # two routes, as bitsandbytes takes
    ops = gm.graph.find_nodes(op="call_function", target=QUANTIZED_OPS["linear_8bit"])
    assert all(op.kwargs["training"].op == "call_module" and op.kwargs["threshold"] == 6.0 for op in ops)


def test_ia3_and_dora_match_peft_on_a_4bit_base(checkpoint, tmp_path):
    ids = token_batch()
    configs = {"ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                feedforward_modules=["down_proj"]),
               "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])}
    for name, config in configs.items():
        peft_model = get_peft_model(load(checkpoint, "nf4"), config)
        randomize_adapters(peft_model, seed=4)
        peft_model.save_pretrained(tmp_path / name)
        gm = fxpeft.load(load(checkpoint, "nf4"), tmp_path / name).train()
        torch.testing.assert_close(logits(gm, ids), logits(peft_model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["nf4-double", "int8"])
def test_twenty_steps_lower_the_loss(checkpoint, scheme, device):
    gm = fxpeft.rewrite(load(checkpoint, scheme, device=device), "lora_qv.toml").train()
    ids = token_batch(batch=4, seq=16).to(device)
    torch.manual_seed(0)  # adapter dropout
    losses = train(gm, lambda m: m(ids, labels=ids).loss)
    assert losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_torch_compile_forward_and_backward_equal_eager(checkpoint, scheme, device):
    ids = token_batch().to(device)
    gm = fxpeft.rewrite(load(checkpoint, scheme, device=device), "lora_qv.toml").train()
    randomize_adapters(gm)
    gm.eval()
    eager = gm(ids, labels=ids).loss
    eager.backward()
    expected = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad()
    compiled = torch.compile(gm, backend="inductor", fullgraph=True)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=0, atol=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(gm.get_parameter(name).grad, grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_requantizes_and_reports_the_error_like_peft(checkpoint, tmp_path, caplog, device):
    ids = token_batch().to(device)
    peft_model = peft_lora(load(checkpoint, "nf4", device=device))
    peft_model.save_pretrained(tmp_path)
    unmerged = logits(peft_model, ids).detach()
    peft_error = (logits(peft_model.merge_and_unload().train(), ids) - unmerged).abs().max()
    gm = fxpeft.load(load(checkpoint, "nf4", device=device), tmp_path)
    with caplog.at_level(logging.WARNING, logger="fxpeft"):
        merged = fxpeft.merge(gm)
    assert "requantized 4 layer(s)" in caplog.text
    assert set(merged.requantization_error) == {f"model.layers.{i}.self_attn.{p}.weight"
                                                for i in range(2) for p in ("q_proj", "v_proj")}
    assert len(merged.graph.find_nodes(op="call_function", target=QUANTIZED_OPS["linear_4bit"])) == 14
    error = (logits(merged, ids) - unmerged).abs().max()
    assert 0 < error <= 2 * peft_error, (error, peft_error)  # the same requantization as PEFT's


def test_merge_into_a_dequantized_copy_adds_no_error(checkpoint):
    ids = token_batch()
    gm = fxpeft.rewrite(load(checkpoint, "nf4-double"), "lora_qv.toml").eval()
    randomize_adapters(gm)
    merged = fxpeft.merge(gm, dequantize=True)
    assert not merged.graph.find_nodes(op="call_function", target=QUANTIZED_OPS["linear_4bit"])
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(logits(merged, ids), logits(gm, ids), rtol=0, atol=1e-5)
    with pytest.raises(fxpeft.FxpeftError, match="quantized"):
        fxpeft.merge_into(load(checkpoint, "nf4-double"), gm)


def test_a_model_already_repacked_for_cpu_inference_is_captured(checkpoint):
    """An eval-mode no_grad call may repack 4-bit weights for CPU inference, rounding their
    scales to bf16. Capture undoes the layout with bitsandbytes' inverse; the rounded scales
    stay, so outputs are those of a fresh load up to that rounding."""
    model, ids = load(checkpoint, "nf4").eval(), token_batch()
    with torch.no_grad():
        logits(model, ids)
    gm = fxpeft.rewrite(model, "lora_qv.toml").eval()
    fresh = logits(load(checkpoint, "nf4"), ids)
    torch.testing.assert_close(logits(gm, ids), fresh, rtol=0, atol=1e-2)


def assert_same_loss_and_grads(copy, reference, ids):
    batch = {"input_ids": ids, "labels": ids}
    (loss, grads), (expected_loss, expected) = loss_and_grads(copy, batch), loss_and_grads(reference, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    assert grads.keys() == expected.keys() and grads
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=1e-5)


def test_qlora_with_gradient_checkpointing_equals_the_unchecked_graph(checkpoint):
    gm = fxpeft.rewrite(load(checkpoint, "nf4-double"), "lora_qv.toml", dropout=0.0).train()
    randomize_adapters(gm)
    assert_same_loss_and_grads(fxpeft.fuse(gm, checkpoint="layers"), fxpeft.fuse(gm), token_batch())


def test_the_memory_passes_apply_on_a_4bit_base_and_keep_loss_and_gradients(checkpoint):
    """GQA without repeat_kv, gated activations and recomputed norms: the quantized layer's
    cast nodes must not hide the shapes they look for."""
    gm = fxpeft.rewrite(load(checkpoint, "nf4-double"), "lora_qv.toml", dropout=0.0).train()
    randomize_adapters(gm)
    fused, layers = fxpeft.fuse(gm), 2
    calls = [n for n in fused.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls].count(silu_and_mul) == layers
    assert [n.kwargs.get("enable_gqa") for n in calls
            if n.target == masked_or_causal_sdpa] == [True] * layers  # causal_mask's SDPA
    assert len([n for n in fused.graph.nodes if n.op == "call_module" and ".norm_" in n.target]) == layers
    plain = fxpeft.fuse(gm, skip=("sdpa_gqa", "gated_activation", "recompute_norms"))
    assert_same_loss_and_grads(fused, plain, token_batch())
