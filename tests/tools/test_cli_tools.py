"""``fxpeft convert``, ``fxpeft merge``, ``fxpeft graph``, and one-line errors from every command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import AdaptionPromptConfig, IA3Config, LoraConfig, PeftConfig, get_peft_model
from safetensors.torch import load_file

import fxpeft
from conftest import REPO_ROOT, randomize_adapters, tiny_llama, token_batch
from fxpeft.tools.cli import main

ATOL = 1e-5  # fp32, the same merged weights; only summation order may differ
ROOT = REPO_ROOT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """An fxpeft-saved LoRA adapter with non-zero weights (PEFT's format)."""
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv", dropout=0.0)
    randomize_adapters(gm)
    return fxpeft.save(gm, tmp_path_factory.mktemp("adapter") / "lora")


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- convert ------------------------------------------------------------------------------------

ROUND_TRIP = {
    "lora list": lambda: LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8,
                                    rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3}),
    "lora regex + layers": lambda: LoraConfig(target_modules=r".*\.1\.self_attn\.(q|k)_proj", r=2),
    "lora layers": lambda: LoraConfig(target_modules=["o_proj", "down_proj"], layers_to_transform=[0]),
    "lora all-linear": lambda: LoraConfig(target_modules="all-linear", exclude_modules=["gate_proj"]),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "adaption prompt": lambda: AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM"),
}


