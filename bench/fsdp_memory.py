"""Per-rank memory and step time of LoRA training on 2 processes: DDP, whole-graph FSDP2 and
per-layer FSDP2 (``shard_layers``), on SmolLM2-135M's shape (``bench/smollm2_config.json``,
random weights), by running ``examples/fsdp_smollm2.py --config`` under torchrun; prints the
example's per-rank tables and writes its JSON report.

    python bench/fsdp_memory.py [--batch 4 --seq 128 --steps 4] [--report out/fsdp_memory.json]

Columns: parameter bytes held at rest (this rank's shards), the peak of gathered parameters
during a step (counted at FSDP's gathers and frees), their sum, the peak allocated memory (CUDA)
or peak resident set (CPU: the whole process, libraries included), and the mean step time after
the first step. gloo on the CPU, nccl on GPUs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--report", default="out/fsdp_memory.json")
    args = parser.parse_args(argv)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "examples" / "fsdp_smollm2.py"), "--config", str(ROOT / "bench" / "smollm2_config.json"),
               "--batch-size", str(args.batch), "--seq-len", str(args.seq), "--steps", str(args.steps),
               "--output", str(Path(args.report).parent / "fsdp_adapter"), "--report", args.report]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
