"""Mask R-CNN and iMaskRCNN: backbone + FPN, RPN, box head and a standard or iMask mask head.

One Flax module with two entry points, both with static shapes:

* `MaskRCNN.losses(images, targets, key, train)` -> (total loss, per-term metrics): RPN
  objectness and box terms, box-head classification and box terms, mask BCE at the mask head's
  own resolution. L = L_rpn_cls + L_rpn_box + L_cls + L_box + L_mask, as in the paper.
* `MaskRCNN.detect(images)` -> `Detections` padded to `max_detections`, with mask
  probabilities at the head's resolution; `detections.detections_to_label_map` pastes them
  into a per-slice label map. `detect(images, paint_only=True)` keeps only the detections that can
  paint (`paint_slots`), so the mask head runs on a few fixed slots instead of all of them.

The pure-array work (anchors, proposals, target sampling, ROIAlign, NMS) is done by
`imask_jax.ops`; this module only wires it to the learnable heads.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from imask_jax.models import heads, losses, point_head
from imask_jax.models.backbones import build_backbone
from imask_jax.models.detections import Detections, paint_slots, propose, select_detections
from imask_jax.models.spec import ModelSpec
from imask_jax.ops import anchors as anchor_ops
from imask_jax.ops import boxes as box_ops
from imask_jax.ops import masks as mask_ops
from imask_jax.ops import points as point_ops
from imask_jax.ops import roi_align as roi_ops
from imask_jax.ops import sampling

Array = jax.Array

RPN_LEVELS = ('P2', 'P3', 'P4', 'P5', 'P6')
ROI_MIN_LEVEL, ROI_MAX_LEVEL = 2, 5
STRIDES = (4, 8, 16, 32, 64)


@functools.lru_cache(maxsize=16)
def _anchors(
  image_size: tuple[int, int], sizes: tuple[float, ...], ratios: tuple[float, ...]
) -> anchor_ops.MultilevelAnchors:
  return anchor_ops.multilevel_anchors(
    image_size, strides=STRIDES, sizes=sizes, aspect_ratios=ratios
  )


class PointInputs(NamedTuple):
  """What the point head's training loss reads besides the pyramid: images `[B, H, W, C]`,
  gt_masks `[B, M, H, W]` and keys `[B]` (its point draws, one per image)."""

  images: Array
  gt_masks: Array
  keys: Array


class MaskRCNN(nn.Module):
  """Mask R-CNN (`spec.mask_head='standard'`) or iMaskRCNN (`'imask'`)."""

  spec: ModelSpec

  def setup(self):
    s = self.spec
    dtype = s.compute_dtype
    self.backbone = build_backbone(
      s.backbone,
      norm=s.norm,
      fpn_dim=s.fpn_dim,
      width=s.width,
      remat=s.remat,
      dtype=dtype,
      axis_name=s.axis_name,
    )
    self.rpn_head = heads.RPNHead(num_anchors=len(s.anchor_ratios), levels=RPN_LEVELS, dtype=dtype)
    self.box_head = heads.BoxHead(
      num_classes=s.num_classes, kind=s.box_head, dim=s.box_head_dim, dtype=dtype
    )
    self.mask_head = s.build_mask_head()
    if s.point_head.enabled:
      self.point_head = point_head.PointHead(s.point_head, s.num_classes, dtype)

  # --- the stages, in the order a training step runs them --------------------------------------
  # Each is public so that benchmarks and tests time and check the same code the step runs.

  @property
  def anchors(self) -> anchor_ops.MultilevelAnchors:
    s = self.spec
    return _anchors(s.image_size, s.anchor_sizes, s.anchor_ratios)

  def pyramid(self, images: Array, train: bool) -> dict[str, Array]:
    """Backbone + FPN: images `[B, H, W, C]` -> {'P2'..'P6': `[B, h, w, fpn_dim]`}."""
    s = self.spec
    if images.ndim != 4 or tuple(images.shape[1:3]) != s.image_size:
      raise ValueError(
        f'MaskRCNN: images must be [B, {s.image_size[0]}, {s.image_size[1]}, C],'
        f' got {tuple(images.shape)}'
      )
    return self.backbone(images.astype(s.compute_dtype), train=train)

  def rpn(self, pyramid: dict[str, Array]) -> tuple[Array, Array]:
    """RPN head: objectness logits `[B, A]` and box deltas `[B, A, 4]` over all anchors."""
    logits, deltas = self.rpn_head(pyramid)
    if logits.shape[1] != self.anchors.boxes.shape[0]:
      raise ValueError(
        f'MaskRCNN: the RPN made {logits.shape[1]} anchor outputs but the '
        f'anchor grid has {self.anchors.boxes.shape[0]}: feature map sizes '
        'differ from ceil(image / stride)'
      )
    return logits, deltas

  def rpn_losses(
    self, logits: Array, deltas: Array, gt_boxes: Array, gt_valid: Array, keys: Array
  ) -> tuple[Array, Array]:
    """(objectness BCE, box L1) of the RPN on `rpn_batch_size` sampled anchors per image;
    keys: [B] PRNG keys for the anchor sampling."""
    s = self.spec
    rpn_t = jax.vmap(
      functools.partial(
        sampling.rpn_targets,
        jnp.asarray(self.anchors.boxes),
        num_samples=s.rpn_batch_size,
        positive_fraction=s.rpn_positive_fraction,
      )
    )(gt_boxes, gt_valid, keys)
    rpn_cls = losses.rpn_objectness_loss(logits, rpn_t.objectness, rpn_t.weight)
    rpn_box = losses.weighted_l1(
      deltas, rpn_t.box_targets, rpn_t.box_weight, normaliser=rpn_t.weight
    )
    return rpn_cls, rpn_box

  def proposals(self, logits: Array, deltas: Array, train: bool) -> tuple[Array, Array]:
    """Proposal boxes `[B, post_nms_topk, 4]` and their validity `[B, post_nms_topk]`
    (`propose` per image; no gradient flows into the RPN through them)."""
    s = self.spec
    pre = s.rpn_pre_nms_topk_train if train else s.rpn_pre_nms_topk_test
    post = s.rpn_post_nms_topk_train if train else s.rpn_post_nms_topk_test
    fn = functools.partial(
      propose,
      anchors=self.anchors,
      image_size=s.image_size,
      pre_nms_topk=pre,
      post_nms_topk=post,
      nms_threshold=s.rpn_nms_threshold,
    )
    boxes, valid = jax.vmap(fn)(jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas))
    return boxes, valid

  def sample_rois(
    self,
    proposals: Array,
    proposal_valid: Array,
    gt_boxes: Array,
    gt_classes: Array,
    gt_valid: Array,
    keys: Array,
  ) -> sampling.RoiTargets:
    """`roi_batch_size` ROIs per image with their class, box and mask targets, positives
    first (in random order); keys: [B] PRNG keys."""
    s = self.spec
    return jax.vmap(
      functools.partial(
        sampling.roi_targets,
        num_samples=s.roi_batch_size,
        positive_fraction=s.roi_positive_fraction,
        hard_negative_fraction=s.roi_hard_negative_fraction,
        high=s.roi_iou_threshold,
        low=s.roi_iou_threshold,
      )
    )(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, keys)

  def roi_features(self, pyramid: dict[str, Array], rois: Array, size: int) -> Array:
    """ROIAlign of `[B, N, 4]` rois from P2-P5 -> `[B * N, size, size, C]`."""
    b, n = rois.shape[:2]
    s = self.spec
    return roi_ops.multilevel_roi_align(
      pyramid,
      rois.reshape(b * n, 4),
      size,
      sampling_ratio=s.roi_sampling_ratio,
      min_level=ROI_MIN_LEVEL,
      max_level=ROI_MAX_LEVEL,
      canonical_level=s.roi_level_k0,
      canonical_size=s.roi_level_canonical,
      batch_index=jnp.repeat(jnp.arange(b, dtype=jnp.int32), n),
    )

  def box_losses(self, box_features: Array, roi_t: sampling.RoiTargets) -> tuple[Array, Array]:
    """(classification cross-entropy, box L1 of the positives) of the box head on the 7x7
    features `[B * S, 7, 7, C]` of the sampled ROIs."""
    s = self.spec
    b = roi_t.rois.shape[0]
    cls_logits, box_deltas = self.box_head(box_features)
    cls_logits = cls_logits.reshape(b, s.roi_batch_size, -1)
    box_deltas = box_deltas.reshape(b, s.roi_batch_size, s.num_classes, 4)
    box_cls = losses.softmax_cross_entropy(cls_logits, roi_t.classes, roi_t.valid)
    own = losses.take_class(box_deltas, roi_t.classes)  # [B, S, 4]
    box_reg = losses.weighted_l1(
      own,
      roi_t.box_targets,
      roi_t.is_positive.astype(jnp.float32),
      normaliser=roi_t.valid.astype(jnp.float32),
    )
    return box_cls, box_reg

  def mask_logits(
    self, pyramid: dict[str, Array], rois: Array, features: Array | None = None
  ) -> Array:
    """Mask logits for `[B, N, 4]` rois -> `[B, N, m, m, K]`; `features`: their 14x14
    ROIAlign (`roi_features(pyramid, rois, 14)`), computed here when not given."""
    b, n = rois.shape[:2]
    if features is None:
      features = self.roi_features(pyramid, rois, 14)
    logits = self.mask_head(
      features, pyramid, rois.reshape(b * n, 4), jnp.repeat(jnp.arange(b, dtype=jnp.int32), n)
    )
    return logits.reshape((b, n) + logits.shape[1:])

  def mask_targets(self, gt_masks: Array, roi_t: sampling.RoiTargets) -> Array:
    """The m x m targets `[B, P, m, m]` of the P = `num_mask_rois` first (positive) ROIs."""
    s = self.spec
    p = s.num_mask_rois
    return jax.vmap(
      functools.partial(mask_ops.mask_targets, output_size=s.mask_size, sampling_ratio=2)
    )(gt_masks, roi_t.gt_index[:, :p], roi_t.rois[:, :p])

  def mask_losses(
    self,
    pyramid: dict[str, Array],
    roi_t: sampling.RoiTargets,
    targets: Array,
    features: Array | None = None,
    points: PointInputs | None = None,
  ) -> dict[str, Array]:
    """{'mask': BCE[, 'mask_dice': weighted soft Dice][, 'mask_point': point BCE]} of the mask
    head on the first `num_mask_rois` sampled ROIs (positives come first, in random order);
    targets from `mask_targets`, features their 14x14 ROIAlign (optional); `points` (needed
    with the point head) the images, ground-truth masks and keys its points are drawn with."""
    s = self.spec
    p = s.num_mask_rois
    mask_pos = roi_t.is_positive[:, :p]
    all_logits = self.mask_logits(pyramid, roi_t.rois[:, :p], features)  # [B, P, m, m, K]
    logits = losses.take_class(all_logits, roi_t.classes[:, :p])  # [B, P, m, m]
    terms = {
      'mask': losses.mask_bce(logits, targets, mask_pos, boundary_weight=s.boundary_loss_weight)
    }
    if s.mask_dice_weight > 0:
      terms['mask_dice'] = s.mask_dice_weight * losses.mask_dice(logits, targets, mask_pos)
    if s.point_head.enabled:
      if points is None:
        raise ValueError('MaskRCNN.mask_losses: the point head needs `points` (PointInputs)')
      b, ps = logits.shape[0], s.point_head
      chosen = jax.vmap(
        functools.partial(
          point_ops.uncertain_points,
          num_points=ps.train_points,
          oversample=ps.oversample,
          importance=ps.importance,
        )
      )(logits, points.keys)  # [B, P, T, 2], each image's ROIs drawn with its own key
      per_roi = self.point_head.loss(
        chosen.reshape((b * p,) + chosen.shape[2:]),
        all_logits.reshape((b * p,) + all_logits.shape[2:]),
        roi_t.rois[:, :p].reshape(b * p, 4),
        jnp.repeat(jnp.arange(b, dtype=jnp.int32), p),
        roi_t.classes[:, :p].reshape(b * p),
        roi_t.gt_index[:, :p].reshape(b * p),
        pyramid,
        points.images,
        points.gt_masks,
      ).reshape(b, p)
      terms['mask_point'] = s.point_head.loss_weight * losses.per_roi_mean(per_roi, mask_pos)
    return terms

  # --- training ------------------------------------------------------------------------------

  def losses(
    self, images: Array, targets: dict[str, Array], keys: Array, train: bool = True
  ) -> tuple[Array, dict[str, Array]]:
    """Training losses for a batch.

    Args:
      images: float [B, H, W, C].
      targets: gt_boxes float32 [B, M, 4], gt_classes int32 [B, M] (1..K, 0 = padding),
        gt_masks uint8 [B, M, H, W], gt_valid bool [B, M].
      keys: [B] PRNG keys, one per image, for its anchor and ROI sampling (per image, so that
        the result does not depend on how a batch is split over devices).
    Returns:
      (total loss, {term: value}) in float32, each term averaged over valid entries.
    """
    gt_boxes = targets['gt_boxes'].astype(jnp.float32)
    gt_valid = targets['gt_valid'].astype(bool)
    gt_classes = targets['gt_classes'].astype(jnp.int32)
    split = jax.vmap(jax.random.split)(keys)
    rpn_keys, roi_keys = split[:, 0], split[:, 1]

    pyramid = self.pyramid(images, train)
    rpn_logits, rpn_deltas = self.rpn(pyramid)
    rpn_cls, rpn_box = self.rpn_losses(rpn_logits, rpn_deltas, gt_boxes, gt_valid, rpn_keys)
    proposals, proposal_valid = self.proposals(rpn_logits, rpn_deltas, train=True)
    roi_t = self.sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, roi_keys)
    box_cls, box_reg = self.box_losses(self.roi_features(pyramid, roi_t.rois, 7), roi_t)
    point_inputs = None
    if self.spec.point_head.enabled:
      # Keys of their own (folded in), so the RPN and ROI sampling draw as without the head.
      point_inputs = PointInputs(
        images, targets['gt_masks'], jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
      )
    mask_terms = self.mask_losses(
      pyramid, roi_t, self.mask_targets(targets['gt_masks'], roi_t), points=point_inputs
    )

    terms = {
      'rpn_cls': rpn_cls,
      'rpn_box': rpn_box,
      'box_cls': box_cls,
      'box_reg': box_reg,
      **mask_terms,
    }
    total = sum(terms.values())
    terms['num_positive_rois'] = jnp.mean(jnp.sum(roi_t.is_positive, axis=1).astype(jnp.float32))
    return total, terms

  def touch_all(self, images: Array) -> Array:
    """Runs every head once on one whole-image ROI: cheap to compile, so used for `init`."""
    pyramid = self.pyramid(images, train=False)
    logits, deltas = self.rpn(pyramid)
    h, w = self.spec.image_size
    rois = jnp.broadcast_to(jnp.array([0.0, 0.0, h, w], jnp.float32), (images.shape[0], 1, 4))
    cls_logits, box_deltas = self.box_head(self.roi_features(pyramid, rois, 7))
    masks = self.mask_logits(pyramid, rois)
    outputs = [logits, deltas, cls_logits, box_deltas, masks]
    if self.spec.point_head.enabled:
      centre = jnp.full((rois.shape[0], 1, 2), 0.5, jnp.float32)
      outputs.append(
        self.point_head(centre, rois[:, 0], jnp.arange(rois.shape[0]), masks[:, 0], pyramid, images)
      )
    return sum(jnp.sum(x) for x in outputs)

  # --- inference -----------------------------------------------------------------------------

  def detect(self, images: Array, paint_only: bool = False) -> Detections:
    """Detections for a batch of images `[B, H, W, C]` (inference mode).

    paint_only (static): with `spec.paint_slots_per_class` = k > 0, only the detections that
    paint label maps come back, k per class in D = K * k slots (`paint_slots`), and the mask
    head runs on those slots alone: its cost no longer grows with `max_detections`, which
    mask AP needs (it ranks every detection) and a label map does not. Label maps are those
    of the full pass as long as no class has more than k painting detections in an image;
    `Detections.unpainted` counts the ones that did not fit.
    """
    s = self.spec
    b = images.shape[0]
    pyramid = self.pyramid(images, train=False)
    rpn_logits, rpn_deltas = self.rpn(pyramid)
    proposals, proposal_valid = self.proposals(rpn_logits, rpn_deltas, train=False)
    cls_logits, box_deltas = self.box_head(self.roi_features(pyramid, proposals, 7))
    n = proposals.shape[1]
    probs = jax.nn.softmax(cls_logits, axis=-1).reshape(b, n, s.num_classes + 1)[..., 1:]
    boxes = box_ops.decode(box_deltas.reshape(b, n, s.num_classes, 4), proposals[:, :, None, :])
    boxes = box_ops.clip(boxes, s.image_size)
    select = functools.partial(
      select_detections,
      max_detections=s.max_detections,
      score_threshold=s.test_score_threshold,
      nms_threshold=s.test_nms_threshold,
    )
    det_boxes, det_scores, det_classes, det_valid = jax.vmap(select)(boxes, probs, proposal_valid)
    unpainted = None
    if paint_only and s.paint_slots_per_class > 0:
      slots = functools.partial(
        paint_slots,
        num_classes=s.num_classes,
        per_class=s.paint_slots_per_class,
        min_score=s.label_score_threshold,
      )
      index, slot_valid, unpainted = jax.vmap(slots)(det_scores, det_classes, det_valid)
      det_boxes = jnp.take_along_axis(det_boxes, index[..., None], axis=1)
      det_boxes = jnp.where(slot_valid[..., None], det_boxes, 0.0)
      det_scores = jnp.where(slot_valid, jnp.take_along_axis(det_scores, index, axis=1), 0.0)
      det_classes = jnp.where(slot_valid, jnp.take_along_axis(det_classes, index, axis=1), 0)
      det_valid = slot_valid
    all_logits = self.mask_logits(pyramid, det_boxes)  # [B, D, m, m, K]
    logits = losses.take_class(all_logits, det_classes)
    if s.point_head.enabled:
      d = det_boxes.shape[1]
      logits = self.point_head.refine(
        logits.reshape((b * d,) + logits.shape[2:]),
        det_boxes.reshape(b * d, 4),
        jnp.repeat(jnp.arange(b, dtype=jnp.int32), d),
        all_logits.reshape((b * d,) + all_logits.shape[2:]),
        pyramid,
        images,
        det_classes.reshape(b * d),
      ).reshape((b, d) + (s.detection_mask_size,) * 2)
    mask_probs = jnp.where(det_valid[..., None, None], jax.nn.sigmoid(logits), 0.0)
    return Detections(det_boxes, det_scores, det_classes, det_valid, mask_probs, unpainted)


def init_variables(model: MaskRCNN, key: Array) -> dict[str, Any]:
  """Initial variables (every parameter and batch statistic of the model).

  The parameters are drawn with the 'rbg' generator seeded from `key`: its initialisers
  compile several times faster on CPU than threefry's (benchmarks/README.md, "Initialisation").
  Only initialisation uses it;
  the sampling keys of training stay threefry, whose values do not change under `vmap` (rbg's
  do), so that results do not depend on how a batch is split over devices.
  """
  key = jax.random.key(jax.random.bits(key, (), jnp.uint32), impl='rbg')
  s = model.spec
  images = jnp.zeros((1,) + s.image_size + (s.input_channels,), jnp.float32)
  return model.init(key, images, method=MaskRCNN.touch_all)
