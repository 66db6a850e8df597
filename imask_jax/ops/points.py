"""Point sampling for point-based mask refinement (PointRend, Kirillov et al., CVPR 2020).

A coarse mask head predicts an `m x m` grid per ROI; a point head then predicts the mask at a
few chosen points from features sampled exactly there. The pure-array parts live here:

* Coordinates. A point of a ROI is `(v, u)` in `[0, 1]^2`, box-normalised: `(0, 0)` is the
  box's top-left corner `(y1, x1)`, `(1, 1)` its bottom-right. Its input-pixel position is
  `y = y1 + v (y2 - y1)` (continuous coordinates: pixel `k` covers `[k, k + 1)`), the
  convention of ROIAlign and of `masks.paste_mask_probs`, so the cell centres of an `m x m`
  mask sit at `v = (i + 0.5) / m`.
* `bilinear_sample`: a grid read at continuous pixel-centre coordinates (pixel `k`'s centre at
  `k`), clamped to the border cells like the paste.
* `uncertain_points` (training): PointRend's importance sampling: `oversample * P` uniform
  random points, the `importance * P` whose coarse logit is nearest 0 (most uncertain), and
  the rest uniform random.
* `uncertain_cells` (inference): the P cells of a grid whose logit is nearest 0, for one step
  of PointRend's adaptive subdivision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def bilinear_sample(grid: Array, yx: Array) -> Array:
  """`grid [H, W, C]` read at `yx [P, 2]` (continuous (y, x) in pixel-centre coordinates:
  pixel `(i, j)` is at `(i, j)`), bilinear, coordinates clamped to `[0, H - 1] x [0, W - 1]`.
  Returns `[P, C]` in the grid's dtype. Differentiable with respect to the grid only."""
  return bilinear_sample_stack(grid[None], jnp.zeros((1,), jnp.int32), yx[None])[0]


def bilinear_sample_stack(stack: Array, layer: Array, yx: Array) -> Array:
  """`bilinear_sample` of layer `layer[n]` of `stack [L, H, W, C]` at `yx[n] [P, 2]` for each
  n: `[N, P, C]`. Reads only the 4 taps of each point (no `[N, H, W, C]` copy of the layers)."""
  h, w = stack.shape[1:3]
  yx = jax.lax.stop_gradient(yx.astype(jnp.float32))
  y = jnp.clip(yx[..., 0], 0.0, h - 1)
  x = jnp.clip(yx[..., 1], 0.0, w - 1)
  y0 = jnp.floor(y).astype(jnp.int32)
  x0 = jnp.floor(x).astype(jnp.int32)
  y1 = jnp.minimum(y0 + 1, h - 1)
  x1 = jnp.minimum(x0 + 1, w - 1)
  wy = (y - y0)[..., None].astype(stack.dtype)
  wx = (x - x0)[..., None].astype(stack.dtype)
  g = jnp.clip(jnp.asarray(layer, jnp.int32), 0, stack.shape[0] - 1)[:, None]
  top = stack[g, y0, x0] * (1 - wx) + stack[g, y0, x1] * wx
  bottom = stack[g, y1, x0] * (1 - wx) + stack[g, y1, x1] * wx
  return top * (1 - wy) + bottom * wy


def roi_points_to_image(points: Array, rois: Array) -> Array:
  """Box-normalised points `[N, P, 2]` of the ROIs `[N, 4]` (y1, x1, y2, x2) -> continuous
  input-pixel coordinates `[N, P, 2]` (y, x)."""
  start = rois[:, None, :2]
  extent = rois[:, None, 2:] - rois[:, None, :2]
  return start + points * extent


def sample_maps_at_image_points(maps: Array, stride: int, layer: Array, points: Array) -> Array:
  """Layer `layer[n]` of `maps [L, H, W, C]` (stride `stride`) read at the input-pixel points
  `points[n] [P, 2]` -> `[N, P, C]`. A map pixel `k` covers input pixels `[k s, (k + 1) s)`, so
  its centre is input `(k + 0.5) s`."""
  return bilinear_sample_stack(maps, layer, points / stride - 0.5)


def sample_grid_at_roi_points(grid: Array, points: Array) -> Array:
  """An `[m, m, C]` per-ROI grid (cell centres at `(i + 0.5) / m`) read at box-normalised
  points `[P, 2]` -> `[P, C]`."""
  m = jnp.asarray(grid.shape[:2], jnp.float32)
  return bilinear_sample(grid, points * m - 0.5)


def uncertain_points(
  coarse_logits: Array, key: Array, num_points: int, oversample: float, importance: float
) -> Array:
  """PointRend's training points for each ROI.

  Args:
    coarse_logits: `[N, m, m]` logits of each ROI's own class (uncertainty = -|logit|).
    key: PRNG key.
    num_points: P, points per ROI.
    oversample: k >= 1; `k P` uniform candidates are scored.
    importance: beta in [0, 1]; `round(beta P)` most uncertain candidates are kept, the rest
      of the P points are drawn uniformly.
  Returns:
    `[N, P, 2]` box-normalised points (no gradient).
  """
  if oversample < 1 or not 0 <= importance <= 1:
    raise ValueError(
      f'points.uncertain_points: oversample={oversample} must be >= 1 and '
      f'importance={importance} in [0, 1]'
    )
  n = coarse_logits.shape[0]
  num_candidates = int(round(oversample * num_points))
  num_uncertain = int(round(importance * num_points))
  key_candidates, key_random = jax.random.split(key)
  candidates = jax.random.uniform(key_candidates, (n, num_candidates, 2))
  logits = jax.lax.stop_gradient(coarse_logits).astype(jnp.float32)[..., None]
  at_candidates = jax.vmap(sample_grid_at_roi_points)(logits, candidates)[..., 0]  # [N, kP]
  _, index = jax.lax.top_k(-jnp.abs(at_candidates), num_uncertain)
  chosen = jnp.take_along_axis(candidates, index[..., None], axis=1)
  uniform = jax.random.uniform(key_random, (n, num_points - num_uncertain, 2))
  return jnp.concatenate([chosen, uniform], axis=1)


def uncertain_cells(logits: Array, num_points: int) -> tuple[Array, Array]:
  """The `num_points` cells of each `[N, R, R]` logit grid nearest 0 (ties: lower flat index
  first). Returns (flat cell index `[N, P]` int32, their centres `[N, P, 2]` box-normalised)."""
  n, r = logits.shape[0], logits.shape[1]
  num_points = min(num_points, r * r)
  _, index = jax.lax.top_k(-jnp.abs(logits.reshape(n, r * r)), num_points)
  rows, cols = index // r, index % r
  centres = (jnp.stack([rows, cols], axis=-1).astype(jnp.float32) + 0.5) / r
  return index.astype(jnp.int32), jax.lax.stop_gradient(centres)


def upsample2x(logits: Array) -> Array:
  """`[N, R, R]` -> `[N, 2R, 2R]` bilinear, half-pixel aligned (cell centres stay at
  `(i + 0.5) / R` of the box), edges clamped: `grid_sample(align_corners=False)`'s upsampling."""
  n, r = logits.shape[0], logits.shape[1]
  fine = (jnp.arange(2 * r, dtype=jnp.float32) + 0.5) / (2 * r)
  v, u = jnp.meshgrid(fine, fine, indexing='ij')
  points = jnp.stack([v.ravel(), u.ravel()], axis=-1)  # [(2R)^2, 2]
  up = jax.vmap(lambda g: sample_grid_at_roi_points(g[..., None], points)[:, 0])(logits)
  return up.reshape(n, 2 * r, 2 * r)
