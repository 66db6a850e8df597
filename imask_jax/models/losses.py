"""Loss terms of Mask R-CNN, each averaged over valid (non-padded) entries, in float32.

Padding is carried by masks and weights, never by shapes, so every term is a weighted sum
divided by the number of entries that count (at least 1, so an image without objects gives 0
and not NaN). Every term is normalised per image, then averaged over the images: the loss of
a batch is then the mean of the losses of its images, so splitting a batch over devices and
averaging with `pmean` gives exactly the single-device value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _per_image_mean(values: Array, count: Array) -> Array:
  """sum(values) / max(sum(count), 1) within each image ([B, ...] -> [B]), then the mean."""
  axes = tuple(range(1, values.ndim))
  per_image = jnp.sum(values, axis=axes) / jnp.maximum(jnp.sum(count, axis=axes), 1.0)
  return jnp.mean(per_image)


def per_roi_mean(per_roi: Array, positive: Array) -> Array:
  """The mean of a per-ROI loss `[B, P]` over each image's positive ROIs `[B, P]`, then over
  the batch (the mask terms' normalisation)."""
  positive = positive.astype(jnp.float32)
  return _per_image_mean(positive * per_roi, positive)


def rpn_objectness_loss(logits: Array, labels: Array, weight: Array) -> Array:
  """Sigmoid BCE over each image's sampled anchors. logits, labels, weight: [B, A]."""
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32))
  return _per_image_mean(weight * bce, weight)


def weighted_l1(pred: Array, target: Array, weight: Array, *, normaliser: Array) -> Array:
  """Sum of |pred - target| over the 4 coordinates of weighted rows / sum(normaliser).

  pred, target: [B, N, 4]; weight, normaliser: [B, N]. The box terms are normalised by the
  number of sampled entries (positives and negatives), as Detectron2 does, so the box loss
  does not grow when few positives are sampled.
  """
  l1 = jnp.sum(jnp.abs(pred.astype(jnp.float32) - target), axis=-1)
  return _per_image_mean(weight * l1, normaliser)


def softmax_cross_entropy(logits: Array, labels: Array, valid: Array) -> Array:
  """Softmax CE over classes (0 = background). logits [B, N, K + 1], labels/valid [B, N]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  valid = valid.astype(jnp.float32)
  return _per_image_mean(valid * ce, valid)


def take_class(per_class: Array, classes: Array) -> Array:
  """Selects each ROI's own class from class-specific outputs.

  per_class: [B, N, K, 4] box deltas or [B, N, m, m, K] mask logits; classes: [B, N] in 1..K
  (0, background/padding, selects class 1; such rows carry zero weight in every loss).
  """
  index = jnp.maximum(classes - 1, 0)
  if per_class.ndim == 4:  # [B, N, K, 4]
    return jnp.take_along_axis(per_class, index[..., None, None], axis=2)[:, :, 0]
  return jnp.take_along_axis(per_class, index[..., None, None, None], axis=-1)[..., 0]


def boundary_band(targets: Array) -> Array:
  """1 on pixels whose 3x3 neighbourhood holds both mask and background. targets [..., m, m]."""
  window = (1,) * (targets.ndim - 2) + (3, 3)
  strides = (1,) * targets.ndim
  hi = jax.lax.reduce_window(targets, -jnp.inf, jax.lax.max, window, strides, 'SAME')
  lo = jax.lax.reduce_window(targets, jnp.inf, jax.lax.min, window, strides, 'SAME')
  return (hi - lo > 0.5).astype(jnp.float32)


def mask_bce(
  logits: Array, targets: Array, positive: Array, *, boundary_weight: float = 0.0
) -> Array:
  """Per-pixel sigmoid BCE of each positive ROI's own-class mask, at the head's resolution.

  logits, targets: [B, P, m, m]; positive: [B, P]. Each ROI's loss is its pixel mean; the
  term is the mean over positive ROIs. With `boundary_weight` w > 0, pixels in the target's
  boundary band weigh 1 + w (an optional boundary-focused variant; off by default).
  """
  targets = targets.astype(jnp.float32)
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
  if boundary_weight > 0:
    w = 1.0 + boundary_weight * boundary_band(targets)
    per_roi = jnp.sum(w * bce, axis=(-2, -1)) / jnp.sum(w, axis=(-2, -1))
  else:
    per_roi = jnp.mean(bce, axis=(-2, -1))
  return per_roi_mean(per_roi, positive)


def mask_dice(logits: Array, targets: Array, positive: Array, *, smooth: float = 1.0) -> Array:
  """Soft Dice loss of each positive ROI's own-class mask: 1 - (2 sum(p t) + s) / (sum(p) +
  sum(t) + s) with p = sigmoid(logits), per ROI, then the mean over positive ROIs.

  BCE is a pixel mean, so on a thin band (cartilage fills a tenth of its box) it gains more by
  calling an uncertain pixel background than the band loses; Dice weighs the band as a whole.
  logits, targets: [B, P, m, m]; positive: [B, P]. smooth (s) keeps an empty target finite.
  """
  probs = jax.nn.sigmoid(logits.astype(jnp.float32))
  targets = targets.astype(jnp.float32)
  overlap = jnp.sum(probs * targets, axis=(-2, -1))
  total = jnp.sum(probs, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1))
  per_roi = 1.0 - (2.0 * overlap + smooth) / (total + smooth)
  return per_roi_mean(per_roi, positive)
