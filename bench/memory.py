"""Peak training memory: fxpeft, its fused copy (with the fused LM-head loss) and HF PEFT, each
in a fresh subprocess, LoRA q,v, a few AdamW steps. Memory is the peak RSS during the training
steps minus the RSS just before them (the peak is reset through /proc/self/clear_refs once the
adapted model is built, so capture's own peak is left out): the ratios compare what training
adds.

    python bench/memory.py [--model smollm2|llama] [--batch 4 --seq 128 --steps 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

VARIANTS = ("PEFT", "fxpeft", "fxpeft fused")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise SystemExit(f"no {field} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _model(name: str):
    import torch
    if name == "smollm2":
        from fxpeft.models import load_smollm2
        return load_smollm2()[0]
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                                        num_attention_heads=9, num_key_value_heads=3,
                                        vocab_size=49152)).eval()


def _adapted(variant: str, model):
    import fxpeft
    if variant == "PEFT":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    gm = fxpeft.rewrite(model, "lora_qv", dropout=0.0)
    return fxpeft.fuse(gm) if variant == "fxpeft fused" else gm


def child(args: argparse.Namespace) -> None:
    """One variant: print {"loaded": MiB, "peak": MiB}."""
    import torch
    model = _model(args.model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    adapted = _adapted(args.variant, model).train()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)
    _reset_peak()
    loaded = _status_mib("VmRSS")
    for _ in range(args.steps):
        adapted(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"loaded": loaded, "peak": _status_mib("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "llama"])
    for name, default in (("batch", 4), ("seq", 128), ("steps", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--variant", default=None)
    args = parser.parse_args()
    if args.variant:
        return child(args)
    print(f"{args.model}, batch {args.batch} x {args.seq}, LoRA q,v, {args.steps} AdamW steps\n{machine_line()}")
    added = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--model", args.model,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
        numbers = json.loads(out.stdout.strip().splitlines()[-1])
        added[variant] = numbers["peak"] - numbers["loaded"]
    for variant, mib in added.items():
        print(f"  {variant:<14} +{mib:8.0f} MiB peak RSS in training   {mib / added['PEFT']:6.3f} x PEFT")


if __name__ == "__main__":
    main()
