"""The paper-style summary tables (report.py, Tables 3-7) checked cell by cell.

Every expected cell is computed here from the per-volume numbers with plain NumPy (mean and
sample SD over volumes; a structure empty in both truth and prediction left out; distances of a
missed structure counted but not averaged), and laid out as the table's stated format says.
Table 7 (per hip, as the paper lays it out, then the scan totals) from the definitions: means and
sample SDs over right hips, left hips and all hips pooled; |a - b| mean and SD; CoV_i = SD_i /
mean_i of each pair of measurements; Bland-Altman bias = mean(a - b) with limits bias -+ 1.96
SD(a - b); ICC(2,1) and ICC(3,1) from the two-way ANOVA of Shrout & Fleiss (1979), whose Table 2
data are the four raters' scan totals here, so the all-raters line must read their published
ICC(2,1) = 0.29 and ICC(3,1) = 0.71.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from data_pipelines.tissues import LabelScheme
from imask_jax import metrics
from imask_jax.evaluation import report
from imask_jax.metrics import CaseStatus

KNEE = LabelScheme(('femur', 'femoral_cartilage', 'tibia', 'tibial_cartilage'), (1, 2, 3, 4))
HIP = LabelScheme(('effusion',), (1,))
CASES = ('c0', 'c1', 'c2')


# --- building per-volume results ------------------------------------------------------------------


def _overlap(dice, status=CaseStatus.OK):
  return metrics.OverlapMetrics(
    dice=dice,
    jaccard=dice / (2 - dice),
    precision=min(1, dice + 0.05),
    recall=dice - 0.05,
    true_positive=0,
    false_positive=0,
    false_negative=0,
    status=status,
  )


def _surface(hd_px, assd, signed_mean, signed_sd, status=CaseStatus.OK):
  values = dict(
    hausdorff_mm=hd_px * 0.5,
    hd95_mm=hd_px * 0.4,
    assd_mm=assd,
    signed_mean_mm=signed_mean,
    signed_sd_mm=signed_sd,
    hausdorff_voxels=hd_px,
    average_hausdorff_mm=assd,
    average_hausdorff_voxels=assd * 2,
    status=status,
  )
  names = [f.name for f in dataclasses.fields(metrics.SurfaceMetrics)]
  return metrics.SurfaceMetrics(**{n: values.get(n, math.nan) for n in names})


# Per case and label value: (dice, hausdorff px, ASSD mm, signed mean mm, signed SD mm, status).
# c2 misses the tibial cartilage (value 4): Dice 0, infinite distances.
INF = math.inf
KNEE_NUMBERS = {
  'c0': {
    1: (0.95, 4.0, 0.30, 0.10, 0.50),
    2: (0.80, 9.0, 0.55, -0.20, 0.70),
    3: (0.96, 3.0, 0.25, 0.05, 0.40),
    4: (0.78, 8.0, 0.60, 0.30, 0.90),
  },
  'c1': {
    1: (0.93, 6.0, 0.35, -0.10, 0.45),
    2: (0.84, 7.0, 0.50, -0.10, 0.65),
    3: (0.97, 2.0, 0.20, 0.15, 0.35),
    4: (0.74, 11.0, 0.70, 0.10, 1.10),
  },
  'c2': {
    1: (0.94, 5.0, 0.40, 0.00, 0.55),
    2: (0.82, 12.0, 0.65, -0.30, 0.80),
    3: (0.95, 4.0, 0.30, 0.25, 0.50),
    4: (0.0, INF, INF, math.nan, math.nan, 'missed'),
  },
}
# Thickness per case and plate: (truth mean, pred mean, difference mean, difference SD); c2's
# thickness could not be measured (its tibial cartilage is missing).
THICKNESS = {
  'c0': {'femoral': (2.10, 2.30, 0.20, 0.40), 'tibial': (1.80, 1.70, -0.10, 0.30)},
  'c1': {'femoral': (2.00, 2.05, 0.05, 0.35), 'tibial': (1.90, 1.60, -0.30, 0.50)},
}
# Mask AP (COCO) pooled over all slices, and per case, by class id.
AP_ALL = {1: 0.81, 2: 0.42, 3: 0.85, 4: 0.30}
AP_CASE = {
  'c0': {1: 0.80, 2: 0.40, 3: 0.90, 4: 0.35},
  'c1': {1: 0.84, 2: 0.46, 3: 0.82, 4: 0.31},
  'c2': {1: 0.79, 2: 0.38, 3: 0.86, 4: math.nan},
}


def _thickness_map(mean):
  return metrics.ThicknessMap(np.zeros((1, 1)), np.zeros(2), np.zeros(2), 'r', 'c', mean, None)


def _plates(case):
  out = {}
  for plate, (truth, pred, mean, sd) in THICKNESS[case].items():
    out[plate] = metrics.PlateComparison(
      truth=_thickness_map(truth),
      pred=_thickness_map(pred),
      difference=metrics.ThicknessDifference(
        np.zeros((1, 1)), np.zeros(2), np.zeros(2), mean, sd, 10
      ),
      status=CaseStatus.OK,
    )
  return out


def knee_results():
  results = []
  for case in CASES:
    overlap, surface = {}, {}
    for value, numbers in KNEE_NUMBERS[case].items():
      status = CaseStatus(numbers[5]) if len(numbers) > 5 else CaseStatus.OK
      overlap[value] = _overlap(numbers[0], status)
      surface[value] = _surface(*numbers[1:5], status=status)
    results.append(
      report.CaseResult(
        case_id=case,
        overlap=overlap,
        surface=surface,
        truth_ml={},
        pred_ml={},
        thickness=_plates(case) if case in THICKNESS else None,
        thickness_note='' if case in THICKNESS else 'no tibial cartilage',
      )
    )
  return results


def _ap(value):
  return metrics.ClassAP(
    ap=value, ap50=value + 0.1, ap75=value - 0.1, truth_instances=3, detections=4
  )


# --- reading tables back ------------------------------------------------------------------------


def table_after(lines, marker):
  """The rows (lists of cells) of the first markdown table after the line containing marker."""
  start = next(i for i, line in enumerate(lines) if marker in line)
  rows = []
  for line in lines[start + 1 :]:
    if line.startswith('|'):
      rows.append([c.strip() for c in line.strip()[1:-1].split('|')])
    elif rows:
      break
  header, rule, *body = rows
  assert set(''.join(rule)) <= set('-')
  return header, body


def summary_cell(values, statuses, digits):
  """The documented cell: 'mean ± SD (n=N)' over volumes (both-empty left out); with infinite
  values, 'mean ± SD over F of N' of the finite ones; then '; k missed' and the like."""
  kept = [v for v, s in zip(values, statuses) if s != 'both_empty']
  finite = [v for v in kept if math.isfinite(v)]

  def mean_sd(xs):
    if len(xs) == 1:
      return f'{xs[0]:.{digits}f}'
    return f'{np.mean(xs):.{digits}f} ± {np.std(xs, ddof=1):.{digits}f}'

  if len(finite) == len(kept):
    text = f'{mean_sd(kept)} (n={len(kept)})'
  else:
    text = f'{mean_sd(finite)} over {len(finite)} of {len(kept)}'
  missed = statuses.count('missed')
  return text + (f'; {missed} missed' if missed else '')


def _column(value, index):
  numbers = [KNEE_NUMBERS[c][value] for c in CASES]
  statuses = [n[5] if len(n) > 5 else 'ok' for n in numbers]
  return [n[index] for n in numbers], statuses


# --- Tables 3, 4 and 5 ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def knee_summary():
  results = knee_results()
  ap = {c: _ap(v) for c, v in AP_ALL.items()}
  ap_per_case = {case: {c: _ap(v) for c, v in table.items()} for case, table in AP_CASE.items()}
  header = dict(
    workdir='w',
    checkpoint_step=6,
    split='test',
    dataset='d',
    mask_head='imask',
    backbone='resnet18',
  )
  return report.summary_markdown(
    header, results, KNEE, ap, ap_per_case, thickness_method='nearest'
  ).splitlines()


def test_table3_cells(knee_summary):
  header, body = table_after(knee_summary, '## Segmentation (paper Table 3)')
  assert header == ['Metric', 'femur', 'femoral_cartilage', 'tibia', 'tibial_cartilage']
  rows = {row[0]: row[1:] for row in body}
  assert list(rows) == ['Dice', 'Hausdorff (voxels)', 'ASSD (mm)', 'Mask AP']
  for i, value in enumerate((1, 2, 3, 4)):
    assert rows['Dice'][i] == summary_cell(*_column(value, 0), 3), value
    assert rows['Hausdorff (voxels)'][i] == summary_cell(*_column(value, 1), 2), value
    assert rows['ASSD (mm)'][i] == summary_cell(*_column(value, 2), 3), value
    per_case = [AP_CASE[c][value] for c in CASES if math.isfinite(AP_CASE[c][value])]
    spread = (
      f'{np.mean(per_case):.3f} ± {np.std(per_case, ddof=1):.3f}'
      if len(per_case) > 1
      else f'{per_case[0]:.3f}'
    )
    assert rows['Mask AP'][i] == f'{AP_ALL[value]:.3f} [{spread}]', value
  # By hand, the missed tibial cartilage: Dice (0.78 + 0.74 + 0) / 3 = 0.507, counted; the
  # Hausdorff over the two finite volumes, (8 + 11) / 2 = 9.5, SD 2.12.
  assert rows['Dice'][3] == '0.507 ± 0.439 (n=3); 1 missed'
  assert rows['Hausdorff (voxels)'][3] == '9.50 ± 2.12 over 2 of 3; 1 missed'
  assert rows['Mask AP'][3] == '0.300 [0.330 ± 0.028]'

  header, body = table_after(knee_summary, 'Further metrics')
  rows = {row[0]: row[1:] for row in body}
  for i, value in enumerate((1, 2, 3, 4)):
    dice, statuses = _column(value, 0)
    assert rows['Precision'][i] == summary_cell([min(1, d + 0.05) for d in dice], statuses, 3)
    assert rows['Recall'][i] == summary_cell([d - 0.05 for d in dice], statuses, 3)
    assert rows['Jaccard'][i] == summary_cell([d / (2 - d) for d in dice], statuses, 3)
    hd, _ = _column(value, 1)
    assert rows['Hausdorff (mm)'][i] == summary_cell([h * 0.5 for h in hd], statuses, 2)
    assert rows['HD95 (mm)'][i] == summary_cell([h * 0.4 for h in hd], statuses, 2)
    assert rows['AP50 (all slices)'][i] == f'{AP_ALL[value] + 0.1:.3f}'
    assert rows['AP75 (all slices)'][i] == f'{AP_ALL[value] - 0.1:.3f}'


def test_table4_cells_keep_the_sign_of_the_signed_distance(knee_summary):
  header, body = table_after(knee_summary, '## Signed surface distance (paper Table 4)')
  assert header[0] == 'Tissue' and len(body) == 4
  for row, (value, name) in zip(body, KNEE.names_by_value.items()):
    assert row[0] == name
    assert row[1] == summary_cell(*_column(value, 3), 3), name
    assert row[2] == summary_cell(*_column(value, 4), 3), name
  # femoral cartilage lies inside the truth on average: (-0.2 - 0.1 - 0.3) / 3 = -0.200
  assert body[1][1] == '-0.200 ± 0.100 (n=3)'


def test_table5_cells_prediction_minus_truth_and_the_unmeasured_volume(knee_summary):
  header, body = table_after(knee_summary, '## Cartilage thickness (paper Table 5)')
  assert header == [
    'Plate',
    'average of mean differences (mm)',
    'average of SD of differences (mm)',
    'truth mean thickness (mm)',
    'predicted mean thickness (mm)',
  ]
  measured = [c for c in CASES if c in THICKNESS]
  for row, plate in zip(body, ('femoral', 'tibial')):
    numbers = np.array([THICKNESS[c][plate] for c in measured])
    ok = ['ok'] * len(measured)
    assert row == [
      plate,
      summary_cell(list(numbers[:, 2]), ok, 3) + '; 1 not measured (c2)',
      summary_cell(list(numbers[:, 3]), ok, 3),
      summary_cell(list(numbers[:, 0]), ok, 2),
      summary_cell(list(numbers[:, 1]), ok, 2),
    ]
  # By hand: the model is thicker on the femoral plate, thinner on the tibial one.
  assert body[0][1].startswith('0.125 ± 0.106 (n=2)')
  assert body[1][1].startswith('-0.200 ± 0.141 (n=2)')


def test_missing_structures_are_listed_by_volume_and_tissue(knee_summary):
  start = knee_summary.index('## Missed and false-positive structures')
  assert knee_summary[start + 2 :] == ['- c2 tibial_cartilage: missed']


# --- Tables 6 and 7 -------------------------------------------------------------------------------

# Shrout & Fleiss (1979), Table 2: 6 subjects rated by 4 judges. Used as total effusion (mL) of
# six volumes by the reference reader, two more readers and the model.
SHROUT_FLEISS = np.array(
  [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float
)
RATERS = ('reference', 'reader1', 'reader2', 'model')
RIGHT_SHARE = np.array([0.3, 0.25, 0.75, 0.4, 0.6, 0.5])  # the right side's part of each total


def icc_from_anova(table):
  """ICC(2,1) and ICC(3,1) of a [subjects, raters] table (Shrout & Fleiss's mean squares)."""
  n, k = table.shape
  grand = table.mean()
  ss_total = ((table - grand) ** 2).sum()
  ss_rows = k * ((table.mean(1) - grand) ** 2).sum()
  ss_cols = n * ((table.mean(0) - grand) ** 2).sum()
  bms, jms = ss_rows / (n - 1), ss_cols / (k - 1)
  ems = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
  return (
    (bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n),
    (bms - ems) / (bms + (k - 1) * ems),
  )


def hip_results(n_volumes=6):
  results = []
  for i in range(n_volumes):
    total = SHROUT_FLEISS[i]
    rater_ml = {
      r: {'right_ml': RIGHT_SHARE[i] * t, 'left_ml': (1 - RIGHT_SHARE[i]) * t, 'total_ml': t}
      for r, t in zip(RATERS, total)
    }
    dice = 0.6 + 0.05 * i
    results.append(
      report.CaseResult(
        case_id=f'h{i}',
        overlap={1: _overlap(dice)},
        surface={1: _surface(5.0, 0.5, 0.1, 0.3)},
        truth_ml={},
        pred_ml={},
        rater_ml=rater_ml,
      )
    )
  return results


def test_table6_cells():
  results = hip_results()
  lines = report.effusion_overlap_table(results, HIP, {1: _ap(0.55)})
  header, (row,) = table_after(lines, '## Effusion segmentation (paper Table 6)')
  dice = [0.6 + 0.05 * i for i in range(6)]
  ok = ['ok'] * 6
  assert row == [
    summary_cell(dice, ok, 3),
    summary_cell([min(1, d + 0.05) for d in dice], ok, 3),
    summary_cell([d - 0.05 for d in dice], ok, 3),
    '0.550',
  ]


def _mean_sd(values):
  values = np.asarray(values, float)
  if values.size == 1:
    return f'{values[0]:.2f}'
  return f'{values.mean():.2f} ± {values.std(ddof=1):.2f}'


def _check_matrix(lines, marker, values_of):
  """A rater x rater table whose cell (a, b) is `values_of(a, b)` formatted, '0' on the
  diagonal."""
  header, body = table_after(lines, marker)
  assert header == ['Rater'] + list(RATERS)
  assert [row[0] for row in body] == list(RATERS)
  for a, row in enumerate(body):
    for b, cell in enumerate(row[1:]):
      assert cell == ('0' if a == b else values_of(a, b)), (marker, a, b)
  return body


def _cov_cell(pair):
  """RMS / mean over rows of CoV_i = (|a_i - b_i| / sqrt 2) / ((a_i + b_i) / 2)."""
  cov = (np.abs(pair[:, 0] - pair[:, 1]) / math.sqrt(2)) / pair.mean(1)
  return f'{np.sqrt(np.mean(cov**2)):.2f} / {np.mean(cov):.2f}'


def test_table7_per_hip_cells_by_definition():
  """The paper's layout: one value per hip (each scan's right hip, then its left)."""
  lines = report.effusion_volume_table(hip_results())
  right = RIGHT_SHARE[:, None] * SHROUT_FLEISS  # [scans, raters]
  left = (1 - RIGHT_SHARE[:, None]) * SHROUT_FLEISS
  hips = np.stack([right, left], axis=1).reshape(-1, 4)  # [12 hips, raters]
  header, body = table_after(lines, '## Effusion volumes (paper Table 7)')
  assert header == ['Rater', 'Right', 'Left', 'Overall']
  assert [row[0] for row in body] == list(RATERS)
  for k, row in enumerate(body):
    assert row[1:] == [_mean_sd(right[:, k]), _mean_sd(left[:, k]), _mean_sd(hips[:, k])]
  # By hand: the reference's right hips 2.7 1.5 6 2.8 6 3 -> 22 / 6 = 3.67.
  assert body[0][1].startswith('3.67 ± ')
  _check_matrix(lines, 'Difference per hip', lambda a, b: _mean_sd(np.abs(hips[:, a] - hips[:, b])))
  _check_matrix(lines, 'CoV per hip', lambda a, b: _cov_cell(hips[:, [a, b]]))


def test_table7_scan_totals_and_agreement_by_definition():
  lines = report.effusion_volume_table(hip_results())
  table = SHROUT_FLEISS
  header, body = table_after(lines, '## Effusion volumes: scan totals')
  assert header == ['Rater', 'Right', 'Left', 'Scan total']
  assert [row[0] for row in body] == list(RATERS)
  for row, k in zip(body, range(4)):
    assert row[1:] == [
      _mean_sd(RIGHT_SHARE * table[:, k]),
      _mean_sd((1 - RIGHT_SHARE) * table[:, k]),
      _mean_sd(table[:, k]),
    ]
  assert body[0][3] == '7.67 ± 1.63'  # by hand: 46 / 6, and the SD of 9 6 8 7 10 6

  body = _check_matrix(
    lines,
    'Difference in volumes (scan totals)',
    lambda a, b: _mean_sd(np.abs(table[:, a] - table[:, b])),
  )
  assert body[0][2] == '5.17 ± 1.17'  # reference vs reader1: |7 5 4 6 5 4| = 31 / 6
  _check_matrix(lines, 'CoV between two raters', lambda a, b: _cov_cell(table[:, [a, b]]))

  header, body = table_after(lines, 'ICC of total volumes')
  assert header == ['Pair', 'ICC(2,1)', 'ICC(3,1)', 'bias (mL)', 'limits of agreement (mL)']
  pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
  assert [row[0] for row in body] == [f'{RATERS[a]} vs {RATERS[b]}' for a, b in pairs]
  for row, (a, b) in zip(body, pairs):
    icc2, icc3 = icc_from_anova(table[:, [a, b]])
    d = table[:, a] - table[:, b]  # a - b: the row's first rater minus its second
    bias, sd = d.mean(), d.std(ddof=1)
    assert row[1:] == [
      f'{icc2:.3f}',
      f'{icc3:.3f}',
      f'{bias:+.2f}',
      f'[{bias - 1.96 * sd:+.2f}, {bias + 1.96 * sd:+.2f}]',
    ], row[0]
  # By hand: the reference reads 46 / 6 - 15 / 6 = +5.17 mL more than reader1 on average.
  assert body[0][3] == '+5.17'

  icc2, icc3 = icc_from_anova(table)
  assert (round(icc2, 2), round(icc3, 2)) == (0.29, 0.71)  # as published
  assert lines[-1] == (f'All 4 raters together: ICC(2,1) {icc2:.3f}, ICC(3,1) {icc3:.3f}.')


def test_table7_with_one_volume_has_means_and_no_agreement():
  lines = report.effusion_volume_table(hip_results(1))
  total = SHROUT_FLEISS[0]
  right, left = RIGHT_SHARE[0] * total, (1 - RIGHT_SHARE[0]) * total
  header, body = table_after(lines, '## Effusion volumes (paper Table 7)')
  for row, k in zip(body, range(4)):  # one right and one left hip: no SD per side
    assert row[1:] == [f'{right[k]:.2f}', f'{left[k]:.2f}', _mean_sd([right[k], left[k]])]
  header, body = table_after(lines, '## Effusion volumes: scan totals')
  for row, k in zip(body, range(4)):
    assert row[1:] == [f'{right[k]:.2f}', f'{left[k]:.2f}', f'{total[k]:.2f}']
  assert lines[-1] == 'Agreement statistics need >= 2 volumes; the split has 1.'
  assert not any('ICC' in line for line in lines)


def test_the_summary_names_a_unet_or_the_mask_head_and_backbone(knee_summary):
  assert 'mask head imask, backbone resnet18.' in knee_summary[2]
  results = knee_results()
  ap = {c: _ap(v) for c, v in AP_ALL.items()}
  header = dict(
    workdir='w',
    checkpoint_step=6,
    split='test',
    dataset='d',
    model_kind='unet',
    mask_head='imask',
    backbone='resnet18',
  )
  lines = report.summary_markdown(header, results, KNEE, ap, {}, thickness_method='nearest')
  first = lines.splitlines()[2]
  assert 'a semantic U-Net (model.kind unet).' in first and 'mask head' not in first
