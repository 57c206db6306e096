"""Several named adapters in one graph: switch and disable at run time, without recompiling."""

import pytest
import torch
from safetensors import safe_open

import fxpeft
from conftest import randomize_adapters, tiny_llama, token_batch


def single(rules, seed, **overrides):
    gm = fxpeft.rewrite(tiny_llama(), rules, dropout=0.0, **overrides)
    randomize_adapters(gm, seed)
    return gm.eval()


def copy_adapter(source, target, adapter):
    """``source``'s default-adapter tensors into ``target``'s ``adapter``."""
    suffix = "" if adapter == "default" else f"_{adapter}"
    theirs = fxpeft.adapter_state_dict(source)
    state = target.state_dict()
    with torch.no_grad():
        for name, tensor in theirs.items():
            ours = name.replace("lora_A", f"lora_A{suffix}").replace("lora_B", f"lora_B{suffix}")
            state[ours].copy_(tensor)


@pytest.fixture(scope="module")
def two():
    first, second = single("lora_qv", 1), single("lora_all_linear", 2, r=4)
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    gm.add_adapter("second", "lora_all_linear", dropout=0.0, r=4)
    copy_adapter(first, gm, "default")
    copy_adapter(second, gm, "second")
    return gm.eval(), first, second


def test_each_adapter_equals_its_single_adapter_graph(two):
    gm, first, second = two
    ids, base = token_batch(), tiny_llama()
    assert gm.adapter_names == ["default", "second"] and gm.active_adapters == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(gm(ids).logits, first(ids).logits, rtol=0, atol=0)
        gm.set_adapter("second")
        torch.testing.assert_close(gm(ids).logits, second(ids).logits, rtol=0, atol=0)
        with gm.disable_adapters():
            torch.testing.assert_close(gm(ids).logits, base(ids).logits, rtol=0, atol=0)
        assert gm.active_adapters == ["second"]
    gm.set_adapter("default")
    with pytest.raises(fxpeft.FxpeftError, match="no adapter 'third'"):
        gm.set_adapter("third")


def _compiled(gm):
    """``gm`` under torch.compile with a fresh dynamo state, and the backend counting frames."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    return torch.compile(gm, backend=backend, dynamic=True), backend


def test_switching_under_torch_compile_compiles_once_per_active_set(two):
    """Switching flips requires_grad (PEFT's set_adapter), which dynamo guards: one compile per
    active set, then every switch hits the cache; gates alone (disable_adapters) never compile."""
    gm, first, second = two
    compiled, backend = _compiled(gm)
    ids = token_batch()
    frames = []
    with torch.no_grad():
        for _ in range(2):
            gm.set_adapter("default")
            torch.testing.assert_close(compiled(ids).logits, first(ids).logits, rtol=0, atol=1e-5)
            gm.set_adapter("second")
            torch.testing.assert_close(compiled(ids).logits, second(ids).logits, rtol=0, atol=1e-5)
            with gm.disable_adapters():
                torch.testing.assert_close(compiled(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=1e-5)
            frames.append(backend.frame_count)
    assert 0 < frames[0] <= 2 and frames[1] == frames[0]
    gm.set_adapter("default")


def test_switching_in_inference_mode_never_recompiles(two):
    """With every adapter frozen (inference_mode=True), switching is gate data only."""
    from torch._dynamo.utils import counters
    gm, first, second = two
    compiled, backend = _compiled(gm)
    ids = token_batch()
    with torch.no_grad():
        gm.set_adapter("default", inference_mode=True)
        torch.testing.assert_close(compiled(ids).logits, first(ids).logits, rtol=0, atol=1e-5)
        frames = backend.frame_count
        gm.set_adapter("second", inference_mode=True)
        torch.testing.assert_close(compiled(ids).logits, second(ids).logits, rtol=0, atol=1e-5)
        with gm.disable_adapters():
            torch.testing.assert_close(compiled(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=1e-5)
        gm.set_adapter("default", inference_mode=True)
        torch.testing.assert_close(compiled(ids).logits, first(ids).logits, rtol=0, atol=1e-5)
    assert frames > 0 and backend.frame_count == frames and sum(counters["recompiles"].values()) == 0
    gm.set_adapter("default")


def test_load_a_second_adapter_from_disk_and_delete_it(tmp_path):
    other = single("lora_qv", 3, r=2)
    folder = fxpeft.save(other, tmp_path / "other")
    gm = single("lora_qv", 4)
    nodes = len(gm.graph.nodes)
    fxpeft.load(gm, folder, adapter="other")
    gm.set_adapter("other")
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(gm(ids).logits, other(ids).logits, rtol=0, atol=0)
    fxpeft.save(gm, tmp_path / "again", adapter="other")
    # safetensors orders its metadata map at random, so compare contents, not bytes
    again, first = (safe_open(str(f / "adapter_model.safetensors"), "pt")
                    for f in (tmp_path / "again", folder))
    assert again.metadata() == first.metadata() and sorted(again.keys()) == sorted(first.keys())
    assert all(torch.equal(again.get_tensor(k), first.get_tensor(k)) for k in first.keys())
    gm.delete_adapter("other")
    gm.set_adapter("default")
    assert gm.adapter_names == ["default"] and len(gm.graph.nodes) == nodes
    assert not any("_other" in n for n, _ in gm.named_parameters())


def test_inference_load_freezes_only_the_loaded_adapter(tmp_path):
    folder = fxpeft.save(single("lora_qv", 5), tmp_path / "frozen")
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv").train()
    fxpeft.load(gm, folder, adapter="served")  # trainable=False
    assert gm.training  # the caller's graph keeps its mode
    grads = {n: p.requires_grad for n, p in gm.named_parameters() if ".lora_" in n}
    assert all(grads[n] for n in grads if "_served" not in n)
    assert not any(grads[n] for n in grads if "_served" in n)
    gm.add_adapter("third", "lora_qv")  # adding another adapter must not unfreeze "served"
    assert not any(p.requires_grad for n, p in gm.named_parameters() if "_served" in n)
    fresh = fxpeft.load(tiny_llama(), folder)
    assert not fresh.training and not any(p.requires_grad for p in fresh.parameters())
    trainable = fxpeft.load(tiny_llama(), folder, trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(
        fxpeft.adapter_state_dict(trainable))
