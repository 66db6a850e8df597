"""Anchor/proposal matching, balanced sampling and the RPN and ROI-head training targets.

Static shapes throughout: ground truth comes padded to a fixed `G` slots with a `gt_valid`
mask (there must be at least one slot), sampled sets are padded to `num_samples` with a
`valid` mask, and randomness comes from an explicit PRNG key. Every function works under
`jax.jit` and `jax.vmap` over a batch of images (pass one key per image).

Label convention: 1 positive (foreground), 0 negative (background), -1 ignored.
Padded index slots hold -1; gather with `jnp.maximum(index, 0)` and mask, or with
`jnp.take(..., mode="fill")`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from imask_jax.ops import boxes as box_ops

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1
PAD_INDEX = -1
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


class Match(NamedTuple):
  """Result of `match` for N rows (anchors or proposals).

  gt_index: int32 `[N]`, the valid gt with the highest IoU (lowest index on ties); -1 only
    when the image has no valid gt. Never a padded gt.
  labels: int32 `[N]` in {1, 0, -1}.
  """

  gt_index: jax.Array
  labels: jax.Array


class BalancedSample(NamedTuple):
  """Result of `sample_balanced`, `S = num_samples` slots, positives first.

  indices: int32 `[S]` rows of `labels`, -1 in unused slots.
  is_positive: bool `[S]`.
  valid: bool `[S]`, False in unused slots.
  """

  indices: jax.Array
  is_positive: jax.Array
  valid: jax.Array


class RpnTargets(NamedTuple):
  """Per-anchor RPN training targets for A anchors.

  objectness: int32 `[A]`, 1 for sampled positives, 0 elsewhere (the classification label).
  weight: float32 `[A]`, 1 for sampled anchors (positive or negative), 0 elsewhere; the
    objectness loss is `sum(weight * bce) / num_samples`.
  box_targets: float32 `[A, 4]`, encoded matched gt box for sampled positives, 0 elsewhere.
  box_weight: float32 `[A]`, 1 for sampled positives, 0 elsewhere.
  gt_index: int32 `[A]`, matched gt for sampled positives, -1 elsewhere.
  """

  objectness: jax.Array
  weight: jax.Array
  box_targets: jax.Array
  box_weight: jax.Array
  gt_index: jax.Array


class RoiTargets(NamedTuple):
  """Sampled ROIs and their box-head/mask-head targets, `S = num_samples` slots.

  rois: float32 `[S, 4]`, sampled boxes (proposals or appended gt boxes), gradient stopped;
    zeros in invalid slots.
  classes: int32 `[S]`, gt class of positives, 0 (background) for negatives and padding.
  gt_index: int32 `[S]`, matched gt slot of positives (for mask targets), -1 elsewhere.
  box_targets: float32 `[S, 4]`, `encode(gt, roi, weights)` for positives, 0 elsewhere.
  valid: bool `[S]`, the slot holds a sampled ROI.
  is_positive: bool `[S]`.
  source_index: int32 `[S]`, row of the sampled ROI in `concat([proposals, gt_boxes])`, -1 in
    invalid slots.
  """

  rois: jax.Array
  classes: jax.Array
  gt_index: jax.Array
  box_targets: jax.Array
  valid: jax.Array
  is_positive: jax.Array
  source_index: jax.Array


def match(
  iou: jax.Array, gt_valid: jax.Array, *, high: float, low: float, allow_low_quality: bool
) -> Match:
  """Labels rows of an IoU matrix against ground truth.

  IoU with the best valid gt `>= high` is positive, `< low` negative, in between ignored.
  With `allow_low_quality`, every valid gt also makes positive the rows that reach its
  highest IoU (ties included), provided that IoU is above 0, so no object goes without a
  positive anchor. Those rows keep their own best gt as `gt_index`, as in Detectron2.
  Padded (invalid) gt columns never match anything.

  Args:
    iou: `[N, G]` IoU of each row with each gt slot.
    gt_valid: bool `[G]`.
    high, low: thresholds with `low <= high` (RPN: 0.7 / 0.3; ROI heads: 0.5 / 0.5).
    allow_low_quality: True for the RPN, False for the ROI heads.

  Returns:
    A `Match`.
  """
  iou = jnp.asarray(iou)
  gt_valid = jnp.asarray(gt_valid, dtype=bool)
  if iou.ndim != 2 or iou.shape[1] == 0:
    raise ValueError(
      f'sampling.match: iou must be [N, G] with G >= 1 gt slots (pad with '
      f'gt_valid=False), got {tuple(iou.shape)}'
    )
  if gt_valid.shape != iou.shape[1:]:
    raise ValueError(
      f'sampling.match: gt_valid must be [G] = [{iou.shape[1]}], got {tuple(gt_valid.shape)}'
    )
  if low > high:
    raise ValueError(f'sampling.match: need low <= high, got low={low} high={high}')
  # -1 is below any real IoU, so padded columns never win a max.
  masked = jnp.where(gt_valid[None, :], iou, -1.0)
  gt_index = jnp.argmax(masked, axis=1).astype(jnp.int32)
  best = jnp.max(masked, axis=1)
  labels = jnp.where(best >= high, POSITIVE, jnp.where(best < low, NEGATIVE, IGNORE))
  if allow_low_quality:
    # Padded columns have best -1 and so never pass the > 0 test.
    best_per_gt = jnp.max(masked, axis=0)
    reaches_best = (masked == best_per_gt[None, :]) & (best_per_gt > 0.0)[None, :]
    labels = jnp.where(jnp.any(reaches_best, axis=1), POSITIVE, labels)
  gt_index = jnp.where(jnp.any(gt_valid), gt_index, PAD_INDEX)
  return Match(gt_index=gt_index, labels=labels.astype(jnp.int32))


def num_positives_wanted(num_samples: int, positive_fraction: float) -> int:
  """`round(num_samples * positive_fraction)`, halves rounded up."""
  return int(math.floor(num_samples * positive_fraction + 0.5))


def sample_balanced(
  labels: jax.Array,
  *,
  num_samples: int,
  positive_fraction: float,
  key: jax.Array,
  hard_negative_fraction: float = 0.0,
) -> BalancedSample:
  """Random subset with a capped share of positives, static size.

  Takes exactly `min(#positives, round(num_samples * positive_fraction))` positives, then
  `min(#negatives, num_samples - positives taken)` negatives; ignored rows (-1) are never
  taken. Each draw is uniform: the top-k of one uniform random key per row. With
  `hard_negative_fraction` h > 0, the first round(h * negatives taken) negative slots go to
  the negative rows that come first in row order (callers put the hardest first: the RPN's
  proposals by objectness) and the rest are drawn uniformly from the other negatives.

  Args:
    labels: int `[N]` in {1, 0, -1}.
    num_samples: S, static.
    positive_fraction: in [0, 1].
    key: a `jax.random` key.
    hard_negative_fraction: in [0, 1]; 0 (the default) draws every negative uniformly.

  Returns:
    A `BalancedSample` (positives in the first slots, then negatives, then padding).
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'sampling.sample_balanced: labels must be [N], got {tuple(labels.shape)}')
  if int(num_samples) != num_samples or num_samples < 1:
    raise ValueError(
      f'sampling.sample_balanced: num_samples must be a positive int, got {num_samples!r}'
    )
  if not 0.0 <= positive_fraction <= 1.0:
    raise ValueError(
      f'sampling.sample_balanced: positive_fraction must be in [0, 1], got {positive_fraction!r}'
    )
  if not 0.0 <= hard_negative_fraction <= 1.0:
    raise ValueError(
      'sampling.sample_balanced: hard_negative_fraction must be in [0, 1], got '
      f'{hard_negative_fraction!r}'
    )
  n = labels.shape[0]
  num_samples = int(num_samples)
  pos_quota = num_positives_wanted(num_samples, positive_fraction)
  is_pos, is_neg = labels == POSITIVE, labels == NEGATIVE
  num_pos = jnp.minimum(jnp.sum(is_pos, dtype=jnp.int32), pos_quota)
  num_neg = jnp.minimum(jnp.sum(is_neg, dtype=jnp.int32), num_samples - num_pos)

  # Uniform keys in [0, 1); rows outside the class get -1 and sort after every member.
  priority = jax.random.uniform(key, (n,))
  negative_priority = priority
  if hard_negative_fraction > 0.0:  # static: the RPN's draw over every anchor skips this
    # Hard negatives outrank every random key (priorities in (1, 2], earlier rows higher).
    negative_rank = jnp.cumsum(is_neg, dtype=jnp.int32) - 1
    num_hard = jnp.floor(hard_negative_fraction * num_neg + 0.5).astype(jnp.int32)
    hard = is_neg & (negative_rank < num_hard)
    negative_priority = jnp.where(hard, 2.0 - negative_rank / n, priority)
  slot = jnp.arange(num_samples)
  take_pos = slot < num_pos
  take_neg = (slot >= num_pos) & (slot < num_pos + num_neg)
  indices = jnp.full((num_samples,), PAD_INDEX, jnp.int32)
  k_pos, k_neg = min(pos_quota, n), min(num_samples, n)
  if k_pos > 0:
    _, pos_rows = jax.lax.top_k(jnp.where(is_pos, priority, -1.0), k_pos)
    indices = jnp.where(take_pos, pos_rows[jnp.minimum(slot, k_pos - 1)], indices)
  if k_neg > 0:
    _, neg_rows = jax.lax.top_k(jnp.where(is_neg, negative_priority, -1.0), k_neg)
    neg_slot = jnp.clip(slot - num_pos, 0, k_neg - 1)
    indices = jnp.where(take_neg, neg_rows[neg_slot], indices)
  return BalancedSample(
    indices=indices.astype(jnp.int32), is_positive=take_pos, valid=take_pos | take_neg
  )


