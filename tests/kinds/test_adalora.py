"""AdaLoRA: identity at init, the graph it splices, PEFT parity of outputs, losses, gradients,
rank allocation and files (both ways), training, merging, and its errors."""

import json

import pytest
import torch

import fxpeft
from conftest import (REPO_ROOT, adapter_nodes, assert_only_adapters_get_grads, emitted_base, tiny_gpt2,
                      tiny_llama, token_batch)
from fxpeft.kinds.adalora import AdaLoraParams, allocator
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.rules import Rule, Where
from kind_checks import allocation_steps

RULES = REPO_ROOT / "passes" / "adalora_qv.toml"  # bundled as "adalora_qv.toml"
SITES = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
KNOBS = dict(init_r=6, target_r=2, tinit=1, tfinal=2, total_step=10)
PEFT_KNOBS = dict(KNOBS, lora_alpha=8, lora_dropout=0.0)
COMPONENTS = ("lora_A", "lora_E", "lora_B")


def _rule(**params):
    return Rule(where=Where(path=[r"(^|\.)[qv]_proj$"]),
                params=AdaLoraParams(**{**KNOBS, "alpha": 8, "auto_allocate": False, **params}))


def _peft_model(**knobs):
    from peft import AdaLoraConfig, get_peft_model
    config = AdaLoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                           **PEFT_KNOBS, **knobs)
    return get_peft_model(tiny_llama(), config)


def _ours(name: str) -> str:
    """PEFT's parameter name -> ours."""
    return name.removeprefix("base_model.model.").replace(".default", "")


def _adapter_params(peft_model):
    return {_ours(n): p for n, p in peft_model.named_parameters() if any(c in n for c in COMPONENTS)}


