"""The paper's columns in metrics.csv, ap.csv and summary.md (issue 12): the per-case wiring
(evaluate_case) equals direct calls of the metric functions, and the new table cells equal
numbers recomputed here plainly (per-hip Table 7 from its definition, Table 3's per-slice and
average Hausdorff rows from the per-volume values)."""

from __future__ import annotations

import csv
import math
import types

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines.datasets import params as params_lib
from data_pipelines.tissues import LabelScheme
from imask_jax import metrics
from imask_jax.evaluation import case_metrics, report
from imask_jax.metrics import CaseStatus

KNEE = LabelScheme(('femur', 'femoral_cartilage', 'tibia', 'tibial_cartilage'), (1, 2, 3, 4))
HIP = LabelScheme(('effusion',), (1,))


def blob(rng, shape, smooth=1.5):
  mask = ndimage.gaussian_filter(rng.random(shape), smooth) > 0.5
  mask[tuple(s // 2 for s in shape)] = True
  return mask


def table_after(lines, marker):
  """(header, body rows) of the first markdown table after the line containing marker."""
  start = next(i for i, line in enumerate(lines) if marker in line)
  rows = []
  for line in lines[start + 1 :]:
    if line.startswith('|'):
      rows.append([c.strip() for c in line.strip()[1:-1].split('|')])
    elif rows:
      break
  return rows[0], rows[2:]


def test_evaluate_case_writes_the_paper_columns_equal_to_direct_calls(tmp_path):
  rng = np.random.default_rng(2)
  shape, spacing = (14, 16, 12), (3.0, 0.91, 0.91)
  truth = blob(rng, shape).astype(np.uint8)
  pred = blob(rng, shape).astype(np.uint8)
  prediction = types.SimpleNamespace(canonical=pred, plane='sagittal')  # slices along X
  result = case_metrics.evaluate_case(
    's7_v1', truth, prediction, HIP, spacing, {'reader1': truth}, thickness_method='nearest'
  )
  (row,) = report.metrics_rows(result, HIP)
  assert tuple(row) == report.METRICS_COLUMNS
  surface = metrics.surface_metrics(pred == 1, truth == 1, spacing, voxel_hausdorff=True)
  assert row['average_hausdorff_mm'] == surface.average_hausdorff_mm
  assert row['average_hausdorff_voxels'] == surface.average_hausdorff_voxels
  sliced = metrics.slice_metrics(pred == 1, truth == 1, 0, spacing)
  for column, name in report.SLICE_COLUMNS.items():
    assert row[column] == sliced.aggregate(name), column
  assert (row['slices_2d'], row['slices_2d_missed'], row['slices_2d_false_positive']) == (
    sliced.n_slices,
    sliced.n_missed_slices,
    sliced.n_false_positive_slices,
  )
  assert row['slices_2d'] == np.count_nonzero((pred | truth).any(axis=(1, 2)))

  ap = metrics.MaskAP({1: 'effusion'})
  for k in range(shape[0]):
    ap.add_slice(
      [(1, truth[k] == 1)] if truth[k].any() else [],
      [(1, 0.9, pred[k] == 1)] if pred[k].any() else [],
      shape[1:],
      group='s7_v1',
    )
  pooled = ap.evaluate()
  report.write_tables(str(tmp_path), [result], HIP, pooled, {'s7_v1': ap.evaluate('s7_v1')})
  with open(tmp_path / 'ap.csv', newline='') as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == report.AP_COLUMNS
    rows = list(reader)
  assert float(rows[0]['map50_per_image']) == pytest.approx(pooled[1].map50_per_image)
  assert int(rows[0]['images_with_truth']) == np.count_nonzero(truth.any(axis=(1, 2)))


def _slice_metrics(dice, hd_px, avg_px, missed=0, status=CaseStatus.OK):
  """A SliceMetrics of two two-sided slices with these per-slice values, plus `missed`
  one-sided (missed) slices."""
  n = 2 + missed
  statuses = (CaseStatus.OK,) * 2 + (CaseStatus.MISSED,) * missed
  pad = [math.inf] * missed
  return metrics.SliceMetrics(
    axis=0,
    pixel_spacing=(0.5, 0.5),
    index=np.arange(n),
    status=statuses,
    dice=np.array(list(dice) + [0.0] * missed),
    hausdorff_px=np.array(list(hd_px) + pad),
    hausdorff_mm=np.array(list(hd_px) + pad) * 0.5,
    average_hausdorff_px=np.array(list(avg_px) + pad),
    average_hausdorff_mm=np.array(list(avg_px) + pad) * 0.5,
    volume_status=status,
  )


def test_table3_paper_rows_from_per_volume_values():
  results = []
  per_volume = {
    'c0': ((0.9, 0.7), (2.0, 4.0), (0.1, 0.3), 0),
    'c1': ((0.8, 0.8), (3.0, 3.0), (0.2, 0.2), 1),
  }
  for case, (dice, hd, avg, missed) in per_volume.items():
    surface = metrics.SurfaceMetrics(
      1.0,
      1.0,
      1.0,
      0.0,
      0.1,
      3.0,
      0.05 + len(results) * 0.1,
      0.1 + len(results) * 0.2,
      CaseStatus.OK,
    )
    results.append(
      report.CaseResult(
        case_id=case,
        overlap={1: metrics.overlap_metrics(np.ones(3), np.ones(3))},
        surface={1: surface},
        truth_ml={},
        pred_ml={},
        slices={1: _slice_metrics(dice, hd, avg, missed)},
      )
    )
  ap = {1: metrics.ClassAP(0.5, 0.6, 0.4, 10, 12, map50_per_image=0.75, images_with_truth=9)}
  per_case = {
    'c0': {1: metrics.ClassAP(0.5, 0.6, 0.4, 5, 6, 0.7, 4)},
    'c1': {1: metrics.ClassAP(0.5, 0.6, 0.4, 5, 6, 0.8, 5)},
  }
  lines = report.segmentation_tables(results, HIP, ap, per_case)
  header, body = table_after(lines, 'Table 3 as the paper defines its columns')
  rows = {row[0]: row[1] for row in body}
  # c0: Dice (0.9 + 0.7) / 2 = 0.8; c1: (0.8 + 0.8 + 0) / 3 = 0.533 (its missed slice counts
  # 0). Distances over two-sided slices only: HD 3 and 3, average 0.2 and 0.2 px.
  assert rows['Dice, 2D per slice'] == '0.667 ± 0.189 (n=2)'
  assert rows['Hausdorff (px), 2D per slice'] == '3.00 ± 0.00 (n=2)'
  assert rows['Ave. Hausdorff (px), 2D per slice'] == '0.200 ± 0.000 (n=2)'
  assert rows['Ave. Hausdorff (mm), 2D per slice'] == '0.100 ± 0.000 (n=2)'
  # 3D: the SurfaceMetrics fields average_hausdorff_voxels 0.1, 0.3; _mm 0.05, 0.15.
  assert rows['Ave. Hausdorff (voxels), 3D'] == '0.200 ± 0.141 (n=2)'
  assert rows['Ave. Hausdorff (mm), 3D'] == '0.100 ± 0.071 (n=2)'
  assert rows['mAP@0.5, per slice (Matterport)'] == '0.750 (9 slices) [0.750 ± 0.071]'
  assert rows['Slices with the tissue in one mask only (2D)'] == ('1 missed, 0 false positive of 5')
  # The 3D table keeps ASSD under its own name.
  _, body = table_after(lines, '## Segmentation (paper Table 3)')
  assert [row[0] for row in body] == ['Dice', 'Hausdorff (voxels)', 'ASSD (mm)', 'Mask AP']
  # Without per-slice measurements the rows say so.
  bare = [report.CaseResult(r.case_id, r.overlap, r.surface, {}, {}) for r in results]
  _, body = table_after(
    report.segmentation_tables(bare, HIP, ap, per_case), 'Table 3 as the paper defines its columns'
  )
  assert {row[0]: row[1] for row in body}['Dice, 2D per slice'] == ('n/a (not measured per slice)')


def _hip_result(case_id, volumes):
  rater_ml = {
    r: {'right_ml': right, 'left_ml': left, 'total_ml': right + left}
    for r, (right, left) in volumes.items()
  }
  return report.CaseResult(
    case_id=case_id, overlap={}, surface={}, truth_ml={}, pred_ml={}, rater_ml=rater_ml
  )


def test_table7_per_hip_at_baseline_then_the_scan_totals():
  results = [
    _hip_result('p1_v1', {'reader1': (4.0, 2.0), 'model': (6.0, 2.0)}),
    _hip_result('p1_v2', {'reader1': (9.0, 9.0), 'model': (1.0, 1.0)}),
    _hip_result('p2_v1', {'reader1': (0.0, 8.0), 'model': (0.0, 4.0)}),
  ]
  lines = report.effusion_volume_table(results, params_lib.SUBJECT_TIMEPOINT_PATTERN)
  intro = next(line for line in lines if line.startswith('Per hip, at baseline'))
  assert '2 of 3 scans, one per subject (left out, not at baseline: p1_v2)' in intro
  header, body = table_after(lines, '## Effusion volumes (paper Table 7)')
  assert header == ['Rater', 'Right', 'Left', 'Overall']
  # By hand, baseline scans p1_v1 and p2_v1. reader1 hips 4, 2, 0, 8: right 2 ± sqrt(8),
  # left 5 ± sqrt(18), overall 3.5 ± sqrt(35/3); model hips 6, 2, 0, 4: 3 ± sqrt(20/3).
  assert body[0] == [
    'reader1',
    f'2.00 ± {math.sqrt(8):.2f}',
    f'5.00 ± {math.sqrt(18):.2f}',
    f'3.50 ± {math.sqrt(35 / 3):.2f}',
  ]
  assert body[1][3] == f'3.00 ± {math.sqrt(20 / 3):.2f}'
  # |reader1 - model| per hip 2, 0, 0, 4: 1.5 ± sqrt(11/3); CoV over the three hips not both 0.
  _, body = table_after(lines, 'Difference per hip')
  assert body[0][2] == f'1.50 ± {math.sqrt(11 / 3):.2f}' and body[1][1] == body[0][2]
  covs = [2 / math.sqrt(2) / 5, 0.0, 4 / math.sqrt(2) / 6]
  _, body = table_after(lines, 'CoV per hip')
  assert body[0][2] == (
    f'{math.sqrt(np.mean(np.square(covs))):.2f} / {np.mean(covs):.2f} (1 all-zero)'
  )
  # The scan totals of every scan follow, named as such.
  header, body = table_after(lines, '## Effusion volumes: scan totals (not a paper column)')
  assert header == ['Rater', 'Right', 'Left', 'Scan total']
  totals = [6.0, 18.0, 8.0]
  assert body[0][3] == f'{np.mean(totals):.2f} ± {np.std(totals, ddof=1):.2f}'
  # Without a subject pattern every scan is its own subject.
  plain = report.effusion_volume_table(results)
  assert any(
    'as the paper lays it out (mL): 3 of 3 scans, one per subject. ' in line for line in plain
  )
  with pytest.raises(ValueError, match="case id 'odd' does not match"):
    report.effusion_volume_table(
      results + [_hip_result('odd', {'reader1': (1.0, 1.0), 'model': (1.0, 1.0)})],
      params_lib.SUBJECT_TIMEPOINT_PATTERN,
    )


def test_table6_names_the_papers_average_precision():
  results = [
    report.CaseResult(
      case_id='h0',
      overlap={1: metrics.overlap_metrics(np.ones(3), np.ones(3))},
      surface={},
      truth_ml={},
      pred_ml={},
    )
  ]
  ap = {1: metrics.ClassAP(0.55, 0.6, 0.5, 4, 5, map50_per_image=0.8125, images_with_truth=4)}
  lines = report.effusion_overlap_table(results, HIP, ap)
  assert lines[-1].endswith(
    "Matterport's per-slice mAP at IoU 0.5 over the slices holding effusion: 0.812 (4 slices)."
  )


def test_summary_passes_the_subject_pattern_to_table7():
  results = [
    _hip_result('p1_v1', {'reader1': (4.0, 2.0), 'model': (6.0, 2.0)}),
    _hip_result('p1_v2', {'reader1': (9.0, 9.0), 'model': (1.0, 1.0)}),
  ]
  for r in results:
    r.overlap[1] = metrics.overlap_metrics(np.ones(3), np.ones(3))
    r.surface[1] = metrics.surface_metrics(
      np.ones((3, 3), bool), np.ones((3, 3), bool), (1.0, 1.0), voxel_hausdorff=True
    )
  ap = {1: metrics.ClassAP(0.5, 0.5, 0.5, 1, 1)}
  header = dict(
    workdir='w',
    checkpoint_step=1,
    split='test',
    dataset='d',
    mask_head='m',
    backbone='b',
    subject_pattern=params_lib.SUBJECT_TIMEPOINT_PATTERN,
  )
  text = report.summary_markdown(
    header, results, HIP, ap, {r.case_id: ap for r in results}, thickness_method='nearest'
  )
  assert '1 of 2 scans, one per subject (left out, not at baseline: p1_v2)' in text
