"""LoRA on ``nn.MultiheadAttention`` (PEFT's ``target_modules=["mha"]``): the plain frontend
traces an attention layer as reads of its weights and one ``multihead_attention`` call, equal
to the module; LoRA on ``in_proj_weight`` and ``out_proj.weight`` at PEFT's keys (``mha.lora_A``,
``mha.base_layer.out_proj.lora_A``), with PEFT 0.21.2's doubled ``out_proj`` delta; identity at
init, the graph, gradients only on adapters, outputs equal PEFT's both ways, merge, and a model
without LoRA on its attention captured and run as before."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import fxpeft
from conftest import adapter_nodes, assert_only_adapters_get_grads, randomize_adapters
from fxpeft.capture.attention import multihead_attention
from fxpeft.capture.export import capture
from fxpeft.formats.peft_format import PeftFormatError
from peft_io import perturb_adapters
from peft_models import MHANet, matrix_input

ATOL = 1e-5
KEYS = {"mha.lora_A.weight": (8, 10), "mha.lora_B.weight": (30, 8),
        "mha.base_layer.out_proj.lora_A.weight": (8, 10), "mha.base_layer.out_proj.lora_B.weight": (10, 8)}


def mha_net() -> MHANet:
    torch.manual_seed(0)
    return MHANet().eval()


class CrossAttention(torch.nn.Module):
    """An attention layer called with every option: separate key and value, a padding mask,
    per-head weights."""

    def __init__(self, batch_first: bool, bias: bool) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first, bias=bias,
                                                add_bias_kv=bias, add_zero_attn=bias)

    def forward(self, query, memory, mask):
        return self.attn(query, memory, memory, key_padding_mask=mask, average_attn_weights=False)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_capture_reads_the_weights_and_equals_the_module(batch_first, bias, training):
    torch.manual_seed(0)
    model = CrossAttention(batch_first, bias).train(training)
    shape = (3, 4, 8) if batch_first else (4, 3, 8)
    query, memory = torch.randn(shape), torch.randn(shape)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = True
    gm = capture(model).graph_module
    calls = gm.graph.find_nodes(op="call_function", target=multihead_attention)
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert len(calls) == 1 and not gm.graph.find_nodes(op="call_module")
    assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= reads
    for ours, theirs in zip(gm(query, memory, mask), model(query, memory, mask)):
        assert torch.equal(ours, theirs)


def test_a_model_without_lora_on_its_attention_runs_as_before():
    model, x = mha_net(), matrix_input("MHA")
    gm = fxpeft.rewrite(model, LoraConfig(target_modules=["lin0"]))
    assert not [n for n in adapter_nodes(gm) if "mha" in str(n.target)]
    assert len(gm.graph.find_nodes(op="call_function", target=multihead_attention)) == 1
    with torch.no_grad():
        assert torch.equal(gm.lin0(torch.zeros(1, 10)), model.lin0(torch.zeros(1, 10)))
        assert torch.equal(gm(x), model(x))


def test_lora_on_the_attention_graph_identity_and_gradients():
    model, x = mha_net(), matrix_input("MHA")
    gm = fxpeft.rewrite(model, LoraConfig(target_modules=["mha"]))
    gm.graph.lint()
    assert {k: tuple(v.shape) for k, v in fxpeft.adapter_state_dict(gm).items()} == KEYS
    call = gm.graph.find_nodes(op="call_function", target=multihead_attention)[0]
    in_proj, out_proj = call.args[3], call.args[5]
    assert in_proj.target == out_proj.target == torch.ops.aten.add.Tensor  # W + scale * B @ A
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # B is zero at init
    randomize_adapters(gm)
    gm.train()
    gm(x).sum().backward()
    assert_only_adapters_get_grads(gm)


def test_a_peft_folder_loads_saves_back_and_merges_exactly(tmp_path):
    """PEFT 0.21.2 adds out_proj's delta twice (its layer and the wrapped Linear's merge); the
    numbers are its own, so adapters move both ways unchanged."""
    x = matrix_input("MHA")
    peft_model = get_peft_model(mha_net(), LoraConfig(target_modules=["mha"])).eval()
    perturb_adapters(peft_model)
    with torch.no_grad():
        expected = peft_model(x)
    peft_model.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(mha_net(), tmp_path / "peft").eval()
    folder = fxpeft.save(gm, tmp_path / "ours")
    back = PeftModel.from_pretrained(mha_net(), str(folder)).eval()
    theirs = {k.replace("base_model.model.", ""): tuple(v.shape)
              for k, v in load_file(folder / "adapter_model.safetensors").items()}
    assert theirs == KEYS and back.peft_config["default"].target_modules == {"mha"}
    with torch.no_grad():
        assert (gm(x) - expected).abs().max() <= ATOL
        assert (back(x) - expected).abs().max() <= ATOL
        merged = fxpeft.merge(copy.deepcopy(gm))
        assert (merged(x) - expected).abs().max() <= ATOL
        assert not adapter_nodes(merged)
        peft_merged = peft_model.merge_and_unload()
        assert (merged.mha.out_proj.weight - peft_merged.mha.out_proj.weight).abs().max() <= ATOL
        assert (merged.mha.in_proj_weight - peft_merged.mha.in_proj_weight).abs().max() <= ATOL


def test_lora_dropout_has_no_effect_on_the_attention_as_in_peft(tmp_path):
    """PEFT merges the attention's adapters before the call, so its lora_dropout never acts."""
    x = matrix_input("MHA")
    config = LoraConfig(target_modules=["mha"], lora_dropout=0.5, init_lora_weights=False)
    peft_model = get_peft_model(mha_net(), config).train()
    peft_model.save_pretrained(tmp_path)
    gm = fxpeft.load(mha_net(), tmp_path).train()
    with torch.no_grad():
        assert (gm(x) - peft_model(x)).abs().max() <= ATOL


