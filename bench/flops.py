"""Model FLOPs of one LoRA training step, counted once from the shapes, and the machine's
measured peak: the two halves of model FLOP utilisation (MFU).

Conventions (the same for every side, so MFU ratios are step-time ratios):

- A matmul of (m, k) by (k, n) is ``2 m k n`` FLOPs; norms, activations, rotary, softmax and the
  loss are not counted (PaLM's and nanoGPT's convention: matmuls only).
- Attention counts QK^T and AV in full, as PaLM, nanoGPT and ``torch.utils.flop_counter`` do,
  causal or not (a causal kernel may skip half of it: it then shows as MFU above the matmuls'
  share, never as lost work). Grouped KV heads count at the query heads' number.
- The backward of a frozen linear is its input gradient only (as much as its forward); the
  adapter's own weights get weight gradients too; attention's backward is twice its forward
  (dQ, dK from the scores' gradient, and dS, dV from the output's). Input gradients count for
  every layer, the first included: a model's FLOPs do not depend on autograd skipping the
  gradient of the frozen embedding's output (``first_layer_skipped`` says how much it skips).
- Recompute (checkpointing, fused passes that recompute) is not model FLOPs: a side that
  recomputes shows it as a lower MFU.
- DoRA adds its per-step weight product ``B @ A`` (forward only: the weight norm is detached,
  as in PEFT and the DoRA paper, section 4.3).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """A Llama-style decoder: gated MLP, grouped-query attention, an untied-or-tied LM head
    (the head's matmul counts either way)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> "DecoderShape":
        """From a transformers config (``LlamaConfig`` and its relatives).

        >>> from transformers import LlamaConfig
        >>> DecoderShape.of(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                             num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
        DecoderShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=96)
        """
        return cls(config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads or config.num_attention_heads,
                   config.intermediate_size, config.vocab_size)

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each layer's linear layers as (in features, out features), by module name."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.heads * head_dim), "k_proj": (h, kv), "v_proj": (h, kv),
                "o_proj": (self.heads * head_dim, h), "gate_proj": (h, i), "up_proj": (h, i),
                "down_proj": (i, h)}


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """One training step's model FLOPs, by part."""

    forward: int
    input_grads: int
    adapter_weight_grads: int
    first_layer_skipped: int  # input gradients autograd skips in layer 0 (see the module doc)

    @property
    def total(self) -> int:
        """Forward + input gradients + the adapter's weight gradients.

        >>> StepFlops(10, 8, 2, 1).total
        20
        """
        return self.forward + self.input_grads + self.adapter_weight_grads


def lora_step_flops(shape: DecoderShape, batch: int, seq: int, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                    r: int = 8, dora: bool = False) -> StepFlops:
    """Model FLOPs of one LoRA (or DoRA) training step of ``shape`` on ``batch`` x ``seq`` tokens,
    adapters of rank ``r`` on ``targets`` in every layer, base weights frozen.

    >>> shape = DecoderShape(hidden=4, layers=1, heads=1, kv_heads=1, intermediate=8, vocab=10)
    >>> lora_step_flops(shape, batch=1, seq=2, targets=("q_proj",), r=1).forward
    896
    """
    tokens = batch * seq
    linears = shape.linears()
    unknown = sorted(set(targets) - set(linears))
    if unknown:
        raise ValueError(f"no linear layer {unknown} in a decoder layer; it has {sorted(linears)}")
    base = 2 * tokens * sum(i * o for i, o in linears.values())
    head_dim = shape.hidden // shape.heads
    attention = 2 * 2 * batch * shape.heads * seq * seq * head_dim  # QK^T and AV
    lora = {name: 2 * tokens * r * sum(linears[name]) for name in targets}  # x A, then (x A) B
    dora_product = 2 * r * sum(linears[n][0] * linears[n][1] for n in targets) if dora else 0
    head = 2 * tokens * shape.hidden * shape.vocab
    per_layer_forward = base + attention + sum(lora.values()) + dora_product
    per_layer_input_grads = base + 2 * attention + sum(lora.values())
    skipped = _first_layer_skipped(linears, set(targets), tokens, r, attention // 2)
    return StepFlops(forward=shape.layers * per_layer_forward + head,
                     input_grads=shape.layers * per_layer_input_grads + head,
                     adapter_weight_grads=shape.layers * sum(lora.values()),
                     first_layer_skipped=skipped)


def _first_layer_skipped(linears: dict[str, tuple[int, int]], targets: set[str], tokens: int, r: int,
                         one_attention_matmul: int) -> int:
    """Input-gradient FLOPs autograd skips in layer 0, whose input (the frozen embedding's
    output) needs no gradient: a tensor needs one only below an adapter."""
    def input_grad(name: str) -> int:  # the base linear's, and the LoRA A's when adapted
        features_in, features_out = linears[name]
        return 2 * tokens * features_in * (features_out + (r if name in targets else 0))
    q, k, v = ("q_proj" in targets), ("k_proj" in targets), ("v_proj" in targets)
    skipped = sum(input_grad(n) for n in ("q_proj", "k_proj", "v_proj"))
    # attention's backward: dS (needs q or k), dQ, dK, dV, each one QK^T-sized matmul
    skipped += one_attention_matmul * ((not (q or k)) + (not q) + (not k) + (not v))
    attention_out = q or k or v
    if not attention_out:
        skipped += input_grad("o_proj")
    residual = attention_out or "o_proj" in targets
    if not residual:
        skipped += input_grad("gate_proj") + input_grad("up_proj")
    if not (residual or {"gate_proj", "up_proj"} & targets):
        skipped += input_grad("down_proj")
    return skipped


def gemm_size(device: torch.device | str) -> int:
    """The square GEMM side that measures a device's peak: large enough to be compute-bound,
    small enough to take well under a second.

    >>> gemm_size("cpu")
    1536
    """
    return 8192 if torch.device(device).type == "cuda" else 1536


def peak_gemms(device: torch.device | str, dtype: torch.dtype) -> dict[str, Callable]:
    """The GEMM routes a training step may take on ``device`` in ``dtype``, by name: aten's
    ``mm`` everywhere, and on a CPU with oneDNN its ``_linear_pointwise`` too (the route
    ``fxpeft.fuse``'s ``onednn_linear`` takes in fp32: 23-36% faster than ``mm`` there, so a peak
    from ``mm`` alone put the fused copy's MFU above 100%).

    >>> "mm" in peak_gemms("cpu", torch.float32)
    True
    """
    routes: dict[str, Callable] = {"mm": torch.mm}
    if torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available() \
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        # a @ b.T (b read as a linear's weight): the same 2 n^3 FLOPs as a @ b.
        routes["onednn linear"] = lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return routes


def measured_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a large square GEMM of ``dtype`` on ``device``, by its fastest route
    (``peak_gemms``): the median of ``repeats`` timed calls after one warm-up, per route. MFU
    divides by this, not by a datasheet number.

    >>> measured_peak_flops("cpu", size=64, repeats=2) > 0
    True
    """
    size = size or gemm_size(device)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
    return max(2 * size ** 3 / _median_seconds(lambda: gemm(a, b), device, repeats)
               for gemm in peak_gemms(device, dtype).values())


def _median_seconds(run: Callable[[], object], device: torch.device | str, repeats: int) -> float:
    cuda = torch.device(device).type == "cuda"
    times = []
    for index in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def mfu(flops: int, seconds: float, peak: float) -> float:
    """Model FLOP utilisation: ``flops`` done in ``seconds`` against ``peak`` FLOP/s.

    >>> mfu(50, 1.0, 100.0)
    0.5
    """
    return flops / seconds / peak