def _peft_selection(config):
    """What PEFT adapts for ``config`` on the tiny Llama: trainable tensors, shapes and scales."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()
              if any(part in n for part in ("lora_", "ia3_", "adaption_"))}
    scales = {n: m.scaling["default"] for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict)}
    return shapes, scales


@pytest.mark.parametrize("form", list(ROUND_TRIP))
def test_convert_round_trips_config_to_toml_to_config(tmp_path, model_dir, capsys, form):
    ROUND_TRIP[form]().save_pretrained(tmp_path / "original")
    toml, back = tmp_path / "rules.toml", tmp_path / "back" / "adapter_config.json"
    needs_model = ["--model", model_dir] if form == "lora all-linear" else []
    assert _run(["convert", tmp_path / "original", "--out", toml, *needs_model], capsys)[0] == 0
    assert _run(["check", toml], capsys)[0] == 0
    code, out, _ = _run(["convert", toml, "--model", model_dir, "--out", back], capsys)
    assert code == 0 and f"wrote {back}" in out
    original = PeftConfig.from_pretrained(str(tmp_path / "original"))
    again = PeftConfig.from_pretrained(str(back.parent))
    assert type(again) is type(original)
    assert _peft_selection(again) == _peft_selection(original)
    # the rules select what fxpeft reads from the original folder, too
    from_toml = fxpeft.explain(tiny_llama(), toml)
    assert sorted(p for r in from_toml.rules for p in r.matched) == sorted(
        p for r in fxpeft.explain(tiny_llama(), ROUND_TRIP[form]()).rules for p in r.matched)


def test_convert_a_bundled_rule_file_and_print(model_dir, capsys):
    code, out, _ = _run(["convert", "ia3.toml", "--model", model_dir], capsys)
    config = json.loads(out)
    assert code == 0 and config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]


def test_convert_says_modules_to_save_are_not_rules(tmp_path, capsys):
    LoraConfig(target_modules=["query"], modules_to_save=["classifier"]).save_pretrained(tmp_path)
    code, out, err = _run(["convert", tmp_path], capsys)
    assert code == 0 and "rewrite = 'lora'" in out
    assert err.strip() == ("note: modules_to_save = ['classifier'] is not part of a rule file; "
                           "pass modules_to_save=['classifier'] to fxpeft.rewrite (and "
                           "allow_empty=True if a name is absent from the model, as PEFT's "
                           "'score' is on BERT)")


# --- merge --------------------------------------------------------------------------------------

def test_merge_writes_a_plain_checkpoint_equal_to_the_merged_graph(tmp_path, model_dir, lora_dir, capsys):
    out = tmp_path / "merged"
    code, printed, err = _run(["merge", model_dir, lora_dir, out], capsys)
    assert code == 0 and err == "" and f"wrote {out}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.safetensors"]
    assert not any("lora" in key for key in load_file(str(out / "model.safetensors")))
    ids = token_batch()
    base = type(tiny_llama()).from_pretrained(model_dir).eval()
    merged_graph = fxpeft.merge(fxpeft.load(base, lora_dir))
    with torch.no_grad():
        expected = merged_graph(ids).logits
        assert not torch.allclose(expected, base(ids).logits, atol=1e-3)  # the adapter matters
    # loaded by transformers alone, in a process that never imports fxpeft
    script = ("import sys, torch; from transformers import AutoModelForCausalLM; "
              "from safetensors.torch import save_file; "
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
              "ids = torch.tensor(eval(sys.argv[2])); "
              "save_file({'logits': m(ids).logits.detach()}, sys.argv[3]); "
              "assert 'fxpeft' not in sys.modules and 'peft' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script, str(out), str(ids.tolist()), str(tmp_path / "l.st")],
                   check=True, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=300)
    torch.testing.assert_close(load_file(str(tmp_path / "l.st"))["logits"], expected, rtol=0, atol=ATOL)


def test_merge_refuses_an_existing_folder_and_unmergeable_kinds(tmp_path, model_dir, lora_dir, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code, _, err = _run(["merge", model_dir, lora_dir, tmp_path / "taken"], capsys)
    assert code == 1 and err == f"fxpeft merge: {tmp_path / 'taken'}: exists; the merged checkpoint goes to a new folder\n"
    gm = fxpeft.rewrite(tiny_llama(), "llama_adapter")
    prompt = fxpeft.save(gm, tmp_path / "prompt")
    code, _, err = _run(["merge", model_dir, prompt, tmp_path / "out"], capsys)
    assert code == 1 and err.count("\n") == 1 and "cannot be merged" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt", "taken"]  # nothing half-written


# --- graph --------------------------------------------------------------------------------------

def test_graph_draws_a_layer_with_its_adapter_nodes(tmp_path, model_dir, capsys):
    svg = tmp_path / "layer1.svg"
    code, out, _ = _run(["graph", model_dir, "--rules", "lora_qv.toml", "--layer", "1", "--out", svg], capsys)
    assert code == 0 and f"wrote {svg}" in out
    modules = svg.read_text()  # the module view: one box per adapted projection
    assert modules.count('id="adapter-lora-') == 2 and ">lora · self_attn.q_proj · r=8<" in modules
    code, out, _ = _run(["graph", model_dir, "--rules", "lora_qv.toml", "--layer", "1", "--out", svg,
                         "--detail"], capsys)
    assert code == 0 and f"wrote {svg}" in out
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv")
    lora = [n for n in gm.graph.nodes if (r := n.meta.get("fxpeft_adapter")) and ".1." in f".{r.module_path}."]
    text = svg.read_text()
    assert len(lora) == 14  # q and v: dropout, A, B (their weights), gate mul, add
    assert text.count('id="adapter-lora-') == len(lora)
    assert all(f'id="adapter-lora-{n.name}"' in text for n in lora)
    assert "lora q_proj: linear" in text and "lora v_proj: add" in text and "gate default" in text
    assert "before (" in text and "14 adapter nodes: lora" in text


def test_graph_writes_png(tmp_path, model_dir, capsys):
    png = tmp_path / "last.png"
    assert _run(["graph", model_dir, "--rules", "ia3.toml", "--layer", "-1", "--out", png], capsys)[0] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- bad input: every command, one line, no traceback ----------------------------------------------

def _bad_inputs(tmp: Path, model: Path, adapter: Path) -> dict:
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text('[[rule]]\nmatch = "linear"\nrewrite = "lora"\n[rule.params]\nr = 0\n')
    (tmp / "broken").mkdir(exist_ok=True)
    (tmp / "broken" / "adapter_config.json").write_text("{not json")
    (tmp / "odd-model").mkdir(exist_ok=True)
    (tmp / "odd-model" / "config.json").write_text('{"model_type": "no-such-family"}')
    (tmp / "fourierft").mkdir(exist_ok=True)
    (tmp / "fourierft" / "adapter_config.json").write_text('{"peft_type": "FOURIERFT"}')
    return {
        "no command": ([], 2, "fxpeft: the following arguments are required: command"),
        "unknown command": (["frobnicate"], 2, "invalid choice"),
        "check": (["check", bad_toml], 1, "rule[0].params.r: expected a positive integer"),
        "rules extra": (["rules", "x"], 2, "unrecognized arguments: x"),
        "kinds extra": (["kinds", "--x"], 2, "unrecognized arguments: --x"),
        "explain model": (["explain", tmp / "nowhere", "--rules", "lora_qv"], 1,
                          "not 'smollm2' nor a transformers checkpoint folder"),
        "explain foreign error": (["explain", tmp / "odd-model", "--rules", "lora_qv"], 1,
                                  "fxpeft explain: ValueError: "),
        "explain rules": (["explain", model, "--rules", "lora_vq"], 1, "no rule file 'lora_vq'"),
        "explain no rules": (["explain", model], 2, "the following arguments are required: --rules"),
        "convert json": (["convert", tmp / "broken"], 1, "not valid JSON"),
        "convert fourierft": (["convert", tmp / "fourierft"], 1, "peft_type 'FOURIERFT' is not supported"),
        "convert missing": (["convert", tmp / "missing.json"], 1, "no such file or adapter folder"),
        "convert no model": (["convert", "lora_qv.toml"], 1, "give --model smollm2|FOLDER"),
        "convert all-linear": (["convert", tmp / "all-linear"], 1, "give a model to resolve it"),
        "convert bad rules": (["convert", bad_toml, "--model", model], 1, "expected a positive integer"),
        "merge adapter": (["merge", model, tmp / "missing", tmp / "o"], 1, "no such file"),
        "merge model": (["merge", tmp / "nowhere", adapter, tmp / "o"], 1, "not 'smollm2' nor"),
        "merge args": (["merge", model], 2, "the following arguments are required: adapter, out"),
        "graph layer": (["graph", model, "--rules", "lora_qv", "--layer", "7", "--out", tmp / "g.svg"], 1,
                        "layer 7 does not exist; the graph has layers 0..1"),
        "graph format": (["graph", model, "--rules", "lora_qv", "--out", tmp / "g.jpg"], 1,
                         "pictures are .svg, .png, .pdf"),
        "graph layer type": (["graph", model, "--rules", "lora_qv", "--layer", "x", "--out", tmp / "g.svg"], 2,
                             "invalid int value: 'x'"),
    }


BAD_NAMES = ["no command", "unknown command", "check", "rules extra", "kinds extra", "explain model",
             "explain foreign error",
             "explain rules", "explain no rules", "convert json", "convert fourierft", "convert missing",
             "convert no model", "convert all-linear", "convert bad rules", "merge adapter",
             "merge model", "merge args", "graph layer", "graph format", "graph layer type"]


@pytest.mark.parametrize("case", BAD_NAMES)
def test_every_command_fails_in_one_line(tmp_path, model_dir, lora_dir, capsys, case):
    LoraConfig(target_modules="all-linear").save_pretrained(tmp_path / "all-linear")
    argv, expected_code, message = _bad_inputs(tmp_path, model_dir, lora_dir)[case]
    code, out, err = _run(argv, capsys)
    assert code == expected_code
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "g.svg").exists()


def test_the_installed_command_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for argv in (["merge"], ["convert", str(tmp_path / "missing.json")]):
        done = subprocess.run([sys.executable, "-m", "fxpeft.tools.cli", *argv], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.startswith("fxpeft")