def test_dora_on_the_attention_is_refused_by_name():
    """PEFT refuses DoRA on MultiheadAttention too; not a MatchError about a rule."""
    with pytest.raises(PeftFormatError, match=r"mha \(MultiheadAttention\): dora on MultiheadAttention"):
        fxpeft.rewrite(mha_net(), LoraConfig(target_modules=["mha"], use_dora=True))


@pytest.mark.parametrize("options", [{"dropout": 0.1}, {"kdim": 4, "vdim": 4}])
def test_an_attention_layer_the_frontend_keeps_whole_is_refused_by_name(options):
    """Dropout or separate key / value sizes: not opened, so the config is refused naming the
    layer, not "matches no module"."""
    net = mha_net()
    net.mha = torch.nn.MultiheadAttention(net.mha.embed_dim, net.mha.num_heads, **options)
    with pytest.raises(PeftFormatError, match=r"selects mha \(MultiheadAttention with dropout"):
        fxpeft.rewrite(net, LoraConfig(target_modules=["mha"]))


def test_lora_bias_on_the_attention_is_refused_by_name():
    """PEFT merges only the weights' delta into ``in_proj_weight`` before the module's forward,
    so its ``lora_B`` bias there is never applied: refused by name, not a ``PassError``."""
    with pytest.raises(PeftFormatError, match=r"mha \(MultiheadAttention\): lora_bias on MultiheadAttention"):
        fxpeft.rewrite(mha_net(), LoraConfig(target_modules=["mha"], lora_bias=True))


class MHANetForExport(MHANet):
    """MHANet with a shape branch ``symbolic_trace`` cannot take: captured by ``torch.export``."""

    def forward(self, x):
        if x.dim() == 2:
            return super().forward(x)
        raise ValueError(x.dim())


def test_under_export_lora_is_on_the_weights_at_peft_keys(tmp_path):
    """Export decomposes the layer itself: out_proj is a linear at the layer's path, which the
    config must not adapt as a module; keys, the doubled out_proj delta and merge as PEFT's."""
    x = matrix_input("MHA")
    torch.manual_seed(0)
    base = MHANetForExport().eval()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["mha", "lin0"])).eval()
    perturb_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(copy.deepcopy(base), tmp_path / "peft", example_inputs=(x,)).eval()
    assert gm.capture_info.frontend == "export"
    assert set(fxpeft.adapter_state_dict(gm)) == {*KEYS, "lin0.lora_A.weight", "lin0.lora_B.weight"}
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(fxpeft.save(gm, tmp_path / "ours"))).eval()
    with torch.no_grad():
        expected = peft_model(x)
        assert (gm(x) - expected).abs().max() <= ATOL
        assert (back(x) - expected).abs().max() <= ATOL
        assert (fxpeft.merge(gm)(x) - expected).abs().max() <= ATOL
