"""A point-based boundary refinement head (PointRend, Kirillov et al., CVPR 2020).

The mask head's `m x m` logits are coarse over a long thin box: a femoral-cartilage box 80
pixels wide gets 56 cells, and the plate is 2-3 of them thick. PointRend predicts the mask
again at chosen points only, from features read exactly there, so the boundary is placed at
the resolution of the features and not of the grid:

* per point: the coarse logits of all K classes at the point, the `level` pyramid map there
  (P2 in the paper), and optionally an `image_patch x image_patch` patch of the input image
  around it (input pixels, bilinear): at 0.8 mm a P2 pixel is 3.2 mm, wider than the plate,
  while the input resolves its edges;
* an MLP shared by all points (`num_fc` layers of `dim`, the coarse logits concatenated again
  before every layer, as in the paper) -> K logits.

Training (`PointSpec.train_points` per ROI): PointRend's importance sampling on the coarse
logits (`points.uncertain_points`), a BCE against the ground-truth mask read at the same
points. Inference: `subdivision_steps` rounds of adaptive subdivision: the own-class logit
grid is upsampled 2x and its `subdivision_points` most uncertain cells are predicted again, so
the masks come back at `m * 2^steps`.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from imask_jax.models.spec import PointSpec
from imask_jax.ops import points as point_ops

Array = jax.Array


class PointMLP(nn.Module):
  """`[N, P, F]` fine features and `[N, P, K]` coarse logits -> `[N, P, K]` float32 logits."""

  num_classes: int
  dim: int = 64
  num_fc: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, fine: Array, coarse: Array) -> Array:
    coarse = coarse.astype(self.dtype)
    x = fine.astype(self.dtype)
    for i in range(self.num_fc):
      x = nn.relu(
        nn.Dense(
          self.dim,
          dtype=self.dtype,
          kernel_init=nn.initializers.variance_scaling(2.0, 'fan_in', 'normal'),
          name=f'fc{i + 1}',
        )(jnp.concatenate([x, coarse], axis=-1))
      )
    logits = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      kernel_init=nn.initializers.normal(0.001),
      name='logits',
    )(jnp.concatenate([x, coarse], axis=-1))
    return logits.astype(jnp.float32)


def _patch_offsets(side: int) -> Array:
  """`[side^2, 2]` input-pixel offsets of a side x side patch centred on 0."""
  steps = jnp.arange(side, dtype=jnp.float32) - (side - 1) / 2
  dy, dx = jnp.meshgrid(steps, steps, indexing='ij')
  return jnp.stack([dy.ravel(), dx.ravel()], axis=-1)


class PointHead(nn.Module):
  """Point features and logits for box-normalised points of ROIs.

  Call: (points `[N, P, 2]` box-normalised, rois `[N, 4]` input pixels, batch index `[N]`,
  coarse logits `[N, m, m, K]`, pyramid `{level: [B, h, w, C]}`, images `[B, H, W, Ci]`) ->
  `[N, P, K]` float32 logits.
  """

  spec: PointSpec
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    points: Array,
    rois: Array,
    batch_index: Array,
    coarse_logits: Array,
    pyramid: Mapping[str, Array],
    images: Array,
  ) -> Array:
    s = self.spec
    image_points = point_ops.roi_points_to_image(points, jax.lax.stop_gradient(rois))
    coarse = jax.vmap(point_ops.sample_grid_at_roi_points)(coarse_logits, points)  # [N, P, K]
    stride = 2 ** int(s.level.lstrip('P'))
    level_map = pyramid[s.level]
    fine = [point_ops.sample_maps_at_image_points(level_map, stride, batch_index, image_points)]
    if s.image_patch > 0:
      offsets = _patch_offsets(s.image_patch)  # [T, 2]
      n, p = points.shape[:2]
      taps = (image_points[:, :, None, :] + offsets).reshape(n, -1, 2)  # [N, P * T, 2]
      patch = point_ops.sample_maps_at_image_points(images, 1, batch_index, taps)  # [N, P*T, Ci]
      fine.append(patch.reshape(n, p, -1).astype(level_map.dtype))
    return PointMLP(self.num_classes, s.dim, s.num_fc, self.dtype, name='mlp')(
      jnp.concatenate(fine, axis=-1), coarse
    )

  def refine(
    self,
    own_logits: Array,
    rois: Array,
    batch_index: Array,
    coarse_logits: Array,
    pyramid: Mapping[str, Array],
    images: Array,
    classes: Array,
  ) -> Array:
    """Adaptive subdivision: `own_logits [N, m, m]` (each ROI's class, 1..K in `classes [N]`)
    -> `[N, m 2^steps, m 2^steps]` logits with the most uncertain cells of every round
    predicted by the point head."""
    s = self.spec
    logits = own_logits
    for _ in range(s.subdivision_steps):
      logits = point_ops.upsample2x(logits)
      n, r = logits.shape[:2]
      index, centres = point_ops.uncertain_cells(logits, s.subdivision_points)
      per_class = self(centres, rois, batch_index, coarse_logits, pyramid, images)  # [N, P, K]
      own = self._own_class(per_class, classes)
      flat = logits.reshape(n, r * r)
      flat = jax.vmap(lambda row, i, v: row.at[i].set(v))(flat, index, own)
      logits = flat.reshape(n, r, r)
    return logits

  def loss(
    self,
    chosen: Array,
    coarse_logits: Array,
    rois: Array,
    batch_index: Array,
    classes: Array,
    matched_gt: Array,
    pyramid: Mapping[str, Array],
    images: Array,
    gt_masks: Array,
  ) -> Array:
    """Per-ROI BCE of the point logits at the box-normalised points `chosen [N, T, 2]`
    (`points.uncertain_points` of the coarse own-class logits) against the ground truth read
    at the same points: `[N]` float32.

    coarse_logits `[N, m, m, K]`, rois `[N, 4]`, batch_index `[N]`, classes `[N]` (1..K),
    matched_gt `[N]` (index into its image's instances), gt_masks `[B, M, H, W]`."""
    per_class = self(chosen, rois, batch_index, coarse_logits, pyramid, images)  # [N, T, K]
    logits = self._own_class(per_class, classes)
    masks = jax.lax.stop_gradient(gt_masks)
    flat_masks = masks.reshape((-1,) + masks.shape[2:])  # [B * M, H, W]
    layer = batch_index * masks.shape[1] + jnp.clip(matched_gt, 0, masks.shape[1] - 1)
    labels = point_targets(
      flat_masks, layer, point_ops.roi_points_to_image(chosen, jax.lax.stop_gradient(rois))
    )
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)

  def _own_class(self, per_class: Array, classes: Array) -> Array:
    """`[N, P, K]` -> `[N, P]`: each ROI's class (1..K; 0, padding, reads class 1)."""
    index = jnp.clip(classes - 1, 0, self.num_classes - 1)[:, None, None]
    return jnp.take_along_axis(per_class, index, axis=-1)[..., 0]


def point_targets(gt_masks: Array, matched_gt: Array, image_points: Array) -> Array:
  """Soft ground truth at points: `gt_masks [G, H, W]` (> 0.5 inside) of one image, each
  ROI's matched instance `matched_gt [N]`, input-pixel points `[N, P, 2]` -> `[N, P]` float32
  in [0, 1] (bilinear between pixel centres, as PointRend's labels). No gradient."""
  masks = jax.lax.stop_gradient(gt_masks)[..., None].astype(jnp.float32)
  return point_ops.sample_maps_at_image_points(masks, 1, matched_gt, image_points)[..., 0]
