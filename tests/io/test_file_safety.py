"""Saving adapter folders: atomic replacement (also under SIGKILL), umask permissions, exact
configs or an error, and loading plain modules that need example_inputs / leaf_modules."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
import torch

import fxpeft
import fxpeft.io.folders as folders
import fxpeft.io.serialize as serialize
from conftest import randomize_adapters
from fxpeft.rules import LoraParams, Rule, Where

FILES = ["adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml"]


class Attention(torch.nn.Module):
    """Two LoRA sites (q_proj, v_proj) and one that lora_qv leaves alone."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.q_proj(x) * self.v_proj(x))


class Net(torch.nn.Module):
    """A plain module symbolic_trace captures in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([Attention(), Attention()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def adapted(seed: int, **overrides) -> fxpeft.AdaptedModule:
    gm = fxpeft.rewrite(Net(), "lora_qv", **{"r": 2, **overrides})
    randomize_adapters(gm, seed)
    return gm.eval()


def same_adapter(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same adapter tensors and the same outputs (which also compares the scale)."""
    sa, sb = fxpeft.adapter_state_dict(a), fxpeft.adapter_state_dict(b)
    with torch.no_grad():
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) \
            and torch.equal(a(X), b(X))


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def old():
    return adapted(seed=1, alpha=16)


@pytest.fixture(scope="module")
def new():
    return adapted(seed=2, alpha=4)  # another scale: new weights under the old config differ


# --- replacing a folder ------------------------------------------------------------------------

def test_save_replaces_the_whole_folder_and_leaves_nothing_beside_it(tmp_path, old, new):
    folder = fxpeft.save(old, tmp_path / "a")
    (folder / "README.md").write_text("stale model card")
    fxpeft.save(new, folder)
    assert sorted(p.name for p in folder.iterdir()) == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert same_adapter(fxpeft.load(Net(), folder), new)


def _fail_second_rename(monkeypatch):
    """Both os.rename and os.replace: the second call fails (whichever a save uses to publish)."""
    calls = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def flaky(src, dst, *args, _real=real, **kwargs):
            calls.append((src, dst))
            if len(calls) == 2:
                raise OSError("disk full")
            return _real(src, dst, *args, **kwargs)
        monkeypatch.setattr(os, name, flaky)


