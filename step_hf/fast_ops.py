"""Faster ways to compute a few standard operations: the same parameters (checkpoints load unchanged) and the same
numbers as the torch operator they replace, tested against it. Each exists because a profile of the GPU forward
showed the standard kernel slow for STEP's shapes; the measurements are in docs/BENCHMARKS.md.

Shipped as Hub code next to saved weights: imports only torch.
"""

import torch
import torch.nn.functional as F
from torch import nn


class PatchConv2d(nn.Conv2d):
    """
    A convolution whose stride equals its kernel (no padding, no overlap). On CUDA it runs as one matrix product over
    the image's patches: cuDNN takes these shapes (3 input channels, large kernels) through a slow implicit-GEMM
    kernel. On CPU the convolution is the faster. `patches_last` returns `(batch, rows, cols, out_channels)`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=kernel_size, bias=bias)

    def patches_last(self, images: torch.Tensor) -> torch.Tensor:
        if not images.is_cuda:
            return super().forward(images).permute(0, 2, 3, 1)
        return self.as_matrix_product(images)

    def as_matrix_product(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        (kernel_rows, kernel_cols), weight = self.kernel_size, self.weight
        rows, cols = height // kernel_rows, width // kernel_cols
        patches = images[:, :, : rows * kernel_rows, : cols * kernel_cols]
        patches = patches.reshape(batch, channels, rows, kernel_rows, cols, kernel_cols).permute(0, 2, 4, 1, 3, 5)
        return F.linear(patches.flatten(3), weight.flatten(1), self.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.patches_last(images).permute(0, 3, 1, 2)


class ImageNorm(nn.GroupNorm):
    """
    GroupNorm with a single group: each image normalised over all its channels and pixels, then scaled per channel.
    On CUDA computed with a plain reduction: PyTorch's GroupNorm kernel spreads its statistics over batch x groups
    thread blocks only (8 for a batch of 8). On CPU the GroupNorm kernel is the faster.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.by_reduction(features) if features.is_cuda else super().forward(features)

    def by_reduction(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(1).float()
        variance, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
        normalized = ((flat - mean) * torch.rsqrt(variance + self.eps)).view(features.shape)
        return (normalized * self.weight[:, None, None] + self.bias[:, None, None]).to(features.dtype)


def bicubic_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """`(out_size, in_size)`: the weights 1-D bicubic resizing (align_corners=False, no antialias) applies, read off
    by resizing the identity with `F.interpolate` itself (the width axis, 1 -> 1, is left as it is)."""
    identity = torch.eye(in_size, device=device)[:, None, :, None]
    return F.interpolate(identity, size=(out_size, 1), mode="bicubic", align_corners=False)[:, 0, :, 0].T


def resize_grid_bicubic(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    Resize a `(rows, cols, dim)` grid as `F.interpolate(..., mode="bicubic", align_corners=False)` does, as two
    small matrix products (bicubic resizing is separable), computed in float32. Same numbers up to rounding, but the
    CUDA bicubic kernel walks every channel in one thread per output cell, a large share of a small ViT's forward.
    """
    (rows, cols, dim), device = grid.shape, grid.device
    resized = bicubic_weights(rows, size[0], device) @ grid.float().reshape(rows, cols * dim)  # rows first
    resized = bicubic_weights(cols, size[1], device) @ resized.view(size[0], cols, dim)  # then columns
    return resized.to(grid.dtype)


__all__ = ["ImageNorm", "PatchConv2d", "bicubic_weights", "resize_grid_bicubic"]
