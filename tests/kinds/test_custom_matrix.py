"""PEFT's custom-model matrix (its tests/test_custom_models.py TEST_CASES), the slice of rows whose
site or option fxpeft newly supports: DoRA on embeddings and 1-d / 2-d / 3-d convolutions
(grouped ones included), Conv3d LoRA, IA3 on Conv2d / Conv3d, lora_bias, MiCA, AdaLoRA on Conv2d,
BD-LoRA, VeLoRA, KaSA and LoRA on nn.MultiheadAttention. Each row both ways through folders and merged
(bench/peft_custom_matrix.py runs every row); the rows fxpeft refuses name the feature; and each new site keeps the guarantees of
the existing kinds: identity at init, the graph, gradients only on adapters, named adapters,
fuse, bf16 bases and torch.compile(fullgraph=True). DoRA on a tiny Llama's embed_tokens
generates PEFT's tokens."""

import copy

import pytest
import torch
from peft import BOFTConfig, IA3Config, LoraConfig, PeftModel, get_peft_model

import fxpeft
from conftest import adapter_nodes, assert_only_adapters_get_grads, tiny_llama
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.names import ADAPTER_META
from kind_checks import check_compiles, check_generate
from peft_io import matrix_case, perturb_adapters
from peft_models import custom_model, matrix_input, peft_custom_cases

ATOL = 1e-5
NEW_ROWS = {
    "Embedding + transformers Conv1D 2 DoRA", "Embedding + transformers Conv1D 3 DoRA",
    "Conv1d LoRA with DoRA", "Conv2d 1 LoRA with DoRA", "Conv2d 2 LoRA with DoRA",
    "Conv2d Groups LoRA with DoRA", "Conv2d Groups2 LoRA with DoRA",
    "Conv3d 1 LoRA", "Conv3d 2 LoRA", "Conv3d 1 LoRA with DoRA", "Conv3d 2 LoRA with DoRA",
    "Conv2d 1 IA3", "Conv2d 2 IA3", "Conv2d 3 IA3", "Conv2d 4 IA3", "Conv2d 5 IA3",
    "Conv3d 1 IA3", "Conv3d 2 IA3", "Conv3d 3 IA3", "Conv3d 4 IA3", "Conv3d 5 IA3",
    "Vanilla MLP 1 LoRA with lora_b bias", "Conv2d 1 LoRA with lora_b bias",
    "Conv3d 1 LoRA with lora_b bias", "Vanilla MLP 1 LoRA with MiCA",
    "Conv2d 1 AdaLoRA", "Conv2d 2 AdaLoRA", "BD-LoRA A only", "BD-LoRA B only", "BD-LoRA both A and B",
    "MHA 1 LoRA", "MHA 2 LoRA", "Vanilla MLP 10 LoRA with VeLoRA random",
    "Vanilla MLP 11 LoRA with VeLoRA batch_average", "Vanilla MLP 12 LoRA with VeLoRA batch_average_once",
    "Vanilla MLP 1 LoRA with KaSA",
}
CASES = [case for case in peft_custom_cases() if case[0] in NEW_ROWS]
# Rows fxpeft refuses, and what the refusal must name.
REFUSED = {"Vanilla MLP 1 LoRA with Monteclora": "MonteCLoRA"}
REFUSED_CASES = [case for case in peft_custom_cases() if case[0] in REFUSED]


def test_the_slice_is_every_new_row():
    assert len(CASES) == len(NEW_ROWS) and len(REFUSED_CASES) == len(REFUSED)


@pytest.mark.parametrize("name, model_id, config_class, kwargs", CASES, ids=[c[0] for c in CASES])
def test_peft_rows_load_save_back_and_merge_exactly(tmp_path, name, model_id, config_class, kwargs):
    errors = matrix_case(model_id, config_class, copy.deepcopy(kwargs), tmp_path)
    assert errors["load"] <= ATOL and errors["back"] <= ATOL, errors
    if "Groups" in model_id:  # PEFT does not merge a grouped convolution's LoRA either
        assert "its convolution has groups" in errors["merge"]
    else:
        assert errors["merge"] <= ATOL, errors


