"""The seed zoo: small, randomly initialised CNNs to start growing from.

Every model here is a plain :class:`torch.nn.Module` made of standard layers
(``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU``, ...) and is traceable by
:func:`torch.fx.symbolic_trace`: all shape-dependent decisions (strides, pools,
the classifier's input size) are taken in ``__init__`` from ``input_shape``, so
``forward`` has no control flow.

Example::

    >>> import torch
    >>> from morphir import zoo
    >>> zoo.names()
    ['densenet', 'mlp', 'mobilenet_v1', 'mobilenet_v2', 'resnet20', 'vgg19']
    >>> model = zoo.build("resnet20", input_shape=(3, 32, 32), num_classes=10)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import torch
from torch import nn

from morphir.errors import LoadError

__all__ = [
    "names",
    "build",
    "VGG19",
    "MobileNetV1",
    "ResNet20",
    "MobileNetV2",
    "DenseNet",
    "MLP",
]


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _scaled(channels: int, width: int, base: int) -> int:
    """Scale a reference channel count by ``width / base`` (at least 1)."""
    return max(1, round(channels * width / base))


def _can_downsample(h: int, w: int) -> bool:
    """Whether a stride-2 op / 2x2 pool still makes sense on an ``h x w`` map."""
    return min(h, w) >= 2


def _strided_size(size: int, stride: int) -> int:
    """Output size of a 3x3/pad-1 or 1x1/pad-0 conv with ``stride``."""
    return (size - 1) // stride + 1


def _conv_bn(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    act: Callable[[], nn.Module] | None = None,
) -> nn.Sequential:
    """``Conv2d`` (no bias, 'same' padding) + ``BatchNorm2d`` [+ activation]."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """A residual block's shortcut: the identity, or a 1x1 conv + BN where the shape changes."""
    return _conv_bn(in_ch, out_ch, 1, stride=stride) if stride != 1 or in_ch != out_ch else nn.Identity()


def _residual_stages(ch: int, h: int, w: int, widths: Sequence[int], counts: Sequence[int],
                     block: Callable[[int, int, int], nn.Module], expansion: int = 1) -> tuple[nn.Sequential, int]:
    """Stages of residual blocks: ``counts[i]`` blocks ``block(in, width, stride)`` of ``widths[i]``,
    each stage after the first starting with stride 2 while the map can still shrink; returns the
    stages and their output channels (``expansion`` times the last width)."""
    stages: list[nn.Module] = []
    for index, (width, count) in enumerate(zip(widths, counts)):
        blocks: list[nn.Module] = []
        for b in range(count):
            stride = 2 if index > 0 and b == 0 and _can_downsample(h, w) else 1
            blocks.append(block(ch, width, stride))
            ch = width * expansion
            h, w = _strided_size(h, stride), _strided_size(w, stride)
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages), ch


def _relu() -> nn.Module:
    return nn.ReLU(inplace=False)


def _relu6() -> nn.Module:
    return nn.ReLU6(inplace=False)


# ---------------------------------------------------------------------------
# VGG-19
# ---------------------------------------------------------------------------


