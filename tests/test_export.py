"""Exports: ONNX files checked in onnxruntime, torch.export programs, compiled copies."""

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import morphir
from morphir.errors import ExportError
from morphir.export import check_onnx, compile, export_onnx, export_program


def zoo_graph(name: str, seed: int = 0) -> morphir.MorphGraph:
    torch.manual_seed(seed)
    return morphir.trace(morphir.zoo.build(name, (1, 8, 8), 10), torch.zeros(1, 1, 8, 8))


def ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@torch.no_grad()
def torch_run(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    was_training = module.training
    module.eval()
    try:
        return module(x).numpy()
    finally:
        module.train(was_training)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


class Histc(torch.nn.Module):
    """aten::histc has no ONNX symbolic: the TorchScript exporter rejects it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.histc(x, bins=4).unsqueeze(0).expand(x.shape[0], 4)


class PinnedBatch(torch.nn.Module):
    """Reshapes with a literal batch size: only a static-shape export is possible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, -1).sum(1)


class DataDependent(torch.nn.Module):
    """Python control flow on a tensor's value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


# -- export_onnx ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vgg19", "resnet20", "mobilenet_v2"])
def test_zoo_models_export_with_a_dynamic_batch(name: str, tmp_path: Path) -> None:
    g = zoo_graph(name)
    g.module.train()  # export runs in eval mode and gives the mode back
    path = export_onnx(g, tmp_path / f"{name}.onnx")
    assert path == tmp_path / f"{name}.onnx" and path.stat().st_size > 1000
    assert g.module.training
    assert leftovers(tmp_path) == []

    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) == 17

    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got, want = ort_run(path, x), torch_run(g.module, x)
    assert got.shape == want.shape == (5, 10)
    assert np.abs(got - want).max() <= 1e-4
    assert check_onnx(path, g) <= 1e-4


def test_a_grown_graph_exports_and_keeps_the_seed_function(tmp_path: Path) -> None:
    g = zoo_graph("resnet20")
    g2 = morphir.apply(g, morphir.candidates(g, "split")[:5])
    assert sum(p.numel() for p in g2.module.parameters()) > sum(p.numel() for p in g.module.parameters())
    path = export_onnx(g2, tmp_path / "grown.onnx")
    assert check_onnx(path, g2, g2.example_inputs) <= 1e-4
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    # the split at θ = 0 keeps the function, and so does the exported file
    assert np.abs(ort_run(path, x) - torch_run(g.module, x)).max() <= 1e-4


def test_a_plain_module_needs_example_inputs(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    with pytest.raises(ExportError, match="example_inputs"):
        export_onnx(net, tmp_path / "net.onnx")
    path = export_onnx(net, tmp_path / "net.onnx", torch.randn(2, 4))
    x = torch.randn(7, 4)
    assert np.abs(ort_run(path, x) - torch_run(net, x)).max() <= 1e-5
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a 0600 temp file


def test_check_onnx_rejects_a_file_from_another_model(tmp_path: Path) -> None:
    path = export_onnx(zoo_graph("resnet20", seed=0), tmp_path / "a.onnx")
    other = zoo_graph("resnet20", seed=1)
    with pytest.raises(ExportError) as info:
        check_onnx(path, other)
    message = str(info.value)
    assert str(path) in message and "more than atol + rtol · max |y|" in message
    worst = float(message.split("max |Δ| = ")[1].split()[0])
    assert worst > 1e-4
    # with a tolerance above the difference the same check passes and returns it
    # (the message is the first batch that fails; the value returned, the worst over both batches)
    assert check_onnx(path, other, atol=10 * worst + 1.0) >= worst * 0.99


def test_a_rejected_op_leaves_the_existing_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportError, match="histc") as info:
        export_onnx(Histc(), path, torch.randn(2, 8))
    assert str(path) in str(info.value)
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


class Drifting(torch.nn.Module):
    """Multiplies by how often it has been called: the exported constant no longer matches torch."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


def test_a_failed_check_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportError, match="Nothing was written"):
        export_onnx(Drifting(), path, torch.randn(2, 4))
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []
    with pytest.raises(ExportError, match="atol must be a finite number"):
        export_onnx(torch.nn.Linear(4, 2), path, torch.randn(2, 4), atol=float("nan"))
    with pytest.raises(ExportError, match="rtol must be a finite number"):
        check_onnx(path, torch.nn.Linear(4, 2), torch.randn(2, 4), rtol=-1.0)


def test_an_exporter_crash_becomes_an_export_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        args[2].write(b"half")  # a partial write before the failure
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(torch.onnx, "export", crash)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportError, match="disk on fire"):
        export_onnx(torch.nn.Linear(4, 2), path, torch.randn(2, 4))
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_an_unwritable_directory_is_an_export_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(ExportError, match="not-a-dir"):
        export_onnx(torch.nn.Linear(4, 2), blocker / "model.onnx", torch.randn(2, 4))
    taken = tmp_path / "taken.onnx"
    taken.mkdir()  # a directory where the file should go: the final move fails
    with pytest.raises(ExportError, match="taken.onnx"):
        export_onnx(torch.nn.Linear(4, 2), taken, torch.randn(2, 4))
    assert taken.is_dir() and leftovers(tmp_path) == []