def _randomise(peft_model, seed=3):
    """E non-zero (PEFT starts it at zero), so the branch changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in _adapter_params(peft_model).items():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.5 if "lora_E" in name else 0.1))


def _copy_into(gm, peft_model):
    state = dict(gm.named_parameters())
    with torch.no_grad():
        for name, param in _adapter_params(peft_model).items():
            state[name].copy_(param)


def _twin(**knobs):
    """PEFT's AdaLoRA model and fxpeft's, holding the same random adapter values."""
    peft_model = _peft_model(**knobs)
    _randomise(peft_model)
    gm = fxpeft.rewrite(tiny_llama(), _rule(**knobs))
    _copy_into(gm, peft_model)
    return peft_model, gm


def test_identity_at_init_peft_names_graph_and_gradients():
    model, ids = tiny_llama(), token_batch()
    gm = fxpeft.rewrite(model, str(RULES), dropout=0.0)
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=0, atol=0)
    trainable = {n: tuple(p.shape) for n, p in gm.named_parameters() if p.requires_grad}
    out = {"q": 64, "v": 32}
    assert trainable == {f"{s}.{c}": shape for s in SITES for c, shape in zip(
        COMPONENTS, [(12, 64), (12, 1), (out[s[-6]], 12)])}
    assert all(not gm.get_parameter(f"{s}.lora_E").any() for s in SITES)  # PEFT's zero E
    gm.graph.lint()
    added = adapter_nodes(gm, "adalora")
    # per site: A, E, A*E, linear, B, linear, scale, add (8; the gate's mul carries the gate's
    # record); A and B again for the regulariser (2); once: the regulariser after the output
    assert len(added) == 4 * 10 + 1
    removable = [n for n in added if n.meta["fxpeft_adapter"].removable]
    assert [n.target for n in removable] == [torch.ops.aten.add.Tensor] * 4 + ["fxpeft_adalora_orth"]
    assert len(removable[-1].args) == 3 + 2 * 4 and list(removable[-1].users)[0].op == "output"
    gm.train()
    gm(ids, labels=ids).loss.backward()
    assert_only_adapters_get_grads(gm)


def test_outputs_losses_and_gradients_equal_peft():
    ids = token_batch()
    peft_model, gm = _twin()
    expected = peft_model(input_ids=ids).logits
    assert (expected - tiny_llama()(ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(gm(ids).logits, expected, rtol=0, atol=1e-5)
    peft_model.train(), gm.train()
    peft_loss, loss = peft_model(input_ids=ids, labels=ids).loss, gm(ids, labels=ids).loss
    torch.testing.assert_close(loss, peft_loss, rtol=0, atol=1e-5)
    gm.eval()
    assert gm(ids, labels=ids).loss < loss - 1e-3  # the regulariser joins in train mode only
    peft_loss.backward(), loss.backward()
    ours = dict(gm.named_parameters())
    for name, param in _adapter_params(peft_model).items():
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=0, atol=1e-5)


def _allocation_steps(peft_model, gm, steps, ids):
    """Both sides take the same steps: PEFT's gradients, the same SGD update, then each side's
    ``update_and_allocate(step)``."""
    allocation_steps(peft_model, gm, steps, lambda model: model(input_ids=ids, labels=ids).loss, 0.05)


def _peft_pattern(peft_model):
    pattern = peft_model.peft_config["default"].rank_pattern
    return {_ours(k).removesuffix(".lora_E"): v for k, v in pattern.items()}


@pytest.mark.parametrize("delta_t", [1, 3])
def test_rank_allocation_equals_peft_at_every_step(delta_t):
    ids = token_batch()
    peft_model, gm = _twin(deltaT=delta_t)
    ranks = []
    for step in range(10):  # warm-up (0, 1), the shrinking budget (2-7), final (8), after (9)
        _allocation_steps(peft_model, gm, [step], ids)
        found = allocator(gm, "default")
        if peft_model.peft_config["default"].rank_pattern is None:
            assert found.rank_pattern is None
            continue
        assert {k: v.tolist() for k, v in found.rank_pattern.items()} == _peft_pattern(peft_model)
        for name, param in _adapter_params(peft_model).items():
            torch.testing.assert_close(gm.get_parameter(name), param, rtol=0, atol=0)
        ranks.append(sum(found.ranks().values()))
    assert ranks[0] < 4 * 6 and ranks[-1] == 4 * 2 and ranks == sorted(ranks, reverse=True)
    with pytest.raises(fxpeft.FxpeftError, match="step must be an integer >= 0"):
        gm.update_and_allocate(-1)


def _peft_files(folder):
    from safetensors.torch import load_file
    return json.loads((folder / "adapter_config.json").read_text()), \
        load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("steps", [0, 5], ids=["before allocation", "after 5 steps"])
def test_folders_cross_load_both_ways(tmp_path, steps):
    from peft import PeftModel
    ids = token_batch()
    peft_model, gm = _twin()
    _allocation_steps(peft_model, gm, range(steps), ids)
    peft_model.eval(), gm.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    fxpeft.save(gm, tmp_path / "ours")
    (config, tensors), (our_config, ours) = _peft_files(tmp_path / "peft"), _peft_files(tmp_path / "ours")
    assert our_config["peft_type"] == "ADALORA" and our_config["rank_pattern"] == config["rank_pattern"]
    assert (config["rank_pattern"] is None) == (steps == 0)
    assert ours.keys() == tensors.keys() and not any(k.endswith(".weight") for k in ours)
    for key, tensor in tensors.items():  # pruned to the kept ranks alike
        torch.testing.assert_close(ours[key], tensor, rtol=0, atol=0)
    expected = peft_model(input_ids=ids).logits
    loaded = fxpeft.load(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    fxpeft.save(loaded, tmp_path / "again")  # the mask survives a load: same files again
    again, again_tensors = _peft_files(tmp_path / "again")
    assert again["rank_pattern"] == config["rank_pattern"] and again_tensors.keys() == tensors.keys()


def _train(gm, ids, steps, optimizer_class, lr, after_step=None) -> list[float]:
    """A plain loop; ``after_step(step)`` runs after each ``optimizer.step()``."""
    optimizer = optimizer_class([p for p in gm.parameters() if p.requires_grad], lr=lr)
    gm.train()
    losses = []
    for step in range(steps):
        loss = gm(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_automatic_allocation_follows_the_optimizer():
    """Without ``update_and_allocate`` calls, each optimizer step allocates (steps from 0), as
    explicit calls after each step do."""
    ids = token_batch()
    graphs = []
    for auto in (True, False):
        torch.manual_seed(5)
        gm = fxpeft.rewrite(tiny_llama(), _rule(auto_allocate=auto))
        _train(gm, ids, 6, torch.optim.SGD, 0.5, after_step=None if auto else gm.update_and_allocate)
        graphs.append(gm)
    auto, manual = (allocator(g, "default") for g in graphs)
    assert auto.steps == 6 and auto.rank_pattern is not None
    assert {k: v.tolist() for k, v in auto.rank_pattern.items()} == \
        {k: v.tolist() for k, v in manual.rank_pattern.items()}
    with pytest.raises(fxpeft.FxpeftError, match="auto_allocate = true"):
        graphs[0].update_and_allocate(6)


def test_training_lowers_the_loss_and_shrinks_to_the_target():
    ids = token_batch(batch=4, seq=16)
    gm = fxpeft.rewrite(tiny_llama(), str(RULES), dropout=0.0, init_r=4, target_r=2, tinit=5,
                        tfinal=5, total_step=20)
    losses = _train(gm, ids, 20, torch.optim.AdamW, 1e-2)
    assert losses[-1] < losses[0] - 0.5, losses
    assert sum(allocator(gm, "default").ranks().values()) == 2 * 4


def test_merge_equals_the_unmerged_graph():
    ids = token_batch()
    peft_model, gm = _twin()
    _allocation_steps(peft_model, gm, range(4), ids)
    gm.eval()
    before = gm(ids).logits
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    assert len(merged.graph.nodes) == len(emitted_base(tiny_llama()).graph.nodes)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(ids).logits, before, rtol=0, atol=1e-5)
    merged_peft = peft_model.eval().merge_and_unload()
    for site in SITES:
        torch.testing.assert_close(merged.get_parameter(f"{site}.weight"),
                                   merged_peft.get_parameter(f"{site}.weight"), rtol=0, atol=1e-6)


def test_deleting_the_adapter_restores_the_base_graph():
    model = tiny_llama()
    gm = fxpeft.rewrite(model, _rule())
    gm.add_adapter("other", _rule())
    gm.delete_adapter("other")
    gm.delete_adapter("default")
    assert len(gm.graph.nodes) == len(emitted_base(model).graph.nodes)
    assert not any("lora_" in n for n, _ in gm.named_parameters())


def test_errors_are_located(tmp_path):
    text = RULES.read_text().replace("total_step = 1000", "")
    (tmp_path / "no_total.toml").write_text(text)
    with pytest.raises(fxpeft.RuleError, match=r"no_total.toml:\d+: rule\[0\].params.total_step: "
                                               r"AdaLoRA needs the number of training steps"):
        fxpeft.rewrite(tiny_llama(), str(tmp_path / "no_total.toml"))
    with pytest.raises(fxpeft.RuleError, match="params.tinit: tinit .10. must be below"):
        _rule(tinit=10, tfinal=0, total_step=10)
    two = [_rule(), Rule(where=Where(path=["o_proj"]), params=AdaLoraParams(total_step=20))]
    with pytest.raises(fxpeft.PassError, match="hold for the whole adapter 'default'"):
        fxpeft.rewrite(tiny_llama(), two)


def test_a_bad_rank_pattern_names_the_file(tmp_path):
    peft_model, _ = _twin()
    _allocation_steps(peft_model, fxpeft.rewrite(tiny_llama(), _rule()), range(4), token_batch())
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    first = next(iter(config["rank_pattern"]))
    config["rank_pattern"][first] = [True] * 6  # keeps more ranks than the file has
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PeftFormatError, match=r"adapter_config.json: .*q_proj.lora_\w: rank_pattern "
                                              r"keeps 6 of 6 ranks, but the tensor is"):
        fxpeft.load(tiny_llama(), tmp_path)


def test_the_trainer_allocates_without_a_call(tmp_path):
    """HF's Trainer steps a torch optimizer: the global step hook allocates once per step."""
    from transformers import Trainer, TrainingArguments
    ids = token_batch(batch=8, seq=16)
    gm = fxpeft.rewrite(tiny_llama(), str(RULES), dropout=0.0, init_r=4, target_r=2, tinit=1,
                        tfinal=1, total_step=6)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=6,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-2,
                             disable_tqdm=True)
    Trainer(model=gm, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids]).train()
    found = allocator(gm, "default")
    assert found.steps == 6 and sum(found.ranks().values()) == 2 * 4