class VGG19(nn.Module):
    """VGG-19 layout (2, 2, 4, 4, 4 convs) with one constant width.

    Every conv is 3x3/pad 1 followed by BatchNorm and ReLU. A ``MaxPool2d(2)``
    closes a stage only while the spatial size is still >= 2. The head flattens
    the final feature map (no global pooling) into a single ``nn.Linear``.

    Example: ``VGG19(input_shape=(3, 32, 32), num_classes=10, width=16)``.
    """

    STAGE_DEPTHS: tuple[int, ...] = (2, 2, 4, 4, 4)
    DEFAULT_WIDTH = 16

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        width: int = DEFAULT_WIDTH,
    ) -> None:
        super().__init__()
        in_ch, h, w = input_shape
        layers: list[nn.Module] = []
        for depth in self.STAGE_DEPTHS:
            for _ in range(depth):
                layers.append(_conv_bn(in_ch, width, 3, act=_relu))
                in_ch = width
            if _can_downsample(h, w):
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------
# MobileNet v1
# ---------------------------------------------------------------------------


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.depthwise = _conv_bn(in_ch, in_ch, 3, stride=stride, groups=in_ch, act=_relu)
        self.pointwise = _conv_bn(in_ch, out_ch, 1, act=_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    """A small MobileNet v1: stem conv, six depthwise-separable blocks, pool, linear.

    Block widths are 64, 64, 128, 128, 128, 128 for the default width 32
    (scaled by ``width / 32``); blocks 2, 4 and 6 downsample while the spatial
    size is still >= 2.

    Example: ``MobileNetV1(input_shape=(3, 32, 32), num_classes=10, width=32)``.
    """

    # (output channels at base width, requested stride)
    BLOCKS: tuple[tuple[int, int], ...] = (
        (64, 1),
        (64, 2),
        (128, 1),
        (128, 2),
        (128, 1),
        (128, 2),
    )
    DEFAULT_WIDTH = 32

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        width: int = DEFAULT_WIDTH,
    ) -> None:
        super().__init__()
        in_ch, h, w = input_shape
        self.stem = _conv_bn(in_ch, width, 3, act=_relu)
        ch = width
        blocks: list[nn.Module] = []
        for base_out, stride in self.BLOCKS:
            stride = stride if _can_downsample(h, w) else 1
            out = _scaled(base_out, width, self.DEFAULT_WIDTH)
            blocks.append(DepthwiseSeparable(ch, out, stride))
            ch = out
            h, w = _strided_size(h, stride), _strided_size(w, stride)
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------
# ResNet-20 (CIFAR)
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn with an identity or 1x1-conv+BN shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = _relu()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20: stem + 3 stages x 3 BasicBlocks (16, 32, 64 wide).

    Stages 2 and 3 start with stride 2 while the spatial size is still >= 2.
    The head is a global average pool (``x.mean((2, 3))``) and a linear layer.

    Example: ``ResNet20(input_shape=(3, 32, 32), num_classes=10, width=16)``.
    """

    STAGE_WIDTHS: tuple[int, ...] = (16, 32, 64)
    BLOCKS_PER_STAGE = 3
    DEFAULT_WIDTH = 16

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        width: int = DEFAULT_WIDTH,
    ) -> None:
        super().__init__()
        in_ch, h, w = input_shape
        self.stem = _conv_bn(in_ch, width, 3, act=_relu)
        widths = [_scaled(base, width, self.DEFAULT_WIDTH) for base in self.STAGE_WIDTHS]
        self.stages, ch = _residual_stages(width, h, w, widths, [self.BLOCKS_PER_STAGE] * len(widths), BasicBlock)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = x.mean((2, 3))
        return self.classifier(x)


# ---------------------------------------------------------------------------
# MobileNet v2
# ---------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """[1x1 expand + BN + ReLU6] -> depthwise 3x3 + BN + ReLU6 -> 1x1 project + BN.

    The expand conv is skipped for expansion factor 1; a residual ``+`` is
    added when the stride is 1 and the channel count is unchanged.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn(in_ch, hidden, 1, act=_relu6))
        layers.append(_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden, act=_relu6))
        layers.append(_conv_bn(hidden, out_ch, 1))
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.use_residual:  # a Python bool fixed in __init__, not a tensor
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """A small MobileNet v2: stem, five inverted residual blocks, 1x1 conv, pool, linear.

    Blocks (expansion, channels, stride) at the default width 16 are
    (1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1); blocks 1, 3
    and 5 carry residual connections. The last 1x1 conv widens to 128.

    Example: ``MobileNetV2(input_shape=(3, 32, 32), num_classes=10, width=16)``.
    """

    # (expansion factor, output channels at base width, requested stride)
    BLOCKS: tuple[tuple[int, int, int], ...] = (
        (1, 16, 1),
        (4, 24, 2),
        (4, 24, 1),
        (4, 32, 2),
        (4, 32, 1),
    )
    LAST_CHANNELS = 128
    DEFAULT_WIDTH = 16

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        width: int = DEFAULT_WIDTH,
    ) -> None:
        super().__init__()
        in_ch, h, w = input_shape
        self.stem = _conv_bn(in_ch, width, 3, act=_relu6)
        ch = width
        blocks: list[nn.Module] = []
        for expansion, base_out, stride in self.BLOCKS:
            stride = stride if _can_downsample(h, w) else 1
            out = _scaled(base_out, width, self.DEFAULT_WIDTH)
            blocks.append(InvertedResidual(ch, out, stride, expansion))
            ch = out
            h, w = _strided_size(h, stride), _strided_size(w, stride)
        self.features = nn.Sequential(*blocks)
        last = _scaled(self.LAST_CHANNELS, width, self.DEFAULT_WIDTH)
        self.head_conv = _conv_bn(ch, last, 1, act=_relu6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_conv(self.features(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------
# DenseNet-BC (small)
# ---------------------------------------------------------------------------


def _bn_relu_conv(in_ch: int, out_ch: int, kernel_size: int) -> nn.Sequential:
    """Pre-activation unit: BN + ReLU + conv (no bias, 'same' padding)."""
    return nn.Sequential(
        nn.BatchNorm2d(in_ch),
        _relu(),
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
    )


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4g)-BN-ReLU-conv3x3(g); output concatenated to the input."""

    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.bottleneck = _bn_relu_conv(in_ch, 4 * growth, 1)
        self.conv = _bn_relu_conv(4 * growth, growth, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv(self.bottleneck(x))
        return torch.cat([x, new], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (halving channels) [+ AvgPool2d(2) if the map allows it]."""

    def __init__(self, in_ch: int, out_ch: int, pool: bool) -> None:
        super().__init__()
        self.reduce = _bn_relu_conv(in_ch, out_ch, 1)
        self.pool: nn.Module = nn.AvgPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.reduce(x))


class DenseNet(nn.Module):
    """A small DenseNet-BC: stem, 2 dense blocks x 3 layers, one transition.

    Growth rate is 8 at the default width 16 (scaled by ``width / 16``).

    Example: ``DenseNet(input_shape=(3, 32, 32), num_classes=10, width=16)``.
    """

    NUM_BLOCKS = 2
    LAYERS_PER_BLOCK = 3
    GROWTH = 8
    DEFAULT_WIDTH = 16

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        width: int = DEFAULT_WIDTH,
    ) -> None:
        super().__init__()
        in_ch, h, w = input_shape
        growth = _scaled(self.GROWTH, width, self.DEFAULT_WIDTH)
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        ch = width
        stages: list[nn.Module] = []
        for index in range(self.NUM_BLOCKS):
            layers: list[nn.Module] = []
            for _ in range(self.LAYERS_PER_BLOCK):
                layers.append(DenseLayer(ch, growth))
                ch += growth
            stages.append(nn.Sequential(*layers))
            if index < self.NUM_BLOCKS - 1:
                pool = _can_downsample(h, w)
                stages.append(Transition(ch, max(1, ch // 2), pool))
                ch = max(1, ch // 2)
                if pool:
                    h, w = h // 2, w // 2
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(ch)
        self.relu = _relu()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.features(self.stem(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    """Hidden layers ``Linear → BatchNorm1d → ReLU`` of ``widths``, then a linear head; inputs of
    any shape are flattened first (the seed of the ``teacher`` and ``clusters`` tasks).

    Example: ``MLP(input_shape=(20,), num_classes=10, widths=(8,))``.
    """

    DEFAULT_WIDTHS: tuple[int, ...] = (16,)

    def __init__(self, input_shape: tuple[int, ...] = (20,), num_classes: int = 10,
                 widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        features = 1
        for d in input_shape:
            features *= d
        layers: list[nn.Module] = [nn.Flatten()] if len(input_shape) > 1 else []
        for w in widths:
            layers += [nn.Linear(features, w), nn.BatchNorm1d(w), nn.ReLU()]
            features = w
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


# ---------------------------------------------------------------------------
# ResNet-50 (bottleneck)
# ---------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 reduce + BN + ReLU -> 3x3 + BN + ReLU -> 1x1 expand (4x) + BN, with an identity or
    1x1-conv+BN shortcut, then ReLU."""

    EXPANSION = 4

    def __init__(self, in_ch: int, planes: int, stride: int) -> None:
        super().__init__()
        out_ch = planes * self.EXPANSION
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = _relu()
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50's structure: a 3x3 stem (with a stride-2 conv and a 2x2 max pool on inputs at least
    32 wide), then bottleneck stages of [3, 4, 6, 3] blocks (64, 128, 256, 512 wide inside, 4x that
    on the residual streams: 256 to 2048), a global average pool and a linear head. Stages 2-4
    start with stride 2 while the map is >= 2 wide.

    ``width`` is the stem's width; at 64 every layer has ResNet-50's width and the net has 11,456
    split candidates (every channel of the stem, of each block's two inner layers and of the four
    residual streams), as torchvision's ResNet-50 does. The default, 8, is a seed to grow from.

    Example: ``ResNet50(input_shape=(3, 64, 64), num_classes=10, width=64)``.
    """

    STAGE_PLANES: tuple[int, ...] = (64, 128, 256, 512)
    STAGE_BLOCKS: tuple[int, ...] = (3, 4, 6, 3)
    REFERENCE_WIDTH = 64  # the stem width at which the stages have ResNet-50's widths
    DEFAULT_WIDTH = 8  # a seed to grow from: 1/8 of ResNet-50's widths

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (3, 64, 64),
        num_classes: int = 10,
        width: int = DEFAULT_WIDTH,
    ) -> None:
        super().__init__()
        in_ch, h, w = input_shape
        # like torchvision's, the stem quarters the resolution (a stride-2 conv, a 2x2 max pool),
        # on inputs at least 32 wide; smaller ones (digits' 8x8) keep theirs
        quarter = min(h, w) >= 32
        self.stem = _conv_bn(in_ch, width, 3, stride=2 if quarter else 1, act=_relu)
        self.pool: nn.Module = nn.MaxPool2d(2) if quarter else nn.Identity()
        if quarter:
            h, w = _strided_size(h, 2) // 2, _strided_size(w, 2) // 2
        planes = [_scaled(base, width, self.REFERENCE_WIDTH) for base in self.STAGE_PLANES]
        self.stages, ch = _residual_stages(width, h, w, planes, self.STAGE_BLOCKS, Bottleneck, Bottleneck.EXPANSION)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.pool(self.stem(x)))
        x = x.mean((2, 3))
        return self.classifier(x)


# ---------------------------------------------------------------------------
# Registry and public API
# ---------------------------------------------------------------------------

_BUILDERS: types.MappingProxyType[str, type[nn.Module]] = types.MappingProxyType(
    {
        "densenet": DenseNet,
        "mlp": MLP,
        "mobilenet_v1": MobileNetV1,
        "mobilenet_v2": MobileNetV2,
        "resnet20": ResNet20,
        "resnet50": ResNet50,
        "vgg19": VGG19,
    }
)


def names() -> list[str]:
    """Return the sorted names of the models :func:`build` knows.

    Example::

        >>> names()
        ['densenet', 'mlp', 'mobilenet_v1', 'mobilenet_v2', 'resnet20', 'resnet50', 'vgg19']
    """
    return sorted(_BUILDERS)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_input_shape(input_shape: object) -> tuple[int, int, int]:
    if (
        not isinstance(input_shape, Sequence)
        or isinstance(input_shape, str)
        or len(input_shape) != 3
        or not all(_is_int(d) and d > 0 for d in input_shape)
    ):
        raise ValueError(
            f"input_shape must be 3 positive ints (C, H, W) without the batch "
            f"dimension, got {input_shape!r}"
        )
    c, h, w = input_shape
    return (c, h, w)


def build(
    name: str,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    width: int | None = None,
    *,
    widths: Sequence[int] | None = None,
) -> nn.Module:
    """Build a fresh, randomly initialised seed model.

    Initialisation draws from the global torch RNG, so ``torch.manual_seed``
    before the call makes the result deterministic.

    Args:
        name: one of :func:`names`.
        input_shape: ``(C, H, W)`` of one input, without the batch dimension;
            strides, pools and the classifier size are chosen from it.
        num_classes: size of the output (logits), at least 1.
        width: base channel width; ``None`` keeps the model's default
            (vgg19 16, mobilenet_v1 32, resnet20 16, resnet50 8 (64: ResNet-50's widths), mobilenet_v2 16,
            densenet 16; for mlp:
            one hidden layer of that width).
        widths: mlp only: the hidden layers' widths (default one layer of 16). An mlp takes an
            ``input_shape`` of any rank (flattened); the other models take ``(C, H, W)``.

    Raises:
        LoadError: ``name`` is not a known model (the message lists the names).
        ValueError: bad ``input_shape``, ``num_classes`` or ``width``.

    Example::

        >>> model = build("vgg19", input_shape=(1, 8, 8), num_classes=7, width=8)
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 7])
    """
    if not isinstance(name, str) or name not in _BUILDERS:
        raise LoadError(
            f"unknown zoo model {name!r}; available names: {', '.join(names())}"
        )
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if width is not None and (not _is_int(width) or width < 1):
        raise ValueError(f"width must be None or an int >= 1, got {width!r}")
    if name == "mlp":
        if widths is None:
            widths = (width,) if width is not None else MLP.DEFAULT_WIDTHS
        if not widths or not all(_is_int(w) and w >= 1 for w in widths):
            raise ValueError(f"widths must be hidden widths >= 1, got {widths!r}")
        if (not isinstance(input_shape, Sequence) or isinstance(input_shape, str) or not input_shape
                or not all(_is_int(d) and d > 0 for d in input_shape)):
            raise ValueError(f"input_shape must be positive ints without the batch dimension, got {input_shape!r}")
        return MLP(input_shape=tuple(input_shape), num_classes=num_classes, widths=tuple(widths))
    if widths is not None:
        raise ValueError(f"widths is for the mlp; {name} takes width")
    shape = _check_input_shape(input_shape)
    cls = _BUILDERS[name]
    if width is None:
        return cls(input_shape=shape, num_classes=num_classes)
    return cls(input_shape=shape, num_classes=num_classes, width=width)
