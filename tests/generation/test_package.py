"""``fxpeft.package``: one AOTInductor package per module (compiling C++ takes about a minute):
the unmerged KV-cached decode graph of a one-layer Llama with two LoRA adapters. A fresh process
with ``transformers`` and ``fxpeft`` blocked loads it, switches adapters by its ``adapter`` input
and decodes greedily: the tokens equal ``fxpeft.generate``'s, the prefill logits the decode
graph's within 1e-5. The forward graph, merged and unmerged, is checked on its exported program
(what ``package`` compiles), which is cheap."""

import json
import subprocess
import sys

import pytest
import torch

import fxpeft
from conftest import randomize_adapters, tiny_llama, token_batch
from fxpeft.errors import FxpeftError
from fxpeft.generation.decode_graph import decoder_for
from fxpeft.generation.package import foreign_ops, packaged_program
from fxpeft.graph.gates import disable_adapters, gate_buffers, set_adapter
from fxpeft.transforms.cpu_gemm import _onednn

NEW_TOKENS = 6
LENGTH = 16  # the decode package's cache

# run in a fresh process: torch only; importing transformers or fxpeft raises ImportError
LOADER = r"""
import sys
sys.modules["transformers"] = None
sys.modules["fxpeft"] = None
import json, torch
path, prompt, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
run = torch._inductor.aoti_load_package(path)
ids = torch.tensor(prompt)
batch, tokens = ids.shape
out = {}
for adapter in (0, 1, -1):
    mask = torch.zeros(batch, %(length)d, dtype=torch.long); mask[:, :tokens] = 1
    steps = torch.arange(tokens)
    logits = run(ids, mask, steps.expand(batch, tokens), steps, torch.tensor(adapter))
    out[f"prefill{adapter}"] = logits.tolist()
    rows = ids
    for step in range(new):
        token = logits[:, -1].argmax(-1)[:, None]
        rows = torch.cat([rows, token], 1)
        mask[:, tokens + step] = 1
        where = torch.tensor([tokens + step])
        logits = run(token, mask, where.expand(batch, 1), where, torch.tensor(adapter))
    out[f"tokens{adapter}"] = rows.tolist()
print(json.dumps({"out": out, "blocked": [m for m in ("transformers", "fxpeft") if sys.modules[m] is not None]}))
""" % {"length": LENGTH}


@pytest.fixture(scope="module")
def two_adapters():
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=1), "lora_qv.toml")
    fxpeft.add_adapter(gm, "sql", "lora_qv.toml")
    randomize_adapters(gm, seed=1)
    return gm.eval()


@pytest.fixture(scope="module")
def decode_package(two_adapters, tmp_path_factory):
    path = tmp_path_factory.mktemp("package") / "decode.pt2"
    info = fxpeft.package(two_adapters, path, token_batch(1, 4), decode_length=LENGTH)
    return path, info


