"""The on-disk capture cache: a file gives the graph and outputs a fresh capture gives; a changed
config, class or version misses; a corrupt or tampered file is ignored and rewritten, never
trusted; nothing is unpickled; a new process hits it; the off switch writes nothing."""

import json
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

import fxpeft
from conftest import REPO_ROOT, graph_signature, randomize_adapters, tiny_gpt2, tiny_llama, token_batch
from fxpeft.capture import cache as capture_cache, disk_cache
from fxpeft.capture.export import capture
from fxpeft.rules import Rule, Where


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPEFT_CAPTURE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FXPEFT_CAPTURE_CACHE", raising=False)
    capture_cache.clear()
    yield tmp_path
    capture_cache.clear()


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    """(file name, text, graph signature) of tiny_llama's capture: captured once for the module."""
    folder = tmp_path_factory.mktemp("capture")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FXPEFT_CAPTURE_CACHE_DIR", str(folder))
        patch.delenv("FXPEFT_CAPTURE_CACHE", raising=False)
        capture_cache.clear()
        program = capture(tiny_llama())
        capture_cache.clear()
    (path,) = folder.iterdir()
    return path.name, path.read_text(), graph_signature(program.graph)


def files(folder) -> list:
    return sorted(p.name for p in folder.iterdir())


def captured(model, caplog):
    """(program, whether it came from a cache file, warnings logged), the in-process cache empty."""
    capture_cache.clear()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="fxpeft"):
        program = capture(model)
    messages = [r.getMessage() for r in caplog.records]
    return (program, any("read from the capture cache file" in m for m in messages),
            [m for m in messages if "ignoring the capture cache file" in m])


def info_fields(info):
    return (info.model_class, info.frontend, info.inputs, info.out_spec, info.max_seq, info.training,
            info.hf, info.positions, info.packs, info.config.to_json_string())


@pytest.mark.parametrize("build, rules", [(tiny_llama, "lora_qv"),
                                          (tiny_gpt2, Rule(where=Where(path=["c_attn"])))],
                         ids=["llama", "gpt2"])