def _check_gt(caller: str, gt_boxes: jax.Array, gt_valid: jax.Array) -> None:
  if gt_boxes.ndim != 2 or gt_boxes.shape[1] != 4 or gt_boxes.shape[0] == 0:
    raise ValueError(
      f'sampling.{caller}: gt_boxes must be [G, 4] with G >= 1 slots (pad with '
      f'gt_valid=False), got {tuple(gt_boxes.shape)}'
    )
  if gt_valid.shape != gt_boxes.shape[:1]:
    raise ValueError(
      f'sampling.{caller}: gt_valid must be [G] = [{gt_boxes.shape[0]}], got '
      f'{tuple(gt_valid.shape)}'
    )


def _scatter_rows(values: jax.Array, rows: jax.Array, size: int) -> jax.Array:
  """`[size, ...]` zeros with `values[k]` written at `rows[k]`; rows of -1 are dropped."""
  rows = jnp.where(rows >= 0, rows, size)  # out of bounds -> dropped
  out = jnp.zeros((size,) + values.shape[1:], values.dtype)
  return out.at[rows].set(values, mode='drop')


def rpn_targets(
  anchors: jax.Array,
  gt_boxes: jax.Array,
  gt_valid: jax.Array,
  key: jax.Array,
  *,
  anchor_valid: jax.Array | None = None,
  high: float = 0.7,
  low: float = 0.3,
  allow_low_quality: bool = True,
  num_samples: int = 256,
  positive_fraction: float = 0.5,
  weights: Sequence[float] = RPN_WEIGHTS,
) -> RpnTargets:
  """Objectness labels, sampling weights and box targets for every anchor.

  Args:
    anchors: `[A, 4]` anchors of all levels (e.g. `MultilevelAnchors.boxes`).
    gt_boxes: `[G, 4]` ground-truth boxes, padded.
    gt_valid: bool `[G]`.
    key: PRNG key for the sampling.
    anchor_valid: optional bool `[A]`; False anchors (e.g. over image padding) are ignored
      and cannot take a low-quality match.
    high, low, allow_low_quality: see `match`.
    num_samples, positive_fraction: see `sample_balanced` (256 anchors, 50% positive).
    weights: box-coder weights (the RPN's are 1, 1, 1, 1).

  Returns:
    An `RpnTargets`.
  """
  anchors = jnp.asarray(anchors, dtype=jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, dtype=jnp.float32)
  gt_valid = jnp.asarray(gt_valid, dtype=bool)
  _check_gt('rpn_targets', gt_boxes, gt_valid)
  num_anchors = anchors.shape[0]
  iou = box_ops.iou_matrix(anchors, gt_boxes)
  if anchor_valid is not None:
    anchor_valid = jnp.asarray(anchor_valid, dtype=bool)
    if anchor_valid.shape != (num_anchors,):
      raise ValueError(
        f'sampling.rpn_targets: anchor_valid must be [A] = [{num_anchors}], got '
        f'{tuple(anchor_valid.shape)}'
      )
    iou = jnp.where(anchor_valid[:, None], iou, -1.0)
  matched = match(iou, gt_valid, high=high, low=low, allow_low_quality=allow_low_quality)
  labels = matched.labels
  if anchor_valid is not None:
    labels = jnp.where(anchor_valid, labels, IGNORE)
  sample = sample_balanced(
    labels, num_samples=num_samples, positive_fraction=positive_fraction, key=key
  )
  weight = _scatter_rows(sample.valid.astype(jnp.float32), sample.indices, num_anchors)
  positive = _scatter_rows(sample.is_positive, sample.indices, num_anchors)
  gt_index = jnp.where(positive, matched.gt_index, PAD_INDEX)
  targets = box_ops.encode(gt_boxes[jnp.maximum(gt_index, 0)], anchors, weights)
  return RpnTargets(
    objectness=positive.astype(jnp.int32),
    weight=weight,
    box_targets=jnp.where(positive[:, None], targets, 0.0),
    box_weight=positive.astype(jnp.float32),
    gt_index=gt_index,
  )


