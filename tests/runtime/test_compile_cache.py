"""fxpeft's warm-start cache for torch.compile (``fxpeft.runtime.compile_cache``): a first compile in an
empty inductor folder reuses what an earlier compile kept, and the cache never fails a compile."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.callback import CallbackArgs, CallbackTrigger
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

import fxpeft
from fxpeft.runtime import compile_cache
from conftest import tiny_llama, token_batch


COMPILE = CallbackArgs(CallbackTrigger.DYNAMO, "0/0")


def compile_starts() -> None:
    """What Dynamo runs as a compile starts: the callbacks registered with it, fxpeft's among them
    once ``activate`` ran (as every rewrite and fuse runs it)."""
    compile_cache.activate()
    torch._dynamo.callback_handler.run_start_callbacks(COMPILE)


def compile_ends() -> None:
    torch._dynamo.callback_handler.run_end_callbacks(COMPILE)


def _elf(path: Path, whole: bool = True) -> None:
    """A minimal ELF64 file whose section table (2 entries of 64 bytes at offset 100) ends at 228."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, 100)
    struct.pack_into("<HH", header, 0x3A, 64, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(header) + bytes(228 - 64 if whole else 100 - 64))


def _built_since(folder: str, since: float) -> list[str]:
    return [str(p) for p in Path(folder).rglob("*.so") if p.stat().st_mtime >= since]


def _first_compiled_step(gm, ids) -> tuple[torch.Tensor, dict, list[str]]:
    """One compiled training step of ``fuse(gm)`` in an empty inductor folder (in-memory caches
    cleared too): the loss, inductor's FX-graph cache counters, and the libraries g++ built."""
    torch._dynamo.reset()
    counters.clear()
    gm = fxpeft.fuse(gm)
    with fresh_cache():
        folder, start = os.environ["TORCHINDUCTOR_CACHE_DIR"], time.time()
        loss = torch.compile(gm, fullgraph=True)(input_ids=ids, labels=ids).loss
        loss.backward()
        built = _built_since(folder, start)
    gm.zero_grad()
    return loss.detach(), dict(counters["inductor"]), built


@pytest.mark.skipif(not hasattr(torch._dynamo, "callback_handler"), reason="torch without compile callbacks")
def test_a_first_compile_in_an_empty_inductor_folder_starts_from_the_kept_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPEFT_COMPILE_CACHE", str(tmp_path / "store"))
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=1), "lora_qv", dropout=0.0)
    ids = token_batch(2, 8)
    cold_loss, cold, cold_built = _first_compiled_step(gm, ids)
    assert cold.get("fxgraph_cache_miss", 0) >= 2 and cold.get("fxgraph_cache_hit", 0) == 0  # forward, backward
    assert cold_built, "the cold compile built no C++ kernel"
    kept = list(compile_cache.store_folder().rglob("*.so"))
    assert len(kept) >= len(cold_built)
    assert not [p for p in compile_cache.store_folder().rglob("*") if p.name.endswith((".lock", ".tmp"))]

    warm_loss, warm, warm_built = _first_compiled_step(gm, ids)
    assert warm.get("fxgraph_cache_hit", 0) >= 2 and warm.get("fxgraph_cache_miss", 0) == 0
    assert warm_built == [], "g++ ran although the kernels were kept"
    torch.testing.assert_close(warm_loss, cold_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(warm_loss, gm(input_ids=ids, labels=ids).loss.detach(), rtol=1e-5, atol=1e-5)


def test_other_versions_or_another_cpu_use_another_folder(monkeypatch):
    here = compile_cache.store_folder()
    compile_cache.environment_key.cache_clear()
    try:
        monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
        assert compile_cache.store_folder() != here
        monkeypatch.undo()
        compile_cache.environment_key.cache_clear()
        monkeypatch.setattr(compile_cache, "_cpu_flags", lambda: "flags : sse2")
        assert compile_cache.store_folder() != here
    finally:
        monkeypatch.undo()
        compile_cache.environment_key.cache_clear()
    assert compile_cache.store_folder() == here


def test_harvest_keeps_new_whole_files_and_skips_locks_partial_libraries_and_old_files(tmp_path):
    inductor, store = tmp_path / "inductor", tmp_path / "store"
    _elf(inductor / "ab" / "kernel.so")
    _elf(inductor / "cd" / "half_written.so", whole=False)
    (inductor / "locks").mkdir(parents=True)
    (inductor / "locks" / "x.lock").write_text("")
    (inductor / "ab" / "kernel.cpp").write_text("// code")
    (inductor / "fxgraph" / "k").mkdir(parents=True)
    (inductor / "fxgraph" / "k" / "entry").write_bytes(b"pickled")
    old = inductor / "old.py"
    old.write_text("# written before the compile started")
    os.utime(old, (1, 1))
    assert compile_cache.harvest(inductor, store, since=time.time() - 60) == 3
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()) == [
        "ab/kernel.cpp", "ab/kernel.so", "fxgraph/k/entry"]
    assert compile_cache.harvest(inductor, store, since=0.0) == 1  # old.py now; nothing twice


