"""Failures found on the trunk, one test each: adapter state as PEFT has it, modules_to_save for
every adapter name, plain modules and hand-written linears, modules called twice, tied weights."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

import fxpeft
from conftest import (randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_batch)
from fxpeft.kinds.ia3 import IA3Params
from fxpeft.rules import LoraParams, Rule, Where

ATOL = 1e-5


def requires_grad(gm, part):
    return {n: p.requires_grad for n, p in gm.named_parameters() if part in n}


# --- adapter state ------------------------------------------------------------------------------

@pytest.fixture
def two():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    gm.add_adapter("sql", "lora_qv", dropout=0.0)
    return gm


def test_a_new_adapter_starts_inactive_and_frozen(two):
    assert two.active_adapters == ["default"]
    assert all(requires_grad(two, "lora_A.").values())
    assert not any(requires_grad(two, "lora_A_sql").values())


def test_set_adapter_freezes_the_inactive_and_trains_the_active(two):
    two.set_adapter("sql")
    assert all(requires_grad(two, "lora_A_sql").values()) and all(requires_grad(two, "lora_B_sql").values())
    assert not any(requires_grad(two, "lora_A.").values())
    two.set_adapter("sql", inference_mode=True)
    assert not any(p.requires_grad for p in two.parameters())
    two.set_adapter(["default", "sql"])
    assert all(p.requires_grad for n, p in two.named_parameters() if "lora_" in n)


def test_weight_decay_never_shrinks_an_inactive_adapter(two):
    """AdamW's decay (torch's default 0.01) used to shrink adapters that got zero gradients."""
    randomize_adapters(two)
    two.set_adapter("sql")
    before = {n: p.detach().clone() for n, p in two.named_parameters() if "_sql" not in n and "lora_" in n}
    optimizer = torch.optim.AdamW([p for p in two.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch()
    for _ in range(3):
        two.train()(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(two.get_parameter(n), t) for n, t in before.items())


def test_load_freezes_or_trains_as_asked(tmp_path):
    folder = fxpeft.save(fxpeft.rewrite(tiny_llama(), "lora_qv"), tmp_path / "a")
    assert not any(p.requires_grad for p in fxpeft.load(tiny_llama(), folder).parameters())
    trained = fxpeft.load(tiny_llama(), folder, trainable=True)
    assert all(requires_grad(trained, "lora_").values())


# --- modules_to_save for every adapter name ------------------------------------------------------

def test_modules_to_save_works_for_a_named_adapter(tmp_path):
    gm = fxpeft.rewrite(tiny_bert(), Rule(where=Where(path=[r"\.query$"])), adapter="sql",
                        modules_to_save=["classifier"])
    assert all(requires_grad(gm, "modules_to_save_sql").values())
    randomize_adapters(gm)
    ids = token_batch()
    expected = gm.eval()(ids).logits
    folder = fxpeft.save(gm, tmp_path / "sql", adapter="sql")
    loaded = fxpeft.load(tiny_bert(), folder, adapter="sql")
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=ATOL)
    peft_model = PeftModel.from_pretrained(tiny_bert(), str(folder)).eval()
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=0, atol=ATOL)


def test_each_adapter_gets_its_own_modules_to_save_copy():
    gm = fxpeft.rewrite(tiny_bert(), Rule(where=Where(path=[r"\.query$"])), modules_to_save=["classifier"])
    gm.add_adapter("b", Rule(where=Where(path=[r"\.value$"])), modules_to_save=["classifier"])
    randomize_adapters(gm)
    ids = token_batch()
    outputs = {}
    for name in ("default", "b"):
        gm.set_adapter(name)
        outputs[name] = gm.eval()(ids).logits
        torch.testing.assert_close(fxpeft.merge(gm)(ids).logits, outputs[name], rtol=0, atol=ATOL)
    assert (outputs["default"] - outputs["b"]).abs().max() > 1e-3


# --- plain modules -------------------------------------------------------------------------------

class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.classifier = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.body(x)))


def test_modules_to_save_on_a_traced_module_and_merge():
    torch.manual_seed(0)
    gm = fxpeft.rewrite(Head(), Rule(where=Where(path=["^body$"])), modules_to_save=["classifier"])
    assert gm.capture_info.frontend == "symbolic_trace"
    assert all(requires_grad(gm, "classifier.modules_to_save").values())
    randomize_adapters(gm)
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = gm(x)
        with gm.disable_adapters():
            assert (gm(x) - expected).abs().max() > 1e-3
        torch.testing.assert_close(fxpeft.merge(gm)(x), expected, rtol=0, atol=1e-6)


class Conv1DNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = Conv1D(6, 4)
        self.out = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.c(x))


def test_conv1d_inside_a_plain_module_loads_a_peft_adapter(tmp_path):
    torch.manual_seed(0)
    peft_model = get_peft_model(Conv1DNet(), LoraConfig(target_modules=["c"], r=2, fan_in_fan_out=True,
                                                        init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    gm = fxpeft.load(Conv1DNet(), tmp_path / "peft")
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(gm(x), peft_model.eval()(x), rtol=0, atol=ATOL)


class HandLinear(torch.nn.Linear):
    """Computes the layer by hand, as some transformers families do."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class HandNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = HandLinear(4, 8), HandLinear(8, 3, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class UntraceableHandNet(HandNet):
    """symbolic_trace cannot branch on a shape; torch.export can."""

    def forward(self, x):
        if x.shape[-1] != 4:
            raise ValueError("expected 4 features")
        return super().forward(x)


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_hand_written_linears_are_sites_and_match_peft(tmp_path, frontend):
    make = HandNet if frontend == "symbolic_trace" else UntraceableHandNet
    x = torch.randn(2, 5, 4)
    torch.manual_seed(0)
    model, reference = make(), make()
    reference.load_state_dict(model.state_dict())
    kwargs = {"example_inputs": (x,)} if frontend == "export" else {}
    assert fxpeft.explain(model, Rule(where=Where(path=["up|down"])), **kwargs).rules[0].matched == \
        ["up", "down"]
    peft_model = get_peft_model(reference, LoraConfig(target_modules=["up", "down"], r=2,
                                                      init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(model, tmp_path / "peft", **kwargs)
    assert gm.capture_info.frontend == frontend
    torch.testing.assert_close(gm(x), peft_model.eval()(x), rtol=0, atol=ATOL)


def test_ia3_scales_a_hand_written_output_with_its_bias():
    torch.manual_seed(0)
    net, x = HandNet(), torch.randn(3, 4)
    gm = fxpeft.rewrite(net, [Rule(where=Where(path=["^up$"]), params=IA3Params()),
                              Rule(where=Where(path=["^down$"]), params=IA3Params(feedforward=True))])
    with torch.no_grad():
        gm.get_parameter("up.ia3_l").fill_(2.0)
        gm.get_parameter("down.ia3_l").fill_(0.5)
        expected = net.down(torch.relu(net.up(x) * 2) * 0.5)
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(fxpeft.merge(gm)(x), expected, rtol=0, atol=1e-6)


# --- shared and tied weights ---------------------------------------------------------------------

class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shared, self.out = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.shared(torch.relu(self.shared(x))))


@pytest.mark.parametrize("example", [None, (torch.randn(3, 4),)])
def test_a_module_called_twice_gets_one_adapter_at_both_sites(tmp_path, example):
    torch.manual_seed(0)
    model = Twice()
    gm = fxpeft.rewrite(model, Rule(where=Where(path=["^shared$"]), params=LoraParams(r=2)),
                        example_inputs=example)
    assert sorted(n for n, _ in gm.named_parameters() if "lora" in n) == [
        "shared.lora_A.weight", "shared.lora_B.weight"]
    randomize_adapters(gm)
    x = torch.randn(3, 4)
    torch.manual_seed(0)
    peft_model = get_peft_model(Twice(), LoraConfig(target_modules=["shared"], r=2))
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "lora" in name:
                peft_model.get_parameter("base_model.model." + name.replace(".weight", ".default.weight")).copy_(param)
        torch.testing.assert_close(gm(x), peft_model(x), rtol=0, atol=ATOL)
        torch.testing.assert_close(fxpeft.merge(gm)(x), gm(x), rtol=0, atol=ATOL)


def test_merging_into_a_tied_lm_head_is_a_clear_error():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    gm = fxpeft.rewrite(model, Rule(where=Where(path=["^lm_head$"])))
    randomize_adapters(gm)
    with pytest.raises(fxpeft.FxpeftError, match="tied weights"):
        fxpeft.merge(gm)
    with pytest.raises(fxpeft.FxpeftError, match="tied weights"):
        fxpeft.merge_into(model, gm)


# --- no silent fallbacks -------------------------------------------------------------------------

def test_uncaptured_output_flags_are_errors_not_ignored():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv")
    ids = token_batch()
    for flag in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=f"{flag}=True: .* returns only what capture returned"):
            gm(ids, **{flag: True})
        assert gm(ids, **{flag: False}).logits.shape[0] == ids.shape[0]


