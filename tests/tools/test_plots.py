"""fxpeft.tools.plots: the loss curve the examples save beside their adapters, and layer pictures."""

from collections import Counter
from html import escape

import pytest
import torch

import fxpeft
from conftest import tiny_llama, token_batch
from fxpeft.helpers.data import train_on_blocks
from fxpeft.tools.plots import (draw_layer, layer_nodes, loss_curve, node_label, node_layers,
                                save_with_curve)

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_examples_save_their_loss_curve_beside_the_adapter(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv")
    blocks = torch.cat([token_batch(4, 16, seed) for seed in range(3)])
    losses = train_on_blocks(gm, blocks, steps=12, batch_size=2, lr=1e-2, seed=0, progress=False)
    assert len(losses) == 12 and all(loss > 0 for loss in losses)
    folder, curve = save_with_curve(gm, losses, str(tmp_path / "adapter"))
    assert curve == tmp_path / "adapter-loss.png" and curve.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter-loss.png"]
    assert fxpeft.load(tiny_llama(), folder).adapter_names == ["default"]


def test_loss_curve_svg_holds_its_title_and_rejects_other_formats(tmp_path):
    svg = loss_curve([2.0, 1.5, 1.2] * 5, tmp_path / "curve.svg", title="my run").read_text()
    assert "my run" in svg and "mean of 2 steps" in svg
    with pytest.raises(fxpeft.FxpeftError, match=r"curve.gif: pictures are .svg, .png, .pdf"):
        loss_curve([1.0], tmp_path / "curve.gif")
    assert not (tmp_path / "curve.gif").exists()


def test_layer_nodes_follow_module_paths_and_gates():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv")
    layers = node_layers(gm.graph)
    gate_reads = [n for n in gm.graph.nodes if "fxpeft_gate" in n.meta]
    assert gate_reads and all(n in layers for n in gate_reads)  # each gate read joins its layer
    adapter = [n for n in gm.graph.nodes if n.meta.get("fxpeft_adapter") is not None]
    assert all(layers[n] == int(n.meta["fxpeft_adapter"].module_path.split(".")[2]) for n in adapter)
    assert layer_nodes(gm.graph, -1) == layer_nodes(gm.graph, 1)
    assert {layers[n] for n in layer_nodes(gm.graph, 0)} == {0}


def test_before_and_after_differ_by_exactly_the_adapter_nodes(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), "ia3.toml")
    svg = draw_layer(gm, 0, tmp_path / "ia3.svg").read_text()
    after = layer_nodes(gm.graph, 0)
    added = [n for n in after if n.meta.get("fxpeft_adapter") is not None or "fxpeft_gate" in n.meta]
    assert svg.count('id="adapter-ia3-') == sum(n.meta.get("fxpeft_adapter") is not None for n in after) > 0
    assert f"before ({len(after) - len(added)} nodes)" in svg
    assert f"after ({len(after)} nodes" in svg and "ia3 adapter" in svg  # the legend
    gm.graph.lint()  # drawing strips adapters from a copy, never from gm
    base_labels = Counter(escape(node_label(n), quote=False) for n in after if n not in added)
    assert all(svg.count(f">{label}<") >= 2 * count  # base nodes appear in both panels, as text
               for label, count in base_labels.items())
