"""Sampling grids for torchvision's geometric transforms on tensors (rotate, perspective, elastic): the output's
pixel centres mapped into the input and sampled with `grid_sample` (align_corners=False), as torchvision does."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def rotation_matrix(angle: float, center: Sequence[float]) -> list[float]:
    """The inverse affine matrix [a, b, c, d, e, f] of a rotation by `angle` degrees about `center` (relative to
    the image centre): it maps an output pixel (x, y from the centre, y down) to where it is read in the input."""
    rot = math.radians(angle)
    cos, sin = math.cos(rot), math.sin(rot)
    matrix = [cos, sin, 0.0, -sin, cos, 0.0]
    cx, cy = center
    matrix[2] += matrix[0] * -cx + matrix[1] * -cy + cx
    matrix[5] += matrix[3] * -cx + matrix[4] * -cy + cy
    return matrix


def affine_output_size(matrix: list[float], width: int, height: int) -> tuple[int, int]:
    """(width, height) of the box holding the whole transformed image (the corners through `matrix`, rounded
    outwards after truncating to 1e-4 so that 12.00000001 stays 12)."""
    corners = torch.tensor([[-0.5 * width, -0.5 * height, 1.0], [-0.5 * width, 0.5 * height, 1.0],
                            [0.5 * width, 0.5 * height, 1.0], [0.5 * width, -0.5 * height, 1.0]])
    points = corners @ torch.tensor(matrix).view(2, 3).T  # float32, as torchvision
    shift = torch.tensor([width * 0.5, height * 0.5])
    tol = 1e-4
    high = torch.ceil(((points.max(dim=0).values + shift) / tol).trunc() * tol)
    low = torch.floor(((points.min(dim=0).values + shift) / tol).trunc() * tol)
    size = high - low
    return int(size[0]), int(size[1])


def rotation_grid(matrix: list[float], width: int, height: int, out_w: int, out_h: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The 1 x out_h x out_w x 2 grid (grid_sample's -1..1 units of the input) of an inverse affine matrix."""
    theta = torch.tensor(matrix, dtype=dtype, device=device).reshape(1, 2, 3)
    xs = torch.linspace(-out_w * 0.5 + 0.5, out_w * 0.5 - 0.5, steps=out_w, dtype=dtype, device=device)
    ys = torch.linspace(-out_h * 0.5 + 0.5, out_h * 0.5 - 0.5, steps=out_h, dtype=dtype, device=device)
    base = torch.stack([xs.expand(out_h, out_w), ys[:, None].expand(out_h, out_w), torch.ones(out_h, out_w,
                        dtype=dtype, device=device)], dim=-1)
    scale = torch.tensor([0.5 * width, 0.5 * height], dtype=dtype, device=device)
    grid = base.view(1, out_h * out_w, 3).bmm(theta.transpose(1, 2) / scale)
    return grid.view(1, out_h, out_w, 2)


def perspective_coefficients(startpoints: Sequence[Sequence[float]],
                             endpoints: Sequence[Sequence[float]]) -> list[float]:
    """The 8 coefficients (a..h) of the homography taking `startpoints` to `endpoints`:
    x' = (a x + b y + c) / (g x + h y + 1), y' = (d x + e y + f) / (g x + h y + 1)."""
    rows, targets = [], []
    for (x, y), (u, v) in zip(startpoints, endpoints, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        targets.extend([u, v])
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(targets, dtype=torch.float64)
    return torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1).tolist()


def perspective_grid(coefficients: list[float], width: int, height: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """The grid that reads, for each output pixel centre, the input point the homography gives."""
    a, b, c, d, e, f, g, h = coefficients
    xs = torch.linspace(0.5, width - 0.5, steps=width, dtype=torch.float64)
    ys = torch.linspace(0.5, height - 0.5, steps=height, dtype=torch.float64)[:, None]
    denominator = g * xs + h * ys + 1.0
    grid_x = (a * xs + b * ys + c) / denominator / (0.5 * width) - 1.0
    grid_y = (d * xs + e * ys + f) / denominator / (0.5 * height) - 1.0
    return torch.stack([grid_x, grid_y], dim=-1).unsqueeze(0).to(dtype=dtype, device=device)


def apply_grid(batch: torch.Tensor, grid: torch.Tensor, mode: str, fill: list[float] | None) -> torch.Tensor:
    """Sample [N, C, H, W] at `grid`; outside the input is 0, or `fill` (one value or one per channel), blended by
    how much of each output pixel came from inside (nearest: where less than half did)."""
    if mode not in ("nearest", "bilinear", "bicubic"):
        raise ValueError(f"interpolation {mode!r} is not supported here; use nearest, bilinear or bicubic")
    if grid.shape[0] != batch.shape[0]:
        grid = grid.expand(batch.shape[0], -1, -1, -1)
    if fill is not None:
        if len(fill) not in (1, batch.shape[1]):
            raise ValueError(f"fill has {len(fill)} values for an image of {batch.shape[1]} channels; give one "
                             "value, or one per channel")
        batch = torch.cat([batch, torch.ones_like(batch[:, :1])], dim=1)
    out = F.grid_sample(batch, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if fill is None:
        return out
    out, inside = out[:, :-1], out[:, -1:].expand_as(out[:, :-1])
    fill_image = torch.tensor(fill, dtype=out.dtype, device=out.device).view(1, -1, 1, 1).expand_as(out)
    if mode == "nearest":
        return torch.where(inside < 0.5, fill_image, out)
    return out * inside + (1.0 - inside) * fill_image
