"""Models of our own with the structures of real ones that broke tracing, the θ = 0 check or export.

torchvision and timm are not test dependencies (torchvision has no CPU build for the pinned
torch here), so each class below reproduces the construct that mattered, written the way those
libraries write it.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F


# -- torchvision: stochastic depth (EfficientNet, ConvNeXt, Swin) ------------------------------------
def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth: drop whole samples ("row") with probability p in training."""
    if not training or p == 0.0:
        return input
    survival = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival)
    return input * noise.div_(survival)


torch.fx.wrap("stochastic_depth")  # as torchvision does: a leaf function of the traced graph


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth: passes its own ``self.training`` to the wrapped function."""

    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)


class MBConv(nn.Module):
    """An EfficientNet block: expand, depthwise, project, then stochastic depth on the residual."""

    def __init__(self, c: int, expand: int = 2, p: float = 0.5):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))
        self.stochastic_depth = StochasticDepth(p)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.project(self.dw(self.expand(input)))
        result = self.stochastic_depth(result)
        result += input
        return result


class EfficientNetLike(nn.Module):
    """Stem, two MBConv blocks with stochastic depth, pooled linear head (built in training mode)."""

    def __init__(self, c: int = 8, classes: int = 5, p: float = 0.5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(c, p=p), MBConv(c, p=p))
        self.head = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(2 * c, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# -- timm: a batch norm fused with its activation, with its own training branch ---------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: ``if self.training`` decides the statistics used and updated."""

    def __init__(self, num_features: int, act_layer: type[nn.Module] = nn.ReLU, momentum: float = 0.1):
        super().__init__(num_features, momentum=momentum)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps,
        )
        return self.act(self.drop(x))


class TimmLike(nn.Module):
    """Convs with timm-style batch-norm-act layers and a residual stage."""

    def __init__(self, c: int = 6, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(2 * c, act_layer=nn.SiLU)
        self.conv3 = nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn3 = BatchNormAct2d(c, act_layer=nn.Identity)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = x + self.bn3(self.conv3(self.bn2(self.conv2(x))))
        return self.head(x.mean((2, 3)))


# -- heads whose output barely depends on the input ----------------------------------------------------
class ScaledHead(nn.Module):
    """Conv features and a linear head whose weight is multiplied by ``scale`` (0: zero-initialised,
    as torchvision's ViT head; 1e-7: tiny) and whose bias is ``bias`` everywhere."""

    def __init__(self, scale: float, bias: float = 0.0, c: int = 6, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.hidden = nn.Linear(c, 8)
        self.head = nn.Linear(8, classes)
        with torch.no_grad():
            self.head.weight.mul_(scale)
            self.head.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.hidden(self.features(x).mean((2, 3)))))


# -- attention -------------------------------------------------------------------------------------------
class ViTLike(nn.Module):
    """torchvision's ViT in small: patch conv, class token, positional embedding, a pre-norm block with
    nn.MultiheadAttention (batch_first: the fast path under no_grad), an MLP, the class token's head."""

    def __init__(self, dim: int = 16, heads: int = 2, patch: int = 4, image: int = 8, classes: int = 3,
                 zero_head: bool = False):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        x = x + self.mlp(self.ln_2(x))
        return self.head(self.ln(x)[:, 0])


class SDPAttention(nn.Module):
    """timm-style attention: qkv projection, heads by reshape, F.scaled_dot_product_attention, with
    the optional ``attn_mask=None`` and ``is_causal: bool = False`` arguments of newer timm blocks."""

    def __init__(self, dim: int = 12, heads: int = 3, classes: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
        return self.head(x.mean(1))


# -- a root whose own code depends on the mode (GoogLeNet's auxiliary heads) ----------------------------
class AuxHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)
        self.aux = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        if self.training:
            return self.head(h), self.aux(h)
        return self.head(h)


class ModeBlindDrop(nn.Module):
    """Reads ``self.training`` but, at p = 0, traces to the same code in both modes: stays traced."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(x))
        if self.training and self.p > 0:
            x = x * 0.5
        return x


# name -> (constructor, example input shape without batch)
LOOKALIKES = {
    "efficientnet_like": (EfficientNetLike, (3, 8, 8)),
    "timm_like": (TimmLike, (3, 6, 6)),
    "zero_head": (lambda: ScaledHead(0.0), (3, 6, 6)),
    "tiny_head": (lambda: ScaledHead(1e-7), (3, 6, 6)),
    "tiny_head_biased": (lambda: ScaledHead(1e-7, bias=0.5), (3, 6, 6)),
    "vit_like": (ViTLike, (3, 8, 8)),
    "vit_zero_head": (lambda: ViTLike(zero_head=True), (3, 8, 8)),
    "sdp_attention": (SDPAttention, (4, 5)),
}
