"""PEFT's decoder-model matrix against fxpeft: every ``ALL_CONFIGS`` row of PEFT 0.21.2's
tests/test_decoder_models.py for the methods fxpeft has (LoRA with aLoRA and trainable tokens,
AdaLoRA, IA3, BOFT, OFT, VeRA, prompt tuning, p-tuning, prefix tuning), on tiny OPT, GPT-2, GPT-J,
Llama, Qwen2, Gemma-3 and Mistral built from configs, plus PEFT's layer-replication and DoRA on
``embed_tokens`` cases. Each case: logits both ways through the folders, merge, greedy
``generate`` against PEFT's. Prints each case, then reproduced / refused (with reasons) per
method and the generate matches.

    python bench/peft_decoder_matrix.py [method ...]   (those methods only, in that order)
"""

from __future__ import annotations

import collections
import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from common import machine_line  # noqa: E402
from decoder_matrix import all_cases, run_case  # noqa: E402

EXACT = 1e-4  # the largest logit error a reproduced case may have


def _line(case) -> str:
    if case.peft_fails:
        return f"PEFT     {case.label}: PEFT cannot build it ({case.peft_fails})"
    if case.refused:
        return f"REFUSED  {case.label}: {case.refused}"
    errors = " ".join(f"{k}={v:.1e}" for k, v in case.errors.items())
    generate = {True: "generate=PEFT", False: "generate DIFFERS", None: "generate n/a"}[case.generate]
    note = f" ({case.generate_note})" if case.generate_note else ""
    exact = "ok      " if max(case.errors.values()) <= EXACT else "INEXACT "
    return f"{exact} {case.label}: {errors} {generate}{note}"


def _summary(cases) -> None:
    by_method = collections.defaultdict(list)
    print(f"not counted (PEFT cannot build them): {sum(1 for c in cases if c.peft_fails)}")
    cases = [c for c in cases if not c.peft_fails]
    for case in cases:
        by_method[case.method].append(case)
    for method, group in by_method.items():
        done = [c for c in group if not c.refused and max(c.errors.values()) <= EXACT]
        reasons = collections.Counter(re.sub(r"/\S+: ", "", c.refused) for c in group if c.refused)
        same = sum(1 for c in done if c.generate)
        print(f"{method:<14} reproduced {len(done)}/{len(group)}, generate = PEFT {same}/{len(done)}")
        for reason, count in reasons.items():
            print(f"    refused {count}: {reason}")
    accepted = [c for c in cases if not c.refused]
    print(f"all: reproduced {sum(1 for c in accepted if max(c.errors.values()) <= EXACT)}/{len(cases)}, "
          f"generate = PEFT {sum(1 for c in accepted if c.generate)}/{len(accepted)}, "
          f"= PEFT's forward only {sum(1 for c in accepted if c.generate is None)}")


def main(methods: list[str]) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(machine_line())
    cases = [c for c in all_cases() if not methods or c.method in methods]
    cases.sort(key=lambda c: methods.index(c.method) if methods else 0)  # the methods' order
    for case in cases:
        print(_line(run_case(case)), flush=True)
    _summary(cases)


if __name__ == "__main__":
    main(sys.argv[1:])
