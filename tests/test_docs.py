"""The docs' examples run as written: every `morphir` command of a bash block and every python
block of README.md and docs/*.md (each marked, and each marker tested here); the CLI reference
names every option of every command."""

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch

import morphir
from morphir.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

# every python block of the README and the docs, by page and marker, with the test that runs it
TESTED_BLOCKS = {
    ("README.md", "tour"),                        # tests/test_readme.py
    ("api.md", "api-tour"),
    ("api.md", "grow-api"),
    ("tasks.md", "tasks-api"),
    ("writing-a-morphism.md", "custom-morphism"),
    ("writing-a-morphism.md", "grower-api"),
}


def block(page: str, marker: str) -> str:
    path = ROOT / page if page == "README.md" else DOCS / page
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", path.read_text(), re.S)
    assert match, f"{page} has no python block after <!-- {marker} -->"
    return match.group(1)


def test_every_python_block_is_marked_and_run() -> None:
    found = set()
    for path in PAGES:
        text = path.read_text()
        for m in re.finditer(r"(?:<!-- ([\w-]+) -->\s*)?```python\n", text):
            assert m.group(1), f"{path.name}: a python block without a marker, so no test runs it"
            found.add((path.name, m.group(1)))
    assert found == TESTED_BLOCKS


def test_every_option_of_every_command_is_in_the_cli_reference() -> None:
    reference = (DOCS / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in sub.choices.items():
        assert f"## `morphir {name}`" in reference, name
        missing += [f"{name} {opt}" for a in parser._actions for opt in a.option_strings
                    if opt.startswith("--") and opt != "--help" and f"`{opt}" not in reference]
    assert not missing, f"docs/cli.md does not document {missing}"


def test_only_the_tasks_page_has_commands_to_run() -> None:
    assert all(not commands(p.name) for p in sorted(DOCS.glob("*.md")) if p.name != "tasks.md")


def commands(page: str) -> list[list[str]]:
    text = (DOCS / page).read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    return [shlex.split(line.split("#")[0]) for line in lines if line.startswith("morphir ")]


def test_the_tasks_page_commands_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    found = commands("tasks.md")
    assert len(found) == 4
    for argv in found:
        assert main(argv[1:]) == 0, argv
    seed = 274
    finals = {d: __import__("json").loads((tmp_path / "runs" / d / "summary.json").read_text())["final_params"]
              for d in ("a", "b", "c")}
    assert finals["a"] == 1_066 and abs(finals["b"] - 3 * seed) <= 30 and finals["c"] < finals["b"]


def test_the_tasks_page_python_block_runs(capsys) -> None:
    scope: dict = {}
    exec(compile(block("tasks.md", "tasks-api"), "docs/tasks.md", "exec"), scope)
    assert scope["result"].graph.num_params() == 1_066
    assert capsys.readouterr().out.strip() == "274 -> 1066"


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_every_link_reaches_a_file_and_heading_that_exist(page: str) -> None:
    path = next(p for p in PAGES if p.name == page)
    for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", path.read_text()):
        dest = (path.parent / target) if target else path
        assert dest.exists(), f"{page} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(dest), f"{page} links to {target}#{anchor}, a heading {dest.name} does not have"
    assert morphir.__version__

def test_api_tour_runs() -> None:
    scope: dict = {}
    exec(compile(block("api.md", "api-tour"), "docs/api.md", "exec"), scope)
    assert scope["err"] <= scope["tol"]
    assert scope["grown"].num_params() > scope["graph"].num_params()


def test_grow_api_example_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block("api.md", "grow-api"), "docs/api.md", "exec"), scope)
    result = scope["result"]
    assert [m["phase"] for m in result.metrics] == [1, 2, 3]
    assert (tmp_path / "grown.onnx").stat().st_size > 0 and (tmp_path / "run-api" / "checkpoint.pt").exists()
    assert scope["fast"](torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_custom_morphism_example_passes_the_contract_suite() -> None:
    scope: dict = {}
    exec(compile(block("writing-a-morphism.md", "custom-morphism"), "docs/writing-a-morphism.md", "exec"), scope)
    report = scope["report"]
    assert report.morphism == "sprout"
    assert report.sites == report.checked_alone == report.checked_live > 0


def test_custom_grower_example_runs() -> None:
    scope: dict = {}
    exec(compile(block("writing-a-morphism.md", "grower-api"), "docs/writing-a-morphism.md", "exec"), scope)
    first = scope["result"].metrics[0]
    assert first["applied"] == {"split": 16}  # channel 0 of each of the 16 groups
    assert abs(first["loss_jump"]) < 1e-6  # splits at θ = 0 are exact