def roi_targets(
  proposals: jax.Array,
  proposal_valid: jax.Array,
  gt_boxes: jax.Array,
  gt_classes: jax.Array,
  gt_valid: jax.Array,
  key: jax.Array,
  *,
  num_samples: int = 512,
  positive_fraction: float = 0.25,
  high: float = 0.5,
  low: float = 0.5,
  weights: Sequence[float] = box_ops.DEFAULT_WEIGHTS,
  hard_negative_fraction: float = 0.0,
) -> RoiTargets:
  """Samples ROIs for the box and mask heads and computes their targets.

  The valid gt boxes are appended to the proposals (so every object has at least one
  perfect positive early in training), rows are matched without low-quality matches, and
  `num_samples` ROIs are drawn with at most `positive_fraction` positives.

  Args:
    proposals: `[P, 4]` RPN proposals (treated as constants: gradients are stopped).
    proposal_valid: bool `[P]`.
    gt_boxes: `[G, 4]` padded ground-truth boxes.
    gt_classes: int `[G]`, foreground classes 1..K (0 is reserved for background).
    gt_valid: bool `[G]`.
    key: PRNG key for the sampling.
    num_samples, positive_fraction: 512 ROIs, 25% positive by default.
    high, low: IoU thresholds for foreground / background (0.5 / 0.5).
    weights: box-coder weights, (10, 10, 5, 5) by default.
    hard_negative_fraction: share of the negatives taken as the highest-objectness negative
      proposals (the proposals come best first), the rest drawn uniformly (`sample_balanced`).

  Returns:
    A `RoiTargets`.
  """
  proposals = jax.lax.stop_gradient(jnp.asarray(proposals, dtype=jnp.float32))
  proposal_valid = jnp.asarray(proposal_valid, dtype=bool)
  gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, dtype=jnp.float32))
  gt_classes = jnp.asarray(gt_classes)
  gt_valid = jnp.asarray(gt_valid, dtype=bool)
  _check_gt('roi_targets', gt_boxes, gt_valid)
  if proposals.ndim != 2 or proposals.shape[1] != 4:
    raise ValueError(
      f'sampling.roi_targets: proposals must be [P, 4], got {tuple(proposals.shape)}'
    )
  if proposal_valid.shape != proposals.shape[:1]:
    raise ValueError(
      f'sampling.roi_targets: proposal_valid must be [P] = '
      f'[{proposals.shape[0]}], got {tuple(proposal_valid.shape)}'
    )
  if gt_classes.shape != gt_valid.shape or not jnp.issubdtype(gt_classes.dtype, jnp.integer):
    raise ValueError(
      f'sampling.roi_targets: gt_classes must be int [G] = '
      f'[{gt_valid.shape[0]}], got {gt_classes.dtype} {tuple(gt_classes.shape)}'
    )

  candidates = jnp.concatenate([proposals, gt_boxes], axis=0)
  candidate_valid = jnp.concatenate([proposal_valid, gt_valid], axis=0)
  iou = box_ops.iou_matrix(candidates, gt_boxes)
  matched = match(iou, gt_valid, high=high, low=low, allow_low_quality=False)
  labels = jnp.where(candidate_valid, matched.labels, IGNORE)
  sample = sample_balanced(
    labels,
    num_samples=num_samples,
    positive_fraction=positive_fraction,
    key=key,
    hard_negative_fraction=hard_negative_fraction,
  )

  row = jnp.maximum(sample.indices, 0)
  rois = jnp.where(sample.valid[:, None], candidates[row], 0.0)
  gt_index = jnp.where(sample.is_positive, matched.gt_index[row], PAD_INDEX)
  gt_row = jnp.maximum(gt_index, 0)
  classes = jnp.where(sample.is_positive, gt_classes[gt_row], 0).astype(jnp.int32)
  targets = box_ops.encode(gt_boxes[gt_row], rois, weights)
  return RoiTargets(
    rois=rois,
    classes=classes,
    gt_index=gt_index,
    box_targets=jnp.where(sample.is_positive[:, None], targets, 0.0),
    valid=sample.valid,
    is_positive=sample.is_positive,
    source_index=sample.indices,
  )
