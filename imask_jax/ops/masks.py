"""Mask-head targets and pasting predicted masks back into the image.

* `mask_targets`: the `m x m` training target of each sampled ROI is its matched ground-truth
  mask cropped and resized into the ROI with ROIAlign (half-pixel aligned, spatial scale 1,
  adaptive sampling) and binarised with `>= 0.5`, as detectron2 does.
* `paste_mask_probs` / `paste_masks`: each detection's `m x m` probability map is resampled
  into its box over the whole image (and thresholded). Static shapes: every image pixel is
  placed in box-normalised coordinates, so the work is two small matmuls per detection (a
  `[H, m]` row-weight and a `[W, m]` column-weight matrix) and no box-dependent crop size
  appears.

Paste convention: the image pixel with centre `y + 0.5` sits at mask coordinate
`u = (y + 0.5 - y1) / (y2 - y1) * m - 0.5` (mask cell centres at integers, the half-pixel
alignment of `grid_sample(align_corners=False)` and of the targets) and is interpolated
bilinearly, `u` clamped to `[0, m - 1]`: the half cell between the outermost cell centres and
the box edge takes the edge cells' values, since the target of an edge cell was sampled there.
(detectron2's `paste_masks_in_image` pads with zeros instead, which shaves the corners of a
full mask.) So a mask of ones pastes to exactly its box. A pixel is inside the box when its
centre is in the half-open box `[y1, y2) x [x1, x2)`; pixels outside are False whatever the
threshold, and an empty or inverted box pastes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from imask_jax.ops import roi_align

Array = jax.Array


def mask_targets(
  gt_masks: Array,
  matched_gt: Array,
  rois: Array,
  output_size: int,
  *,
  sampling_ratio: int = 0,
  max_sampling_ratio: int = 4,
) -> Array:
  """Binary mask targets of sampled ROIs.

  Args:
    gt_masks: `[G, H, W]` ground-truth instance masks (bool, int or float; > 0.5 is inside)
      on the network input's pixel grid.
    matched_gt: `[S]` int index into `gt_masks` of each ROI's matched instance.
    rois: `[S, 4]` ROI boxes `(y1, x1, y2, x2)` in input pixels.
    output_size: `m`, the mask head's resolution (28, or 56 for iMaskRCNN).
    sampling_ratio, max_sampling_ratio: ROIAlign sampling (see `roi_align.roi_align`); the
      default is detectron2's adaptive ratio, capped at 4 samples per bin and axis.
  Returns:
    `[S, m, m]` float32 targets in {0, 1}. No gradient flows through it.
  """
  gt_masks, matched_gt, rois = (jnp.asarray(x) for x in (gt_masks, matched_gt, rois))
  if gt_masks.ndim != 3:
    raise ValueError(
      f'masks.py: mask_targets: gt_masks must be [G, H, W], got {tuple(gt_masks.shape)}'
    )
  if rois.ndim != 2 or rois.shape[-1] != 4:
    raise ValueError(f'masks.py: mask_targets: rois must be [S, 4], got {tuple(rois.shape)}')
  if matched_gt.shape != rois.shape[:1]:
    raise ValueError(
      f'masks.py: mask_targets: matched_gt must be [S] = {rois.shape[:1]} '
      f'like rois, got {tuple(matched_gt.shape)}'
    )
  if not isinstance(output_size, int) or output_size <= 0:
    raise ValueError(
      f'masks.py: mask_targets: output_size must be a positive int, got {output_size!r}'
    )
  masks = jax.lax.stop_gradient(gt_masks).astype(jnp.float32)[..., None]
  # An index outside [0, G) would read another instance's pixels: clamp like a gather does.
  matched_gt = jnp.clip(matched_gt.astype(jnp.int32), 0, gt_masks.shape[0] - 1)
  crops = roi_align.roi_align(
    masks,
    rois.astype(jnp.float32),
    output_size,
    spatial_scale=1.0,
    sampling_ratio=sampling_ratio,
    max_sampling_ratio=max_sampling_ratio,
    batch_index=matched_gt,
  )
  return (crops[..., 0] >= 0.5).astype(jnp.float32)


def _paste_weights(lo: Array, hi: Array, pixels: int, m: int) -> Array:
  """Bilinear weights of the mask cells for every image pixel along one axis.

  Returns `[D, pixels, m]` weights, zero for pixels whose centre is outside `[lo, hi)`.
  """
  centre = jnp.arange(pixels, dtype=lo.dtype) + 0.5
  extent = (hi - lo)[:, None]
  safe_extent = jnp.where(extent > 0, extent, 1.0)
  u = (centre[None, :] - lo[:, None]) / safe_extent * m - 0.5  # [D, pixels]
  u = jnp.clip(u, 0.0, m - 1.0)
  inside = (centre[None, :] >= lo[:, None]) & (centre[None, :] < hi[:, None])
  # relu(1 - |u - k|) is the bilinear weight of cell k.
  weight = jnp.maximum(1.0 - jnp.abs(u[..., None] - jnp.arange(m, dtype=lo.dtype)), 0.0)
  return jnp.where(inside[..., None], weight, 0.0)


def paste_mask_probs(mask_probs: Array, boxes: Array, image_size: Sequence[int]) -> Array:
  """Resamples `m x m` mask probabilities into their boxes on the full image.

  Args:
    mask_probs: `[D, m, m]` per-detection mask probabilities (or any `[D, mh, mw]` grid).
    boxes: `[D, 4]` detection boxes `(y1, x1, y2, x2)` in image pixels.
    image_size: `(H, W)` of the output.
  Returns:
    `[D, H, W]` probabilities (float32, or wider if `mask_probs` is), 0 outside each box.
  """
  mask_probs, boxes = jnp.asarray(mask_probs), jnp.asarray(boxes)
  if mask_probs.ndim != 3:
    raise ValueError(
      f'masks.py: paste_mask_probs: mask_probs must be [D, m, m], got {tuple(mask_probs.shape)}'
    )
  if boxes.shape != (mask_probs.shape[0], 4):
    raise ValueError(
      f'masks.py: paste_mask_probs: boxes must be [D, 4] = '
      f'{(mask_probs.shape[0], 4)} to match mask_probs, got '
      f'{tuple(boxes.shape)}'
    )
  if len(image_size) != 2 or not all(int(s) == s and s > 0 for s in image_size):
    raise ValueError(
      f'masks.py: paste_mask_probs: image_size must be (H, W) positive ints, got {image_size!r}'
    )
  height, width = int(image_size[0]), int(image_size[1])
  dtype = jnp.promote_types(mask_probs.dtype, jnp.float32)
  boxes = boxes.astype(dtype)
  rows = _paste_weights(boxes[:, 0], boxes[:, 2], height, mask_probs.shape[1])
  cols = _paste_weights(boxes[:, 1], boxes[:, 3], width, mask_probs.shape[2])
  # The weights are zero for pixels outside the box, so the product is 0 there.
  return jnp.einsum('dhk,dkl,dwl->dhw', rows, mask_probs.astype(dtype), cols)


def paste_masks(
  mask_probs: Array, boxes: Array, image_size: Sequence[int], threshold: float = 0.5
) -> Array:
  """Pastes `m x m` mask probabilities into their boxes on the full image and thresholds them.

  Args: as `paste_mask_probs`; threshold (> 0): a pixel is True when its interpolated
    probability is `>= threshold`.
  Returns:
    `[D, H, W]` bool masks (False outside each box).
  """
  if not threshold > 0:
    raise ValueError(
      f'masks.py: paste_masks: threshold must be > 0 (pixels outside a box '
      f'have probability 0), got {threshold!r}'
    )
  return paste_mask_probs(mask_probs, boxes, image_size) >= threshold