def test_fused_copy_keeps_the_regulariser():
    ids = token_batch()
    _, gm = _twin()
    fused = fxpeft.fuse(gm)
    gm.train(), fused.train()
    torch.testing.assert_close(fused(ids, labels=ids).loss, gm(ids, labels=ids).loss, rtol=0, atol=1e-5)


def test_bundled_rule_file_matches_q_and_v_only():
    paths = fxpeft.explain(tiny_llama(), str(RULES)).rules[0].matched
    assert paths == SITES
    assert not any(p.endswith(("k_proj", "o_proj", "lm_head")) or ".mlp." in p for p in paths)


@pytest.mark.parametrize("family", ["llama bf16", "gpt2 Conv1D"])
def test_other_dtypes_and_layouts_equal_peft_both_ways(tmp_path, family):
    """fp32 adapters on a bf16 base (PEFT's autocast), and GPT-2's fan-in-fan-out Conv1D."""
    from peft import AdaLoraConfig, PeftModel, get_peft_model
    build, targets = {"llama bf16": (lambda: tiny_llama().to(torch.bfloat16), ["q_proj", "v_proj"]),
                      "gpt2 Conv1D": (tiny_gpt2, ["c_attn"])}[family]
    ids = token_batch()
    peft_model = get_peft_model(build(), AdaLoraConfig(target_modules=targets, task_type="CAUSAL_LM",
                                                       **PEFT_KNOBS))
    _randomise(peft_model)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    expected = peft_model(input_ids=ids).logits
    gm = fxpeft.load(build(), tmp_path / "peft")
    assert all(p.dtype == torch.float32 for n, p in gm.named_parameters() if "lora_" in n)
    torch.testing.assert_close(gm(ids).logits, expected, rtol=0, atol=1e-5)
    fxpeft.save(gm, tmp_path / "ours")
    back = PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    if family == "gpt2 Conv1D":
        torch.testing.assert_close(fxpeft.merge(gm)(ids).logits, expected, rtol=0, atol=1e-5)


