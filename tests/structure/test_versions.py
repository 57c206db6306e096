"""The dependency ranges fxpeft declares are the ones it checks: pyproject.toml's torch,
transformers and bitsandbytes bounds equal ``fxpeft.capture.versions.TESTED``, and a version
outside them is a one-line ``VersionError`` at ``rewrite`` (the model untouched), or a warning
with ``FXPEFT_UNTESTED_VERSIONS=1``."""

import tomllib

import pytest
import torch

import fxpeft
from conftest import REPO_ROOT, tiny_llama
from fxpeft.capture import versions
from fxpeft.capture.versions import TESTED, VersionError


def declared() -> dict[str, str]:
    """package -> its specifier in pyproject.toml (dependencies and the bnb extra)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["bnb"]]
    found = {}
    for line in lines:
        name = line.split(">")[0].split("<")[0].split("=")[0].strip()
        found[name] = line[len(name):].strip()
    return found


def test_pyproject_declares_the_ranges_fxpeft_checks():
    if not (REPO_ROOT / "pyproject.toml").exists():
        pytest.skip("pyproject.toml is not beside the tests (the suite copied outside the checkout)")
    specs = declared()
    for package, (low, high) in TESTED.items():
        assert set(specs[package].split(",")) == {f">={low}", f"<{high}"}, package


@pytest.mark.parametrize("package, version", [("transformers", "5.17.0"), ("transformers", "5.26.0"),
                                              ("torch", "2.10.0"), ("torch", "2.14.0+cpu")])
def test_a_version_outside_the_range_is_a_one_line_error_at_rewrite(monkeypatch, package, version):
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda name: version if name == package else real(name))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VersionError, match=rf"^{package} {version.replace('+', '[+]')} is outside the "
                                           rf"versions fxpeft is tested with \(>={TESTED[package][0]},"
                                           rf"<{TESTED[package][1]}\); install a tested one") as err:
        fxpeft.rewrite(model, "lora_qv.toml")
    assert "\n" not in str(err.value) and isinstance(err.value, fxpeft.FxpeftError)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    monkeypatch.setenv("FXPEFT_UNTESTED_VERSIONS", "1")
    with pytest.warns(UserWarning, match=f"{package} .* is outside"):
        fxpeft.rewrite(model, "lora_qv.toml")


def test_bitsandbytes_is_checked_only_once_a_model_imports_it(monkeypatch):
    monkeypatch.setattr(versions, "installed", lambda name: "0.40.0" if name == "bitsandbytes"
                        else {"torch": "2.13.0", "transformers": "5.25.0"}[name])
    monkeypatch.delitem(versions.sys.modules, "bitsandbytes", raising=False)
    versions.check_versions()
    monkeypatch.setitem(versions.sys.modules, "bitsandbytes", object())
    with pytest.raises(VersionError, match="bitsandbytes 0.40.0 is outside"):
        versions.check_versions()
