"""PEFT's per-sample mixed-adapter batch: ``gm(ids, adapter_names=[...])`` runs each sample with
its own adapter (``"__base__"``: none), equal to running that sample alone with it active."""

import pytest
import torch

import fxpeft
from conftest import tiny_gpt2, tiny_llama, token_batch

NAMES = ["default", "sql", "__base__", "sql"]


def randomize(gm, seed):
    """Every adapter tensor random (IA3 vectors near one, prompt gates non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if any(k in name for k in ("lora_", "ia3_l", "adaption_")):
                noise = torch.randn(param.shape, generator=generator) * 0.1
                param.copy_(noise + 1 if "ia3_l" in name else noise)


def batch():
    ids = token_batch(batch=len(NAMES), seq=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    return ids, mask


@pytest.fixture(scope="module")
def llama():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    gm.add_adapter("sql", "lora_all_linear", dropout=0.0, r=4)
    gm.add_adapter("scale", "ia3.toml")
    gm.add_adapter("prompt", "llama_adapter.toml")
    randomize(gm, 0)
    return gm.eval()


@pytest.fixture(scope="module")
def gpt2():
    gm = fxpeft.rewrite(tiny_gpt2(), "lora_all_linear", dropout=0.0)
    gm.add_adapter("sql", "lora_all_linear", dropout=0.0, r=4)
    randomize(gm, 1)
    return gm.eval()


def alone(gm, ids, mask, name):
    """One row run by itself, with ``name`` the only active adapter (or none)."""
    active = gm.active_adapters
    try:
        if name == "__base__":
            with gm.disable_adapters():
                return gm(ids, attention_mask=mask).logits
        gm.set_adapter(name)
        return gm(ids, attention_mask=mask).logits
    finally:
        gm.set_adapter(active)


def check_rows(gm, names, served=None):
    """Each row of a mixed batch (run on ``served``, default ``gm``) equals it alone on ``gm``."""
    ids, mask = batch()
    with torch.no_grad():
        mixed = (served or gm)(ids, attention_mask=mask, adapter_names=names).logits
        for row, name in enumerate(names):
            expected = alone(gm, ids[row:row + 1], mask[row:row + 1], name)
            torch.testing.assert_close(mixed[row:row + 1], expected, rtol=0, atol=1e-5)


def test_each_row_runs_its_own_adapter_lora_ia3_prompt(llama):
    check_rows(llama, NAMES)
    check_rows(llama, ["scale", "prompt", "__base__", "sql"])


def test_each_row_runs_its_own_adapter_gpt2_conv1d(gpt2):
    check_rows(gpt2, NAMES)


def test_without_adapter_names_outputs_are_bit_identical(llama):
    ids, mask = batch()
    reference = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0).eval()
    reference.load_state_dict(llama.state_dict(), strict=False)
    with torch.no_grad():
        before = llama(ids, attention_mask=mask).logits
        mixed = llama(ids, attention_mask=mask, adapter_names=["default"] * len(NAMES)).logits
        after = llama(ids, attention_mask=mask).logits
        torch.testing.assert_close(after, before, rtol=0, atol=0)
        torch.testing.assert_close(reference(ids, attention_mask=mask).logits, before, rtol=0, atol=0)
    torch.testing.assert_close(mixed, before, rtol=0, atol=1e-5)


def test_bad_names_wrong_length_and_train_mode_are_clear_errors(llama):
    ids, mask = batch()
    with torch.no_grad(), pytest.raises(ValueError, match=r"unknown adapters \['chat'\]"):
        llama(ids, attention_mask=mask, adapter_names=["default", "chat", "sql", "sql"])
    with torch.no_grad(), pytest.raises(ValueError, match="3 names for a batch of 4"):
        llama(ids, attention_mask=mask, adapter_names=NAMES[:3])
    llama.train()
    try:
        with pytest.raises(ValueError, match="inference only"):
            llama(ids, attention_mask=mask, adapter_names=NAMES)
    finally:
        llama.eval()


def test_plain_graphs_do_not_take_adapter_names():
    gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                        fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    with pytest.raises(TypeError):
        gm(torch.ones(1, 4), adapter_names=["default"])


def test_modules_to_save_adapters_refuse_mixed_batches():
    from conftest import tiny_bert
    from fxpeft.rules import Rule, Where
    gm = fxpeft.rewrite(tiny_bert(), Rule(where=Where(path=[r"\.(query|value)$"])),
                        modules_to_save=["classifier"]).eval()
    ids = token_batch(batch=2)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\['default'\] have modules_to_save"):
        gm(ids, adapter_names=["default", "__base__"])


def test_merged_graph_refuses_adapter_names():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv").eval()
    merged = fxpeft.merge(gm)
    ids = token_batch(2, 6)
    with pytest.raises(TypeError, match="has no adapters \\(it was merged\\)"):
        merged(ids, adapter_names=["default", "default"])
    gm(ids, adapter_names=["default", "__base__"])  # the adapted graph still takes them


MIXTURES = [["default", "sql", "__base__", "sql"], ["sql"] * 4, ["default"] * 4,
            ["__base__", "sql", "default", "default"], ["sql", "sql", "default", "__base__"]]


class CountingBackend:
    """A ``torch.compile`` backend that runs the graph as traced, counting compiles and keeping
    each compiled graph's tensor inputs (their example values)."""

    def __init__(self) -> None:
        self.compiles, self.inputs = 0, []

    def __call__(self, graph_module, example_inputs):
        self.compiles += 1
        self.inputs.append([v for v in example_inputs if isinstance(v, torch.Tensor)])
        return graph_module.forward


@pytest.mark.parametrize("fused", [False, True], ids=["gated", "fuse_mixed"])
def test_five_mixtures_compile_once_and_the_graph_receives_an_index_tensor(fused):
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    gm.add_adapter("sql", "lora_all_linear", dropout=0.0, r=4)
    randomize(gm, 2)
    gm = (fxpeft.fuse(gm.eval(), mixed=True) if fused else gm).eval()
    ids, mask = batch()
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(gm, backend=backend, fullgraph=True)
    with torch.no_grad():
        for names in MIXTURES:
            out = compiled(ids, attention_mask=mask, adapter_names=names).logits
            expected = gm(ids, attention_mask=mask, adapter_names=names).logits
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert backend.compiles == 1
    indices = [t for t in backend.inputs[0] if t.dtype == torch.int64 and t.shape == (len(NAMES),)]
    assert len(indices) == 1  # the per-sample adapter indices: data, not a guard on names


def test_an_index_tensor_works_like_the_names(llama):
    ids, mask = batch()
    index = torch.tensor([llama.adapter_names.index(n) if n != "__base__" else -1 for n in NAMES])
    with torch.no_grad():
        by_names = llama(ids, attention_mask=mask, adapter_names=NAMES).logits
        by_index = llama(ids, attention_mask=mask, adapter_names=index).logits
    torch.testing.assert_close(by_index, by_names, rtol=0, atol=0)


def test_an_index_tensor_out_of_range_is_refused(llama):
    ids, mask = batch()
    index = torch.full((len(NAMES),), len(llama.adapter_names))
    with torch.no_grad(), pytest.raises(ValueError, match="indices into .* or -1"):
        llama(ids, attention_mask=mask, adapter_names=index)
    with torch.no_grad(), pytest.raises(ValueError, match="one adapter index per sample"):
        llama(ids, attention_mask=mask, adapter_names=index.float())
