"""Bundled tasks where width matters: generated data, deterministic in the seed, nothing downloaded.

On digits a 35k-parameter seed is within half a point of a net three times its size, so growth
there cannot be told from no growth. These tasks are built so that a wider net does much better
than the seed, which is what a growth method has to close:

* ``teacher``: teacher–student regression as in GradMax (Evci et al. 2022). A fixed teacher
  ``t(x) = relu(x W1ᵀ + b1) W2ᵀ`` with 64 hidden units (its own generator, seed
  :data:`TEACHER_SEED`: ``W1 ~ N(0, 1)/√20`` (64×20), ``b1 ~ N(0, 1)·0.5/√20``,
  ``W2 ~ N(0, 1)/√64`` (10×64)); outputs standardised with the mean and standard deviation of t
  over 100,000 further draws; inputs ``x ~ N(0, I₂₀)``, 4,096 train and 4,096 val drawn from the
  run's seed; mean squared error. Seed: ``zoo:mlp`` with 8 hidden units.
* ``clusters``: scikit-learn's ``make_classification(n_samples=12000, n_features=40,
  n_informative=32, n_redundant=0, n_repeated=0, n_classes=20, n_clusters_per_class=4,
  class_sep=2.0, flip_y=0, random_state=0)``, features standardised, 4,000 val and 8,000 train
  split by the run's seed; cross-entropy. Seed: ``zoo:mlp`` with two hidden layers of 16.

>>> task = morphir.tasks.teacher(seed=0)
>>> task.x_train.shape, task.y_train.shape, task.seed_widths
(torch.Size([4096, 20]), torch.Size([4096, 10]), (8,))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from morphir.errors import DataError

__all__ = ["TASKS", "TEACHER_SEED", "Task", "augment", "build_task", "clusters", "digits_augmented", "digits_tensors",
           "task_names", "teacher"]

TEACHER_SEED = 20_220_131  # the teacher's own generator: the same teacher for every run seed


@dataclass(frozen=True)
class Task:
    """A bundled task's tensors, its loss and the seed network it is grown from.

    ``kind`` is ``"classification"`` (integer labels, cross-entropy, accuracy reported) or
    ``"regression"`` (targets of ``outputs`` numbers, mean squared error); ``seed_model`` is the
    model spec of the seed it is grown from (``seed_widths``: the hidden widths of a ``zoo:mlp`` seed).
    ``train_transform``, where set, is applied to every training batch's inputs as it is drawn
    (fresh random variants each epoch, from torch's global generator, which :func:`morphir.grow`
    seeds before every epoch); ``x_train`` then holds the untransformed inputs.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    kind: str
    seed_widths: tuple[int, ...]
    seed_model: str = ""
    train_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.seed_model:
            object.__setattr__(self, "seed_model", "zoo:mlp:" + ",".join(map(str, self.seed_widths)))

    @property
    def loss(self) -> Callable[..., torch.Tensor]:
        """The task's mean loss, ``loss(output, y)``."""
        return F.cross_entropy if self.kind == "classification" else F.mse_loss

    @property
    def outputs(self) -> int:
        """Outputs the model needs: classes, or target dimensions."""
        if self.kind == "classification":
            return int(max(self.y_train.max(), self.y_val.max())) + 1
        return int(self.y_train.shape[1])


def teacher(*, seed: int = 0, n_train: int = 4096, n_val: int = 4096) -> Task:
    """The teacher–student regression task (module docstring); inputs drawn from ``seed``.

    >>> teacher(seed=1).y_val.std(0).mean()   # standardised targets
    tensor(0.99)
    """
    gen = torch.Generator().manual_seed(TEACHER_SEED)
    w1 = torch.randn(64, 20, generator=gen) / 20**0.5
    b1 = torch.randn(64, generator=gen) * 0.5 / 20**0.5
    w2 = torch.randn(10, 64, generator=gen) / 64**0.5

    def t(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w1.T + b1) @ w2.T

    reference = t(torch.randn(100_000, 20, generator=gen))
    mean, std = reference.mean(0), reference.std(0)
    draw = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, 20, generator=draw)
    y = (t(x) - mean) / std
    return Task("teacher", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "regression", (8,))


