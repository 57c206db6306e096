"""One pass protocol: kind passes and optimisation passes declare what they do, require, ensure
and break; pipelines ask for passes by what they do; the manager checks the order."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import fxpeft
from conftest import tiny_llama, token_batch
from fxpeft.errors import PassError
from fxpeft.generation.decode_graph import slim_passes
from fxpeft.graph.state import GraphState, graph_state
from fxpeft.runtime.passes import (ADAPTED, FACTS, GraphPass, KindPass, check_order,
                                   default_passes, run_pipeline, select)
from fxpeft.graph.patterns import match
from fxpeft.names import GATE_META
from fxpeft.transforms.fuse import GRAPH_PASSES, SCALED_BRANCH, fuse_passes

FUSE_DEFAULT = ["drop_inactive", "fold_lora_scale", "share_input_casts", "fuse_lora_a", "fuse_lm_loss",
                "sdpa_gqa", "causal_mask", "fp32_short_attention", "gated_activation",
                "strip_leftovers", "recompute_norms", "onednn_linear"]


def _names(passes) -> list[str]:
    return [p.name for p in passes]


def test_fuse_pipelines_are_what_their_options_ask_for():
    assert _names(fuse_passes()) == FUSE_DEFAULT
    assert _names(fuse_passes(shared_dropout=True)) == \
        FUSE_DEFAULT[:2] + ["share_dropout"] + FUSE_DEFAULT[2:]
    assert _names(fuse_passes(checkpoint="layers")) == \
        FUSE_DEFAULT[:-2] + ["checkpoint_layers", "onednn_linear"]  # no recompute_norms in regions
    assert _names(fuse_passes(regions="layers")) == \
        FUSE_DEFAULT[:-2] + ["region_layers", "onednn_linear"]
    assert _names(fuse_passes(mixed=True)) == ["gather_lora", "share_input_casts", "sdpa_gqa",
                                               "causal_mask", "fp32_short_attention",
                                               "gated_activation", "strip_leftovers",
                                               "recompute_norms", "onednn_linear"]


def test_a_pass_whose_facts_are_broken_drops_out_of_a_selection():
    """recompute_norms needs the no-op casts gone: skipping strip_leftovers skips it too."""
    assert "recompute_norms" not in _names(fuse_passes(skip=("strip_leftovers",)))


def test_the_decode_graph_asks_for_the_passes_that_slim_an_eval_only_graph():
    assert _names(slim_passes()) == ["drop_dropout", "fold_lora_scale", "fuse_lora_a",
                                     "strip_leftovers", "fuse_rms_norm"]
    assert not any(p.specialises for p in slim_passes())  # the gates still switch adapters


def test_every_order_in_use_passes_the_check_and_a_wrong_one_is_refused():
    for passes in (fuse_passes(), fuse_passes(shared_dropout=True), fuse_passes(mixed=True),
                   fuse_passes(checkpoint="layers"), fuse_passes(regions="layers")):
        check_order(passes, ADAPTED)
    by_name = {p.name: p for p in GRAPH_PASSES}
    with pytest.raises(PassError, match="'fold_lora_scale' requires aten_linear .* which "
                                        "'onednn_linear' before it breaks"):
        check_order([by_name["onednn_linear"], by_name["fold_lora_scale"]], ADAPTED)
    with pytest.raises(PassError, match=r"'fuse_lora_a' must run after \['share_dropout'\]"):
        check_order([by_name["fuse_lora_a"], by_name["share_dropout"]], ADAPTED)
    with pytest.raises(PassError, match="'drop_dropout' requires eval_only .* does not hold"):
        check_order([by_name["drop_dropout"]], ADAPTED)


def test_kind_passes_and_graph_passes_have_one_shape():
    shape = ("name", "does", "requires", "ensures", "invalidates", "after", "run", "check")
    for graph_pass in [*default_passes(), *GRAPH_PASSES]:
        assert all(hasattr(graph_pass, field) for field in shape), graph_pass
        assert graph_pass.requires | graph_pass.ensures | graph_pass.invalidates <= set(FACTS)
    assert all(isinstance(p, KindPass) for p in default_passes())


def test_unknown_facts_are_refused_when_a_pass_is_declared():
    with pytest.raises(ValueError, match="unknown pass facts"):
        GraphPass("x", lambda gm: 0, {"slims"}, requires={"linear_is_fast"})


def test_fused_copy_reports_each_pass_and_names_the_failing_one(caplog):
    import logging
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    with caplog.at_level(logging.INFO, logger="fxpeft"):
        fxpeft.fuse(gm)
    ran = [r.getMessage().split()[2].rstrip(":") for r in caplog.records
           if r.getMessage().startswith("fxpeft pass ")]
    assert ran == FUSE_DEFAULT
    broken = GraphPass("breaks", lambda g: 1 / 0, {"slims"})
    with pytest.raises(PassError, match=r"pass 'breaks' failed: ZeroDivisionError.*passes run "
                                        r"before it: fold_lora_scale\)"):
        run_pipeline(fxpeft.fuse(gm, skip=tuple(FUSE_DEFAULT)),
                     [next(p for p in GRAPH_PASSES if p.name == "fold_lora_scale"), broken], ADAPTED)


def test_fold_lora_scale_is_a_pattern_and_a_replacement():
    """Every LoRA branch's scale moves onto its gate: one multiply fewer per site, same outputs."""
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if "lora_B" in name:
                p.normal_()
    folded = fxpeft.fuse(gm, skip=tuple(n for n in FUSE_DEFAULT if n != "fold_lora_scale"))
    plain = fxpeft.fuse(gm, skip=tuple(FUSE_DEFAULT))
    branches = lambda g: sum(match(SCALED_BRANCH, n) is not None for n in g.graph.nodes)
    assert branches(plain) == 2 * 2 and branches(folded) == 0  # q and v in 2 layers
    gate_scales = [n for n in folded.graph.nodes if GATE_META in n.meta and
                   n.target == torch.ops.aten.mul.Tensor and isinstance(n.args[1], float)]
    assert len(gate_scales) == 2 * 2 and len(folded.graph.nodes) == len(plain.graph.nodes)
    ids = token_batch()
    gm.eval(), folded.eval()
    torch.testing.assert_close(folded(ids).logits, gm(ids).logits, rtol=0, atol=1e-5)
    folded.graph.lint()


