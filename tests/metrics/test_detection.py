"""COCO mask AP (pycocotools) against values derived by hand from COCO's definition, and
Matterport's per-image AP at IoU 0.5 against hand-worked slices and a plain implementation
written from its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imask_jax.metrics import MaskAP
from imask_jax.metrics import detection as metrics_detection


def _square(top, left, size=10, shape=(40, 40)):
  mask = np.zeros(shape, bool)
  mask[top : top + size, left : left + size] = True
  return mask


def test_mask_ap_matches_hand_derived_coco_values():
  ap = MaskAP({1: 'a', 2: 'b', 3: 'c', 4: 'd'})
  shape = (40, 40)
  # Class 1: 3 truth squares on 3 slices, each found exactly (score 0.8), plus one false
  # positive scored above them all: precision k / (k + 1) after the k-th hit, interpolated to
  # 3/4 at every recall, so AP = 3/4 at every IoU.
  # Class 2: 2 truth squares; one found exactly (0.9), one shifted by 2 px (IoU 8/12 = 0.667,
  # score 0.7): both match at IoU 0.50-0.65; above that recall stops at 1/2, so 51 of the 101
  # recall points have precision 1.
  # Class 4: one truth instance and no detection: AP 0. Class 3: no truth: NaN.
  ap.add_slice(
    [(1, _square(0, 0)), (2, _square(20, 20))],
    [(1, 0.8, _square(0, 0)), (1, 0.95, _square(25, 0)), (2, 0.9, _square(20, 20))],
    shape,
    group='x',
  )
  ap.add_slice(
    [(1, _square(5, 5)), (2, _square(20, 20)), (4, _square(0, 25))],
    [(1, 0.8, _square(5, 5)), (2, 0.7, _square(20, 22)), (3, 0.5, _square(30, 30))],
    shape,
    group='y',
  )
  ap.add_slice([(1, _square(10, 10))], [(1, 0.8, _square(10, 10))], shape, group='y')
  result = ap.evaluate()
  assert result[1].ap == pytest.approx(0.75) and result[1].ap50 == pytest.approx(0.75)
  assert (result[1].truth_instances, result[1].detections) == (3, 4)
  assert result[2].ap50 == pytest.approx(1.0)
  assert result[2].ap75 == pytest.approx(51 / 101)
  assert result[2].ap == pytest.approx((4 * 1.0 + 6 * 51 / 101) / 10)
  assert math.isnan(result[3].ap) and result[3].detections == 1
  assert result[4].ap == 0.0 and result[4].truth_instances == 1
  # Group 'y' alone: class 1 found exactly twice, no false positive.
  assert ap.evaluate('y')[1].ap == pytest.approx(1.0)


# ----------------------------------------------------------------------------- Matterport mAP


def plain_matterport_ap(truth, detections, threshold=0.5):
  """Per-image AP written from the definition (Matterport's compute_ap): rank by score, each
  detection takes the best-IoU free truth of its class at IoU >= threshold, then
  AP = (1 / n_truth) * sum over the hits k of max(precision_j for j >= k)."""
  if not truth:
    return math.nan
  ranked = sorted(range(len(detections)), key=lambda i: -detections[i][1])  # stable
  matched, hits = set(), []
  for i in ranked:
    class_id, _, mask = detections[i]
    best, best_iou = None, -1.0
    for j, (truth_class, truth_mask) in enumerate(truth):
      if j in matched or truth_class != class_id:
        continue
      iou = np.logical_and(mask, truth_mask).sum() / np.logical_or(mask, truth_mask).sum()
      if iou >= threshold and iou > best_iou:
        best, best_iou = j, iou
    if best is not None:
      matched.add(best)
    hits.append(best is not None)
  precisions = [sum(hits[: k + 1]) / (k + 1) for k in range(len(hits))]
  return sum(max(precisions[k:]) for k in range(len(hits)) if hits[k]) / len(truth)


def test_matterport_ap_hand_worked_and_unlike_coco_interpolation():
  # One class, 3 truth squares A, B, C. Ranked detections: A exact (0.9, hit), an empty spot
  # (0.8, false), B exact (0.7, hit), A again (0.6, duplicate: false); C is never found.
  # Precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3, 2/3; envelope 1 at the first hit and
  # 2/3 at the second: AP = 1/3 * 1 + 1/3 * 2/3 = 5/9. COCO's 101-point AP50 of the same
  # slice is (34 * 1 + 33 * 2/3) / 101 = 56/101 (recall points 0..0.33 and 0.34..0.66).
  a, b, c = _square(0, 0), _square(0, 20), _square(20, 0)
  truth = [(1, a), (1, b), (1, c)]
  detections = [(1, 0.9, a), (1, 0.8, _square(25, 25)), (1, 0.7, b), (1, 0.6, a)]
  assert metrics_detection.image_average_precision(truth, detections) == pytest.approx(5 / 9)
  assert plain_matterport_ap(truth, detections) == pytest.approx(5 / 9)
  ap = MaskAP({1: 'a'})
  ap.add_slice(truth, detections, (40, 40))
  result = ap.evaluate()[1]
  assert result.ap50 == pytest.approx(56 / 101)
  assert result.map50_per_image == pytest.approx(5 / 9) and result.images_with_truth == 1


def test_matterport_ap_matches_only_its_class_and_the_iou_threshold():
  # Truth: class 1 at A, class 2 at B. Ranked: class 2 exactly on A (0.95: IoU 1 but the
  # wrong class, false), class 1 on A (0.9, hit), class 2 on B shifted 2 px (IoU 80/120 =
  # 0.67, hit). Precision 0, 1/2, 2/3 at recall 0, 1/2, 1: AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3.
  a, b = _square(0, 0), _square(20, 20)
  truth = [(1, a), (2, b)]
  detections = [(2, 0.95, a), (1, 0.9, a), (2, 0.5, _square(20, 22))]
  assert metrics_detection.image_average_precision(truth, detections) == pytest.approx(2 / 3)
  # Shifted 4 px, IoU 60/140 = 0.43 < 0.5: a miss, so recall stops at 1/2 with envelope 1/2.
  detections[2] = (2, 0.5, _square(20, 24))
  assert metrics_detection.image_average_precision(truth, detections) == pytest.approx(1 / 4)
  assert metrics_detection.image_average_precision(truth, []) == 0.0
  assert math.isnan(metrics_detection.image_average_precision([], detections))


def test_per_image_map_over_slices_skips_slices_without_truth():
  # Slice 1: the 5/9 slice of the hand-worked test. Slice 2: one truth found exactly (AP 1).
  # Slice 3: a detection and no truth: no AP, left out. Mean over slices with truth: 7/9.
  a, b, c = _square(0, 0), _square(0, 20), _square(20, 0)
  ap = MaskAP({1: 'a', 2: 'b'})
  ap.add_slice(
    [(1, a), (1, b), (1, c)],
    [(1, 0.9, a), (1, 0.8, _square(25, 25)), (1, 0.7, b), (1, 0.6, a)],
    (40, 40),
    group='x',
  )
  ap.add_slice([(1, c)], [(1, 0.3, c)], (40, 40), group='y')
  ap.add_slice([], [(1, 0.99, a)], (40, 40), group='y')
  result = ap.evaluate()
  assert result[1].map50_per_image == pytest.approx(7 / 9)
  assert result[1].images_with_truth == 2
  assert math.isnan(result[2].map50_per_image) and result[2].images_with_truth == 0
  assert ap.evaluate('y')[1].map50_per_image == pytest.approx(1.0)


def test_matterport_ap_equals_a_plain_implementation_on_random_slices():
  rng = np.random.default_rng(4)
  ap = MaskAP({1: 'a', 2: 'b'})
  expected = {1: [], 2: []}
  for _ in range(12):
    truth = [
      (int(rng.integers(1, 3)), _square(*rng.integers(0, 30, 2), size=10))
      for _ in range(int(rng.integers(0, 4)))
    ]
    detections = []
    for class_id, mask in truth:  # jittered copies of the truth, some of the other class
      if rng.random() < 0.8:
        shifted = np.roll(mask, tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
        detections.append(
          (class_id if rng.random() < 0.8 else 3 - class_id, float(rng.random()), shifted)
        )
    detections += [
      (int(rng.integers(1, 3)), float(rng.random()), _square(*rng.integers(0, 30, 2), size=8))
      for _ in range(2)
    ]
    everything = metrics_detection.image_average_precision(truth, detections)
    assert everything == pytest.approx(plain_matterport_ap(truth, detections), nan_ok=True)
    ap.add_slice(truth, detections, (40, 40))
    for c in (1, 2):
      mine = [t for t in truth if t[0] == c]
      if mine:
        expected[c].append(plain_matterport_ap(mine, [d for d in detections if d[0] == c]))
  result = ap.evaluate()
  for c in (1, 2):
    assert result[c].images_with_truth == len(expected[c]) > 0
    assert result[c].map50_per_image == pytest.approx(np.mean(expected[c]))