def clusters(*, seed: int = 0) -> Task:
    """The 20-class clusters task (module docstring); the train/val split drawn from ``seed``.

    >>> clusters(seed=0).outputs
    20
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=12000, n_features=40, n_informative=32, n_redundant=0, n_repeated=0,
                               n_classes=20, n_clusters_per_class=4, class_sep=2.0, flip_y=0, random_state=0)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = order[:4000], order[4000:]
    return Task("clusters", x[train], y[train], x[val], y[val], "classification", (16, 16))


def augment(images: torch.Tensor, copies: int = 1, gen: torch.Generator | None = None) -> torch.Tensor:
    """``copies`` random variants of each image (N, C, H, W): rotation ±15°, scale 0.9–1.1, shift
    ±1 pixel (bilinear, zero padding), then N(0, 0.25²) noise; variant-major, so row ``k·N + i`` is
    variant k of image i. Drawn from ``gen``, or from torch's global generator when it is None.

    >>> augment(torch.rand(5, 1, 8, 8), 3, torch.Generator().manual_seed(0)).shape
    torch.Size([15, 1, 8, 8])
    """
    n, _, h, w = images.shape
    m = n * copies
    angle = (torch.rand(m, generator=gen) * 2 - 1) * (15 * torch.pi / 180)
    scale = 0.9 + 0.2 * torch.rand(m, generator=gen)
    shift = (torch.rand(m, 2, generator=gen) * 2 - 1) * torch.tensor([2 / w, 2 / h])  # ±1 px in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    src = images.repeat(copies, 1, 1, 1)
    grid = F.affine_grid(theta, list(src.shape), align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + 0.25 * torch.randn(out.shape, generator=gen)


def digits_tensors(*, seed: int = 0, val_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: images scaled to [0, 1] as (N, 1, 8, 8) float32, labels int64.

    The split is a fixed permutation drawn from ``seed``.

    >>> xt, yt, xv, yv = digits_tensors(seed=0)
    >>> xt.shape, xv.shape
    (torch.Size([1438, 1, 8, 8]), torch.Size([359, 1, 8, 8]))
    """
    from sklearn.datasets import load_digits  # scikit-learn's bundled data (imported only when used)

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def digits_augmented(*, seed: int = 0, copies: int = 4) -> Task:
    """Digits made harder for a small convolutional net: scikit-learn's 8×8 digits split as
    :func:`digits_tensors` splits them (by ``seed``); each epoch sees every training
    image ``copies`` times, each time a fresh random variant (:func:`augment` as the
    ``train_transform``), and the validation set is ``copies`` fixed variants of each validation
    image (drawn from ``seed``); cross-entropy. Seed: ``zoo:vgg19`` at width 4.

    Fresh variants each epoch, as augmentation is used in practice: the training set cannot be
    memorised, and the gap between the seed and a 4× wider net is wider than with variants drawn
    once (docs/tasks.md).

    >>> task = digits_augmented(seed=0)
    >>> task.x_train.shape, task.x_val.shape
    (torch.Size([5752, 1, 8, 8]), torch.Size([1436, 1, 8, 8]))
    """
    xt, yt, xv, yv = digits_tensors(seed=seed)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    return Task("digits_augmented", xt.repeat(copies, 1, 1, 1), yt.repeat(copies), augment(xv, copies, gen),
                yv.repeat(copies), "classification", (), "zoo:vgg19:4", train_transform=augment)


TASKS: dict[str, Callable[..., Task]] = {"teacher": teacher, "clusters": clusters,
                                         "digits_augmented": digits_augmented}


def task_names() -> list[str]:
    """The bundled tasks' names.

    >>> task_names()
    ['teacher', 'clusters', 'digits_augmented']
    """
    return list(TASKS)


def build_task(name: str, *, seed: int = 0) -> Task:
    """The bundled task called ``name`` for run seed ``seed``.

    >>> build_task("clusters", seed=3).x_train.shape
    torch.Size([8000, 40])
    """
    if name not in TASKS:
        raise DataError(f"no bundled task {name!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[name](seed=seed)
