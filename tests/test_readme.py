"""The README: short, its two set-up commands the ones CI and users run, its tour runs as written."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_readme_is_a_page_not_a_notebook() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; reference material belongs in docs/"


def test_the_readme_bash_blocks_are_exactly_the_two_setup_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]
    assert commands == ["bash tools/install.sh && morphir grow zoo:vgg19 --out run",
                        "bash tools/install.sh && python -m pytest -q"]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text().splitlines()


def test_the_tour_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    block = re.search(r"<!-- tour -->\s*```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "16 4"  # the stem and the last conv of each of stage 1's three blocks
    seed, final = scope["result"].summary()["seed_params"], scope["result"].summary()["final_params"]
    assert printed[1] == f"{seed} -> {final}" and final > seed
    assert scope["wider"].group("stem.0").width == scope["stream"].width + sum(
        c.site.anchor == "stem.0" for c in scope["splits"][:8])
    assert (tmp_path / "grown.onnx").stat().st_size > 0
    assert scope["fast"](torch.randn(2, 1, 8, 8)).shape == (2, 10)
