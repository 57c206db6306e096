"""BD-LoRA (PEFT's ``use_bdlora``): block-diagonal A or B stored as PEFT stores them, identity at
init, the graph, outputs, gradients and files equal to PEFT's both ways on a tiny Llama with
PEFT's recommended layout, merge, fuse, named adapters, generate and compile; what PEFT refuses,
refused by name."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import BdLoraConfig

import fxpeft
from conftest import adapter_nodes, assert_only_adapters_get_grads, tiny_llama, token_batch
from fxpeft.kinds.bd_lora import block_diagonal
from fxpeft.kinds.lora import LoraParams
from fxpeft.rules import Rule, Where
from kind_checks import check_compiles_whole, check_generate, check_named_adapters, logits, perturb
from peft_models import custom_model

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
BD = dict(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", "v_proj", "up_proj"],
          nblocks=2)
ATOL = 1e-5


def _config(**bd):
    return LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8,
                      use_bdlora=BdLoraConfig(**{**BD, **bd}), task_type="CAUSAL_LM")


def _adapter_params(model):
    return {n.removeprefix("base_model.model.").replace(".default", ""): p
            for n, p in model.named_parameters() if "lora_" in n}


def _twin():
    """PEFT's and fxpeft's BD-LoRA models from one config, holding the same random values."""
    peft_model = get_peft_model(tiny_llama(), _config())
    perturb(peft_model, "lora_", seed=3, scale=0.2)
    gm = fxpeft.rewrite(tiny_llama(), _config())
    ours = dict(gm.named_parameters())
    with torch.no_grad():
        for name, param in _adapter_params(peft_model).items():
            ours[name].copy_(param)
    return peft_model.eval(), gm.eval()


def test_identity_at_init_stacked_shapes_and_the_graph():
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, _config())
    torch.testing.assert_close(logits(gm, ids), logits(model, ids), rtol=0, atol=0)
    ours = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    theirs = {n: tuple(p.shape) for n, p in _adapter_params(get_peft_model(tiny_llama(), _config())).items()}
    assert ours == theirs
    assert ours["model.layers.0.self_attn.o_proj.lora_A.weight"] == (4, 64 // 2)  # A's blocks stacked
    assert ours["model.layers.0.self_attn.q_proj.lora_B.weight"] == (64, 4 // 2)  # B's blocks stacked
    gm.graph.lint()
    expansions = [n for n in adapter_nodes(gm) if n.target is block_diagonal]
    assert len(expansions) == 2 * len(TARGETS) and all(n.args[1] == 2 for n in expansions)
    perturb(gm, "lora_", seed=1)
    gm.train()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)


def test_outputs_and_gradients_equal_peft():
    ids = token_batch()
    peft_model, gm = _twin()
    expected = logits(peft_model, ids)
    assert (expected - logits(tiny_llama(), ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(gm, ids), expected, rtol=0, atol=ATOL)
    peft_model.train(), gm.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    gm(ids, labels=ids).loss.backward()
    ours = dict(gm.named_parameters())
    for name, param in _adapter_params(peft_model).items():  # training keeps the blocks: same grads
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-4, atol=1e-6)


def test_folders_both_ways_merge_and_fuse(tmp_path):
    ids = token_batch()
    peft_model, gm = _twin()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = fxpeft.load(tiny_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=ATOL)
    fxpeft.save(gm, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_bdlora"]
    assert config["nblocks"] == 2 and all(p.endswith(("o_proj", "down_proj")) for p in config["target_modules_bd_a"])
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, ids), expected, rtol=0, atol=ATOL)
    merged = fxpeft.merge(loaded)
    assert not adapter_nodes(merged)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=ATOL)
    peft_merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged.get_parameter("model.layers.1.mlp.down_proj.weight"),
                               peft_merged.get_parameter("model.layers.1.mlp.down_proj.weight"), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(fxpeft.fuse(gm), ids), expected, rtol=0, atol=ATOL)


def test_rules_name_adapters_generate_and_compile(tmp_path):
    """A rule file's ``block_diagonal`` / ``blocks`` are BD-LoRA too: two named adapters, one
    block-diagonal, switch, mix and fuse; generate is PEFT's; the graph compiles whole."""
    bd = Rule(where=Where(path=[r"\.(q|v)_proj$"]), params=LoraParams(r=4, block_diagonal="B", blocks=4))
    gm = fxpeft.rewrite(tiny_llama(), bd)
    fxpeft.add_adapter(gm, "other", Rule(where=Where(path=[r"\.(q|v)_proj$"]), params=LoraParams(r=4)))
    perturb(gm, "lora_", seed=2, scale=0.3)
    gm.eval()
    check_named_adapters(gm, tmp_path)
    check_generate(gm, tmp_path)
    check_compiles_whole(gm, token_batch())


@pytest.mark.parametrize("config, message", [
    (dict(use_dora=True), "use_bdlora with use_dora is not a combination"),
    (dict(lora_bias=True), "BD-LoRA does not combine with lora_bias"),
    (dict(use_bdlora=BdLoraConfig(target_modules_bd_b=["q_proj"], nblocks=3)), "which 3 blocks do not divide"),
])
def test_what_peft_refuses_is_refused_by_name(config, message):
    kwargs = dict(target_modules=["q_proj"], r=4, use_bdlora=BdLoraConfig(target_modules_bd_b=["q_proj"], nblocks=2))
    with pytest.raises(fxpeft.FxpeftError, match=message):
        fxpeft.rewrite(tiny_llama(), LoraConfig(**{**kwargs, **config}))


class TwoLinears(torch.nn.Module):
    """``lin1`` is a substring of ``lin10``: PEFT's BD-LoRA patterns cannot tell them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin10 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin10(self.lin1(x))


def test_a_convolution_and_a_substring_clash_are_refused(tmp_path):
    with pytest.raises(fxpeft.FxpeftError, match="conv2d: BD-LoRA applies to linear layers only"):
        fxpeft.rewrite(custom_model("Conv2d"), Rule(match="conv", where=Where(path=["conv2d"]),
                                                    params=LoraParams(r=4, block_diagonal="A", blocks=2)))
    rules = [Rule(where=Where(path=[r"^lin1$"]), params=LoraParams(r=4, block_diagonal="B", blocks=2)),
             Rule(where=Where(path=[r"^lin10$"]), params=LoraParams(r=4))]
    gm = fxpeft.rewrite(TwoLinears(), rules)
    with pytest.raises(fxpeft.FxpeftError, match="'lin1' would also pick 'lin10'"):
        fxpeft.save(gm, tmp_path / "clash")
    assert not (tmp_path / "clash").exists()


def test_block_diagonal_matches_peft_blockwise_product():
    from peft.tuners.lora.variants import BlockDiagonalLinear
    layer = BlockDiagonalLinear(12, 6, nblocks=3, init_zero=False)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x @ block_diagonal(layer.weight.detach(), 3).T, layer(x).detach(), rtol=0, atol=1e-6)