def test_a_file_gives_the_graph_and_outputs_of_a_fresh_capture(build, rules, cache_folder, caplog):
    model = build()
    fresh, hit, _ = captured(model, caplog)
    assert not hit and len(files(cache_folder)) == 1
    again, hit, _ = captured(model, caplog)
    assert hit
    again.graph.lint()
    assert graph_signature(again.graph) == graph_signature(fresh.graph)
    assert [n.name for n in again.graph.nodes] == [n.name for n in fresh.graph.nodes]
    assert [n.meta["val"].dtype for n in again.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)] \
        == [n.meta["val"].dtype for n in fresh.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert info_fields(again.info) == info_fields(fresh.info)
    assert [s.module_path for s in again.sites] == [s.module_path for s in fresh.sites]
    # bound to the model's own parameters, adapted and run as a fresh capture is
    param = next(iter(model.named_parameters()))
    assert again.graph_module.get_parameter(param[0]) is param[1]
    capture_cache.clear()
    from_file = fxpeft.rewrite(model, rules)
    os.environ["FXPEFT_CAPTURE_CACHE"] = "0"
    try:
        from_export = fxpeft.rewrite(model, rules)
    finally:
        del os.environ["FXPEFT_CAPTURE_CACHE"]
    assert graph_signature(from_file.graph) == graph_signature(from_export.graph)
    randomize_adapters(from_file), randomize_adapters(from_export)
    ids = token_batch()
    torch.testing.assert_close(from_file(ids, labels=ids).loss, from_export(ids, labels=ids).loss,
                               rtol=0, atol=0)


class RenamedLlama(LlamaForCausalLM):
    pass


def _renamed():
    model = tiny_llama()
    model.__class__ = RenamedLlama
    return model


@pytest.mark.parametrize("change", ["config", "class", "transformers", "torch"])
def test_a_changed_config_class_or_version_misses(change, cache_folder, caplog, monkeypatch, llama_file):
    name, text, _ = llama_file
    (cache_folder / name).write_text(text)
    assert captured(tiny_llama(), caplog)[1]
    torch_version, transformers_version = capture_cache._versions()
    model = tiny_llama()
    if change == "config":
        model = tiny_llama(rms_norm_eps=1e-5)
    elif change == "class":
        model = _renamed()
    elif change == "transformers":
        monkeypatch.setattr(capture_cache, "_versions", lambda: (torch_version, "5.99.0"))
    else:
        monkeypatch.setattr(capture_cache, "_versions", lambda: ("2.99.0", transformers_version))
    _, hit, ignored = captured(model, caplog)
    assert not hit and not ignored
    assert len(files(cache_folder)) == 2  # its own file; the first one stays


def _tamper(text: str, how: str) -> bytes:
    if how == "garbage":
        return os.urandom(64)
    if how == "truncated":
        return text[: len(text) // 2].encode()
    data = json.loads(text)
    if how == "another key":
        data["key"] = data["key"] + " "
    elif how == "os.system":
        call = next(n for n in data["nodes"] if n["op"] == "call_function")
        call["target"] = "os.system"
    elif how == "a builtin":
        call = next(n for n in data["nodes"] if n["op"] == "call_function")
        call["target"] = "builtins.eval"
    elif how == "code in a size":
        data["symbols"]["__import__('os').system('false')"] = [2, 2, None]
    elif how == "a later node":
        node = next(n for n in data["nodes"] if n["op"] == "call_function")
        node["args"] = {"tuple": [{"node": data["nodes"][-1]["name"]}]}
    elif how == "a strange tag":
        node = next(n for n in data["nodes"] if n["op"] == "call_function")
        node["args"] = {"tuple": [{"pickle": "gASVAAAAAAAAAAB9lC4="}]}
    return json.dumps(data).encode()


@pytest.mark.parametrize("how", ["garbage", "truncated", "another key", "os.system", "a builtin",
                                 "code in a size", "a later node", "a strange tag"])
def test_a_corrupt_or_tampered_file_is_ignored_and_rewritten(how, cache_folder, caplog, monkeypatch,
                                                            llama_file):
    name, good, fresh = llama_file
    path = cache_folder / name
    path.write_bytes(_tamper(good, how))
    model = tiny_llama()
    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("a file ran code"))
    program, hit, ignored = captured(model, caplog)
    assert not hit and len(ignored) == 1
    assert graph_signature(program.graph) == fresh
    assert path.read_text() == good  # the fresh capture wrote it again
    assert captured(model, caplog)[1]


def test_reading_a_file_never_unpickles(cache_folder, caplog, monkeypatch, llama_file):
    model = tiny_llama()
    (cache_folder / llama_file[0]).write_text(llama_file[1])

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert captured(model, caplog)[1]


def test_writes_are_atomic_and_a_failed_write_leaves_nothing(cache_folder, caplog, monkeypatch):
    model = tiny_llama()

    def fail(*args):
        raise OSError("disk full")
    with monkeypatch.context() as patch:
        patch.setattr(disk_cache.os, "replace", fail)
        program, hit, _ = captured(model, caplog)  # the capture itself goes on
    assert not hit and program.graph_module is not None
    assert files(cache_folder) == []
    assert disk_cache.save(("a key",), program.graph, program.info)
    assert [name.startswith(".tmp") for name in files(cache_folder)] == [False]


@pytest.mark.parametrize("switch", ["0", "memory"])
def test_the_off_switch_writes_nothing(switch, cache_folder, caplog, monkeypatch):
    monkeypatch.setenv("FXPEFT_CAPTURE_CACHE", switch)
    captured(tiny_llama(), caplog)
    assert files(cache_folder) == []


_CHILD = """
import logging, sys
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import tiny_llama
from fxpeft.capture.export import capture
from fxpeft.rules import Rule, Where
logging.basicConfig(level=logging.DEBUG, format="%(message)s", stream=sys.stdout)
logging.getLogger().handlers[0].addFilter(lambda r: r.name == "fxpeft")
capture(tiny_llama())
"""


def test_a_new_process_reads_the_file(cache_folder, llama_file):
    (cache_folder / llama_file[0]).write_text(llama_file[1])
    code = _CHILD.format(root=str(REPO_ROOT), tests=str(REPO_ROOT / "tests"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FXPEFT_CAPTURE_CACHE_DIR": str(cache_folder)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "read from the capture cache file" in out.stdout


@pytest.mark.parametrize("build", [lambda: tiny_llama(num_hidden_layers=4),
                                   lambda: tiny_gpt2(n_layer=4)], ids=["llama", "gpt2"])
def test_the_position_probe_answers_on_the_shallow_copy_as_on_the_whole_model(build):
    """Cold ``rewrite`` probes positions on one layer per kind only (``probe_model``)."""
    from fxpeft.capture import positions
    from fxpeft.capture.export import probe_model
    from fxpeft.capture.hf import example_inputs
    model = build()
    shallow = probe_model(model)
    assert shallow is not model and len(list(shallow.modules())) < len(list(model.modules()))
    inputs = example_inputs(model)
    assert positions.probe(shallow, dict(inputs)) == positions.probe(model, dict(inputs))
    unpadded = {"input_ids": inputs["input_ids"]}
    assert positions.probe(shallow, dict(unpadded)) == positions.probe(model, dict(unpadded))