def test_a_missing_decoder_start_token_is_an_error_not_zero():
    from conftest import tiny_t5
    model = tiny_t5()
    gm = fxpeft.rewrite(model, Rule(where=Where(path=[r"\.q$"])))
    gm.fxpeft_inputs.start = None  # as a config without decoder_start_token_id
    with pytest.raises(ValueError, match="no decoder_start_token_id"):
        gm(token_batch(), labels=token_batch())


class Normed(torch.nn.Module):
    """Batch norm (batch statistics in train mode), and a shape check symbolic_trace can't do."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        if x.shape[-1] != 4:
            raise ValueError("expected 4 features")
        return self.norm(self.proj(x))


def test_train_only_branches_are_refused_at_capture_unless_a_rule_says_safe():
    x = torch.randn(6, 4)
    rule = Rule(where=Where(path=["^proj$"]))
    with pytest.raises(fxpeft.CaptureError, match="train-only op.*batch_norm.*allow_training_branches"):
        fxpeft.rewrite(Normed(), rule, example_inputs=(x,))
    allowed = fxpeft.rules.RuleSet((rule,), allow_training_branches=True)
    assert fxpeft.rewrite(Normed(), allowed, example_inputs=(x,))(x).shape == (6, 4)
    text = fxpeft.rules.dump.dump_rules(allowed)
    assert fxpeft.rules.parse_rules(text).allow_training_branches is True


def test_an_eager_scale_that_is_not_a_constant_binds_nothing():
    from fxpeft.match.attention import _eager_scale
    graph = torch.fx.Graph()
    q, k, s = (graph.placeholder(n) for n in "qks")
    scores = graph.call_function(torch.ops.aten.matmul.default, (q, k))
    scaled = graph.call_function(torch.ops.aten.mul.Tensor, (scores, s))
    softmax = graph.call_function(torch.ops.aten.softmax.int, (scaled, -1))
    assert _eager_scale(scores, softmax) is None
    constant = graph.call_function(torch.ops.aten.mul.Tensor, (scores, 0.5))
    assert _eager_scale(scores, graph.call_function(torch.ops.aten.softmax.int, (constant, -1))) == 0.5


# --- what tokenizers return --------------------------------------------------------------------

def test_bert_graphs_take_what_its_tokenizer_returns():
    """gm(**tokenizer(...)) with token_type_ids, with and without each optional input."""
    model = tiny_bert()
    gm = fxpeft.rewrite(model, Rule(where=Where(path=[r"\.query$"])))
    randomize_adapters(gm)
    merged = fxpeft.merge(gm)
    ids = token_batch(2, 7)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1  # a second segment changes the embeddings
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}, {"token_type_ids": types},
                       {"attention_mask": mask, "token_type_ids": types}):
            torch.testing.assert_close(gm(ids, **kwargs).logits, merged(ids, **kwargs).logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(fxpeft.rewrite(model, Rule(where=Where(path=[r"\.query$"])))(
                ids, **kwargs).logits, model(ids, **kwargs).logits, rtol=0, atol=1e-6)
        assert (gm(ids, token_type_ids=types).logits - gm(ids).logits).abs().max() > 1e-4
