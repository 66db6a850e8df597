"""Mask average precision per class over slices: COCO's (pycocotools) and the per-image mean
AP at IoU 0.5 of Matterport's Mask R-CNN (`utils.compute_ap`) that Matterport-based papers
report as "mAP".

    ap = MaskAP({1: 'femur', 2: 'femoral_cartilage'})
    ap.add_slice([(1, truth_mask)], [(1, 0.93, predicted_mask)], (h, w), group='case_7')
    ap.evaluate()            # {class id: ClassAP} over every slice
    ap.evaluate('case_7')    # over the slices of one volume

Masks are bool [h, w] arrays of the slice; nothing here knows about models. One image's AP at
one IoU threshold: `image_average_precision`. Matterport's definition step by step, the per-class
mean over slices and how it differs from COCO AP: docs/metrics.md, 'Mask AP'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MATTERPORT_IOU = 0.5


@dataclasses.dataclass(frozen=True)
class ClassAP:
  """Mask AP of one class over a scope of slices.

  ap = COCO's AP, the mean over IoU 0.50:0.05:0.95 and the 101 recall points; ap50 / ap75 the
  same at one IoU; NaN when the scope has no truth instance of the class. Counts are instances
  over the scope's slices. map50_per_image: Matterport's per-image AP at IoU 0.5 averaged over
  the images_with_truth slices that hold a truth instance of the class (docs/metrics.md,
  'Mask AP'); NaN when there is none.
  """

  ap: float
  ap50: float
  ap75: float
  truth_instances: int
  detections: int
  map50_per_image: float = math.nan
  images_with_truth: int = 0


def mask_iou(
  detection_masks: Sequence[np.ndarray], truth_masks: Sequence[np.ndarray]
) -> np.ndarray:
  """IoU [n_detections, n_truth] of bool masks of one image (pixel counts)."""
  if not len(detection_masks) or not len(truth_masks):
    return np.zeros((len(detection_masks), len(truth_masks)))
  det = np.stack([np.asarray(m, bool).reshape(-1) for m in detection_masks]).astype(np.float64)
  truth = np.stack([np.asarray(m, bool).reshape(-1) for m in truth_masks]).astype(np.float64)
  intersection = det @ truth.T
  union = det.sum(1)[:, None] + truth.sum(1)[None, :] - intersection
  return np.where(union > 0, intersection / np.maximum(union, 1), 0.0)


def image_average_precision(
  truth: Sequence[tuple[int, np.ndarray]],
  detections: Sequence[tuple[int, float, np.ndarray]],
  iou_threshold: float = MATTERPORT_IOU,
) -> float:
  """Matterport's `compute_ap` of one image (docs/metrics.md, 'Mask AP'): truth (class id,
  bool mask [h, w]) per instance, detections (class id, score, bool mask [h, w]); NaN without
  truth."""
  ious = mask_iou([m for _, _, m in detections], [m for _, m in truth])
  return _matterport_ap(
    ious,
    [c for c, _, _ in detections],
    [s for _, s, _ in detections],
    [c for c, _ in truth],
    iou_threshold,
  )


def _matterport_ap(
  ious: np.ndarray,
  det_classes: Sequence[int],
  det_scores: Sequence[float],
  truth_classes: Sequence[int],
  iou_threshold: float,
) -> float:
  """AP of one image from its IoU matrix [n_detections, n_truth] (docs/metrics.md, 'Mask AP')."""
  n_truth = len(truth_classes)
  if n_truth == 0:
    return math.nan
  if not len(det_classes):
    return 0.0
  order = np.argsort(-np.asarray(det_scores, dtype=float), kind='stable')
  det_classes = np.asarray(det_classes)[order]
  truth_classes = np.asarray(truth_classes)
  ious = np.asarray(ious, dtype=float)[order]
  free = np.ones(n_truth, bool)
  hit = np.zeros(order.size, bool)
  for k in range(order.size):
    candidates = free & (truth_classes == det_classes[k]) & (ious[k] >= iou_threshold)
    if candidates.any():
      best = int(np.argmax(np.where(candidates, ious[k], -1.0)))  # first of equal IoUs
      free[best] = False
      hit[k] = True
  true_positives = np.cumsum(hit)
  precision = true_positives / np.arange(1, order.size + 1)
  recall = true_positives / n_truth
  envelope = np.maximum.accumulate(precision[::-1])[::-1]
  rises = np.diff(np.concatenate([[0.0], recall]))
  return float(np.sum(rises * envelope))


class MaskAP:
  """Collects slices (truth instances and scored detections) and scores, per class, COCO mask
  AP with pycocotools and Matterport's per-image mAP at IoU 0.5, over all slices or over one
  group (volume) of them."""

  def __init__(self, class_names: Mapping[int, str]):
    self.class_names = dict(class_names)
    self._images: list[dict[str, Any]] = []
    self._truth: list[dict[str, Any]] = []
    self._detections: list[dict[str, Any]] = []

  def add_slice(
    self,
    truth: Sequence[tuple[int, np.ndarray]],
    detections: Sequence[tuple[int, float, np.ndarray]],
    shape: tuple[int, int],
    group: str = '',
  ) -> None:
    """One slice of `shape` (h, w). truth: (class id, bool mask [h, w]) per truth instance;
    detections: (class id, score, bool mask [h, w]) per detected instance."""
    from pycocotools import mask as mask_utils

    image_id = len(self._images) + 1
    height, width = int(shape[0]), int(shape[1])
    self._images.append({'id': image_id, 'height': height, 'width': width, 'group': group})
    for class_id, rle in zip([c for c, _ in truth], _encode([m for _, m in truth], shape)):
      self._truth.append(
        {
          'id': len(self._truth) + 1,
          'image_id': image_id,
          'category_id': int(class_id),
          'segmentation': rle,
          'area': float(mask_utils.area(rle)),
          'bbox': [float(v) for v in mask_utils.toBbox(rle)],
          'iscrowd': 0,
        }
      )
    for (class_id, score, _), rle in zip(detections, _encode([m for _, _, m in detections], shape)):
      self._detections.append(
        {
          'image_id': image_id,
          'category_id': int(class_id),
          'segmentation': rle,
          'score': float(score),
        }
      )

  def evaluate(self, group: str | None = None) -> dict[int, ClassAP]:
    """Class id -> ClassAP over every slice (group None) or the slices of one group."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [im for im in self._images if group is None or im['group'] == group]
    ids = {im['id'] for im in images}
    truth = [a for a in self._truth if a['image_id'] in ids]
    detections = [dict(d) for d in self._detections if d['image_id'] in ids]
    class_ids = sorted(self.class_names)
    n_truth = {c: sum(a['category_id'] == c for a in truth) for c in class_ids}
    n_det = {c: sum(d['category_id'] == c for d in detections) for c in class_ids}
    precision = None
    if images and detections:
      coco_truth = COCO()
      coco_truth.dataset = {
        'images': [{k: im[k] for k in ('id', 'height', 'width')} for im in images],
        'annotations': truth,
        'categories': [{'id': c, 'name': self.class_names[c]} for c in class_ids],
      }
      with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_truth.createIndex()
        coco_det = coco_truth.loadRes(detections)
        evaluation = COCOeval(coco_truth, coco_det, 'segm')
        evaluation.params.imgIds = sorted(ids)
        evaluation.params.catIds = class_ids
        evaluation.evaluate()
        evaluation.accumulate()
      precision = evaluation.eval['precision']  # [IoU 10, recall 101, class, area, max dets]
    per_image = self._per_image_ap(images, truth, detections, class_ids)
    out = {}
    for k, c in enumerate(class_ids):
      image_aps = per_image[c]
      matterport = dict(
        map50_per_image=float(np.mean(image_aps)) if image_aps else math.nan,
        images_with_truth=len(image_aps),
      )
      if n_truth[c] == 0:
        out[c] = ClassAP(math.nan, math.nan, math.nan, 0, n_det[c], **matterport)
      elif precision is None:  # truth but no detection at all: nothing found
        out[c] = ClassAP(0.0, 0.0, 0.0, n_truth[c], n_det[c], **matterport)
      else:
        # Area range 'all' (index 0) and the largest max-detections setting (index -1);
        # IoU thresholds 0.50:0.05:0.95, so index 0 is 0.50 and index 5 is 0.75.
        p = precision[:, :, k, 0, -1]
        out[c] = ClassAP(
          _mean_precision(p),
          _mean_precision(p[0]),
          _mean_precision(p[5]),
          n_truth[c],
          n_det[c],
          **matterport,
        )
    return out

  def _per_image_ap(
    self,
    images: Sequence[dict[str, Any]],
    truth: Sequence[dict[str, Any]],
    detections: Sequence[dict[str, Any]],
    class_ids: Sequence[int],
  ) -> dict[int, list[float]]:
    """Class id -> Matterport's AP at IoU 0.5 of each image holding a truth instance of it."""
    from pycocotools import mask as mask_utils

    truth_by_image: dict[int, list[dict[str, Any]]] = {}
    for a in truth:
      truth_by_image.setdefault(a['image_id'], []).append(a)
    dets_by_image: dict[int, list[dict[str, Any]]] = {}
    for d in detections:
      dets_by_image.setdefault(d['image_id'], []).append(d)
    out: dict[int, list[float]] = {c: [] for c in class_ids}
    for image in images:
      for c in class_ids:
        gts = [a for a in truth_by_image.get(image['id'], []) if a['category_id'] == c]
        if not gts:
          continue
        dets = [d for d in dets_by_image.get(image['id'], []) if d['category_id'] == c]
        # pycocotools' IoU of RLEs (iscrowd 0) is intersection / union of pixel counts.
        ious = np.asarray(
          mask_utils.iou(
            [d['segmentation'] for d in dets], [a['segmentation'] for a in gts], [0] * len(gts)
          ),
          dtype=float,
        ).reshape(len(dets), len(gts))
        out[c].append(
          _matterport_ap(
            ious, [c] * len(dets), [d['score'] for d in dets], [c] * len(gts), MATTERPORT_IOU
          )
        )
    return out


def _mean_precision(precision: np.ndarray) -> float:
  """Mean of COCO's interpolated precisions; -1 marks settings without truth, and recall
  points never reached hold 0 (so they lower the AP, as in COCO)."""
  defined = precision[precision > -1]
  return float(defined.mean()) if defined.size else 0.0


def _encode(masks: Sequence[np.ndarray], shape: tuple[int, int]) -> list[dict[str, Any]]:
  from pycocotools import mask as mask_utils

  if not masks:
    return []
  stacked = np.asfortranarray(
    np.stack(masks, axis=-1).astype(np.uint8).reshape(int(shape[0]), int(shape[1]), len(masks))
  )
  return mask_utils.encode(stacked)
