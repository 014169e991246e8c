"""The bundled tasks where width matters: deterministic, standardised, and runnable from the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

import morphir
from morphir.cli import main
from morphir.load import resolve_model
from morphir.tasks import TEACHER_SEED, build_task, clusters, teacher


def test_teacher_is_one_fixed_teacher_with_inputs_from_the_seed() -> None:
    a, b, a2 = teacher(seed=0), teacher(seed=1), teacher(seed=0)
    assert a.x_train.shape == (4096, 20) and a.y_val.shape == (4096, 10)
    assert torch.equal(a.x_train, a2.x_train) and torch.equal(a.y_train, a2.y_train)
    assert not torch.equal(a.x_train, b.x_train)
    assert abs(float(a.y_train.mean())) < 0.05 and abs(float(a.y_train.std()) - 1) < 0.05
    assert a.kind == "regression" and a.loss is F.mse_loss and a.outputs == 10 and a.seed_widths == (8,)
    # the documented recipe, from the teacher's own generator: the same teacher for every run seed
    gen = torch.Generator().manual_seed(TEACHER_SEED)
    w1, b1 = torch.randn(64, 20, generator=gen) / 20**0.5, torch.randn(64, generator=gen) * 0.5 / 20**0.5
    w2 = torch.randn(10, 64, generator=gen) / 64**0.5
    ref = torch.relu(torch.randn(100_000, 20, generator=gen) @ w1.T + b1) @ w2.T
    t = torch.relu(b.x_val @ w1.T + b1) @ w2.T
    assert torch.allclose((t - ref.mean(0)) / ref.std(0), b.y_val, atol=1e-5)


def test_clusters_is_twenty_classes_split_by_the_seed() -> None:
    a, b = clusters(seed=0), clusters(seed=1)
    assert a.x_train.shape == (8000, 40) and a.x_val.shape == (4000, 40)
    assert a.outputs == 20 and a.kind == "classification" and a.seed_widths == (16, 16)
    assert sorted(torch.cat([a.y_train, a.y_val]).tolist()) == sorted(torch.cat([b.y_train, b.y_val]).tolist())
    assert not torch.equal(a.y_val, b.y_val)
    full = torch.cat([a.x_train, a.x_val])
    assert torch.allclose(full.mean(0), torch.zeros(40), atol=1e-4)
    with pytest.raises(morphir.DataError, match="no bundled task 'imagenet'"):
        build_task("imagenet")


def test_load_data_gives_the_task_with_its_loss_and_seed() -> None:
    data = morphir.load_data("teacher", seed=2, batch_size=128)
    x, y = next(iter(data.train))
    assert x.shape == (128, 20) and y.dtype == torch.float32 and data.loss is F.mse_loss
    assert data.kind == "regression" and data.seed_widths == (8,)
    assert morphir.load_data("clusters").loss is F.cross_entropy
    mlp = resolve_model("zoo:mlp:8,4", input_shape=(20,), num_classes=10)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [8, 4, 10]
    narrow = resolve_model("zoo:vgg19:4", input_shape=(1, 8, 8))
    assert {m.out_channels for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)} == {4}
    with pytest.raises(morphir.LoadError, match="only the mlp takes several widths"):
        resolve_model("zoo:vgg19:8,8", input_shape=(1, 8, 8))


def test_cli_grows_the_mlp_seed_on_a_regression_task(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["grow", "zoo:mlp", "--data", "teacher", "--phases", "2", "--phase-epochs", "1", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and "val accuracy" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed_params"] == 20 * 8 + 8 + 2 * 8 + 8 * 10 + 10  # the task's seed: 8 hidden units
    assert summary["val_accuracy"] is None and summary["val_loss"] < 1.2
    assert (out / "grown.onnx").is_file()


def test_digits_augmented_draws_fresh_training_variants_each_epoch_and_keeps_validation_fixed() -> None:
    task = build_task("digits_augmented", seed=0)
    base, images = task.x_train.shape[0] // 4, task.x_train
    assert torch.equal(images[:base], images[base:2 * base])  # the base images, each 4 times, untransformed
    assert task.x_val.shape == (1436, 1, 8, 8) and torch.equal(task.x_val, build_task("digits_augmented").x_val)
    data = morphir.load_data("digits_augmented", seed=0, batch_size=32)

    def first_batch(epoch_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(epoch_seed)  # what morphir.grow does before every epoch
        return next(iter(data.train))

    (a, ya), (b, yb), (c, _) = first_batch(5), first_batch(5), first_batch(6)
    assert torch.equal(a, b) and torch.equal(ya, yb)  # the same epoch seed: the same batch (resume-safe)
    assert not torch.equal(a, c)
    assert task.train_transform is morphir.tasks.augment and a.shape == (32, 1, 8, 8)
    # a batch holds transformed images: none of them is one of the untransformed inputs
    assert all(not any(torch.equal(x, img) for img in images[:base]) for x in a)
    assert abs(float(a.mean() - images.mean())) < 0.15 and 0.2 < float((a - a.mean()).std()) < 1.0


def test_a_resumed_digits_augmented_run_sees_the_same_variants_and_ends_identical(tmp_path) -> None:
    data = morphir.load_data("digits_augmented", seed=1, batch_size=128)
    settings = dict(progress=False, seed=1, phases=2, phase_epochs=1, score_batches=2)

    def run(out, **kw):
        torch.manual_seed(0)  # the same seed net every time
        return morphir.grow(resolve_model("zoo:vgg19:4", input_shape=(1, 8, 8)), data.train, data.val, data.loss,
                            run_dir=tmp_path / out, **settings, **kw)

    def crash(record):
        if record["phase"] == 1:
            raise RuntimeError("simulated crash")

    full = run("a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("b", on_phase=crash)
    resumed = run("b", resume=True)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in ms]  # noqa: E731
    assert strip(resumed.metrics) == strip(full.metrics) and len(full.metrics) == 2
    sa, sb = full.graph.module.state_dict(), resumed.graph.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full.graph.num_params() > 2374  # it grew from the width-4 seed
