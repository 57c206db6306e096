"""Capture: both frontends, linear sites tied to module paths and types, and clear failures."""

import inspect

import pytest
import torch

import fxpeft
from conftest import assert_only_adapters_get_grads, randomize_adapters, tiny_gpt2, tiny_llama, token_batch
from fxpeft.capture.export import capture
from fxpeft.rules import LoraParams, Rule, Where


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)
        self.v_proj = torch.nn.Linear(8, 8)
        self.out = torch.nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        hidden = torch.relu(self.q_proj(x)) + self.v_proj(x)
        return torch.nn.functional.linear(hidden, self.out)


class Branchy(torch.nn.Module):
    """Python control flow on a shape: symbolic_trace cannot follow it; torch.export can."""

    def forward(self, x):
        return x * 2 if x.shape[0] > 1 else x


class WithBranchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)
        self.branchy = Branchy()

    def forward(self, x):
        return self.branchy(self.q_proj(x))


def test_llama_sites_carry_module_paths_and_types():
    program = capture(tiny_llama())
    paths = program.module_paths()
    assert len(paths) == 15 and paths[0] == "model.layers.0.self_attn.q_proj" and paths[-1] == "lm_head"
    assert {s.module_type for s in program.sites} == {"torch.nn.modules.linear.Linear"}
    assert all(s.kind == "linear" for s in program.sites)
    assert program.layer_count == 2 and program.frontend == "export"


def test_gpt2_conv1d_sites_are_addmm():
    sites = {s.module_path: s for s in capture(tiny_gpt2()).sites}
    conv = sites["transformer.h.0.attn.c_attn"]
    assert conv.kind == "addmm" and conv.fan_in_fan_out
    assert conv.module_type.endswith("Conv1D") and (conv.in_features, conv.out_features) == (64, 192)
    assert sites["lm_head"].kind == "linear"


def test_plain_module_uses_symbolic_trace_and_trains():
    block = Block()
    program = capture(block)
    assert program.frontend == "symbolic_trace"
    assert [(s.module_path, s.kind) for s in program.sites] == [
        ("q_proj", "module"), ("v_proj", "module"), ("out", "linear")]
    # a functional linear over a bare parameter says so, rather than posing as an nn.Linear
    assert program.sites[2].module_type == "torch.nn.functional.linear"
    gm = fxpeft.rewrite(block, "lora_qv.toml")
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), block(x), rtol=0, atol=0)
    randomize_adapters(gm)
    gm(x).sum().backward()
    assert_only_adapters_get_grads(gm)


def test_rewrite_leaves_the_users_plain_module_unchanged():
    block = Block()
    before = [name for name, _ in block.named_parameters()]
    gm = fxpeft.rewrite(block, "lora_qv.toml").train()
    assert [name for name, _ in block.named_parameters()] == before
    assert not hasattr(block.q_proj, "lora_A") and block.training is True
    gm.eval()
    assert block.training is True and gm.get_parameter("q_proj.weight") is block.q_proj.weight


def test_leaf_modules_make_untraceable_code_capturable():
    model = WithBranchy()
    with pytest.raises(fxpeft.CaptureError, match="could not capture WithBranchy") as caught:
        capture(model)
    assert "leaf_modules" in str(caught.value)
    gm = fxpeft.rewrite(model, "lora_qv.toml", leaf_modules=[Branchy])
    x = torch.randn(2, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert any(n.op == "call_module" and n.target == "branchy" for n in gm.graph.nodes)


def test_example_inputs_fall_back_to_export_for_plain_modules():
    model = WithBranchy()
    x = torch.ones(2, 8)
    program = capture(model, example_inputs=(x,))
    assert program.frontend == "export" and program.module_paths() == ["q_proj"]
    gm = fxpeft.rewrite(model, "lora_qv.toml", example_inputs=(x,))
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_hf_capture_failure_names_the_model_and_what_to_try():
    with pytest.raises(fxpeft.CaptureError) as caught:
        capture(tiny_llama(), example_inputs={"input_ids": token_batch(), "bogus": torch.ones(1)})
    message = str(caught.value)
    assert message.startswith("could not capture LlamaForCausalLM with torch.export")
    assert "Try:" in message and len(message) < 1000


def test_capture_leaves_the_model_as_it_was():
    model = tiny_llama()
    model.config.use_cache = True
    capture(model)
    assert model.training is False and model.config.use_cache is True


def test_adapted_graph_cannot_be_rewritten_again():
    gm = fxpeft.rewrite(Block(), "lora_qv.toml")
    with pytest.raises(fxpeft.CaptureError, match="already an fxpeft graph"):
        fxpeft.rewrite(gm, "lora_qv.toml")


def test_per_call_overrides_change_rank_and_scale():
    gm = fxpeft.rewrite(Block(), Rule(where=Where(path=["q_proj"]), params=LoraParams(r=2)), r=3,
                        alpha=6)
    assert gm.get_parameter("q_proj.lora_A.weight").shape == (3, 8)
    scales = [n.args[1] for n in gm.graph.nodes
              if n.target == torch.ops.aten.mul.Tensor and n.meta.get("fxpeft_adapter")]
    assert scales == [2.0]


def test_a_no_grad_block_in_forward_runs_as_a_grad_mode_region_without_export_checks(monkeypatch):
    """Export keeps a ``no_grad`` block as a higher-order op over a submodule; capture strips
    the metadata asserts there too and calls it through ``grad_mode_region``, which restores
    the grad mode even when the block raises (torch's own op leaves it off)."""
    from conftest import tiny_llama, token_batch
    from fxpeft.capture.export import _EXPORT_CHECKS, grad_mode_region
    # the caches (in memory and on disk) cannot tell a patched forward from the plain one
    monkeypatch.setenv("FXPEFT_CAPTURE_CACHE", "0")
    model = tiny_llama()
    rotary = model.model.rotary_emb
    # transformers 5.23 decorates it with no_grad already (5.25 does not); nested blocks export
    # as several regions, so wrap the plain function: one block on every version
    plain = inspect.unwrap(type(rotary).forward)
    rotary.forward = torch.no_grad()(plain.__get__(rotary))
    ids = token_batch()
    expected = model(ids).logits
    gm = fxpeft.rewrite(model, "lora_qv.toml").train()
    regions = gm.graph.find_nodes(op="call_function", target=grad_mode_region)
    assert len(regions) == 1 and regions[0].args[0] is False
    bodies = [m for m in gm.modules() if m is not gm and isinstance(m, torch.fx.GraphModule)]
    assert bodies and not [n for b in bodies for n in b.graph.nodes if n.target in _EXPORT_CHECKS]
    gm.graph.lint()
    torch.testing.assert_close(gm.eval()(ids).logits, expected, rtol=0, atol=1e-6)
    compiled = torch.compile(gm.train(), fullgraph=True)
    compiled(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
    assert torch.is_grad_enabled()
