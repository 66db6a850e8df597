"""COCO-style mask average precision per class over slices, with pycocotools.

    ap = MaskAP({1: 'femur', 2: 'femoral_cartilage'})
    ap.add_slice([(1, truth_mask)], [(1, 0.93, predicted_mask)], (h, w), group='case_7')
    ap.evaluate()            # {class id: ClassAP} over every slice
    ap.evaluate('case_7')    # over the slices of one volume

Masks are bool [h, w] arrays of the slice; nothing here knows about models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClassAP:
  """COCO mask AP of one class: ap = mean over IoU 0.50:0.05:0.95 and the 101 recall points
  (COCO's AP), ap50 / ap75 at one IoU; NaN when the scope has no truth instance of the class.
  Counts are instances over the scope's slices."""
  ap: float
  ap50: float
  ap75: float
  truth_instances: int
  detections: int


class MaskAP:
  """Collects slices (truth instances and scored detections) and scores COCO mask AP per class
  with pycocotools, over all slices or over one group (volume) of them."""

  def __init__(self, class_names: Mapping[int, str]):
    self.class_names = dict(class_names)
    self._images: list[dict[str, Any]] = []
    self._truth: list[dict[str, Any]] = []
    self._detections: list[dict[str, Any]] = []

  def add_slice(self, truth: Sequence[tuple[int, np.ndarray]],
                detections: Sequence[tuple[int, float, np.ndarray]], shape: tuple[int, int],
                group: str = '') -> None:
    """One slice of `shape` (h, w). truth: (class id, bool mask [h, w]) per truth instance;
    detections: (class id, score, bool mask [h, w]) per detected instance."""
    from pycocotools import mask as mask_utils
    image_id = len(self._images) + 1
    height, width = int(shape[0]), int(shape[1])
    self._images.append({'id': image_id, 'height': height, 'width': width, 'group': group})
    for class_id, rle in zip([c for c, _ in truth], _encode([m for _, m in truth], shape)):
      self._truth.append({
          'id': len(self._truth) + 1, 'image_id': image_id, 'category_id': int(class_id),
          'segmentation': rle, 'area': float(mask_utils.area(rle)),
          'bbox': [float(v) for v in mask_utils.toBbox(rle)], 'iscrowd': 0})
    for (class_id, score, _), rle in zip(detections, _encode([m for _, _, m in detections],
                                                             shape)):
      self._detections.append({'image_id': image_id, 'category_id': int(class_id),
                               'segmentation': rle, 'score': float(score)})

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
          'categories': [{'id': c, 'name': self.class_names[c]} for c in class_ids]}
      with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_truth.createIndex()
        coco_det = coco_truth.loadRes(detections)
        evaluation = COCOeval(coco_truth, coco_det, 'segm')
        evaluation.params.imgIds = sorted(ids)
        evaluation.params.catIds = class_ids
        evaluation.evaluate()
        evaluation.accumulate()
      precision = evaluation.eval['precision']  # [IoU 10, recall 101, class, area, max dets]
    out = {}
    for k, c in enumerate(class_ids):
      if n_truth[c] == 0:
        out[c] = ClassAP(math.nan, math.nan, math.nan, 0, n_det[c])
      elif precision is None:  # truth but no detection at all: nothing found
        out[c] = ClassAP(0.0, 0.0, 0.0, n_truth[c], n_det[c])
      else:
        # Area range 'all' (index 0) and the largest max-detections setting (index -1);
        # IoU thresholds 0.50:0.05:0.95, so index 0 is 0.50 and index 5 is 0.75.
        p = precision[:, :, k, 0, -1]
        out[c] = ClassAP(_mean_precision(p), _mean_precision(p[0]), _mean_precision(p[5]),
                         n_truth[c], n_det[c])
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
  stacked = np.asfortranarray(np.stack(masks, axis=-1).astype(np.uint8).reshape(
      int(shape[0]), int(shape[1]), len(masks)))
  return mask_utils.encode(stacked)
