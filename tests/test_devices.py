"""Devices. Export bakes ``device=`` constants into the graph; ``gm.to(device)`` moves them with
the parameters. The CUDA tests run where a GPU exists and are skipped, saying so, elsewhere."""

import pytest
import torch

import fxpeft
from conftest import randomize_adapters, tiny_llama, token_batch, train
from fxpeft.graph_module import move_device_constants

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def device_constants(gm):
    found = []
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                found += [v for v in (*node.args, *node.kwargs.values()) if isinstance(v, torch.device)]
    return found


def test_moving_the_graph_moves_every_baked_device_constant():
    gm = fxpeft.fuse(fxpeft.rewrite(tiny_llama(), "lora_qv.toml"), checkpoint="layers")
    assert device_constants(gm) and {d.type for d in device_constants(gm)} == {"cpu"}
    assert move_device_constants(gm, "meta") > 0
    assert {d.type for d in device_constants(gm)} == {"meta"}


def test_to_the_same_device_changes_nothing():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    ids = token_batch()
    expected = gm(ids).logits
    code = gm.code
    assert gm.to("cpu") is gm and gm.cpu() is gm and gm.code == code
    torch.testing.assert_close(gm(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("rules", ["lora_qv.toml", "dora_qv.toml", "ia3.toml", "llama_adapter.toml"])
def test_captured_on_cpu_then_moved_to_cuda_equals_cpu(rules):
    gm = fxpeft.rewrite(tiny_llama(), rules).eval()
    randomize_adapters(gm)
    ids = token_batch()
    expected = gm(ids, labels=ids)
    gm.to("cuda")
    out = gm(ids.cuda(), labels=ids.cuda())
    torch.testing.assert_close(out.logits.cpu(), expected.logits, rtol=0, atol=1e-4)
    out.loss.backward()
    assert all(p.grad.is_cuda for n, p in gm.named_parameters() if p.grad is not None)


@pytest.mark.cuda
@cuda
def test_a_cuda_model_is_captured_on_its_device_and_trains_compiled():
    model = tiny_llama().cuda()
    gm = fxpeft.rewrite(model, "lora_qv.toml").train()
    ids = token_batch().cuda()
    compiled = torch.compile(gm, fullgraph=True)
    losses = train(gm, lambda m: compiled(ids, labels=ids).loss, steps=10)
    assert losses[-1] < losses[0]


@pytest.mark.cuda
@cuda
def test_qlora_nf4_on_cuda_trains_with_checkpointing(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    tiny_llama().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cuda")
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    checked = fxpeft.fuse(gm, checkpoint="layers").train()
    ids = token_batch().cuda()
    losses = train(checked, lambda m: m(ids, labels=ids).loss)
    assert losses[-1] < losses[0]
