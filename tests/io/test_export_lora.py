"""``fxpeft.export_lora``: every kind exports as a plain PEFT LoRA within its reported error, or
is refused by name; PEFT loads what it writes; truncation is the best rank-r one and its error
is what the report says; nothing half-written on refusal. (vLLM's rules: test_vllm_rules.py.)"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import fxpeft
from conftest import graph_signature, tiny_gpt2, tiny_llama, token_batch
from export_cases import EXPORTS, REFUSED, adapted, exported, logits
from fxpeft import registry
from fxpeft.io.export_lora import VLLM_RANKS
from fxpeft.kinds.ia3 import IA3Params
from fxpeft.rules import LoraParams, Rule, Where


def _peft_logits(folder, base, ids):
    from peft import PeftModel
    return logits(PeftModel.from_pretrained(base, str(folder)).eval(), ids)


def _factors(folder) -> dict[str, torch.Tensor]:
    """Module path -> lora_B @ lora_A, from the folder's file alone."""
    tensors = load_file(folder / "adapter_model.safetensors")
    paths = {k[len("base_model.model."):-len(".lora_A.weight")] for k in tensors if "lora_A" in k}
    return {p: tensors[f"base_model.model.{p}.lora_B.weight"].double()
            @ tensors[f"base_model.model.{p}.lora_A.weight"].double() for p in paths}


def _true_deltas(gm, base) -> dict[str, torch.Tensor]:
    """Module path -> dW, from ``fxpeft.merge`` (the public merge) and the base model."""
    merged, weights = fxpeft.merge(gm), dict(base.named_parameters())
    return {name[:-len(".weight")]: (merged.get_parameter(name) - weights[name]).detach().double()
            for name in weights if name.endswith(".weight")
            and not torch.equal(merged.get_parameter(name), weights[name])}


def test_every_registered_kind_is_placed():
    """A new kind must say whether it exports (tests/export_cases.py)."""
    assert sorted([*EXPORTS, *REFUSED]) == sorted(k.name for k in registry.all_kinds())


@pytest.mark.parametrize("kind", [k.name for k in registry.all_kinds()])
def test_every_kind_exports_within_its_reported_error_or_is_refused_by_name(kind, tmp_path):
    if kind in REFUSED:
        with pytest.raises(fxpeft.FxpeftError, match=f"export_lora: the {kind} adapter 'default' at "):
            fxpeft.export_lora(adapted(kind), tmp_path / "out")
        with pytest.raises(fxpeft.FxpeftError, match=re.escape(REFUSED[kind])):
            fxpeft.export_lora(adapted(kind), tmp_path / "out")
        assert list(tmp_path.iterdir()) == []  # nothing half-written, no staging folder left
        return
    done = exported(kind)
    assert done.r in VLLM_RANKS and done.r <= 64 and done.modules
    assert all(e.rank <= done.r for e in done.modules.values())
    # at full rank every kind's dW is exact up to the fp32 rounding of the merged weights
    assert max(e.max_abs for e in done.modules.values()) < 1e-6 and done.worst < 1e-5
    deltas = _true_deltas(adapted(kind), tiny_llama())
    assert set(done.modules) == set(deltas)
    for path, product in _factors(done.folder).items():  # the report is the folder's truth
        gap = deltas[path] - product
        assert done.modules[path].max_abs == pytest.approx(float(gap.abs().max()), abs=1e-7)


@pytest.mark.parametrize("kind", EXPORTS)
def test_peft_loads_each_exported_folder_with_the_source_outputs(kind):
    ids = token_batch()
    source = logits(adapted(kind), ids)
    assert (source - logits(tiny_llama(), ids)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(_peft_logits(exported(kind).folder, tiny_llama(), ids), source,
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["ia3", "dora"])
def test_a_truncated_export_is_the_best_rank_r_one_and_peft_serves_exactly_it(kind):
    """Full-rank changes at max_rank 8: each module's reported error is the Eckart-Young bound
    (the singular values past r), and PEFT's outputs are the base with W + lora_B @ lora_A."""
    done = exported(kind, 8)
    assert done.r == 8 and done.worst > 0.1
    deltas, products = _true_deltas(adapted(kind), tiny_llama()), _factors(done.folder)
    for path, delta in deltas.items():
        tail = torch.linalg.svdvals(delta)[8:]
        assert done.modules[path].rank > 8
        assert done.modules[path].relative == pytest.approx(float(tail.norm() / delta.norm()), rel=1e-4)
        assert float((delta - products[path]).norm() / delta.norm()) == pytest.approx(
            done.modules[path].relative, rel=1e-4)
    served = tiny_llama()
    with torch.no_grad():
        for path, product in products.items():
            served.get_submodule(path).weight.add_(product.float())
    ids = token_batch()
    torch.testing.assert_close(_peft_logits(done.folder, tiny_llama(), ids), logits(served, ids),
                               rtol=0, atol=1e-5)


def _mixed_lora(model):
    """LoRA of rank 2 (alpha 8: scale 4) on q and rank 12 with rsLoRA (alpha 3) on v."""
    return fxpeft.rewrite(model, [
        Rule(name="q", where=Where(path=[r"q_proj$"]), params=LoraParams(r=2, alpha=8, init="random")),
        Rule(name="v", where=Where(path=[r"v_proj$"]),
             params=LoraParams(r=12, alpha=3, use_rslora=True, init="random"))]).eval()


def test_mixed_ranks_and_scales_become_one_r_with_each_scale_in_lora_b(tmp_path):
    gm = _mixed_lora(tiny_llama())
    before = graph_signature(gm.graph)
    done = fxpeft.export_lora(gm, tmp_path / "mixed", max_rank=64)
    config = json.loads((done.folder / "adapter_config.json").read_text())
    assert done.r == config["r"] == config["lora_alpha"] == 16  # 12 -> vLLM's next rank
    assert config["rank_pattern"] == config["alpha_pattern"] == {} and not config["use_rslora"]
    ranks = {path.rsplit(".", 1)[-1]: e.rank for path, e in done.modules.items()}
    assert ranks == {"q_proj": 2, "v_proj": 12} and done.worst < 1e-6
    tensors = load_file(done.folder / "adapter_model.safetensors")
    padding = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][2:]
    assert padding.abs().max() == 0  # rank 2 padded to 16 with zero rows
    assert graph_signature(gm.graph) == before  # exporting leaves the graph as it was
    ids = token_batch()
    torch.testing.assert_close(_peft_logits(done.folder, tiny_llama(), ids), logits(gm, ids),
                               rtol=0, atol=1e-4)