def test_graph_state_is_one_typed_object():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv")
    state = graph_state(gm)
    assert isinstance(state, GraphState) and state.role == "adapted" and list(state.adapters) == ["default"]
    fused = fxpeft.fuse(gm)
    assert graph_state(fused).role == "fused" and graph_state(fused).adapters is state.adapters
    assert graph_state(fused).specialised_to == ("default",)
    assert any(entry[0] is fused for entry in state.fused_copies.values())
    copied = __import__("copy").deepcopy(gm)
    assert len(graph_state(copied).fused_copies) == 0 and list(graph_state(copied).adapters) == ["default"]
    extra = [k for k in gm.__dict__ if k.startswith(("fxpeft", "_fxpeft"))]
    assert extra == [] and set(gm.meta) == {"fxpeft"}


PASS_CODE = ["fxpeft/transforms", "fxpeft/generation", "fxpeft/runtime/passes.py"]


def test_no_pass_is_special_cased_by_its_name():
    """No ``<pass>.name == "..."`` (or ``!=``, ``in (...)``) in the pass code."""
    root = pathlib.Path(fxpeft.__file__).parent.parent
    offenders = []
    for place in PASS_CODE:
        path = root / place
        for file in (sorted(path.rglob("*.py")) if path.is_dir() else [path]):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and \
                        node.left.attr == "name" and any(isinstance(c, (ast.Constant, ast.Tuple))
                                                         for c in node.comparators):
                    offenders.append(f"{file.name}:{node.lineno}")
    assert offenders == []
