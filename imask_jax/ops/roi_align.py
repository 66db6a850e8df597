"""ROIAlign on one feature map or an FPN pyramid: bilinear, half-pixel aligned (detectron2's
`ROIAlign(aligned=True)`).

`roi_align(features, rois, output_size, spatial_scale=...)` reads one map [H, W, C] (or
[B, H, W, C] with `batch_index`); `multilevel_roi_align` a pyramid {'P2': ..., ...}, each ROI
from its `assign_levels` level or from one given level. Boxes: [N, 4] `(y1, x1, y2, x2)` in
continuous pixel coordinates of the network input; output [N, h, w, C] in the features' dtype.
Gradients flow to the features only; the backward is a `custom_vjp`, so reverse mode only
(`jax.jvp` / `jacfwd` raise; `jit`, `vmap` and `grad` work). Over 500 lines because it is one
op: both entry points share the flat-table forward and its hand-written, chunked backward.

Sampling, points outside the map and the layout of the computation: docs/architecture.md,
'ROIAlign'; the measurements that chose the layout: benchmarks/README.md, 'ROIAlign'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Gathered feature values (taps x channels) handled per scan step: large enough to amortise
# the loop's per-step cost, small enough that a step's temporaries stay in cache. Tuned with
# benchmarks/roi_align.py.
_VALUES_PER_STEP = 1024 * 1024
# Up to this many taps per output the tap sum is unrolled (fastest, see `_pool_step`);
# sampling ratio 3 gives 36.
_MAX_UNROLLED_TAPS = 36
# Inside a training step XLA:CPU may materialise every tap's gathered values at once instead
# of fusing them into the sum (the iMask skip ROIAlign of a 1024-pixel input became the step's
# largest buffer; benchmarks/README.md). Above this many gathered bytes the unrolled sum runs
# in scan steps of this size.
_MAX_UNCHUNKED_BYTES = 64 * 2**20


def _check_rois(where: str, rois: Array) -> None:
  if rois.ndim != 2 or rois.shape[-1] != 4:
    raise ValueError(
      f'roi_align.py: {where}: rois must have shape [N, 4] (y1, x1, y2, x2), '
      f'got {tuple(rois.shape)}'
    )


def _check_output_size(where: str, output_size: int | Sequence[int]) -> tuple[int, int]:
  size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
  if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
    raise ValueError(
      f'roi_align.py: {where}: output_size must be a positive int or a pair '
      f'of positive ints, got {output_size!r}'
    )
  return int(size[0]), int(size[1])


def _check_sampling(where: str, sampling_ratio: int, max_sampling_ratio: int) -> int:
  """Returns the static number of sample slots per bin and axis."""
  if not isinstance(sampling_ratio, (int, np.integer)) or sampling_ratio < 0:
    raise ValueError(
      f'roi_align.py: {where}: sampling_ratio must be an int >= 0 (0 = '
      f'adaptive), got {sampling_ratio!r}'
    )
  if sampling_ratio > 0:
    return int(sampling_ratio)
  if not isinstance(max_sampling_ratio, (int, np.integer)) or max_sampling_ratio < 1:
    raise ValueError(
      f'roi_align.py: {where}: adaptive sampling (sampling_ratio=0) needs '
      f'max_sampling_ratio >= 1, got {max_sampling_ratio!r}'
    )
  return int(max_sampling_ratio)


def assign_levels(
  rois: Array,
  *,
  min_level: int = 2,
  max_level: int = 5,
  canonical_level: int = 4,
  canonical_size: float = 224.0,
) -> Array:
  """FPN level of each box: `floor(k0 + log2(sqrt(area) / canonical))`, clamped.

  Args:
    rois: `[N, 4]` boxes `(y1, x1, y2, x2)` in input pixels.
    min_level, max_level: the pyramid levels available (P2-P5 by default).
    canonical_level, canonical_size: `k0` and the box size (input pixels) mapped to it. The
      COCO values are 4 and 224; MRI inputs are smaller, so both are arguments.
  Returns:
    `[N]` int32 levels in `[min_level, max_level]`. Empty boxes go to `min_level`.
  """
  rois = jnp.asarray(rois)
  _check_rois('assign_levels', rois)
  if not min_level <= max_level:
    raise ValueError(
      f'roi_align.py: assign_levels: need min_level <= max_level, got {min_level} and {max_level}'
    )
  if not canonical_size > 0:
    raise ValueError(
      f'roi_align.py: assign_levels: canonical_size must be > 0, got {canonical_size!r}'
    )
  height = jnp.maximum(rois[:, 2] - rois[:, 0], 0.0)
  width = jnp.maximum(rois[:, 3] - rois[:, 1], 0.0)
  size = jnp.sqrt(height * width)
  # The 1e-8 keeps log2 finite for empty boxes (detectron2 does the same).
  level = jnp.floor(canonical_level + jnp.log2(size / canonical_size + 1e-8))
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def _axis_taps(
  start: Array, length: Array, size: Array, bins: int, slots: int, grid: Array
) -> tuple[Array, Array]:
  """Bilinear taps along one axis for every ROI and bin.

  Args:
    start, length: `[N]` box start and extent on the map, in map pixels (pixel centres at
      integers; the -0.5 shift already applied).
    size: `[N]` int map extent along this axis (it differs between pyramid levels).
    bins: output bins along this axis.
    slots: static number of sample slots per bin (the fixed or the capped adaptive ratio).
    grid: `[N]` int samples actually used per bin, `<= slots` (slots beyond get weight 0).
  Returns:
    `index [N, bins, 2 * slots]` int32 pixel indices in `[0, size)` and `weight` of the same
    shape, which already includes the `1 / grid` of the mean and zero for dropped samples.
  """
  dtype = length.dtype
  grid_f = jnp.maximum(grid, 1).astype(dtype)[:, None, None]
  bin_size = (length / bins)[:, None, None]
  offsets = (jnp.arange(slots, dtype=dtype)[None, None, :] + 0.5) / grid_f
  pos = start[:, None, None] + bin_size * (
    jnp.arange(bins, dtype=dtype)[None, :, None] + offsets
  )  # [N, bins, slots]
  size_i = size[:, None, None]
  size_f = size_i.astype(dtype)
  used = jnp.arange(slots)[None, None, :] < grid[:, None, None]
  inside = (pos >= -1.0) & (pos <= size_f)
  keep = jnp.where(used & inside, 1.0 / grid_f, 0.0).astype(dtype)
  # NaN boxes give NaN positions, which are not `inside` (weight 0); they are replaced so that
  # the indices, read without bounds checks, stay inside the map.
  pos = jnp.clip(jnp.nan_to_num(pos, nan=0.0), 0.0, size_f - 1.0)
  low = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, size_i - 1)
  high = jnp.minimum(low + 1, size_i - 1)
  frac = pos - low.astype(dtype)
  index = jnp.concatenate([low, high], axis=-1)
  weight = jnp.concatenate([(1.0 - frac) * keep, frac * keep], axis=-1)
  return index, weight


def _pool_step(table: Array, rows: Array, row_w: Array, cols: Array, col_w: Array) -> Array:
  """`out[u, q] = sum_ab row_w[u, a] col_w[u, q, b] table[rows[u, a] + cols[u, q, b]]`.

  `u` runs over output rows (one bin row of one ROI). The double sum is unrolled so that XLA
  emits one fused loop, gathers included, that writes only the `[U, w, C]` result (faster
  than one gather followed by a contraction: benchmarks/roi_align.py).
  """
  if rows.shape[-1] * cols.shape[-1] > _MAX_UNROLLED_TAPS:
    # Many taps (large adaptive caps): one gather and a contraction compile much faster than
    # hundreds of unrolled terms.
    index = rows[:, None, :, None] + cols[:, :, None, :]  # [U, w, a, b]
    weight = row_w[:, None, :, None] * col_w[:, :, None, :]
    pixels = table.at[index].get(mode='promise_in_bounds', wrap_negative_indices=False)
    return jnp.einsum('uwab,uwabc->uwc', weight, pixels)
  out = None
  for a in range(rows.shape[-1]):
    for b in range(cols.shape[-1]):
      index = rows[:, None, a] + cols[:, :, b]
      pixels = table.at[index].get(mode='promise_in_bounds', wrap_negative_indices=False)
      term = (row_w[:, None, a] * col_w[:, :, b])[..., None] * pixels
      out = term if out is None else out + term
  return out


def _pool_step_transpose(
  grad_table: Array, d_out: Array, rows: Array, row_w: Array, cols: Array, col_w: Array
) -> Array:
  """Adds the transpose of `_pool_step` applied to `d_out [U, w, C]` into `grad_table`."""
  index = rows[:, None, :, None] + cols[:, :, None, :]  # [U, w, a, b]
  weight = row_w[:, None, :, None] * col_w[:, :, None, :]
  updates = weight[..., None] * d_out[:, :, None, None, :]
  return grad_table.at[index.reshape(-1)].add(
    updates.reshape(-1, d_out.shape[-1]), mode='promise_in_bounds'
  )


def _steps(
  rows: Array,
  row_w: Array,
  cols: Array,
  col_w: Array,
  channels: int,
  values_per_step: int = _VALUES_PER_STEP,
) -> tuple[int, int, tuple]:
  """Splits the output rows into equal scan steps of about `values_per_step` gathered values;
  returns (steps, rows per step, arrays)."""
  units = rows.shape[0]
  w, taps_x = cols.shape[1:]
  target = max(1, min(units, values_per_step // (w * rows.shape[-1] * taps_x * channels)))
  # Prefer a chunk that divides the rows exactly: padding would make the output one copy
  # longer than needed (the final slice).
  divisor = max(c for c in range(1, target + 1) if units % c == 0)
  chunk = divisor if 2 * divisor >= target else target
  steps = -(-units // chunk)
  pad = steps * chunk - units

  def split(x: Array) -> Array:
    # Padded rows read table row 0 with weight 0; their output is dropped.
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(steps, chunk, *x.shape[1:])

  return steps, chunk, tuple(split(x) for x in (rows, row_w, cols, col_w))


@jax.custom_vjp
def _pool(table: Array, rows: Array, row_w: Array, cols: Array, col_w: Array) -> Array:
  """Bilinear pooling of output rows from a flat `[P, C]` table.

  Forward: one fused loop (unrolled taps), or scan steps when there are many taps per output
  or many gathered values (`_MAX_UNCHUNKED_BYTES`). Backward: always scan steps, see
  `_pool_bwd`.

  Args:
    table: `[P, C]` pixel vectors.
    rows, row_w: `[U, Ty]` table offsets of the tapped map rows and their weights.
    cols, col_w: `[U, w, Tx]` tapped columns (added to the row offsets) and their weights.
  Returns:
    `[U, w, C]`. Differentiable with respect to `table` only (the taps are constants).
  """
  taps = rows.shape[-1] * cols.shape[-1]
  gathered_bytes = cols.shape[0] * cols.shape[1] * taps * table.shape[-1] * table.dtype.itemsize
  if taps <= _MAX_UNROLLED_TAPS and gathered_bytes <= _MAX_UNCHUNKED_BYTES:
    # One fused loop over every output; it writes only the output, so chunking would only add
    # the scan's zero-initialised stacked output (measured 15-25% slower).
    return _pool_step(table, rows, row_w, cols, col_w)
  units, w = cols.shape[:2]
  # Many taps: small steps of one gather + contraction each; else unrolled steps at the cap.
  values = (
    _VALUES_PER_STEP if taps > _MAX_UNROLLED_TAPS else _MAX_UNCHUNKED_BYTES // table.dtype.itemsize
  )
  steps, chunk, xs = _steps(rows, row_w, cols, col_w, table.shape[-1], values)
  _, out = jax.lax.scan(lambda carry, x: (carry, _pool_step(table, *x)), None, xs)
  return out.reshape(steps * chunk, w, table.shape[-1])[:units]


def _pool_fwd(
  table: Array, rows: Array, row_w: Array, cols: Array, col_w: Array
) -> tuple[Array, tuple]:
  return _pool(table, rows, row_w, cols, col_w), (table.shape[0], rows, row_w, cols, col_w)


def _pool_bwd(residuals: tuple, d_out: Array) -> tuple[Array, None, None, None, None]:
  # Taps are constants (built from stop_gradient boxes): only the table gets a cotangent.
  pixels, rows, row_w, cols, col_w = residuals
  steps, chunk, xs = _steps(rows, row_w, cols, col_w, d_out.shape[-1])
  pad = steps * chunk - d_out.shape[0]
  d_out = jnp.pad(d_out, [(0, pad), (0, 0), (0, 0)]).reshape(steps, chunk, *d_out.shape[1:])
  # The scan carries the table gradient, so every step scatter-adds its few thousand rows
  # in place instead of materialising all weighted copies of d_out at once.
  grad_table, _ = jax.lax.scan(
    lambda acc, x: (_pool_step_transpose(acc, *x), None),
    jnp.zeros((pixels, d_out.shape[-1]), d_out.dtype),
    (d_out,) + xs,
  )
  return grad_table, None, None, None, None


_pool.defvjp(_pool_fwd, _pool_bwd)


def _roi_align_flat(
  table: Array,
  rois: Array,
  scale: Array,
  height: Array,
  width: Array,
  base: Array,
  output_size: tuple[int, int],
  sampling_ratio: int,
  slots: int,
) -> Array:
  """ROIAlign from a flat `[pixels, C]` table; each ROI has its own map geometry.

  scale, height, width, base: `[N]` map scale (1 / stride), map size and the table row of the
  map's pixel (0, 0) for each ROI.
  """
  dtype = table.dtype
  rois = jax.lax.stop_gradient(rois).astype(dtype)
  scale = scale.astype(dtype)
  y1, x1, y2, x2 = (rois[:, i] * scale for i in range(4))
  start_y, start_x = y1 - 0.5, x1 - 0.5
  length_y, length_x = y2 - y1, x2 - x1
  out_h, out_w = output_size
  if sampling_ratio > 0:
    grid_y = grid_x = jnp.full(rois.shape[:1], sampling_ratio, jnp.int32)
  else:
    # ceil of a negative extent (inverted box) is <= 0: no samples, zero output.
    grid_y = jnp.clip(jnp.ceil(length_y / out_h), 0, slots).astype(jnp.int32)
    grid_x = jnp.clip(jnp.ceil(length_x / out_w), 0, slots).astype(jnp.int32)
  rows, row_w = _axis_taps(start_y, length_y, height, out_h, slots, grid_y)
  cols, col_w = _axis_taps(start_x, length_x, width, out_w, slots, grid_x)
  rows = base[:, None, None] + rows * width[:, None, None]
  # One scan unit per output row of a ROI; each unit carries its ROI's column taps.
  n = rois.shape[0]
  cols = jnp.broadcast_to(cols[:, None], (n, out_h) + cols.shape[1:])
  col_w = jnp.broadcast_to(col_w[:, None], (n, out_h) + col_w.shape[1:])
  out = _pool(
    table,
    rows.reshape(n * out_h, -1),
    row_w.reshape(n * out_h, -1),
    cols.reshape(n * out_h, out_w, -1),
    col_w.reshape(n * out_h, out_w, -1),
  )
  return out.reshape(n, out_h, out_w, table.shape[-1])


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'roi_align.py: features must be floating point, got {dtype}')
  return jnp.promote_types(dtype, jnp.float32)


def _batch_layout(
  where: str, features: Array, rois: Array, batch_index: Array | None
) -> tuple[Array, Array]:
  """Returns `([B, H, W, C] features, [N] image index)` for 3-D or 4-D features."""
  if features.ndim == 3:
    if batch_index is not None:
      raise ValueError(
        f'roi_align.py: {where}: batch_index given but features are '
        f'[H, W, C] {tuple(features.shape)}; pass [B, H, W, C] features'
      )
    return features[None], jnp.zeros(rois.shape[:1], jnp.int32)
  if features.ndim == 4:
    if batch_index is None:
      raise ValueError(
        f'roi_align.py: {where}: [B, H, W, C] features {tuple(features.shape)} need batch_index [N]'
      )
    batch_index = jnp.asarray(batch_index)
    if batch_index.shape != rois.shape[:1]:
      raise ValueError(
        f'roi_align.py: {where}: batch_index must have shape '
        f'{rois.shape[:1]}, got {tuple(batch_index.shape)}'
      )
    # Clamped like a gather's index: the table is read without bounds checks.
    return features, jnp.clip(batch_index.astype(jnp.int32), 0, features.shape[0] - 1)
  raise ValueError(
    f'roi_align.py: {where}: features must be [H, W, C] or [B, H, W, C], '
    f'got {tuple(features.shape)}'
  )


def roi_align(
  features: Array,
  rois: Array,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float,
  sampling_ratio: int = 2,
  max_sampling_ratio: int = 4,
  batch_index: Array | None = None,
) -> Array:
  """ROIAlign from one feature map.

  Args:
    features: `[H, W, C]`, or `[B, H, W, C]` together with `batch_index`.
    rois: `[N, 4]` boxes `(y1, x1, y2, x2)` in input pixels.
    output_size: `h` or `(h, w)` bins.
    spatial_scale: map pixels per input pixel (1 / stride).
    sampling_ratio: samples per bin and axis; 0 = adaptive, capped at `max_sampling_ratio`.
    batch_index: `[N]` int image of each ROI when `features` has a batch axis (clamped to
      `[0, B)`).
  Returns:
    `[N, h, w, C]` in the features' dtype.
  """
  features, rois = jnp.asarray(features), jnp.asarray(rois)
  _check_rois('roi_align', rois)
  size = _check_output_size('roi_align', output_size)
  slots = _check_sampling('roi_align', sampling_ratio, max_sampling_ratio)
  features, batch_index = _batch_layout('roi_align', features, rois, batch_index)
  dtype = _compute_dtype(features.dtype)
  b, h, w, c = features.shape
  table = features.astype(dtype).reshape(b * h * w, c)
  n = rois.shape[0]
  out = _roi_align_flat(
    table,
    rois,
    jnp.full((n,), spatial_scale, dtype),
    jnp.full((n,), h, jnp.int32),
    jnp.full((n,), w, jnp.int32),
    batch_index * (h * w),
    size,
    int(sampling_ratio),
    slots,
  )
  return out.astype(features.dtype)


def _level_maps(
  where: str, features: Mapping[str, Array], levels: Sequence[int], batched: bool
) -> list[Array]:
  maps = []
  for level in levels:
    name = f'P{level}'
    if name not in features:
      raise ValueError(
        f'roi_align.py: {where}: features has no level {name!r} (keys '
        f"{sorted(features)}); expected 'P{levels[0]}'..'P{levels[-1]}'"
      )
    maps.append(jnp.asarray(features[name]))
  ndim = 4 if batched else 3
  first = maps[0]
  for level, m in zip(levels, maps):
    if m.ndim != ndim or m.shape[-1] != first.shape[-1] or m.shape[:-3] != first.shape[:-3]:
      raise ValueError(
        f'roi_align.py: {where}: level P{level} has shape {tuple(m.shape)}; '
        f'all levels must be {"[B, H, W, C]" if batched else "[H, W, C]"} '
        f'with the same B and C as P{levels[0]} {tuple(first.shape)}'
      )
  return maps


def multilevel_roi_align(
  features: Mapping[str, Array],
  rois: Array,
  output_size: int | Sequence[int],
  *,
  sampling_ratio: int = 2,
  max_sampling_ratio: int = 4,
  min_level: int = 2,
  max_level: int = 5,
  canonical_level: int = 4,
  canonical_size: float = 224.0,
  level: int | None = None,
  batch_index: Array | None = None,
) -> Array:
  """ROIAlign over an FPN pyramid, each ROI read from its assigned level (or one given level).

  Args:
    features: `{'P2': [H2, W2, C], 'P3': ..., ...}` (extra keys such as 'P6' are ignored);
      `P{k}` has stride `2**k`. With `batch_index`, every level is `[B, Hk, Wk, C]`.
    rois: `[N, 4]` boxes `(y1, x1, y2, x2)` in input pixels.
    output_size: `h` or `(h, w)` bins (7 for boxes, 14 for masks, 56 for the iMaskRCNN skip).
    sampling_ratio, max_sampling_ratio: as in `roi_align`.
    min_level, max_level, canonical_level, canonical_size: level assignment, see
      `assign_levels`.
    level: read every ROI from this one level instead (e.g. 2 for the 56x56 skip path).
    batch_index: `[N]` int image of each ROI when the levels have a batch axis (clamped to
      `[0, B)`).
  Returns:
    `[N, h, w, C]` in the features' dtype.
  """
  rois = jnp.asarray(rois)
  where = 'multilevel_roi_align'
  _check_rois(where, rois)
  size = _check_output_size(where, output_size)
  slots = _check_sampling(where, sampling_ratio, max_sampling_ratio)
  levels = list(range(min_level, max_level + 1)) if level is None else [level]
  if not levels:
    raise ValueError(
      f'roi_align.py: {where}: need min_level <= max_level, got {min_level} and {max_level}'
    )
  maps = _level_maps(where, features, levels, batched=batch_index is not None)
  out_dtype = maps[0].dtype
  dtype = _compute_dtype(out_dtype)
  _, batch_index = _batch_layout(where, maps[0], rois, batch_index)
  maps = [m if m.ndim == 4 else m[None] for m in maps]
  c = maps[0].shape[-1]
  # One flat table holding every level of every image; a ROI addresses its own map by the
  # table row of that map's pixel (0, 0).
  heights = [m.shape[1] for m in maps]
  widths = [m.shape[2] for m in maps]
  sizes = [m.shape[0] * m.shape[1] * m.shape[2] for m in maps]
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  table = jnp.concatenate([m.astype(dtype).reshape(-1, c) for m in maps], axis=0)
  if level is None:
    which = (
      assign_levels(
        rois,
        min_level=min_level,
        max_level=max_level,
        canonical_level=canonical_level,
        canonical_size=canonical_size,
      )
      - min_level
    )
  else:
    which = jnp.zeros(rois.shape[:1], jnp.int32)
  height = jnp.asarray(heights, jnp.int32)[which]
  width = jnp.asarray(widths, jnp.int32)[which]
  scale = jnp.asarray([2.0**-k for k in levels], dtype)[which]
  base = jnp.asarray(offsets)[which] + batch_index * height * width
  out = _roi_align_flat(table, rois, scale, height, width, base, size, int(sampling_ratio), slots)
  return out.astype(out_dtype)
