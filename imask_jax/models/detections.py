"""From the network's outputs to detections and label maps, all static shapes: RPN proposals
(`propose`), per-class detections after NMS (`select_detections`), the few detections that can
paint a label map (`paint_slots`), and the per-slice label map they paint
(`detections_to_label_map`). Pure array code on top of imask_jax.ops; MaskRCNN.detect and the
inference programs call it."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from imask_jax.ops import anchors as anchor_ops
from imask_jax.ops import boxes as box_ops
from imask_jax.ops import masks as mask_ops
from imask_jax.ops import nms as nms_ops
from imask_jax.ops import sampling

Array = jax.Array


class Detections(NamedTuple):
  """Per-image detections padded to D = `max_detections` (B images).

  boxes: float32 [B, D, 4] (y1, x1, y2, x2) in input pixels; scores: float32 [B, D];
  classes: int32 [B, D] (1..K, 0 for padding); valid: bool [B, D];
  mask_probs: float32 [B, D, m, m] probabilities of each detection's own class (m =
    `ModelSpec.detection_mask_size`).
  unpainted: int32 [B] (`detect(paint_only=True)` only, else None): detections that could
  have painted (score >= label_score_threshold) but found no slot, so are missing here.
  """

  boxes: Array
  scores: Array
  classes: Array
  valid: Array
  mask_probs: Array
  unpainted: Array | None = None


def propose(
  logits: Array,
  deltas: Array,
  *,
  anchors: anchor_ops.MultilevelAnchors,
  image_size: tuple[int, int],
  pre_nms_topk: int,
  post_nms_topk: int,
  nms_threshold: float,
) -> tuple[Array, Array]:
  """RPN proposals for one image: per-level top-k, NMS within each level, global top-k.

  Args:
    logits: [A] objectness logits; deltas: [A, 4] (RPN coder weights 1, 1, 1, 1).
  Returns:
    boxes [post_nms_topk, 4] clipped to the image, highest objectness first, and valid
    [post_nms_topk] (False in padding slots).
  """
  boxes, scores, levels = [], [], []
  starts = anchors.level_starts
  for level in range(anchors.num_levels):
    lo, hi = starts[level], starts[level + 1]
    k = min(pre_nms_topk, hi - lo)
    top_scores, top = jax.lax.top_k(logits[lo:hi], k)
    level_boxes = box_ops.decode(
      deltas[lo:hi][top], jnp.asarray(anchors.boxes[lo:hi])[top], sampling.RPN_WEIGHTS
    )
    boxes.append(box_ops.clip(level_boxes, image_size))
    scores.append(top_scores)
    levels.append(jnp.full((k,), level, jnp.int32))
  boxes = jnp.concatenate(boxes)
  scores = jnp.concatenate(scores)
  levels = jnp.concatenate(levels)
  size_ok = (boxes[:, 2] - boxes[:, 0] > 1e-3) & (boxes[:, 3] - boxes[:, 1] > 1e-3)
  # NMS within each level, then the best `post_nms_topk` over all levels (Detectron2's order).
  keep, _ = nms_ops.batched_nms(
    boxes, scores, levels, iou_threshold=nms_threshold, max_outputs=post_nms_topk, valid=size_ok
  )
  valid = keep >= 0
  return jnp.where(valid[:, None], boxes[jnp.maximum(keep, 0)], 0.0), valid


def select_detections(
  boxes: Array,
  probs: Array,
  proposal_valid: Array,
  *,
  max_detections: int,
  score_threshold: float,
  nms_threshold: float,
) -> tuple[Array, Array, Array, Array]:
  """Per-class NMS over one image's class-specific boxes.

  Args:
    boxes: [N, K, 4] decoded per-class boxes; probs: [N, K] foreground class probabilities;
    proposal_valid: [N].
  Returns:
    boxes [D, 4], scores [D], classes [D] (1..K, 0 in padding), valid [D].
  """
  n, k = probs.shape
  flat_boxes = boxes.reshape(n * k, 4)
  flat_scores = probs.reshape(n * k)
  flat_classes = jnp.tile(jnp.arange(1, k + 1, dtype=jnp.int32), n)
  candidate = jnp.repeat(proposal_valid, k)
  keep, _ = nms_ops.batched_nms(
    flat_boxes,
    flat_scores,
    flat_classes,
    iou_threshold=nms_threshold,
    max_outputs=max_detections,
    score_threshold=score_threshold,
    valid=candidate,
  )
  valid = keep >= 0
  idx = jnp.maximum(keep, 0)
  return (
    jnp.where(valid[:, None], flat_boxes[idx], 0.0),
    jnp.where(valid, flat_scores[idx], 0.0),
    jnp.where(valid, flat_classes[idx], 0),
    valid,
  )


def paint_slots(
  scores: Array,
  classes: Array,
  valid: Array,
  *,
  num_classes: int,
  per_class: int,
  min_score: float,
) -> tuple[Array, Array, Array]:
  """The detections of one image that paint a label map, `per_class` slots for each class.

  A detection paints when it is valid and scores >= `min_score` (the label-map rule of
  `detections_to_label_map`); each class keeps its `per_class` best such detections. Per class
  rather than over all classes, so that one class's many look-alikes cannot take the slots of
  another class's single structure.

  Args:
    scores: float32 [D]; classes: int32 [D] (1..K); valid: bool [D].
  Returns:
    index int32 [K * per_class] into the D detections (slots of class c at
    [(c - 1) * per_class, c * per_class), best first; 0 in empty slots), slot_valid bool
    [K * per_class], and unpainted int32 []: painting detections left without a slot.
  """
  paints = valid & (scores >= min_score)
  index, slot_valid = [], []
  for class_id in range(1, num_classes + 1):
    mine = paints & (classes == class_id)
    # Non-painting detections rank below every painting one (scores lie in [0, 1]).
    _, top = jax.lax.top_k(jnp.where(mine, scores, -1.0), per_class)
    index.append(top)
    slot_valid.append(mine[top])
  index = jnp.concatenate(index).astype(jnp.int32)
  slot_valid = jnp.concatenate(slot_valid)
  index = jnp.where(slot_valid, index, 0)
  unpainted = jnp.sum(paints, dtype=jnp.int32) - jnp.sum(slot_valid, dtype=jnp.int32)
  return index, slot_valid, unpainted


PAINT_RULES = ('union', 'each')


def detections_to_label_map(
  det: Detections,
  image_size: tuple[int, int],
  threshold: float = 0.5,
  min_score: float = 0.0,
  paint_rule: str = 'union',
) -> tuple[Array, Array]:
  """Pastes detections into a per-image label map of class ids.

  The painted detections are those scoring >= `min_score`. Which pixels are painted:
    'union'  where the probability that some painted detection covers the pixel,
             1 - prod(1 - p) over their pasted mask probabilities p (as if independent), is
             >= `threshold`;
    'each'   where some painted detection's own p is >= `threshold` (the older rule, kept for
             the workdirs that ran with it: workdir.LEGACY_VALUES). Two touching structures
             whose masks are each unsure of their common edge (p = 0.3-0.45 on both sides)
             leave a background seam between them, and a
             seam between bone and cartilage reads as articular surface: the cartilage
             measures thinner, the more so the finer the grid it is pasted on.
  A painted pixel takes the class of the painted detection with the highest score x mask
  probability, the detection's estimate that the pixel is its object. (Ranking by score alone
  lets a confident femur box take every bone-cartilage edge pixel it half believes in; the
  product leaves such pixels to the cartilage detection that is sure of them.) Detections
  below `min_score` still come back in the instance masks, for mask AP.

  Returns:
    label_map int32 [B, H, W] (0 = background, else class id 1..K) and the pasted instance
    masks bool [B, D, H, W] (every valid detection's mask >= `threshold`, whatever its score).
  """
  if not threshold > 0:  # pixels outside a box have probability 0
    raise ValueError(f'detections_to_label_map: threshold must be > 0, got {threshold!r}')
  if paint_rule not in PAINT_RULES:
    raise ValueError(f'model.paint_rule={paint_rule!r}; expected one of {PAINT_RULES}')
  paste = functools.partial(mask_ops.paste_mask_probs, image_size=image_size)
  probs = jax.vmap(paste)(det.mask_probs, det.boxes)  # [B, D, H, W]
  masks = (probs >= threshold) & det.valid[..., None, None]
  eligible = (det.valid & (det.scores >= min_score))[..., None, None]
  if paint_rule == 'each':
    painted = masks & eligible
    covered = jnp.any(painted, axis=1)
  else:
    painted = eligible & (probs > 0)
    covered = 1.0 - jnp.prod(jnp.where(painted, 1.0 - probs, 1.0), axis=1) >= threshold
  support = jnp.where(painted, probs * det.scores[..., None, None], -1.0)
  best = jnp.argmax(support, axis=1)  # [B, H, W]
  classes = jnp.take_along_axis(det.classes[..., None, None], best[:, None], axis=1)[:, 0]
  return jnp.where(covered, classes, 0).astype(jnp.int32), masks
