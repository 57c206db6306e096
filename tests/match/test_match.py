"""Matching is a pure query; explain says what matched and why not."""

import pytest
import torch

import fxpeft
from conftest import tiny_llama
from fxpeft.capture.export import capture
from fxpeft.match.query import match
from fxpeft.rules import LoraParams, Rule, RuleSet, Where, parse_rules


@pytest.fixture(scope="module")
def program():
    return capture(tiny_llama())


def test_match_does_not_mutate_the_graph(program):
    before = program.graph_module.code
    nodes = len(program.graph.nodes)
    match(program, fxpeft.rules.load_rules("lora_all_linear.toml"))
    assert program.graph_module.code == before and len(program.graph.nodes) == nodes


def test_first_matching_rule_wins(program):
    rules = RuleSet([Rule(name="q wide", where=Where(path=[r"q_proj$"]), params=LoraParams(r=16)),
                     Rule(name="attention", where=Where(path=[r"self_attn\."]), params=LoraParams(r=4))])
    result = match(program, rules)
    assert result.paths(0) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert len(result.paths(1)) == 6  # k, v, o in two layers
    miss = [m for m in result.misses if m.rule_index == 1 and m.module_path.endswith("0.self_attn.q_proj")]
    assert "already claimed by 'q wide'" in miss[0].reason


def test_layer_range_counts_negative_from_the_end(program):
    rules = RuleSet([Rule(where=Where(path=["q_proj"], layer_range=[-1, -1]))])
    assert match(program, rules).paths() == ["model.layers.1.self_attn.q_proj"]
    rules = RuleSet([Rule(where=Where(path=["proj"], layers=[0], exclude=["mlp"]))])
    assert match(program, rules).paths() == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]


def test_module_type_constraint(program):
    assert match(program, RuleSet([Rule(where=Where(module_type=["Linear"]))])).paths()[-1] == "lm_head"
    assert match(program, RuleSet([Rule(where=Where(module_type=["Conv1D"]))])).paths() == []


def test_explain_reports_matches_and_closest_names():
    text = 'version = 1\n[[rule]]\nmatch = "linear"\nrewrite = "lora"\noptional = true\n' \
           '[rule.where]\npath = ["q_prj", "vproj"]\n'
    report = fxpeft.explain(tiny_llama(), [*fxpeft.rules.load_rules("lora_qv").rules,
                                           *parse_rules(text).rules])
    assert report.rules[0].matched[0] == "model.layers.0.self_attn.q_proj"
    assert report.rules[1].matched == [] and report.rules[1].closest[:2] == ["q_proj", "v_proj"]
    rendered = str(report)
    assert "4 match(es)" in rendered and "closest module names: q_proj, v_proj" in rendered
    why = report.why("model.layers.0.mlp.up_proj")
    assert why["attention q and v"].startswith("path matches none of")


def test_rule_matching_nothing_raises_unless_optional():
    model = tiny_llama()
    with pytest.raises(fxpeft.MatchError, match="matched nothing in LlamaForCausalLM; closest module "
                                                "names: q_proj"):
        fxpeft.rewrite(model, [Rule(where=Where(path=["q_proj"])), Rule(where=Where(path=["qproj_x"]))])
    gm = fxpeft.rewrite(model, [Rule(where=Where(path=["q_proj"])),
                                Rule(where=Where(path=["nothing"]), optional=True)])
    assert isinstance(gm, torch.fx.GraphModule)