def test_an_off_adapter_adds_no_regulariser():
    ids = token_batch()
    _, gm = _twin()
    gm.add_adapter("other", str(RULES), total_step=10)
    gm.train()
    base = tiny_llama().train()(input_ids=ids, labels=ids).loss
    with gm.disable_adapters():
        torch.testing.assert_close(gm(ids, labels=ids).loss, base, rtol=0, atol=0)
    gm.set_adapter("other")  # E is zero at init: only its regulariser changes the loss
    assert gm(ids, labels=ids).loss > base + 1e-2


def test_a_saved_ranknum_must_be_the_initial_rank(tmp_path):
    """PEFT 0.21 leaves ``ranknum`` out of its files; a file that has it loads when it holds
    ``init_r`` (the value PEFT always gives it)."""
    from safetensors.torch import load_file, save_file
    ids = token_batch()
    peft_model, _ = _twin()
    peft_model.eval().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for site in SITES:
        tensors[f"base_model.model.{site}.ranknum"] = torch.tensor([6.0])
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    loaded = fxpeft.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)
    tensors[f"base_model.model.{SITES[0]}.ranknum"] = torch.tensor([3.0])
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(PeftFormatError, match=r"q_proj.ranknum = \[3.0\]: fxpeft reads only ranknum"):
        fxpeft.load(tiny_llama(), tmp_path)


def test_allocation_hooks_only_the_optimizer_that_trains_the_graph():
    """No process-wide hook stays: the graph's optimizer gets a step hook of its own at its first
    step; an unrelated optimizer stepping in between is left alone, and nothing is armed before
    the first backward."""
    from torch.optim.optimizer import _global_optimizer_post_hooks
    ids = token_batch()
    gm = fxpeft.rewrite(tiny_llama(), _rule(auto_allocate=True))
    assert not _global_optimizer_post_hooks  # rewriting arms nothing
    other = torch.nn.Linear(2, 2)
    unrelated = torch.optim.SGD(other.parameters(), lr=0.1)
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    gm.train()
    for _ in range(3):
        gm(ids, labels=ids).loss.backward()
        other(torch.ones(1, 2)).sum().backward()
        unrelated.step()  # between the graph's backward and its optimizer's step
        unrelated.zero_grad()
        optimizer.step()
        optimizer.zero_grad()
    assert allocator(gm, "default").steps == 3
    assert not _global_optimizer_post_hooks and not unrelated._optimizer_step_post_hooks
    assert len(optimizer._optimizer_step_post_hooks) == 1
