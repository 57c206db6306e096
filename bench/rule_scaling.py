"""Rule files scale (issue 24, item 6): ``fxpeft.rewrite`` of the tiny Llama of the tests
(2 layers, 14 linears) with generated rule files of 1k to 10k rules, each with a path pattern
of its own (so none share ``re``'s cache), the first 14 matching one linear each and the rest
``optional`` and matching nothing. Prints the median seconds of a few runs per size, the
seconds per thousand rules, and the ratio of the largest size's time to the smallest's, which
is the ratio of their rule counts where the growth is linear.

    python bench/rule_scaling.py [--sizes 1000 2000 5000 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

import fxpeft  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=128)).eval()


def rules_text(count: int) -> str:
    """``count`` rules: rule i selects projection i % 7 of layer i // 7 (layers past the
    model's 2 match nothing, so those rules are optional)."""
    lines = ["version = 1"]
    for i in range(count):
        layer, projection = divmod(i, len(PROJECTIONS))
        lines += ["", "[[rule]]", f'name = "rule {i}"', 'match = "linear"', 'rewrite = "lora"',
                  f"optional = {'false' if layer < 2 else 'true'}", "[rule.where]",
                  f"path = ['^model\\.layers\\.{layer}\\.[a-z_]+\\.{PROJECTIONS[projection]}$']",
                  "[rule.params]", f"r = {1 + i % 8}"]
    return "\n".join(lines) + "\n"


def seconds_to_apply(path: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        model = tiny_llama()
        start = time.perf_counter()
        gm = fxpeft.rewrite(model, str(path))
        times.append(time.perf_counter() - start)
        assert len(fxpeft.adapter_state_dict(gm)) == 2 * 14  # the 14 linears, once each
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fxpeft.rewrite(tiny_llama(), "lora_qv.toml")  # capture once: what is timed is the rules
    print(machine_line())
    timings = {}
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            path = Path(folder) / f"rules_{size}.toml"
            path.write_text(rules_text(size))
            timings[size] = seconds_to_apply(path, args.repeats)
            print(f"{size:>7} rules  {timings[size]:7.2f} s   {timings[size] / size * 1000:6.3f} s per 1k rules")
    low, high = min(timings), max(timings)
    print(f"{high}/{low} rules: time ratio {timings[high] / timings[low]:.2f} (linear: {high / low:.2f})")


if __name__ == "__main__":
    main()
