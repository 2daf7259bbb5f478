"""The ConvNeXt trunk of the small presets, in plain torch.

timm's ``ConvNeXt`` (``num_classes=0``) for a plain ``convnext_custom`` config (depths,
dims, kernel_sizes, ls_init_value, drop_path_rate): the same modules, parameter names and
shapes, so its checkpoints (and ours) load into either, and the same construction and
initialisation order, so a seeded build draws the same initial weights. Importing timm
costs seconds of start-up (it pulls torchvision and torch's compiler stack), which a node
pays on every configure; a config with any other timm field is still built by timm.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

REQUIRED = frozenset({"depths", "dims"})
PLAIN_FIELDS = REQUIRED | {"kernel_sizes", "ls_init_value", "drop_path_rate"}


def is_plain(convnext_cfg: dict) -> bool:
    """True when this module builds the trunk exactly as timm would: only the fields
    above, four stages, odd depthwise kernels (an even one shrinks the map and timm's
    residual add fails: that config goes to timm, which raises as before)."""
    if not REQUIRED <= set(convnext_cfg) <= PLAIN_FIELDS:
        return False
    kernels = convnext_cfg.get("kernel_sizes", 7)
    kernels = [kernels] * 4 if isinstance(kernels, int) else kernels
    ls_init_value = convnext_cfg.get("ls_init_value", 1e-6)
    return (all(isinstance(convnext_cfg[k], Sequence) and len(convnext_cfg[k]) == 4
                and all(isinstance(v, int) and v > 0 for v in convnext_cfg[k]) for k in ("depths", "dims"))
            and isinstance(kernels, Sequence) and len(kernels) == 4
            and all(isinstance(k, int) and k % 2 == 1 for k in kernels)
            and (ls_init_value is None or isinstance(ls_init_value, (int, float)))
            and isinstance(convnext_cfg.get("drop_path_rate", 0.0), (int, float)))


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float, mean: float = 0.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """Normal(mean, std) cut to [a, b] by the inverse CDF, one uniform draw per element:
    timm's draw (torch's own ``nn.init.trunc_normal_`` now rejection-samples, which draws
    differently)."""
    cdf = lambda v: (1.0 + math.erf((v - mean) / std / math.sqrt(2.0))) / 2.0  # noqa: E731
    tensor.uniform_(2 * cdf(a) - 1, 2 * cdf(b) - 1)
    return tensor.erfinv_().mul_(std * math.sqrt(2.0)).add_(mean).clamp_(min=a, max=b)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability
    ``drop_prob`` and scale the kept ones by 1 / (1 - drop_prob)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, width)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., width] -> [..., width]."""
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, channels-last LayerNorm, MLP (x4), layer scale, residual."""

    def __init__(self, width: int, kernel_size: int, ls_init_value: float | None, drop_path: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(width, width, kernel_size, padding=(kernel_size - 1) // 2, groups=width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, 4 * width)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(width)) if ls_init_value is not None else None
        self.shortcut = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, C, H, W]."""
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        if self.gamma is not None:
            y = y.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(y) + self.shortcut(x)


class ConvNeXtStage(nn.Module):
    """Downsample (LayerNorm2d + 2x2 stride-2 conv; none in stage 0), then the blocks."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, depth: int, kernel_size: int,
                 ls_init_value: float | None, drop_path_rates: list[float]):
        super().__init__()
        if in_chs != out_chs or stride > 1:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs),
                                            nn.Conv2d(in_chs, out_chs, kernel_size=2 if stride > 1 else 1,
                                                      stride=stride))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*(ConvNeXtBlock(out_chs, kernel_size, ls_init_value, drop_path_rates[i])
                                      for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class GlobalAvgPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(x))


class NormHead(nn.Module):
    """Average pool, LayerNorm2d, flatten; no classifier (``num_classes=0``)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_features = self.num_features = width
        self.global_pool = GlobalAvgPool()
        self.norm = LayerNorm2d(width)
        self.flatten = nn.Flatten(1)
        self.pre_logits = nn.Identity()
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, C]."""
        return self.fc(self.drop(self.pre_logits(self.flatten(self.norm(self.global_pool(x))))))


class ConvNeXt(nn.Module):
    """Patch stem (4x4 conv + LayerNorm2d), four stages at strides 4, 8, 16, 32, and the
    pooled-norm head (for checkpoint compatibility and ``forward``; the encoder reads the
    stage outputs). ``feature_info[i]["num_chs"]`` is stage i's width."""

    def __init__(self, depths: Sequence[int], dims: Sequence[int], kernel_sizes: int | Sequence[int] = 7,
                 ls_init_value: float | None = 1e-6, drop_path_rate: float = 0.0):
        super().__init__()
        kernels = [kernel_sizes] * 4 if isinstance(kernel_sizes, int) else list(kernel_sizes)
        self.num_classes, self.in_chans, self.drop_rate = 0, 3, 0.0
        self.feature_info: list[dict] = []
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        rates = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths)).split(list(depths))]
        stages, prev, reduction = [], dims[0], 4
        for i in range(4):
            stride = 1 if i == 0 else 2
            reduction *= stride
            stages.append(ConvNeXtStage(prev, dims[i], stride, depths[i], kernels[i], ls_init_value, rates[i]))
            prev = dims[i]
            self.feature_info.append({"num_chs": prev, "reduction": reduction, "module": f"stages.{i}"})
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.norm_pre = nn.Identity()
        self.head = NormHead(prev)
        for module in self.modules():  # after construction, in module order, as timm does
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> last stage [B, dims[3], S/32, S/32]."""
        return self.norm_pre(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> pooled, normalised features [B, dims[3]]."""
        return self.head(self.forward_features(x))


def build(convnext_cfg: dict) -> ConvNeXt:
    cfg = dict(convnext_cfg)
    return ConvNeXt(depths=cfg["depths"], dims=cfg["dims"], kernel_sizes=cfg.get("kernel_sizes", 7),
                    ls_init_value=cfg.get("ls_init_value", 1e-6), drop_path_rate=cfg.get("drop_path_rate", 0.0))