@pytest.mark.parametrize("name, model_id, config_class, kwargs", REFUSED_CASES,
                         ids=[c[0] for c in REFUSED_CASES])
def test_refused_rows_name_the_feature(tmp_path, name, model_id, config_class, kwargs):
    peft_model = get_peft_model(custom_model(model_id), config_class(**copy.deepcopy(kwargs)))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(PeftFormatError, match=REFUSED[name]):
        fxpeft.load(custom_model(model_id), tmp_path)


@pytest.mark.parametrize("targets", [["conv2d"], ["conv2d", "lin0"]])
def test_a_config_for_a_site_the_kind_lacks_names_it_not_a_rule(targets):
    """Not a MatchError about the rule 'peft', which the user never wrote; and a config that
    also targets a linear is refused, not applied to the linear alone (BOFT: PEFT has it on
    Conv2d, fxpeft on linears only)."""
    with pytest.raises(PeftFormatError, match=r"target_modules selects conv2d \(Conv2d\): boft "
                                              r"on Conv2d is not supported"):
        fxpeft.rewrite(custom_model("Conv2d"), BOFTConfig(target_modules=targets, boft_block_size=5))


def test_mica_and_kasa_messages_say_what_each_does(tmp_path):
    """MiCA leaves the base weight alone (loads); an init that rewrites it says so."""
    config = LoraConfig(target_modules=["lin0"], init_lora_weights="mica", r=4)
    get_peft_model(custom_model("MLP"), config).save_pretrained(tmp_path / "mica")
    assert fxpeft.load(custom_model("MLP"), tmp_path / "mica")
    get_peft_model(custom_model("MLP"), LoraConfig(target_modules=["lin0"])).save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(path.read_text().replace('"init_lora_weights": true', '"init_lora_weights": "pissa"'))
    with pytest.raises(PeftFormatError, match="'pissa' changes the base weights"):
        fxpeft.load(custom_model("MLP"), tmp_path / "p")


# --- the guarantees, on every new site ------------------------------------------------------------

SITES = {
    "conv3d lora": ("Conv3d", lambda: LoraConfig(target_modules=["conv3d"])),
    "conv3d dora": ("Conv3d", lambda: LoraConfig(target_modules=["conv3d", "lin0"], use_dora=True)),
    "conv1d dora": ("Conv1dBigger", lambda: LoraConfig(target_modules=["conv1d"], use_dora=True)),
    "grouped conv2d dora": ("Conv2dGroups2", lambda: LoraConfig(target_modules=["conv2d"], use_dora=True)),
    "embedding dora": ("EmbConv1D", lambda: LoraConfig(target_modules=["emb", "conv1d"], use_dora=True)),
    "conv2d ia3": ("Conv2d", lambda: IA3Config(target_modules=["conv2d", "lin0"], feedforward_modules=["conv2d"])),
    "conv3d ia3": ("Conv3d", lambda: IA3Config(target_modules=["conv3d"], feedforward_modules=[])),
    "conv2d lora_bias": ("Conv2d", lambda: LoraConfig(target_modules=["conv2d", "lin0"], lora_bias=True,
                                                      lora_alpha=32)),
    "mica": ("MLP", lambda: LoraConfig(target_modules=["lin0"], init_lora_weights="mica", r=4)),
}


def adapted(model_id, make_config, seed=1):
    gm = fxpeft.rewrite(custom_model(model_id), make_config())
    perturb_adapters(gm, seed)
    return gm.eval()


@pytest.mark.parametrize("site", SITES)
def test_identity_at_init_and_the_graph(site):
    model_id, make_config = SITES[site]
    x, model = matrix_input(model_id), custom_model(model_id)
    gm = fxpeft.rewrite(model, make_config()).eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    gm.graph.lint()
    kind = "ia3" if "ia3" in site else "dora" if "dora" in site else "lora"
    added = adapter_nodes(gm, kind)
    joins = [n for n in added if n.meta[ADAPTER_META].removable]
    assert {n.meta[ADAPTER_META].module_path for n in joins} == set(make_config().target_modules)
    merged = fxpeft.merge(gm) if "grouped" not in site else None
    assert merged is None or not adapter_nodes(merged, kind)


