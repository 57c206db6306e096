"""fxpeft.tools.plots: the loss curve the examples save beside their adapters, and layer pictures."""

from collections import Counter
from html import escape

import pytest
import torch

import fxpeft
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from fxpeft.helpers.data import train_on_blocks
from fxpeft.tools.plots import (draw_layer, layer_figure, layer_nodes, loss_curve, node_label,
                                node_layers, save_with_curve)

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
    svg = draw_layer(gm, 0, tmp_path / "ia3.svg", detail=True).read_text()
    after = layer_nodes(gm.graph, 0)
    added = [n for n in after if n.meta.get("fxpeft_adapter") is not None or "fxpeft_gate" in n.meta]
    assert svg.count('id="adapter-ia3-') == sum(n.meta.get("fxpeft_adapter") is not None for n in after) > 0
    assert f"before ({len(after) - len(added)} nodes)" in svg
    assert f"after ({len(after)} nodes" in svg and "ia3 adapter" in svg  # the legend
    gm.graph.lint()  # drawing strips adapters from a copy, never from gm
    base_labels = Counter(escape(node_label(n), quote=False) for n in after if n not in added)
    assert all(svg.count(f">{label}<") >= 2 * count  # base nodes appear in both panels, as text
               for label, count in base_labels.items())


# --- the module view (issue 24, item 9) -----------------------------------------------------------

def _label_boxes(figure):
    """The drawn extent (pixels) of every non-empty text: box labels with their box, titles,
    legend entries."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    texts = [t for t in figure.findobj(Text) if t.get_visible() and t.get_text()]
    return [(t.get_text(), (t.get_bbox_patch() or t).get_window_extent(renderer)) for t in texts], figure.bbox


def assert_readable(figure):
    boxes, page = _label_boxes(figure)
    assert len(boxes) > 3
    for text, box in boxes:  # nothing cut off: inside the picture
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text
    for i, (text, box) in enumerate(boxes):
        for other, second in boxes[i + 1:]:
            assert not box.shrunk(0.99, 0.99).overlaps(second.shrunk(0.99, 0.99)), (text, other)


MODELS = {"llama": (tiny_llama, "lora_qv"), "gpt2": (tiny_gpt2, "lora_all_linear"),
          "bert": (tiny_bert, "lora_all_linear")}


@pytest.mark.parametrize("model", MODELS)
def test_no_two_labels_overlap_and_none_is_cut_off(model):
    build, rules = MODELS[model]
    gm = fxpeft.rewrite(build(), rules)
    assert_readable(layer_figure(gm, 0))
    if model == "llama":
        gm.add_adapter("other", "ia3.toml")
        assert_readable(layer_figure(gm, -1))
        assert_readable(layer_figure(gm, 0, detail=True))


def test_modules_are_boxes_and_adapters_say_kind_projection_and_rank(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", r=4)
    gm.add_adapter("other", "ia3.toml")
    svg = draw_layer(gm, 0, tmp_path / "layer.svg").read_text()
    for module in ("input_layernorm (LlamaRMSNorm)", "self_attn.q_proj (Linear)", "attention (sdpa)",
                   "self_attn.o_proj (Linear)", "mlp.down_proj (Linear)", "post_attention_layernorm"):
        assert module in svg, module
    assert svg.count(">lora · self_attn.q_proj · r=4 · default<") == 1
    assert svg.count(">lora · self_attn.v_proj · r=4 · default<") == 1
    assert svg.count(">ia3 · mlp.down_proj · other<") == 1
    assert svg.count('id="adapter-lora-') == 2 and svg.count('id="adapter-ia3-') == 3
    assert ">view" not in svg and ">sym_size" not in svg and ">linear" not in svg  # aten: on request


def test_layer_minus_one_is_titled_with_its_real_index(tmp_path, capsys):
    from fxpeft.tools.cli import main
    tiny_llama().save_pretrained(tmp_path / "model")
    for detail in ([], ["--detail"]):
        out = tmp_path / f"last{len(detail)}.svg"
        assert main(["graph", str(tmp_path / "model"), "--rules", "lora_qv.toml", "--layer", "-1",
                     "--out", str(out), *detail]) == 0
        svg = out.read_text()
        assert "LlamaForCausalLM layer 1" in svg and "layer -1" not in svg


def test_the_readability_check_sees_an_overlap_and_a_cut_off_label():
    import matplotlib.figure
    figure = matplotlib.figure.Figure(figsize=(3, 2))
    ax = figure.add_axes((0, 0, 1, 1))
    for _ in range(4):
        ax.text(0.5, 0.5, "the same place", bbox={"boxstyle": "round"})
    with pytest.raises(AssertionError):
        assert_readable(figure)
    figure = matplotlib.figure.Figure(figsize=(3, 2))
    ax = figure.add_axes((0, 0, 1, 1))
    for y in (0.2, 0.4, 0.6, 0.8):
        ax.text(0.9, y, "a label running past the right edge")
    with pytest.raises(AssertionError):
        assert_readable(figure)