def test_restore_fills_only_what_is_missing(tmp_path):
    store, inductor = tmp_path / "store", tmp_path / "inductor"
    _elf(store / "ab" / "kernel.so")
    (store / "ab" / "kernel.cpp").write_text("// kept")
    (inductor / "ab").mkdir(parents=True)
    (inductor / "ab" / "kernel.cpp").write_text("// inductor's own")
    assert compile_cache.restore(store, inductor) == 1
    assert (inductor / "ab" / "kernel.cpp").read_text() == "// inductor's own"
    assert (inductor / "ab" / "kernel.so").read_bytes() == (store / "ab" / "kernel.so").read_bytes()


def test_the_store_is_held_to_its_size_limit_oldest_first(tmp_path, monkeypatch):
    inductor, store = tmp_path / "inductor", tmp_path / "store"
    monkeypatch.setenv("FXPEFT_COMPILE_CACHE_MB", str(1500 / 2**20))
    inductor.mkdir()
    for age, name in enumerate(["new", "middle", "old"]):
        (inductor / f"{name}.py").write_bytes(b"x" * 1000)
        os.utime(inductor / f"{name}.py", (time.time() - 10 * age,) * 2)
    compile_cache.harvest(inductor, store, since=0.0)
    assert [p.name for p in store.iterdir()] == ["new.py"]


def test_the_cache_never_fails_a_compile_and_is_off_with_0(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FXPEFT_COMPILE_CACHE", str(blocker / "store"))
    with fresh_cache():
        (Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "k.py").write_text("# new")
        compile_starts()
        compile_ends()  # cannot write under a file: logged, not raised
    monkeypatch.setenv("FXPEFT_COMPILE_CACHE", "0")
    assert not compile_cache.enabled()
    with fresh_cache():
        (Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "k.py").write_text("# new")
        compile_starts()
        compile_ends()
    assert not Path("0").exists() and blocker.read_text() == "not a folder"


def test_a_folder_no_compile_started_in_is_never_copied(tmp_path, monkeypatch):
    """A compile that ends in a folder it did not start in (the folder changed mid-way) keeps
    nothing: without a start time, all of a user's inductor cache would be copied."""
    monkeypatch.setenv("FXPEFT_COMPILE_CACHE", str(tmp_path / "store"))
    with fresh_cache():  # the compile starts in this folder
        compile_starts()
        with fresh_cache():  # and ends in another
            (Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "k.py").write_text("# old")
            compile_ends()
    assert not (tmp_path / "store").exists()


def test_a_torch_without_this_callback_api_compiles_without_the_cache(monkeypatch):
    monkeypatch.setattr(torch._dynamo, "callback_handler", object())
    compile_cache.activate()  # no error: the cache is simply not registered
    monkeypatch.delattr(torch._dynamo, "callback_handler")
    compile_cache.activate()


@pytest.mark.skipif(not hasattr(torch._dynamo, "callback_handler"), reason="torch without compile callbacks")
def test_an_unrelated_compile_in_the_same_process_is_left_alone(tmp_path, monkeypatch):
    """A process that built an fxpeft graph registers the callbacks, but a ``torch.compile`` of
    other code keeps nothing in fxpeft's store and restores nothing into its folder."""
    monkeypatch.setenv("FXPEFT_COMPILE_CACHE", str(tmp_path / "store"))
    torch._dynamo.reset()
    fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                   fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))  # registers them
    (compile_cache.store_folder() / "kept.py").parent.mkdir(parents=True)
    (compile_cache.store_folder() / "kept.py").write_text("# an earlier fxpeft compile's")
    with fresh_cache():
        folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        compiled = torch.compile(lambda x: torch.sin(x) * 2 + 1)
        torch.testing.assert_close(compiled(torch.ones(8)), torch.sin(torch.ones(8)) * 2 + 1)
        written = [p for p in folder.rglob("*") if p.is_file()]
        assert written and not (folder / "kept.py").exists()  # nothing restored into its folder
    assert [p.name for p in compile_cache.store_folder().rglob("*") if p.is_file()] == ["kept.py"]
