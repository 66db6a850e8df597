"""Box arithmetic: areas, IoU, clipping and the R-CNN box coder.

Boxes are `(y1, x1, y2, x2)` in continuous pixel coordinates (see `anchors.py`); a box's
height is `y2 - y1` with no "+1". Every function takes any number of leading batch axes
(`[..., 4]`) unless it says otherwise, and works under `jax.jit` and `jax.vmap`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Detectron2's default coder weights for the box head; the RPN conventionally uses 1s.
DEFAULT_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Largest log-scale change decode accepts: keeps exp() from producing boxes of 1000x a
# 16 px anchor from one bad logit.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16.0)
# Floor for heights/widths divided by or logged in `encode`, so degenerate (zero-size, e.g.
# padded) boxes give large finite targets instead of inf/NaN.
_MIN_SIZE = 1e-6


def _check_boxes(name: str, boxes: jax.Array, ndim: int | None = None) -> None:
  if boxes.shape[-1:] != (4,) or (ndim is not None and boxes.ndim != ndim):
    want = '[..., 4]' if ndim is None else '[' + ', '.join(['N'] * (ndim - 1) + ['4']) + ']'
    raise ValueError(
      f'boxes.py: {name} must have shape {want} (y1, x1, y2, x2), got {tuple(boxes.shape)}'
    )


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
  weights = tuple(float(w) for w in weights)
  if len(weights) != 4 or not all(w > 0 for w in weights):
    raise ValueError(
      f'boxes.py: weights must be 4 positive numbers (wy, wx, wh, ww), got {weights!r}'
    )
  return weights


def area(boxes: jax.Array) -> jax.Array:
  """`[..., 4] -> [...]`: area in pixels^2; inverted boxes count as empty (0)."""
  boxes = jnp.asarray(boxes)
  _check_boxes('area(boxes)', boxes)
  height = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  width = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return height * width


def iou_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise intersection over union.

  Args:
    a: `[N, 4]` boxes.
    b: `[M, 4]` boxes.

  Returns:
    `[N, M]` IoU in [0, 1]. A pair whose union is empty (both boxes zero-area) has IoU 0,
    never NaN.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  _check_boxes('iou_matrix(a)', a, ndim=2)
  _check_boxes('iou_matrix(b)', b, ndim=2)
  top = jnp.maximum(a[:, None, 0], b[None, :, 0])
  left = jnp.maximum(a[:, None, 1], b[None, :, 1])
  bottom = jnp.minimum(a[:, None, 2], b[None, :, 2])
  right = jnp.minimum(a[:, None, 3], b[None, :, 3])
  inter = jnp.maximum(bottom - top, 0.0) * jnp.maximum(right - left, 0.0)
  union = area(a)[:, None] + area(b)[None, :] - inter
  has_union = union > 0.0
  return jnp.where(has_union, inter / jnp.where(has_union, union, 1.0), 0.0)


def clip(boxes: jax.Array, image_hw: tuple[int, int] | jax.Array) -> jax.Array:
  """Clamps `[..., 4]` boxes into the image `[0, H] x [0, W]`.

  `image_hw` may be a static `(H, W)` or an array of shape `[2]` (or `[..., 2]` broadcasting
  against the boxes' leading axes), e.g. each image's unpadded size.
  """
  boxes = jnp.asarray(boxes)
  _check_boxes('clip(boxes)', boxes)
  hw = jnp.asarray(image_hw, dtype=boxes.dtype)
  if hw.shape[-1:] != (2,):
    raise ValueError(f'boxes.clip: image_hw must be (H, W), got shape {tuple(hw.shape)}')
  limits = jnp.concatenate([hw, hw], axis=-1)
  if limits.ndim > 1:  # per-image sizes: broadcast over the boxes of each image
    limits = jnp.expand_dims(limits, axis=tuple(range(limits.ndim - 1, boxes.ndim - 1)))
  return jnp.clip(boxes, 0.0, limits)


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  height = boxes[..., 2] - boxes[..., 0]
  width = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * height, boxes[..., 1] + 0.5 * width, height, width


def encode(
  boxes: jax.Array, anchors: jax.Array, weights: Sequence[float] = DEFAULT_WEIGHTS
) -> jax.Array:
  """Regression targets that turn `anchors` into `boxes`.

  `dy = wy * (cy_box - cy_anchor) / h_anchor`, `dh = wh * log(h_box / h_anchor)`, likewise
  for x/w. Heights and widths are floored at 1e-6 px so degenerate boxes give finite targets.

  Args:
    boxes: `[..., 4]` target boxes.
    anchors: `[..., 4]` reference boxes (anchors or proposals), broadcastable with `boxes`.
    weights: `(wy, wx, wh, ww)`; (10, 10, 5, 5) for the box head, (1, 1, 1, 1) for the RPN.

  Returns:
    `[..., 4]` deltas `(dy, dx, dh, dw)`.
  """
  boxes, anchors = jnp.asarray(boxes), jnp.asarray(anchors)
  _check_boxes('encode(boxes)', boxes)
  _check_boxes('encode(anchors)', anchors)
  wy, wx, wh, ww = _check_weights(weights)
  cy, cx, h, w = _centre_size(boxes)
  acy, acx, ah, aw = _centre_size(anchors)
  ah, aw = jnp.maximum(ah, _MIN_SIZE), jnp.maximum(aw, _MIN_SIZE)
  h, w = jnp.maximum(h, _MIN_SIZE), jnp.maximum(w, _MIN_SIZE)
  return jnp.stack(
    [wy * (cy - acy) / ah, wx * (cx - acx) / aw, wh * jnp.log(h / ah), ww * jnp.log(w / aw)],
    axis=-1,
  )


def decode(
  deltas: jax.Array,
  anchors: jax.Array,
  weights: Sequence[float] = DEFAULT_WEIGHTS,
  clamp: float = DEFAULT_SCALE_CLAMP,
) -> jax.Array:
  """Inverse of `encode`: applies `[..., 4]` deltas to `[..., 4]` anchors.

  `dh / wh` and `dw / ww` are clamped to at most `clamp` before `exp`, so a wild prediction
  cannot overflow. Returns `[..., 4]` boxes `(y1, x1, y2, x2)` (not clipped to the image).
  """
  deltas, anchors = jnp.asarray(deltas), jnp.asarray(anchors)
  _check_boxes('decode(deltas)', deltas)
  _check_boxes('decode(anchors)', anchors)
  wy, wx, wh, ww = _check_weights(weights)
  acy, acx, ah, aw = _centre_size(anchors.astype(deltas.dtype))
  dy, dx = deltas[..., 0] / wy, deltas[..., 1] / wx
  dh = jnp.minimum(deltas[..., 2] / wh, clamp)
  dw = jnp.minimum(deltas[..., 3] / ww, clamp)
  cy, cx = acy + dy * ah, acx + dx * aw
  h, w = ah * jnp.exp(dh), aw * jnp.exp(dw)
  return jnp.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)