@pytest.mark.parametrize("site", SITES)
def test_gradients_reach_only_the_adapters(site):
    model_id, make_config = SITES[site]
    gm = adapted(model_id, make_config).train()
    gm(matrix_input(model_id)).sum().backward()
    if site == "mica":  # MiCA trains A only; B stays frozen
        assert [n for n, p in gm.named_parameters() if p.grad is not None] == ["lin0.lora_A.weight"]
        assert not gm.get_parameter("lin0.lora_B.weight").requires_grad
    else:
        assert_only_adapters_get_grads(gm)


@pytest.mark.parametrize("site", SITES)
def test_named_adapters_and_fuse(tmp_path, site):
    model_id, make_config = SITES[site]
    x = matrix_input(model_id)
    gm, other = adapted(model_id, make_config, seed=1), adapted(model_id, make_config, seed=2)
    with torch.no_grad():
        expected = {"default": gm(x), "other": other(x), "base": custom_model(model_id)(x)}
    fxpeft.load(gm, fxpeft.save(other, tmp_path / "other"), adapter="other")
    with torch.no_grad():
        for name in ("other", "default"):
            gm.set_adapter(name)
            torch.testing.assert_close(gm(x), expected[name], rtol=0, atol=ATOL)
            torch.testing.assert_close(fxpeft.fuse(gm)(x), expected[name], rtol=0, atol=ATOL)
        with gm.disable_adapters():
            torch.testing.assert_close(gm(x), expected["base"], rtol=0, atol=0)
    assert (expected["default"] - expected["other"]).abs().max() > 1e-4


# One site per new branch op (conv DoRA's kernel norms, conv IA3's channel vectors, B's bias):
# the other sites are these ops on other shapes, or LoRA's and DoRA's linear and embedding
# branches, which tests/kinds/test_dora.py compiles; each compile takes seconds.
COMPILED = ["conv3d dora", "conv2d ia3", "conv2d lora_bias"]


@pytest.mark.parametrize("site", COMPILED)
def test_compiles_with_fullgraph_forward_and_backward(site):
    model_id, make_config = SITES[site]
    check_compiles(adapted(model_id, make_config), matrix_input(model_id))  # eval: no base dropout


@pytest.mark.parametrize("site", SITES)
def test_bf16_bases_match_peft(tmp_path, site):
    """PEFT's fp32 adapter on a bf16 base: fxpeft's adapters are fp32 too, with PEFT's outputs."""
    model_id, make_config = SITES[site]
    x = matrix_input(model_id)
    x = x.to(torch.bfloat16) if x.is_floating_point() else x
    fxpeft.save(adapted(model_id, make_config), tmp_path)
    gm = fxpeft.load(custom_model(model_id).to(torch.bfloat16), tmp_path)
    peft_model = PeftModel.from_pretrained(custom_model(model_id).to(torch.bfloat16), str(tmp_path)).eval()
    assert {p.dtype for n, p in gm.named_parameters() if "lora_" in n or "ia3_l" in n} == {torch.float32}
    with torch.no_grad():
        out = gm(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, peft_model(x), rtol=0, atol=2e-2)


def test_dora_on_llama_embed_tokens_matches_peft_and_generates_its_tokens(tmp_path):
    """The decoder matrix's "DoRA on embed_tokens" row: logits both ways and greedy generate."""
    gm = fxpeft.rewrite(tiny_llama(), LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True))
    perturb_adapters(gm, scale=0.3)
    gm.eval()
    assert gm.get_parameter("model.embed_tokens.lora_magnitude_vector").shape == (64,)
    twin = PeftModel.from_pretrained(tiny_llama(), str(fxpeft.save(gm, tmp_path / "ours"))).eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = gm(ids).logits
        torch.testing.assert_close(ours, twin(input_ids=ids).logits, rtol=0, atol=ATOL)
        assert (ours - tiny_llama()(ids).logits).abs().max() > 1e-3
    check_generate(gm, tmp_path)
