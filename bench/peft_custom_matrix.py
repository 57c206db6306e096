"""PEFT's custom-model matrix, whole: every LoRA (DoRA, rsLoRA and the LoRA variants), IA3 and
AdaLoRA row of PEFT 0.21.2's ``tests/test_custom_models.py`` ``TEST_CASES``, on the recreated
models of ``tests/peft_models.py``. Each case: PEFT builds the adapter (every adapter tensor moved
off its init), saves it; fxpeft loads it (outputs against PEFT's), saves it back;
``PeftModel.from_pretrained`` loads that (outputs again); ``fxpeft.merge`` (outputs again, where
PEFT merges). Prints one line per case and the reproduced / refused counts per method.

    python bench/peft_custom_matrix.py [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's fxpeft and test models
from peft_io import matrix_case  # noqa: E402
from peft_models import peft_custom_cases  # noqa: E402

from fxpeft.errors import FxpeftError  # noqa: E402

ATOL = 1e-5


def method_of(config_class: type, kwargs: dict) -> str:
    name = config_class.__name__.removesuffix("Config")
    return "DoRA" if kwargs.get("use_dora") else name


def run_case(model_id: str, config_class: type, kwargs: dict, folder: Path) -> tuple[str, str]:
    """``("reproduced", errors)``, ``("refused", reason)`` or ``("wrong", errors)``."""
    try:
        errors = matrix_case(model_id, config_class, kwargs, folder)
    except FxpeftError as refusal:
        return "refused", str(refusal).splitlines()[0].replace(str(folder), "<folder>")
    numbers = [v for v in errors.values() if isinstance(v, float)]
    verdict = "reproduced" if max(numbers) <= ATOL else "wrong"
    return verdict, ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} refused ({v})"
                              for k, v in errors.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name holds this")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # PEFT's notes on merging grouped convolutions and the like
    counts: dict[str, Counter] = {}
    for name, model_id, config_class, kwargs in peft_custom_cases():
        if args.only not in name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            verdict, detail = run_case(model_id, config_class, copy.deepcopy(kwargs), Path(tmp))
        counts.setdefault(method_of(config_class, kwargs), Counter())[verdict] += 1
        print(f"{verdict:10s} {name}: {detail}", flush=True)
    total = sum(counts.values(), Counter())
    for method, count in [*counts.items(), ("all", total)]:
        print(f"{method:8s} reproduced {count['reproduced']} / refused {count['refused']} / "
              f"wrong {count['wrong']} of {sum(count.values())}")


if __name__ == "__main__":
    main()
