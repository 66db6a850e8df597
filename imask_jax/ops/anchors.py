"""Anchor boxes for the FPN levels P2-P6.

Conventions (shared with the rest of `imask_jax.ops`):

* Boxes are `(y1, x1, y2, x2)` in continuous pixel coordinates of the network input: pixel
  `(i, j)` covers `[i, i + 1) x [j, j + 1)`, so its centre is `(i + 0.5, j + 0.5)`.
* Feature cell `(i, j)` of a level with stride `s` covers input pixels
  `[i * s, (i + 1) * s)`; its anchors are centred on `((i + 0.5) * s, (j + 0.5) * s)`, the
  centre of that footprint in the same continuous coordinates (this is what half-pixel aligned
  ROIAlign expects).
* Aspect ratio is `ratio = height / width`. An anchor of size `z` and ratio `r` keeps the area
  `z ** 2`: `height = z * sqrt(r)`, `width = z / sqrt(r)`. Cartilage is a thin long band, so
  ratios far outside 0.5-2 (0.125 ... 8) are expected and supported.
* The anchors of one level are ordered `(y, x, anchor)`, row-major, with the anchor index
  fastest, so that a conv head's `[H, W, A * k]` output reshaped to `[H * W * A, k]` lines up
  with them. Within a location the anchors are ordered scale-major: for each scale (octave
  step) all ratios in the given order.

Everything here is NumPy computed at trace time: anchors depend only on static shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

DEFAULT_STRIDES = (4, 8, 16, 32, 64)
DEFAULT_SIZES = (32, 64, 128, 256, 512)
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def anchor_shapes(
  size: float, *, scales_per_octave: int = 1, aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS
) -> np.ndarray:
  """Heights and widths of the anchors placed at one location.

  Args:
    size: base anchor side in pixels (the square anchor of scale 1 is `size x size`).
    scales_per_octave: number of scales `2 ** (k / scales_per_octave)`, k = 0 .. n-1.
    aspect_ratios: `height / width` of each anchor; each must be positive and finite.

  Returns:
    float64 `[A, 2]` of `(height, width)`, A = scales_per_octave * len(aspect_ratios), in
    scale-major order.
  """
  if not (math.isfinite(size) and size > 0):
    raise ValueError(f'anchors.anchor_shapes: size must be a positive number, got {size!r}')
  if int(scales_per_octave) != scales_per_octave or scales_per_octave < 1:
    raise ValueError(
      f'anchors.anchor_shapes: scales_per_octave must be an integer >= 1, got {scales_per_octave!r}'
    )
  ratios = np.asarray(aspect_ratios, dtype=np.float64)
  if ratios.ndim != 1 or ratios.size == 0 or not np.all(np.isfinite(ratios) & (ratios > 0)):
    raise ValueError(
      'anchors.anchor_shapes: aspect_ratios must be a non-empty list of positive '
      f'height/width ratios, got {aspect_ratios!r}'
    )
  scales = 2.0 ** (np.arange(scales_per_octave) / scales_per_octave)
  sides = size * scales[:, None]  # [S, 1]
  heights = sides * np.sqrt(ratios)[None, :]  # [S, R]
  widths = sides / np.sqrt(ratios)[None, :]
  return np.stack([heights.reshape(-1), widths.reshape(-1)], axis=-1)


def level_anchors(
  feature_hw: tuple[int, int],
  stride: int,
  size: float,
  *,
  scales_per_octave: int = 1,
  aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
) -> np.ndarray:
  """Anchors of one pyramid level.

  Args:
    feature_hw: `(H_l, W_l)` of the level's feature map.
    stride: input pixels per feature cell.
    size, scales_per_octave, aspect_ratios: see `anchor_shapes`.

  Returns:
    float32 `[H_l * W_l * A, 4]` boxes `(y1, x1, y2, x2)` in input pixels, order `(y, x, a)`.
  """
  height, width = (int(v) for v in feature_hw)
  if height < 1 or width < 1:
    raise ValueError(f'anchors.level_anchors: feature_hw must be positive, got {feature_hw!r}')
  if int(stride) != stride or stride < 1:
    raise ValueError(f'anchors.level_anchors: stride must be a positive integer, got {stride!r}')
  shapes = anchor_shapes(size, scales_per_octave=scales_per_octave, aspect_ratios=aspect_ratios)
  cy = (np.arange(height) + 0.5) * stride
  cx = (np.arange(width) + 0.5) * stride
  cy, cx = np.meshgrid(cy, cx, indexing='ij')  # [H, W]
  centres = np.stack([cy, cx], axis=-1)[:, :, None, :]  # [H, W, 1, 2]
  half = 0.5 * shapes[None, None, :, :]  # [1, 1, A, 2]
  boxes = np.concatenate([centres - half, centres + half], axis=-1)  # [H, W, A, 4]
  return boxes.reshape(-1, 4).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MultilevelAnchors:
  """Anchors of all pyramid levels.

  Attributes:
    per_level: one float32 `[H_l * W_l * A, 4]` array per level, order `(y, x, anchor)`.
    boxes: float32 `[sum_l H_l * W_l * A, 4]`, the levels concatenated from finest to coarsest.
    level_starts: `level_starts[l]` is the first row of level l in `boxes`; it has one more
      entry than there are levels, the last being `len(boxes)`, so level l is
      `boxes[level_starts[l]:level_starts[l + 1]]`.
    feature_shapes: `(H_l, W_l)` of each level.
    strides: input pixels per feature cell of each level.
    num_anchors_per_location: A, the same on every level.
  """

  per_level: tuple[np.ndarray, ...]
  boxes: np.ndarray
  level_starts: tuple[int, ...]
  feature_shapes: tuple[tuple[int, int], ...]
  strides: tuple[int, ...]
  num_anchors_per_location: int

  @property
  def num_levels(self) -> int:
    return len(self.per_level)

  def level_ids(self) -> np.ndarray:
    """int32 `[sum_l H_l * W_l * A]`: the level index (0 = finest) of each row of `boxes`."""
    counts = np.diff(np.asarray(self.level_starts))
    return np.repeat(np.arange(self.num_levels, dtype=np.int32), counts)


def feature_shape(image_hw: tuple[int, int], stride: int) -> tuple[int, int]:
  """`(ceil(H / stride), ceil(W / stride))`: the map a stack of stride-2 'SAME' convs makes."""
  return (-(-int(image_hw[0]) // stride), -(-int(image_hw[1]) // stride))


def multilevel_anchors(
  image_hw: tuple[int, int],
  *,
  strides: Sequence[int] = DEFAULT_STRIDES,
  sizes: Sequence[float] = DEFAULT_SIZES,
  scales_per_octave: int = 1,
  aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
  feature_shapes: Sequence[tuple[int, int]] | None = None,
) -> MultilevelAnchors:
  """Anchors for every pyramid level, one base size per level.

  Args:
    image_hw: `(H, W)` of the network input in pixels.
    strides: stride of each level (P2-P6 by default: 4, 8, 16, 32, 64).
    sizes: base anchor side of each level in pixels (default 32 ... 512).
    scales_per_octave, aspect_ratios: see `anchor_shapes`; the same on every level.
    feature_shapes: `(H_l, W_l)` of each level; defaults to `ceil(image / stride)`. Pass the
      backbone's real shapes when they differ.

  Returns:
    A `MultilevelAnchors`.
  """
  strides = tuple(int(s) for s in strides)
  sizes = tuple(float(z) for z in sizes)
  if len(strides) == 0 or len(strides) != len(sizes):
    raise ValueError(
      'anchors.multilevel_anchors: need one size per stride, got strides '
      f'{strides!r} and sizes {sizes!r}'
    )
  if len(image_hw) != 2 or min(image_hw) < 1:
    raise ValueError(f'anchors.multilevel_anchors: image_hw must be (H, W) > 0, got {image_hw!r}')
  if feature_shapes is None:
    feature_shapes = [feature_shape(image_hw, s) for s in strides]
  feature_shapes = tuple((int(h), int(w)) for h, w in feature_shapes)
  if len(feature_shapes) != len(strides):
    raise ValueError(
      'anchors.multilevel_anchors: need one feature shape per stride, got '
      f'{feature_shapes!r} for strides {strides!r}'
    )
  per_level = tuple(
    level_anchors(hw, s, z, scales_per_octave=scales_per_octave, aspect_ratios=aspect_ratios)
    for hw, s, z in zip(feature_shapes, strides, sizes)
  )
  starts = np.concatenate([[0], np.cumsum([len(a) for a in per_level])])
  return MultilevelAnchors(
    per_level=per_level,
    boxes=np.concatenate(per_level, axis=0),
    level_starts=tuple(int(v) for v in starts),
    feature_shapes=feature_shapes,
    strides=strides,
    num_anchors_per_location=scales_per_octave * len(tuple(aspect_ratios)),
  )