def test_gpt2_conv1d_weights_export_in_linear_layout_with_fan_in_fan_out(tmp_path):
    rule = Rule(where=Where(path=[r"c_attn$"]), params=LoraParams(r=4, init="random"))
    gm = fxpeft.rewrite(tiny_gpt2(), rule).eval()
    done = fxpeft.export_lora(gm, tmp_path / "gpt2", max_rank=8)
    assert json.loads((done.folder / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ids = token_batch()
    torch.testing.assert_close(_peft_logits(done.folder, tiny_gpt2(), ids), logits(gm, ids),
                               rtol=0, atol=1e-4)


def test_a_change_that_is_no_linear_weight_is_refused_by_name(tmp_path):
    """LoRA on the embedding table (vLLM's embedding LoRA is not written) and IA3 scaling an
    output with a bias (the bias changes too): refused, naming the tensor."""
    embeddings = fxpeft.rewrite(tiny_llama(), "lora_embeddings")
    with pytest.raises(fxpeft.FxpeftError, match=r"changes model\.embed_tokens\.weight, which is not "
                                                 r"a linear layer's weight"):
        fxpeft.export_lora(embeddings, tmp_path / "emb")
    ia3 = fxpeft.rewrite(tiny_gpt2(), Rule(where=Where(path=[r"c_attn$"]), params=IA3Params()))
    with pytest.raises(fxpeft.FxpeftError, match=r"changes transformer\.h\.0\.attn\.c_attn\.bias"):
        fxpeft.export_lora(ia3, tmp_path / "ia3")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_export_leaves_the_folder_there_as_it_was(tmp_path):
    folder = tmp_path / "served"
    fxpeft.export_lora(adapted("lora"), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(fxpeft.FxpeftError, match="modules_to_save"):
        fxpeft.export_lora(adapted("modules_to_save"), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["served"]


def test_named_adapters_and_bad_arguments(tmp_path):
    gm = _mixed_lora(tiny_llama())
    fxpeft.add_adapter(gm, "other", Rule(where=Where(path=[r"k_proj$"]),
                                         params=LoraParams(r=1, init="random")))
    done = fxpeft.export_lora(gm, tmp_path / "other", adapter="other", max_rank=8)
    assert done.r == 1 and all(p.endswith("k_proj") for p in done.modules)
    with pytest.raises(fxpeft.FxpeftError, match="no adapter 'nope' in the graph; it has default, other"):
        fxpeft.export_lora(gm, tmp_path / "nope", adapter="nope")
    with pytest.raises(fxpeft.FxpeftError, match="max_rank = 0; vLLM's ranks are 1, 8"):
        fxpeft.export_lora(gm, tmp_path / "zero", max_rank=0)
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


def test_peft_convert_to_lora_drops_doras_magnitudes_where_export_lora_keeps_them(tmp_path):
    """PEFT 0.21.2's ``convert_to_lora`` takes DoRA's ``get_delta_weight`` (``scale B A``) and
    leaves the magnitudes out, at any rank; ``export_lora`` converts the whole change."""
    from peft import PeftModel, convert_to_lora, get_peft_model, set_peft_model_state_dict
    ids = token_batch()
    dora = PeftModel.from_pretrained(tiny_llama(), str(fxpeft.save(adapted("dora"), tmp_path / "d")))
    source = logits(dora.eval(), ids)
    config, state = convert_to_lora(dora, 1.0)  # each module at its full rank (all energy)
    converted = get_peft_model(tiny_llama(), config).eval()
    set_peft_model_state_dict(converted, state)
    assert (logits(converted, ids) - source).abs().max() > 1e-2
    torch.testing.assert_close(_peft_logits(exported("dora").folder, tiny_llama(), ids), source,
                               rtol=0, atol=1e-4)


def test_a_bf16_base_exports_its_lora_at_its_rank_exactly(tmp_path):
    """dW comes from a merge into fp32 copies: a bf16 merge would round it to the base's
    precision (full rank, errors of 1e-3)."""
    rule = Rule(where=Where(path=[r"q_proj$"]), params=LoraParams(r=8, alpha=16, init="random"))
    gm = fxpeft.rewrite(tiny_llama().to(torch.bfloat16), rule)
    done = fxpeft.export_lora(gm, tmp_path / "bf16", max_rank=64)
    assert done.r == 8 and done.worst < 1e-6
    detail = next(n.meta["fxpeft_adapter"].detail for n in gm.graph.nodes if "fxpeft_adapter" in n.meta)
    product = _factors(done.folder)["model.layers.0.self_attn.q_proj"]
    expected = 2.0 * gm.get_parameter(detail.lora_B).double() @ gm.get_parameter(detail.lora_A).double()
    torch.testing.assert_close(product, expected.detach(), rtol=0, atol=1e-6)
