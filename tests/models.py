"""Small models that exercise the channel analysis: each one a construct the zoo does not cover."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin: int, cout: int, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU())


class ConcatResidualDepthwise(nn.Module):
    """Concat of a plain and a depthwise-separable branch, then a residual add around the block."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.plain = nn.Conv2d(c, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.dw_bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1)
        self.merge = nn.Conv2d(2 * c, c, 1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        a = F.relu(self.plain(x))
        b = F.relu(self.pw(F.relu(self.dw_bn(self.dw(x)))))
        y = self.merge(torch.cat([a, b], 1))
        x = F.relu(x + y)
        return self.head(x.mean((2, 3)))


class FlattenLinear(nn.Module):
    """Conv features flattened with spatial positions kept (one channel -> H*W features), literal view."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c * 16, 12)
        self.fc2 = nn.Linear(12, 3)
        self.c = c

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        x = x.view(-1, self.c * 16)
        return self.fc2(F.gelu(self.fc1(x)))


class SharedActivation(nn.Module):
    """One activation read by two convs whose outputs are added (a diamond)."""

    def __init__(self, c: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.left = nn.Conv2d(c, c, 3, padding=1)
        self.right = nn.Conv2d(c, c, 1)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        h = F.silu(self.stem(x))
        y = F.relu(self.left(h) + self.right(h))
        return self.head(y).flatten(1)


class GatedMul(nn.Module):
    """A sigmoid gate multiplying another branch (GLU-style), channels tied by the mul."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.value = nn.Conv2d(3, c, 3, padding=1)
        self.gate = nn.Conv2d(3, c, 3, padding=1)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.out(self.value(x) * torch.sigmoid(self.gate(x))).mean((2, 3))


class ChunkModel(nn.Module):
    """chunk along the channels: the chunked group is not growable, the others are."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a = nn.Conv2d(c // 2, 4, 3, padding=1)
        self.b = nn.Conv2d(c // 2, 4, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        p, q = torch.relu(self.stem(x)).chunk(2, dim=1)
        y = torch.cat([torch.relu(self.a(p)), torch.relu(self.b(q))], 1)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class GroupedConv(nn.Module):
    """A grouped conv (groups=2): its input and output groups are not growable."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.grouped = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.post = nn.Conv2d(c, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.grouped(F.relu(self.stem(x)))
        x = F.relu(self.post(F.relu(x)))
        return self.head(x.mean((2, 3)))


class LayerNormResidual(nn.Module):
    """Tokens (N, L, C) with a pre-norm residual MLP: the LayerNorm'd stream is not growable,
    the MLP's hidden layer is."""

    def __init__(self, c: int = 8, hidden: int = 16):
        super().__init__()
        self.embed = nn.Linear(4, c)
        self.norm = nn.LayerNorm(c)
        self.up = nn.Linear(c, hidden)
        self.down = nn.Linear(hidden, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        return self.head(x.mean(1))


class SharedConv(nn.Module):
    """The same conv called twice (weight sharing): both calls' channels are one group."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.shared = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.head(x.mean((2, 3)))


# name -> (constructor, example input shape without batch)
EXTRA_MODELS = {
    "concat_residual_depthwise": (ConcatResidualDepthwise, (3, 8, 8)),
    "flatten_linear": (FlattenLinear, (3, 8, 8)),
    "shared_activation": (SharedActivation, (3, 6, 6)),
    "gated_mul": (GatedMul, (3, 6, 6)),
    "chunk": (ChunkModel, (3, 6, 6)),
    "grouped_conv": (GroupedConv, (3, 6, 6)),
    "layernorm_residual": (LayerNormResidual, (5, 4)),
    "shared_conv": (SharedConv, (3, 6, 6)),
}
