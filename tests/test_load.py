"""Tests for morphir.load: safe loading of torch.save files and zoo specs."""

from __future__ import annotations

import logging
import os
import zipfile

import pytest
import torch
from torch import nn

from morphir.errors import LoadError
from morphir.load import load_model, resolve_model


class CustomBlock(nn.Module):
    """A user-defined class: loading it needs full unpickling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _plain_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )
    # Non-trivial BatchNorm statistics so the buffers are really compared.
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))
    model.eval()
    return model


def _safe_globals_snapshot() -> set[object]:
    # get_safe_globals() returns a list built from a set: compare contents, not order.
    return set(torch.serialization.get_safe_globals())


@pytest.fixture
def plain_file(tmp_path):
    model = _plain_model()
    path = tmp_path / "plain.pt"
    torch.save(model, path)
    return model, path


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------- safe loads


def test_plain_model_round_trip(plain_file):
    model, path = plain_file
    before = _safe_globals_snapshot()
    loaded = load_model(path)
    assert _safe_globals_snapshot() == before  # nothing leaked into global state
    assert type(loaded) is nn.Sequential
    assert [type(m) for m in loaded] == [type(m) for m in model]
    _assert_same_state(model, loaded)
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_mode_is_kept_as_saved(tmp_path):
    model = _plain_model().train()
    path = tmp_path / "train.pt"
    torch.save(model, path)
    assert load_model(str(path)).training is True
    torch.save(model.eval(), path)
    assert load_model(path).training is False


def test_safe_load_does_not_leave_torch_nn_allowed(plain_file):
    _, path = plain_file
    load_model(path)
    # Outside our call, torch's own weights-only load must still refuse the nn classes.
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


def test_transformer_with_functional_activation_loads_safely(tmp_path):
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
    model.eval()
    path = tmp_path / "tr.pt"
    torch.save(model, path)
    loaded = load_model(path)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


# --------------------------------------------------------------------------- unsafe globals


def test_custom_class_is_refused_then_allowed(tmp_path, caplog):
    torch.manual_seed(0)
    model = CustomBlock().eval()
    path = tmp_path / "custom.pt"
    torch.save(model, path)
    qualname = f"{CustomBlock.__module__}.{CustomBlock.__qualname__}"

    before = _safe_globals_snapshot()
    with pytest.raises(LoadError) as info:
        load_model(path)
    assert _safe_globals_snapshot() == before
    msg = str(info.value)
    assert qualname in msg
    assert "--allow-pickle" in msg
    assert "allow_pickle=True" in msg
    assert "trust" in msg
    # torch.nn classes are allowed automatically and so are not listed as a problem.
    assert "torch.nn.modules.conv.Conv2d" not in msg

    with caplog.at_level(logging.WARNING, logger="morphir.load"):
        loaded = load_model(path, allow_pickle=True)
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert type(loaded) is CustomBlock
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert _safe_globals_snapshot() == before


def test_fx_graph_module_needs_allow_pickle(tmp_path):
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    path = tmp_path / "fx.pt"
    torch.save(traced, path)
    with pytest.raises(LoadError, match="torch.fx"):
        load_model(path)
    loaded = load_model(path, allow_pickle=True)
    x = torch.randn(3, 2)
    assert torch.equal(traced(x), loaded(x))


# --------------------------------------------------------------------------- bad files


def _assert_names_path(exc: LoadError, path: os.PathLike | str) -> None:
    assert str(path) in str(exc)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(LoadError) as info:
        load_model(path)
    _assert_names_path(info.value, path)
    assert "does not exist" in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(LoadError) as info:
        load_model(tmp_path)
    _assert_names_path(info.value, tmp_path)
    assert "directory" in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(LoadError) as info:
        load_model(path)
    _assert_names_path(info.value, path)
    assert "empty" in str(info.value)
    assert "torch.save(model, path)" in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_file(plain_file, tmp_path, keep):
    _, good = plain_file
    data = good.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(LoadError) as info:
        load_model(path)
    _assert_names_path(info.value, path)
    assert "truncated" in str(info.value)
    assert info.value.__cause__ is not None  # chained, not swallowed


def test_corrupt_pickle_inside_zip(plain_file, tmp_path):
    _, good = plain_file
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        pickle_bytes = archive.read(name)
    start = data.find(pickle_bytes)
    assert start > 0  # stored uncompressed
    # Garble the pickle stream but keep the zip directory intact.
    data[start + 2 : start + len(pickle_bytes)] = b"\xff" * (len(pickle_bytes) - 2)
    path = tmp_path / "corrupt.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError) as info:
        load_model(path)
    _assert_names_path(info.value, path)
    # found by the archive's checksums before anything is unpickled
    assert "corrupt" in str(info.value) and "data.pkl" in str(info.value) and "checksum" in str(info.value)


def test_a_weight_changed_in_place_is_refused(plain_file, tmp_path):
    _, good = plain_file
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        name = next(n for n in archive.namelist() if "/data/" in n)
        storage = archive.read(name)
    start = data.find(storage)
    assert start > 0
    data[start:start + 8] = bytes(b ^ 0xFF for b in data[start:start + 8])  # same size, other weights
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="does not match its checksum"):
        load_model(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a model\n")
    with pytest.raises(LoadError) as info:
        load_model(path)
    _assert_names_path(info.value, path)
    assert "torch.save" in str(info.value)


def test_other_zip_file(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", "hi")
    with pytest.raises(LoadError) as info:
        load_model(path)
    _assert_names_path(info.value, path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(path))
    with pytest.raises(LoadError, match="TorchScript") as info:
        load_model(path)
    _assert_names_path(info.value, path)


def test_legacy_format(tmp_path):
    model = _plain_model()
    path = tmp_path / "legacy.pt"
    torch.save(model, path, _use_new_zipfile_serialization=False)
    with pytest.raises(LoadError, match="legacy") as info:
        load_model(path)
    assert "--allow-pickle" in str(info.value)
    loaded = load_model(path, allow_pickle=True)
    _assert_same_state(model, loaded)


# --------------------------------------------------------------------------- wrong content


def test_state_dict_is_refused(plain_file, tmp_path):
    model, _ = plain_file
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(LoadError) as info:
        load_model(path)
    msg = str(info.value)
    assert "state_dict" in msg
    assert "torch.save(model, path)" in msg
    assert "zoo:" in msg
    _assert_names_path(info.value, path)


def test_plain_list_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(LoadError) as info:
        load_model(path)
    assert "list" in str(info.value)
    _assert_names_path(info.value, path)


def test_checkpoint_dict_is_refused(plain_file, tmp_path):
    model, _ = plain_file
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model_state_dict": model.state_dict()}, path)
    with pytest.raises(LoadError, match="model_state_dict"):
        load_model(path)


# --------------------------------------------------------------------------- resolve_model


def test_resolve_zoo_model():
    model = resolve_model("zoo:vgg19", input_shape=(1, 8, 8), num_classes=10)
    assert isinstance(model, nn.Module)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_resolve_unknown_zoo_model():
    with pytest.raises(LoadError) as info:
        resolve_model("zoo:nope")
    assert "vgg19" in str(info.value)


def test_resolve_empty_zoo_name():
    with pytest.raises(LoadError) as info:
        resolve_model("zoo:")
    assert "vgg19" in str(info.value)


def test_resolve_path(plain_file):
    model, path = plain_file
    loaded = resolve_model(str(path))
    _assert_same_state(model, loaded)


def test_resolve_missing_path(tmp_path):
    path = tmp_path / "missing.pt"
    with pytest.raises(LoadError) as info:
        resolve_model(str(path))
    _assert_names_path(info.value, path)
