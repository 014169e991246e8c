"""The docs' examples run as written: every `morphir` command of a bash block and every marked
python block of docs/*.md."""

import re
import shlex
from pathlib import Path

import pytest

import morphir
from morphir.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs"


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
    text = (DOCS / "tasks.md").read_text()
    block = re.search(r"<!-- tasks-api -->\s*```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "docs/tasks.md", "exec"), scope)
    assert scope["result"].graph.num_params() == 1_066
    assert capsys.readouterr().out.strip() == "274 -> 1066"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_docs_page_links_to_files_that_exist(page: str) -> None:
    text = (DOCS / page).read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (DOCS / target).exists(), f"{page} links to {target}, which does not exist"
    assert morphir.__version__
