"""Preallocated adapter slots (``fxpeft.fuse(gm, mixed=True, slots=N)``): a mixed batch equals
each sample run alone with its adapter; loading and unloading while serving neither recompiles
the compiled copy nor copies the other adapters; ranks and alphas differ in one batch; full
slots and too large ranks are clear errors."""

import pytest
import torch

import fxpeft
from conftest import tiny_gpt2, tiny_llama, token_batch
from test_mixed_batch import NAMES as GPT2_NAMES
from test_mixed_batch import CountingBackend, alone, batch, check_rows
from fxpeft.names import SLOTS, adapter_node
from fxpeft.transforms.slots import slotted_lora

NAMES = ["default", "sql", "__base__", "rs"]


def randomize(gm, seed, adapter=""):
    """Random LoRA weights (of one adapter: its suffix, e.g. ``"_late"``, as in ``lora_A_late``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "lora_" in name and name.split(".")[-2].endswith(adapter):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def adapted():
    """Three adapters of different ranks, alphas and sites (one rsLoRA)."""
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0, r=8, alpha=16)
    gm.add_adapter("sql", "lora_all_linear", dropout=0.0, r=4, alpha=3)
    gm.add_adapter("rs", "lora_qv", dropout=0.0, r=2, alpha=5, use_rslora=True)
    randomize(gm, 0)
    return gm.eval()


@pytest.fixture(scope="module")
def gm():
    return adapted()


def test_mixed_batch_of_ranks_and_alphas_equals_each_adapter_alone(gm):
    served = fxpeft.fuse(gm, mixed=True, slots=8, slot_rank=8)
    assert served.get_submodule(SLOTS).names == ["default", "sql", "rs", *[None] * 5]
    check_rows(gm, NAMES, served)
    check_rows(gm, ["rs", "__base__", "default", "sql"], served)


def test_gpt2_conv1d_sites_take_slots_too():
    gm = fxpeft.rewrite(tiny_gpt2(), "lora_all_linear", dropout=0.0)
    gm.add_adapter("sql", "lora_all_linear", dropout=0.0, r=4)
    randomize(gm, 1)
    served = fxpeft.fuse(gm.eval(), mixed=True, slots=4)
    assert len([n for n in served.graph.nodes if n.target is slotted_lora]) == 8  # 4 per block
    check_rows(gm, GPT2_NAMES, served)


def test_the_graph_has_one_slotted_call_per_site_and_no_adapter_nodes(gm):
    served = fxpeft.fuse(gm, mixed=True, slots=4, slot_rank=8)
    served.graph.lint()
    calls = [n for n in served.graph.nodes if n.target is slotted_lora]
    assert len(calls) == 2 * 7  # every linear of 2 layers ("sql" adapts all seven)
    assert not any(adapter_node(n) for n in served.graph.nodes)
    slots = served.get_submodule(SLOTS)
    down = slots.get_buffer(f"{slots.sites['model.layers.0.self_attn.q_proj']}_down")
    assert down.shape == (4 + 1, 64, 8) and not down[-1].any()  # the zero row "__base__" reads
    assert not any(p.requires_grad for p in slots.buffers())


def test_each_call_builds_a_new_serving_copy(gm):
    first, second = fxpeft.fuse(gm, mixed=True, slots=4), fxpeft.fuse(gm, mixed=True, slots=4)
    assert first is not second
    fxpeft.unload_slot(first, "sql")
    assert second.get_submodule(SLOTS).names[1] == "sql"


def snapshot(slots):
    """Each stack's storage address and its rows' values."""
    return {name: (buffer.data_ptr(), buffer.clone()) for name, buffer in slots.named_buffers()}


def test_load_and_unload_while_serving_do_not_recompile_or_copy_other_slots():
    gm = adapted()
    served = fxpeft.fuse(gm, mixed=True, slots=4, slot_rank=8)
    slots = served.get_submodule(SLOTS)
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(served, backend=backend, fullgraph=True)
    ids, mask = batch()
    with torch.no_grad():
        compiled(ids, attention_mask=mask, adapter_names=NAMES)
        gm.add_adapter("late", "lora_qv", dropout=0.0, r=6, alpha=7)  # a new adapter arrives
        randomize(gm, 3, "_late")
        before = snapshot(slots)
        assert fxpeft.load_into_slot(served, gm, "late") == 3
        after = snapshot(slots)
        for name, (pointer, values) in before.items():
            assert after[name][0] == pointer  # written in place
            torch.testing.assert_close(after[name][1][:3], values[:3], rtol=0, atol=0)  # others untouched
        out = compiled(ids, attention_mask=mask, adapter_names=["late", "__base__", "late", "default"]).logits
        for row, name in enumerate(["late", "__base__", "late", "default"]):
            expected = alone(gm, ids[row:row + 1], mask[row:row + 1], name)
            torch.testing.assert_close(out[row:row + 1], expected, rtol=0, atol=1e-5)
        assert fxpeft.unload_slot(served, "sql") == 1
        assert slots.names == ["default", None, "rs", "late"]
        assert not any(b[1].any() for n, b in slots.named_buffers())  # freed rows are zeros
        assert all(b.data_ptr() == before[n][0] for n, b in slots.named_buffers())
        compiled(ids, attention_mask=mask, adapter_names=["rs", "late", "default", "__base__"])
        assert fxpeft.load_into_slot(served, gm, "sql", name="sql2") == 1  # the freed slot
        out = compiled(ids, attention_mask=mask, adapter_names=NAMES[:1] + ["sql2"] + NAMES[2:]).logits
        expected = alone(gm, ids[1:2], mask[1:2], "sql")
        torch.testing.assert_close(out[1:2], expected, rtol=0, atol=1e-5)
    assert backend.compiles == 1


def test_slot_indices_as_a_tensor_work_like_names(gm):
    served = fxpeft.fuse(gm, mixed=True, slots=4)
    ids, mask = batch()
    with torch.no_grad():
        by_names = served(ids, attention_mask=mask, adapter_names=NAMES).logits
        by_index = served(ids, attention_mask=mask, adapter_names=torch.tensor([0, 1, -1, 2])).logits
        torch.testing.assert_close(by_index, by_names, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"slot indices in \[0, 4\) or -1"):
            served(ids, attention_mask=mask, adapter_names=torch.tensor([0, 4, 0, 0]))


def test_full_slots_large_ranks_and_unknown_names_are_clear_errors(gm):
    served = fxpeft.fuse(gm, mixed=True, slots=3, slot_rank=8)
    with pytest.raises(fxpeft.FxpeftError, match=r"all 3 slots are full"):
        fxpeft.load_into_slot(served, gm, "rs", name="again")
    fxpeft.unload_slot(served, "rs")
    with pytest.raises(fxpeft.FxpeftError, match=r"slot 0 already holds 'default'"):
        fxpeft.load_into_slot(served, gm, "rs", name="default")
    small = fxpeft.fuse(gm, mixed=True, slots=3, slot_rank=8)
    fxpeft.unload_slot(small, "default")
    big = fxpeft.rewrite(tiny_llama(), "lora_qv", r=16)
    with pytest.raises(fxpeft.FxpeftError, match=r"rank 16 at model.layers.0.self_attn.q_proj; "
                                                  r"the slots hold rank 8 at most"):
        fxpeft.load_into_slot(small, big, "default")
    assert small.get_submodule(SLOTS).names == [None, "sql", "rs"]  # nothing written
    with pytest.raises(fxpeft.PassError, match=r"rank 8 .* the slots hold rank 4 at most"):
        fxpeft.fuse(gm, mixed=True, slots=3, slot_rank=4)
    with pytest.raises(fxpeft.PassError, match=r"3 adapters do not fit 2 slots"):
        fxpeft.fuse(gm, mixed=True, slots=2)
    ids, mask = batch()
    with torch.no_grad(), pytest.raises(ValueError, match=r"\['chat'\] in no slot"):
        served(ids, attention_mask=mask, adapter_names=["chat", "sql", "sql", "sql"])
    with torch.no_grad(), pytest.raises(ValueError, match="pass adapter_names="):
        served(ids, attention_mask=mask)
    with pytest.raises(fxpeft.FxpeftError, match="no slot holds 'chat'"):
        fxpeft.unload_slot(served, "chat")


def test_wrong_options_and_graphs_are_refused(gm):
    with pytest.raises(ValueError, match="pass mixed=True too"):
        fxpeft.fuse(gm, slots=4)
    with pytest.raises(ValueError, match=r"slot_rank=0; expected a positive integer"):
        fxpeft.fuse(gm, mixed=True, slots=4, slot_rank=0)
    with pytest.raises(fxpeft.FxpeftError, match="has no adapter slots"):
        fxpeft.load_into_slot(fxpeft.fuse(gm, mixed=True), gm, "default")
    other = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    other.add_adapter("scale", "ia3.toml")
    with pytest.raises(fxpeft.PassError, match=r"adapter 'scale' is not plain LoRA at"):
        fxpeft.fuse(other.eval(), mixed=True, slots=4)
    served = fxpeft.fuse(gm, mixed=True, slots=4, slot_rank=8)
    with pytest.raises(fxpeft.FxpeftError, match=r"adapter 'scale' is not plain LoRA"):
        fxpeft.load_into_slot(served, other, "scale")
    qv = fxpeft.fuse(fxpeft.rewrite(tiny_llama(), "lora_qv").eval(), mixed=True, slots=2)
    with pytest.raises(fxpeft.FxpeftError, match=r"adapts \['model.layers.0.mlp.down_proj'.*no slots"):
        fxpeft.load_into_slot(qv, gm, "sql")
