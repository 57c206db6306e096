"""Devices. Export bakes ``device=`` constants into the graph; ``gm.to(device)`` moves them with
the parameters. The CUDA tests run where a GPU exists and are skipped, saying so, elsewhere."""

import pytest
import torch

import fxpeft
from conftest import device_constants, on_cuda, randomize_adapters, tiny_llama, token_batch, train
from fxpeft.runtime.adapted_module import move_device_constants


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


@on_cuda
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


@on_cuda
def test_a_cuda_model_is_captured_on_its_device_and_trains_compiled():
    model = tiny_llama().cuda()
    gm = fxpeft.rewrite(model, "lora_qv.toml").train()
    ids = token_batch().cuda()
    compiled = torch.compile(gm, fullgraph=True)
    losses = train(gm, lambda m: compiled(ids, labels=ids).loss, steps=10)
    assert losses[-1] < losses[0]


@on_cuda
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


def test_a_gate_read_on_another_device_is_a_copy_that_switches_with_it():
    from fxpeft.graph.gates import gate_attr
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    gm.add_adapter("sql", "lora_qv.toml")
    copy = gate_attr(gm, "sql", torch.device("meta")).target
    assert copy == "fxpeft_gates._devices.sql_1"
    assert gate_attr(gm, "sql", torch.device("meta")).target == copy  # made once per device
    assert gate_attr(gm, "sql", torch.device("cpu")).target == "fxpeft_gates.sql"
    assert gm.adapter_names == ["default", "sql"]  # copies are not adapters
    gates = gm.get_submodule("fxpeft_gates")
    copy_buffer = gm.get_buffer(copy)
    assert copy_buffer.device.type == "meta"
    with gm.disable_adapters():  # fills every copy too (meta tensors hold no values to read)
        pass
    fused = fxpeft.fuse(gm)  # a fused copy's gates module is a plain Module: still works
    assert fused.adapter_names == ["default", "sql"] and fused.active_adapters == ["default"]
    gm.delete_adapter("sql")
    assert not list(gates.get_submodule("_devices").buffers())


class TwoDevices(torch.nn.Module):
    """A plain module split by hand: its first half on the CPU, its second on the GPU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        self.second = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x).to(self.second[0].weight.device))


def gate_devices(gm):
    """{(gate buffer target, its device) read by the graph}."""
    return {(n.target, gm.get_buffer(n.target).device.type) for n in gm.graph.nodes
            if n.op == "get_attr" and n.target.startswith("fxpeft_gates.")}


@on_cuda
def test_a_plain_module_split_over_cpu_and_cuda_reads_each_gate_on_its_layers_device():
    import copy
    whole = TwoDevices()
    split = copy.deepcopy(whole)
    split.second.cuda()
    x = torch.randn(5, 16)
    gm = fxpeft.rewrite(split, "lora_all_linear.toml", dropout=0.0)
    reference = fxpeft.rewrite(whole, "lora_all_linear.toml", dropout=0.0)
    randomize_adapters(gm)
    randomize_adapters(reference)
    assert {device for _, device in gate_devices(gm)} == {"cpu", "cuda"}
    out = gm(x)
    torch.testing.assert_close(out.cpu(), reference(x), rtol=0, atol=1e-5)
    out.sum().backward()
    for name, param in gm.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.device == param.device, name
    with gm.disable_adapters():
        torch.testing.assert_close(gm(x).cpu(), split(x).cpu(), rtol=0, atol=1e-6)


PLACES = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
          "model.layers.1": "cuda", "model.norm": "cuda", "lm_head": "cuda"}


def split_llama(places: "dict[str, str]" = PLACES):
    """The tiny Llama with each listed module on its device and accelerate's hooks moving the
    activations between them, as ``from_pretrained(device_map=...)`` places a model over several
    GPUs (here over the CPU and one GPU: accelerate's own "cpu" entries are offloaded weights
    that still run on a GPU, so the hooks are added directly)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    model = tiny_llama()
    for name, device in places.items():
        module = model.get_submodule(name).to(device)
        add_hook_to_module(module, AlignDevicesHook(execution_device=device,
                                                    io_same_device=name == "model.embed_tokens"))
    return model


def test_accelerate_device_hooks_are_captured():
    pytest.importorskip("accelerate")
    model = split_llama({name: "cpu" for name in PLACES})
    ids = token_batch()
    expected = model(ids).logits
    gm = fxpeft.rewrite(model, "lora_qv.toml")
    torch.testing.assert_close(gm(ids).logits, expected, rtol=0, atol=1e-6)


@on_cuda
def test_a_transformers_model_split_over_cpu_and_cuda_trains_and_mixes_adapters():
    pytest.importorskip("accelerate")
    gm = fxpeft.rewrite(split_llama(), "lora_qv.toml", dropout=0.0)
    gm.add_adapter("sql", "lora_qv.toml", dropout=0.0)
    reference = fxpeft.rewrite(tiny_llama(), "lora_qv.toml", dropout=0.0)
    reference.add_adapter("sql", "lora_qv.toml", dropout=0.0)
    randomize_adapters(gm)
    randomize_adapters(reference)
    assert {device for _, device in gate_devices(gm)} == {"cpu", "cuda"}
    ids = token_batch()
    names = ["sql", "__base__"]
    for model in (gm, reference):
        model.set_adapter("sql")
    torch.testing.assert_close(gm(ids).logits.cpu(), reference(ids).logits, rtol=0, atol=1e-4)
    expected = reference(ids, adapter_names=names).logits
    torch.testing.assert_close(gm(ids, adapter_names=names).logits.cpu(), expected, rtol=0, atol=1e-4)
    fused = fxpeft.fuse(gm.eval(), mixed=True)
    torch.testing.assert_close(fused(ids, adapter_names=names).logits.cpu(), expected, rtol=0, atol=1e-4)
    losses = train(gm.train(), lambda m: m(ids, labels=ids).loss, steps=10)
    assert losses[-1] < losses[0]
