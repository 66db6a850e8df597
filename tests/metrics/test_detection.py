"""COCO mask AP (pycocotools) against values derived by hand from COCO's definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imask_jax.metrics import MaskAP


def _square(top, left, size=10, shape=(40, 40)):
  mask = np.zeros(shape, bool)
  mask[top:top + size, left:left + size] = True
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
  ap.add_slice([(1, _square(0, 0)), (2, _square(20, 20))],
               [(1, 0.8, _square(0, 0)), (1, 0.95, _square(25, 0)),
                (2, 0.9, _square(20, 20))], shape, group='x')
  ap.add_slice([(1, _square(5, 5)), (2, _square(20, 20)), (4, _square(0, 25))],
               [(1, 0.8, _square(5, 5)), (2, 0.7, _square(20, 22)),
                (3, 0.5, _square(30, 30))], shape, group='y')
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