def _in_fresh_process(path, prompt):
    done = subprocess.run([sys.executable, "-c", LOADER, str(path), json.dumps(prompt.tolist()),
                           str(NEW_TOKENS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _expected(gm, prompt, adapter):
    decoder = decoder_for(gm, prompt.shape[0], LENGTH)
    steps = torch.arange(prompt.shape[1])
    mask = torch.zeros(prompt.shape[0], LENGTH, dtype=torch.long)
    mask[:, :prompt.shape[1]] = 1
    if adapter is None:
        with disable_adapters(gm):
            return decoder(prompt, mask, steps[None], steps), \
                fxpeft.generate(gm, prompt, NEW_TOKENS, eos_token_id=[])
    set_adapter(gm, adapter)
    return decoder(prompt, mask, steps[None], steps), fxpeft.generate(gm, prompt, NEW_TOKENS, eos_token_id=[])


def test_the_package_decodes_without_fxpeft_or_transformers(two_adapters, decode_package):
    path, info = decode_package
    assert info.adapters == ("default", "sql") and info.cache_length == LENGTH
    assert info.inputs == ("input_ids", "attention_mask", "position_ids", "cache_position", "adapter")
    prompt = token_batch(1, 4, seed=3)
    got = _in_fresh_process(path, prompt)
    assert got["blocked"] == []
    for index, adapter in ((0, "default"), (1, "sql"), (-1, None)):
        logits, tokens = _expected(two_adapters, prompt, adapter)
        packaged = torch.tensor(got["out"][f"prefill{index}"])
        assert (packaged - logits).abs().max() < 1e-5, adapter
        assert got["out"][f"tokens{index}"] == tokens.tolist(), adapter
    set_adapter(two_adapters, "default")
    # the adapters do differ, so the switch is shown
    assert got["out"]["tokens0"] != got["out"]["tokens-1"] or got["out"]["prefill0"] != got["out"]["prefill-1"]


def test_nothing_half_written_and_a_bad_name_is_refused(two_adapters, tmp_path):
    with pytest.raises(FxpeftError, match=r"model\.zip: an AOTInductor package's name ends in \.pt2"):
        fxpeft.package(two_adapters, tmp_path / "model.zip", {"input_ids": token_batch(1, 4)})
    with pytest.raises(FxpeftError, match="no folder"):
        fxpeft.package(two_adapters, tmp_path / "absent" / "model.pt2", {"input_ids": token_batch(1, 4)})
    assert list(tmp_path.iterdir()) == []


def _aten_only(program):
    assert foreign_ops(program.graph) == []
    program.graph.lint()


def test_the_unmerged_forward_program_switches_adapters_by_input(two_adapters):
    ids = token_batch(2, 5)
    mask = torch.ones_like(ids)
    before = [float(g) for _, g in gate_buffers(two_adapters.fxpeft_gates)]
    program, info = packaged_program(two_adapters, {"input_ids": ids, "attention_mask": mask})
    assert [float(g) for _, g in gate_buffers(two_adapters.fxpeft_gates)] == before  # export ran on fakes
    assert info.inputs == ("input_ids", "attention_mask", "adapter")
    _aten_only(program)
    run = program.module()
    for index, adapter in enumerate(info.adapters):
        set_adapter(two_adapters, adapter)
        assert (run(ids, mask, torch.tensor(index)) - two_adapters(ids, attention_mask=mask).logits).abs().max() < 1e-5
    with disable_adapters(two_adapters):
        base = two_adapters(ids, attention_mask=mask).logits
    assert (run(ids, mask, torch.tensor(-1)) - base).abs().max() < 1e-5
    set_adapter(two_adapters, "default")
    longer = token_batch(3, 9)  # batch and sequence are dynamic
    assert run(longer, torch.ones_like(longer), torch.tensor(0)).shape == (3, 9, 128)


def test_the_merged_program_is_the_base_graph_on_merged_weights(two_adapters):
    ids = token_batch(2, 5)
    program, info = packaged_program(two_adapters, {"input_ids": ids}, merged=True)
    assert info.adapters == () and info.inputs == ("input_ids",)
    _aten_only(program)
    base, _ = packaged_program(fxpeft.rewrite(tiny_llama(num_hidden_layers=1), "lora_qv.toml"),
                               {"input_ids": ids}, merged=True)
    count = lambda p: sum(n.op == "call_function" for n in p.graph.nodes)  # noqa: E731
    assert count(program) == count(base)  # no adapter node is left
    assert (program.module()(ids) - two_adapters(ids).logits).abs().max() < 1e-5


@pytest.mark.skipif(not _onednn(), reason="fxpeft.fuse routes frozen linears to oneDNN only where torch has it")
def test_fxpeft_ops_of_a_fused_copy_are_lowered_to_aten(two_adapters):
    fused = fxpeft.fuse(two_adapters)
    assert fused.graph.find_nodes(op="call_function", target=torch.ops.fxpeft.frozen_linear.default)
    ids = token_batch(2, 5)
    program, _ = packaged_program(fused, {"input_ids": ids})
    _aten_only(program)
    assert fused.graph.find_nodes(op="call_function", target=torch.ops.fxpeft.frozen_linear.default)
    assert (program.module()(ids, torch.tensor(0)) - two_adapters(ids).logits).abs().max() < 1e-5


def test_what_cannot_be_packaged_is_refused_by_name():
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=1), "prompt_tuning.toml")
    fxpeft.add_adapter(gm, "other", "prompt_tuning.toml")
    ids = token_batch(1, 4)
    with pytest.raises(FxpeftError, match=r"adapters \['default', 'other'\] change the graph's shape"):
        packaged_program(gm, {"input_ids": ids})
    with pytest.raises(FxpeftError, match=r"adapters \['default \(prompt_tuning\)', 'other \(prompt_tuning\)'\] put tokens"):
        packaged_program(gm, ids, decode_length=LENGTH)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.ops.fxpeft.frozen_linear.default, (x, x, None)))
    assert foreign_ops(g) == ["fxpeft::frozen_linear"]


def test_a_4bit_graph_is_refused_unmerged_and_packages_dense_merged(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    tiny_llama(num_hidden_layers=1).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    gm = fxpeft.rewrite(model, "lora_qv.toml").eval()
    randomize_adapters(gm)
    ids = token_batch(2, 5)
    with pytest.raises(FxpeftError, match=r"7 quantized \(bitsandbytes\) layers, model\.layers\.0\.self_attn\.q_proj first"):
        packaged_program(gm, {"input_ids": ids})
    program, _ = packaged_program(gm, {"input_ids": ids}, merged=True)
    _aten_only(program)  # no fxpeft::linear_4bit, no bitsandbytes op
    dense = fxpeft.merge(gm, dequantize=True)
    assert (program.module()(ids) - dense(ids).logits).abs().max() < 1e-5
