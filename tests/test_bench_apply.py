"""Smoke test of tools/bench_apply.py: a tiny run (sizes 1 and 10, width 8) passes its checks."""

import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import bench_apply  # noqa: E402


def test_small_run_passes_quickly(capsys):
    t0 = time.perf_counter()
    rc = bench_apply.main(["--sizes", "1,10", "--width", "8", "--repeats", "1", "--resnet50-width", "4",
                           "--resnet50-repeats", "1"])
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "all checks passed" in out
    assert "ratio t(1000)" not in out  # the vgg19 ratio bound needs both 100 and 1000
    assert "resnet50 width=4" in out and "t(all = 716)" in out  # every split of the ResNet-50-shaped net
    assert elapsed < 20, f"small benchmark took {elapsed:.1f} s"


def test_choose_is_deterministic_and_spread():
    import morphir
    import torch

    torch.manual_seed(0)
    g = morphir.trace(morphir.zoo.build("vgg19", (3, 32, 32), 10, width=4), torch.randn(1, 3, 32, 32))
    cands = morphir.candidates(g, "split")
    a = bench_apply.choose(cands, 16, seed=0)
    assert a == bench_apply.choose(cands, 16, seed=0)
    assert len(set(a)) == 16
    assert len({c.site.anchor for c in a}) == 16  # one per conv group