def test_a_save_that_fails_while_publishing_leaves_the_old_folder(tmp_path, monkeypatch, old, new):
    folder = fxpeft.save(old, tmp_path / "a")
    before = folder_bytes(folder)
    _fail_second_rename(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        fxpeft.save(new, folder)
    monkeypatch.undo()
    assert folder_bytes(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert same_adapter(fxpeft.load(Net(), folder), old)


@pytest.mark.parametrize("case", ["a subfolder", "not an adapter folder", "a file"])
def test_save_never_replaces_what_is_not_an_adapter_folder(tmp_path, old, case):
    target = tmp_path / "a"
    if case == "a file":
        target.write_text("mine")
    elif case == "a subfolder":
        (target / "other").mkdir(parents=True)
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(fxpeft.AdapterFileError, match=str(target)):
        fxpeft.save(old, target)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_folder_and_files_follow_the_umask(tmp_path, old, umask):
    previous = os.umask(umask)
    try:
        folder = fxpeft.save(old, tmp_path / "a")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~umask}


def test_save_through_a_symlink_keeps_the_link(tmp_path, old, new):
    real = fxpeft.save(old, tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    fxpeft.save(new, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert same_adapter(fxpeft.load(Net(), tmp_path / "link"), new)


# --- SIGKILL at every step of a save ------------------------------------------------------------

def _pause_at_every_step(monkeypatch, announce, resume) -> None:
    """In the child: before and after every call that touches the disk, say so and wait."""
    def step(label: str) -> None:
        os.write(announce, label.encode()[:200] + b"\n")
        os.read(resume, 1)

    def pausing(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            step(f"before {name}")
            result = real(*args, **kwargs)
            step(f"after {name}")
            return result
        monkeypatch.setattr(owner, name, wrapper)
    for name in ("mkdir", "rename", "replace", "unlink", "rmdir", "fsync"):
        pausing(os, name)
    pausing(serialize, "save_file")
    pausing(type(serialize.Path()), "write_bytes")
    pausing(type(serialize.Path()), "write_text")


def _save_in_a_child(gm, folder, stop_at: int, monkeypatch) -> list[str]:
    """Fork a child that saves ``gm``; SIGKILL it at its ``stop_at``-th step. Returns the steps
    it announced (all of them when it finished first)."""
    announce_r, announce_w = os.pipe()
    resume_r, resume_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(announce_r)
            _pause_at_every_step(monkeypatch, announce_w, resume_r)
            fxpeft.save(gm, folder)
            os.write(announce_w, b"done\n")
            code = 0
        finally:
            os._exit(code)
    os.close(announce_w)
    steps, killed = [], False
    with os.fdopen(announce_r) as lines:
        for line in lines:
            if line.strip() == "done":
                break
            steps.append(line.strip())
            if len(steps) == stop_at:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            os.write(resume_w, b"x")
    _, status = os.waitpid(pid, 0)
    assert killed or os.waitstatus_to_exitcode(status) == 0, "the child's save failed"
    os.close(resume_w)
    os.close(resume_r)
    return steps


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Fail, rather than hang the suite, if the block blocks (a stuck child, a FIFO)."""
    def expired(*_):
        raise TimeoutError(f"{what} took over {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def aside_of(folder: Path) -> Path:
    """Where a save keeps the old folder between its two renames, the name the save protocol
    documents (fxpeft/io/folders.py): ``.<name>.fxpeft-old`` beside it."""
    folder = folder.resolve()
    return folder.with_name(f".{folder.name}.fxpeft-old")


def _complete(folder, gm) -> bool:
    return folder.is_dir() and sorted(p.name for p in folder.iterdir()) == FILES and \
        same_adapter(fxpeft.load(Net(), folder), gm)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_killed_save_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, old, new):
    folder = tmp_path / "a"
    stop_at, outcomes, states = 1, [], set()
    while True:
        fxpeft.save(old, folder)  # also finishes what the previous killed save left
        assert [p.name for p in tmp_path.iterdir()] == ["a"]
        with deadline(60, "a forked save"):
            steps = _save_in_a_child(new, folder, stop_at, monkeypatch)
        if len(steps) < stop_at:  # the child finished before this step: every step was tried
            break
        loaded = fxpeft.load(Net(), folder)  # never an error, never a mix
        outcomes.append("old" if same_adapter(loaded, old) else "new" if same_adapter(loaded, new)
                        else f"a mix after {steps[-1]}")
        on_disk = "old" if _complete(folder, old) else "new" if _complete(folder, new) else \
            "old aside" if not folder.exists() and _complete(aside_of(folder), old) \
            else "?"
        assert on_disk in ("old", "new", "old aside"), (stop_at, steps[-1])
        states.add(on_disk)
        stop_at += 1
    assert set(outcomes) == {"old", "new"} and states == {"old", "new", "old aside"}, outcomes
    assert len(outcomes) >= 10  # the protocol's steps were each interrupted
    assert same_adapter(fxpeft.load(Net(), folder), new)
    fxpeft.save(new, folder)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_a_read_overlapping_a_save_sees_one_version(tmp_path, monkeypatch, old, new):
    """A save swaps the folder between two of load's file reads: load still returns one of
    the two adapters, whichever read it was."""
    for reads_before_save in (1, 2, 3):
        folder = fxpeft.save(old, tmp_path / f"a{reads_before_save}")
        real, count = folders._read_member, []

        def read_then_save(*args, **kwargs):
            data = real(*args, **kwargs)
            count.append(1)
            if len(count) == reads_before_save:
                fxpeft.save(new, folder)
            return data
        monkeypatch.setattr(folders, "_read_member", read_then_save)
        loaded = fxpeft.load(Net(), folder)
        monkeypatch.undo()
        assert same_adapter(loaded, old) or same_adapter(loaded, new), reads_before_save


def test_load_falls_back_to_the_old_folder_between_the_two_renames(tmp_path, old):
    folder = fxpeft.save(old, tmp_path / "a")
    os.rename(folder, aside_of(folder))  # a save killed between its renames
    assert same_adapter(fxpeft.load(Net(), folder), old)


# --- nothing lossy -----------------------------------------------------------------------------

def _two_dropouts() -> fxpeft.AdaptedModule:
    rules = [Rule(where=Where(path=[r"q_proj$"]), params=LoraParams(r=2, dropout=0.1)),
             Rule(where=Where(path=[r"v_proj$"]), params=LoraParams(r=2, dropout=0.2))]
    return fxpeft.rewrite(Net(), rules)


def _nan_alpha() -> fxpeft.AdaptedModule:
    return fxpeft.rewrite(Net(), Rule(where=Where(path=[r"q_proj$"]),
                                      params=LoraParams(r=2, alpha=float("nan"))))


@pytest.mark.parametrize("make, why", [(_two_dropouts, "one lora_dropout"),
                                       (_nan_alpha, "lora_alpha = nan cannot be written as JSON")])
@pytest.mark.parametrize("existing", [False, True])
def test_a_config_that_cannot_be_written_exactly_is_an_error_and_writes_nothing(
        tmp_path, old, make, why, existing):
    folder = tmp_path / "a"
    if existing:
        fxpeft.save(old, folder)
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(fxpeft.FxpeftError, match=why) as err:
        fxpeft.save(make(), folder)
    assert str(folder / "adapter_config.json") in str(err.value)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == (["a"] if existing else [])


def test_saved_weights_carry_a_digest_that_load_checks(tmp_path, old):
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = fxpeft.save(old, tmp_path / "a") / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as file:
        assert file.metadata() == {"format": "pt",
                                   "fxpeft_sha256": serialize.tensor_digest(load_file(str(path)))}
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(fxpeft.AdapterFileError, match=f"{path}: damaged"):
        fxpeft.load(Net(), path.parent)


# --- example_inputs and leaf_modules ------------------------------------------------------------

class ShapeBranch(torch.nn.Module):
    """Control flow on a shape: symbolic_trace fails, torch.export (with example inputs) works."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.v_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 8:
            return self.q_proj(x) + self.v_proj(x)
        return x


class SignGate(torch.nn.Module):
    """Data-dependent control flow: neither frontend traces it, unless it is a leaf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class WithGate(ShapeBranch):
    def __init__(self) -> None:
        super().__init__()
        self.gate = SignGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.q_proj(x)) + self.v_proj(x)


@pytest.mark.parametrize("make, capture", [(ShapeBranch, {"example_inputs": (X,)}),
                                           (WithGate, {"leaf_modules": (SignGate,)})])
def test_load_captures_with_example_inputs_and_leaf_modules(tmp_path, make, capture):
    gm = fxpeft.rewrite(make(), "lora_qv", r=2, **capture)
    randomize_adapters(gm)
    folder = fxpeft.save(gm.eval(), tmp_path / "a")
    with pytest.raises(fxpeft.CaptureError):
        fxpeft.load(make(), folder)
    loaded = fxpeft.load(make(), folder, **capture)
    with torch.no_grad():
        assert torch.equal(loaded(X), gm(X))
    with pytest.raises(fxpeft.FxpeftError, match="already an fxpeft graph"):
        fxpeft.load(loaded, folder, adapter="again", **capture)


# --- a killed save never resurrects a partial folder (issue 24, item 7) ------------------------

class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing after it runs, no handler catches it."""


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_save_killed_while_deleting_the_old_folder_never_brings_it_back(tmp_path, monkeypatch,
                                                                           old, new):
    folder = fxpeft.save(old, tmp_path / "a")
    real, deleted = os.unlink, []

    def dies_after_the_first_delete(path, *args, **kwargs):
        if deleted:
            raise Killed
        deleted.append(path)
        real(path, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", dies_after_the_first_delete)
    with pytest.raises(Killed):
        fxpeft.save(new, folder)  # killed in step 4, after the config of the old folder went
    monkeypatch.undo()
    assert Path(deleted[0]).name == "adapter_config.json"
    assert _complete(folder, new)  # the save itself had succeeded
    assert not aside_of(folder).exists()  # what is half-deleted is never the set-aside folder
    shutil.rmtree(folder)  # the user removes the adapter folder
    with pytest.raises(fxpeft.AdapterFileError):  # load reads no partial old adapter
        fxpeft.load(Net(), folder)
    fxpeft.save(old, folder)  # the tidy-up puts nothing partial into place, and removes it
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert same_adapter(fxpeft.load(Net(), folder), old)


@pytest.mark.parametrize("left", [["adapter_model.safetensors", "fxpeft_rules.toml"],
                                  ["fxpeft_rules.toml"]])
def test_a_half_deleted_set_aside_folder_is_removed_not_put_back(tmp_path, old, new, left):
    """What an older fxpeft left when killed while deleting the set-aside folder in place (its
    config first), after the user removed the adapter folder: never read, never put back."""
    folder = fxpeft.save(old, tmp_path / "a")
    os.rename(folder, aside_of(folder))
    for name in set(FILES) - set(left):
        (aside_of(folder) / name).unlink()
    with pytest.raises(fxpeft.AdapterFileError):
        fxpeft.load(Net(), folder)
    fxpeft.save(new, folder)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert _complete(folder, new)


def test_a_complete_set_aside_folder_is_still_put_back(tmp_path, old):
    folder = fxpeft.save(old, tmp_path / "a")
    on_disk = _tree(folder)
    os.rename(folder, aside_of(folder))  # a save killed between its two renames
    folders._tidy(folders._target(folder))
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and _tree(folder) == on_disk


def test_saving_below_a_file_is_a_one_line_error(tmp_path, old):
    (tmp_path / "a_file").write_text("mine")
    before = _tree(tmp_path)
    target = tmp_path / "a_file" / "sub"
    with pytest.raises(fxpeft.AdapterFileError) as err:
        fxpeft.save(old, target)
    assert str(err.value) == (f"{target}: cannot be made, {tmp_path / 'a_file'} is a file, not a "
                              f"folder; save to a path whose folders are folders")
    assert _tree(tmp_path) == before
    with pytest.raises(fxpeft.AdapterFileError, match="is a file, not a folder"):
        fxpeft.save(old, tmp_path / "a_file" / "sub" / "deeper")
    assert _tree(tmp_path) == before
