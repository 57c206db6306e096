"""bench/flops.py: a LoRA step's model FLOPs against a hand count of a tiny Llama, and against
``torch.utils.flop_counter.FlopCounterMode`` on a real forward + backward (PEFT's model and
fxpeft's graph), and the measured-peak GEMM."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fxpeft
from conftest import VOCAB, tiny_llama, token_batch

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
from flops import DecoderShape, lora_step_flops, measured_peak_flops, mfu, peak_gemms  # noqa: E402

BATCH, SEQ, R = 2, 8, 4
T = BATCH * SEQ  # tokens


def hand_count_qv() -> dict[str, int]:
    """tiny_llama (hidden 64, 2 layers, 4 heads of 16, 2 KV heads, intermediate 128, vocab 128),
    LoRA r=4 on q_proj and v_proj, batch 2 x 8, written out matmul by matmul."""
    q, k, v, o = 2 * T * 64 * 64, 2 * T * 64 * 32, 2 * T * 64 * 32, 2 * T * 64 * 64
    gate, up, down = 2 * T * 64 * 128, 2 * T * 64 * 128, 2 * T * 128 * 64
    scores = 2 * BATCH * 4 * SEQ * SEQ * 16          # QK^T over 4 query heads (KV repeated)
    mix = 2 * BATCH * 4 * SEQ * SEQ * 16             # AV
    lora_q = 2 * T * 64 * 4 + 2 * T * 4 * 64          # x A, (x A) B
    lora_v = 2 * T * 64 * 4 + 2 * T * 4 * 32
    head = 2 * T * 64 * VOCAB
    layer = q + k + v + o + gate + up + down + scores + mix + lora_q + lora_v
    forward = 2 * layer + head
    input_grads = 2 * (q + k + v + o + gate + up + down + 2 * (scores + mix) + lora_q + lora_v) + head
    weight_grads = 2 * (lora_q + lora_v)
    # layer 0: its input needs no gradient, so no dx for q, k, v (nor their LoRA A), and k
    # needs none there either (no adapter on k_proj): no dK
    skipped = q + k + v + 2 * T * 64 * 4 * 2 + scores
    return {"forward": forward, "input_grads": input_grads, "weight_grads": weight_grads,
            "skipped": skipped}


def test_a_lora_step_counts_what_a_hand_count_of_a_tiny_llama_counts():
    counted = lora_step_flops(DecoderShape.of(tiny_llama().config), BATCH, SEQ, r=R)
    hand = hand_count_qv()
    assert (counted.forward, counted.input_grads, counted.adapter_weight_grads,
            counted.first_layer_skipped) == (hand["forward"], hand["input_grads"],
                                             hand["weight_grads"], hand["skipped"])
    assert counted.total == hand["forward"] + hand["input_grads"] + hand["weight_grads"]


def test_dora_adds_its_weight_product_forward_only():
    shape = DecoderShape.of(tiny_llama().config)
    lora, dora = lora_step_flops(shape, BATCH, SEQ, r=R), lora_step_flops(shape, BATCH, SEQ, r=R, dora=True)
    assert dora.total - lora.total == 2 * 2 * R * (64 * 64 + 64 * 32)  # 2 layers, B @ A of q and v
    assert dora.input_grads == lora.input_grads


def test_an_unknown_target_is_refused_naming_the_layers():
    with pytest.raises(ValueError, match="no linear layer .'fc1'. .*q_proj"):
        lora_step_flops(DecoderShape.of(tiny_llama().config), 1, 4, targets=("fc1",))


def counted_by_torch(model, ids) -> int:
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"),
                                     ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")])
def test_torch_flop_counter_agrees_but_for_what_autograd_skips_in_layer_0(targets):
    """FlopCounterMode counts the matmuls that ran: the same as ours, minus layer 0's input
    gradients that autograd skips (the frozen embedding needs none), and minus nothing for the
    frozen base weights' gradients, which neither counts (they are never computed). Eager
    attention, so its matmuls are aten.bmm (the CPU's fused SDPA kernel has no FLOP formula)."""
    from peft import LoraConfig, get_peft_model
    ids = token_batch(BATCH, SEQ)
    ours = lora_step_flops(DecoderShape.of(tiny_llama().config), BATCH, SEQ, targets=targets, r=R)
    config = LoraConfig(r=R, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets))
    peft_model = get_peft_model(tiny_llama(attn_implementation="eager"), config).train()
    gm = fxpeft.rewrite(tiny_llama(attn_implementation="eager"), config).train()
    expected = ours.total - ours.first_layer_skipped
    assert counted_by_torch(peft_model, ids) == expected
    assert counted_by_torch(gm, ids) == expected


def test_the_peak_is_a_timed_gemm_and_mfu_divides_by_it():
    peak = measured_peak_flops("cpu", torch.float32, size=128, repeats=2)
    assert peak > 1e6  # any CPU does a 128^3 GEMM faster than 4 s
    assert mfu(int(peak), 2.0, peak) == pytest.approx(0.5)


def test_every_peak_route_is_a_square_gemm_of_the_same_flops():
    """The peak is the fastest of the routes a step may take (oneDNN's linear on a CPU, which
    the fused copy's ``onednn_linear`` uses): each must be the same n^3 product."""
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    routes = peak_gemms("cpu", torch.float32)
    assert "mm" in routes
    expected = {"mm": a @ b, "onednn linear": a @ b.T}
    for name, gemm in routes.items():
        torch.testing.assert_close(gemm(a, b), expected[name])