# -- export_program ---------------------------------------------------------------------------------
def test_export_program_round_trips_with_a_dynamic_batch(tmp_path: Path) -> None:
    g = zoo_graph("resnet20")
    path = export_program(g, tmp_path / "grown.pt2")
    assert path == tmp_path / "grown.pt2" and path.is_file()
    assert leftovers(tmp_path) == []
    loaded = torch.export.load(str(path)).module()
    for batch in (1, 4):
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            got = loaded(x)
        assert got.shape == (batch, 10)
        assert (got - torch.from_numpy(torch_run(g.module, x))).abs().max().item() <= 1e-5


def test_export_program_falls_back_to_a_static_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    with caplog.at_level(logging.WARNING, logger="morphir.export"):
        path = export_program(PinnedBatch(), tmp_path / "pinned.pt2", x)
    assert path is not None and path.is_file()
    assert any("static batch size" in r.getMessage() for r in caplog.records)
    assert torch.allclose(torch.export.load(str(path)).module()(x), PinnedBatch()(x))


def test_export_program_returns_none_and_warns_when_export_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "grown.pt2"
    with caplog.at_level(logging.WARNING, logger="morphir.export"):
        assert export_program(DataDependent(), path, (torch.randn(2, 3),)) is None
    assert not path.exists() and leftovers(tmp_path) == []
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "morphir.export"]
    assert len(warned) == 1 and "torch.export cannot export" in warned[0].getMessage()
    assert str(path) in warned[0].getMessage()


# -- compile ----------------------------------------------------------------------------------------
def test_compile_returns_an_equal_copy_and_leaves_the_input_alone() -> None:
    g = zoo_graph("mobilenet_v2")
    g.module.train()
    before = {k: v.clone() for k, v in g.module.state_dict().items()}
    params = [id(p) for p in g.module.parameters()]

    fast = compile(g, "cpu")
    assert fast is not g.module and not fast.training and g.module.training
    assert not {id(p) for p in fast.parameters()} & set(params)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fast(x), torch.from_numpy(torch_run(g.module, x)))
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(1.0)  # the copy owns its weights
    assert [id(p) for p in g.module.parameters()] == params
    after = g.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_compile_wraps_a_copy_in_torch_compile() -> None:
    # torch.compile compiles at the first call (about 40 s with inductor on this CPU): not called here
    g = zoo_graph("vgg19")
    wrapped = compile(g, torch.device("cpu"), use_torch_compile=True)
    assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert wrapped._orig_mod is not g.module and not wrapped._orig_mod.training


def test_compile_to_cuda_without_cuda_is_an_export_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    g = zoo_graph("vgg19")
    with pytest.raises(ExportError, match="CUDA is not available"):
        compile(g, "cuda")
    with pytest.raises(ExportError, match="not a device"):
        compile(g, "warp-drive")


# -- attention and relative tolerances ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_like", "vit_zero_head", "sdp_attention"])
def test_attention_exports_and_checks_in_onnxruntime(name: str, tmp_path: Path) -> None:
    from lookalikes import LOOKALIKES

    ctor, shape = LOOKALIKES[name]
    torch.manual_seed(0)
    g = morphir.trace(ctor(), torch.randn(2, *shape))
    path = export_onnx(g, tmp_path / f"{name}.onnx")  # checked at two batch sizes before it is written
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not any("MultiHeadAttention" in op for op in ops) and "MatMul" in ops
    assert check_onnx(path, g) <= 1e-5
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["input"]  # no is_causal, no mask input


class BigLogits(torch.nn.Module):
    """Logits near 300, as a grown net's can be: float32 rounding alone differs by ~1e-5 there."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(64, 256)
        self.fc2 = torch.nn.Linear(256, 10)
        with torch.no_grad():
            self.fc2.weight.mul_(400.0)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_the_onnx_check_is_relative_to_each_outputs_scale(tmp_path: Path) -> None:
    net, x = BigLogits(), torch.randn(1, 1, 8, 8)
    path = export_onnx(net, tmp_path / "big.onnx", x)
    worst = check_onnx(path, net, x)
    scale = float(torch_run(net, x).__abs__().max())
    assert scale > 100 and 0 < worst <= 1e-5 + 1e-4 * scale
    with pytest.raises(ExportError, match="more than atol"):  # the same file, held to rtol = 0
        check_onnx(path, net, x, atol=worst / 2, rtol=0.0)
    assert check_onnx(path, net, x, atol=0.0, rtol=10 * worst / scale) == worst
