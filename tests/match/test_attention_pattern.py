"""The attention pattern binds each layer's attention, whatever the family calls its parts."""

import pytest
import torch

import fxpeft
from conftest import (REPO_ROOT, tiny_gemma, tiny_gpt2, tiny_llama, tiny_mistral, tiny_opt, tiny_qwen2,
                      tiny_qwen3)
from fxpeft.match.attention import EAGER_PATTERN, SDPA_PATTERN, bind, condense, find_attention_sites
from fxpeft.capture.export import capture

aten = torch.ops.aten
# builder, attention module path template, o projection name, (heads, kv_heads, head_dim)
FAMILIES = {
    "llama": (tiny_llama, "model.layers.{}.self_attn", "o_proj", (4, 2, 16)),
    "mistral": (tiny_mistral, "model.layers.{}.self_attn", "o_proj", (4, 2, 16)),
    "qwen2": (tiny_qwen2, "model.layers.{}.self_attn", "o_proj", (4, 2, 16)),
    "qwen3": (tiny_qwen3, "model.layers.{}.self_attn", "o_proj", (4, 2, 16)),
    "gemma": (tiny_gemma, "model.layers.{}.self_attn", "o_proj", (4, 1, 16)),
    "opt": (tiny_opt, "model.decoder.layers.{}.self_attn", "out_proj", (4, 4, 16)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_one_attention_site_per_layer_with_its_projections(family):
    build, template, o_name, (heads, kv_heads, head_dim) = FAMILIES[family]
    sites = find_attention_sites(capture(build()))
    assert [s.module_path for s in sites] == [template.format(i) for i in range(2)]
    for site in sites:
        assert site.form == "sdpa"
        assert site.output.target == aten.scaled_dot_product_attention.default
        assert site.query is site.output.args[0]
        assert [site.q.module_path, site.k.module_path, site.v.module_path, site.o.module_path] == [
            f"{site.module_path}.{name}" for name in ("q_proj", "k_proj", "v_proj", o_name)]
        assert (site.heads, site.kv_heads, site.head_dim) == (heads, kv_heads, head_dim)
        assert site.query.meta["val"].shape[1:2] == (heads,)


def test_query_is_post_rope():
    site = find_attention_sites(capture(tiny_llama()))[0]
    assert site.query.target == aten.add.Tensor  # q * cos + rotate_half(q) * sin
    assert site.query is not site.q.node


def test_eager_attention_binds_matmul_softmax_matmul():
    sites = find_attention_sites(capture(tiny_llama(attn_implementation="eager")))
    assert [s.form for s in sites] == ["eager", "eager"]
    site = sites[0]
    assert site.output.target == aten.matmul.default
    assert site.scale == pytest.approx(0.25)
    assert site.query.meta["val"].shape[1] == 4 and site.o.module_path.endswith("o_proj")


def test_opt_scale_is_the_attention_ops_own():
    """OPT scales q before attention and passes scale=1.0; the adapter must reuse that."""
    assert {s.scale for s in find_attention_sites(capture(tiny_opt()))} == {1.0}


def test_fused_qkv_is_not_bound():
    """GPT-2's single c_attn feeds q, k and v: the pattern needs three distinct projections."""
    assert find_attention_sites(capture(tiny_gpt2())) == []


def test_patterns_are_data_and_the_data_decides_what_binds():
    """Saying in the data that q feeds the mask operand makes the same graph bind nothing."""
    program = capture(tiny_llama())
    host = condense(program.graph, {s.node: s for s in program.sites})
    assert len(list(bind(host, SDPA_PATTERN))) == 2
    changed = SDPA_PATTERN.copy()
    changed.edges["q", "attention"]["operand"] = 3
    assert list(bind(host, changed)) == []
    eager = capture(tiny_llama(attn_implementation="eager"))
    eager_host = condense(eager.graph, {s.node: s for s in eager.sites})
    assert len(list(bind(eager_host, EAGER_PATTERN))) == 2 and list(bind(eager_host, SDPA_PATTERN)) == []


def test_condensed_graph_edges_carry_operand_positions():
    program = capture(tiny_llama())
    host = condense(program.graph, {s.node: s for s in program.sites})
    site = find_attention_sites(program)[0]
    assert host.edges[site.q.node, site.output]["operands"] == {0}
    assert host.edges[site.v.node, site.output]["operands"] == {2}
    assert host.edges[site.output, site.o.node]["operands"] == {0}


def test_matching_does_not_mutate():
    program = capture(tiny_llama())
    before = [(n.name, n.target, n.args) for n in program.graph.nodes]
    find_attention_sites(program)
    assert [(n.name, n.target, n.args) for n in program.graph.nodes] == before


def test_explain_shows_what_was_bound_per_layer():
    report = fxpeft.explain(tiny_llama(num_hidden_layers=3), "llama_adapter.toml")
    assert report.rules[0].matched == ["model.layers.1.self_attn", "model.layers.2.self_attn"]
    text = str(report)
    for layer in (1, 2):
        assert ("bound: sdpa attention: query=" in text
                and f"k=model.layers.{layer}.self_attn.k_proj" in text
                and f"o=model.layers.{layer}.self_attn.o_proj" in text)
    assert "kv_heads=2" in text
    assert "outside [1, 2]" in report.why("model.layers.0.self_attn")["top attention layers"]


def test_networkx_is_imported_only_when_attention_sites_are_asked_for():
    import subprocess
    import sys
    code = ("import sys, fxpeft; assert 'networkx' not in sys.modules; "
            "from fxpeft.match.attention import SDPA_PATTERN; assert 'networkx' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
