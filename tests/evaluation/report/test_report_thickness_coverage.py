"""Coverage of the thickness maps in report.py: thickness.csv's coverage columns and the
coverage table under Table 5, on hand-built maps whose cells are counted by hand."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from imask_jax import metrics
from imask_jax.evaluation import report
from imask_jax.metrics.overlap import CaseStatus

NAN = math.nan


def plate(truth_cells, pred_cells, status=CaseStatus.OK):
  """A PlateComparison of two 2 x 4 maps (2 mm of cartilage in the truth, 1.5 mm in the
  prediction) where the given (row, col) cells hold cartilage."""

  def thickness_map(cells, value):
    values = np.full((2, 4), NAN)
    for cell in cells:
      values[cell] = value
    return metrics.ThicknessMap(
      values,
      np.arange(3.0),
      np.arange(5.0),
      'anterior_mm',
      'right_mm',
      float(np.nanmean(values)) if cells else NAN,
      None,
    )

  truth, pred = thickness_map(truth_cells, 2.0), thickness_map(pred_cells, 1.5)
  return metrics.PlateComparison(
    truth=truth, pred=pred, difference=metrics.thickness_difference(pred, truth), status=status
  )


# Truth: 4 femoral cells; the prediction covers 3 of them and 1 more. Truth: 5 tibial cells;
# the prediction covers 1 of them (a missed region) and nothing else.
FEMORAL = plate([(0, 0), (0, 1), (1, 0), (1, 1)], [(0, 0), (0, 1), (1, 1), (1, 3)])
TIBIAL = plate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)], [(1, 1)])
# A second volume whose tibial plate the prediction misses entirely.
FEMORAL_2 = plate([(0, 0), (0, 1)], [(0, 0), (0, 1)])
TIBIAL_2 = plate([(0, 0), (0, 1)], [], status=CaseStatus.MISSED)


def case(case_id, plates=None, note=''):
  return report.CaseResult(
    case_id=case_id,
    overlap={},
    surface={},
    truth_ml={},
    pred_ml={},
    thickness=plates,
    thickness_note=note,
  )


RESULTS = [
  case('c0', {'femoral': FEMORAL, 'tibial': TIBIAL}),
  case('c1', {'femoral': FEMORAL_2, 'tibial': TIBIAL_2}),
  case('c2', None, 'no tibial cartilage'),
]


def test_difference_counts_only_shared_cells_and_coverage_shows_the_rest():
  # The tibial difference is a single cell (-0.5 mm) although 4 of the 5 truth cells are missed.
  assert TIBIAL.difference.n_cells == 1 and TIBIAL.difference.mean_mm == pytest.approx(-0.5)
  assert TIBIAL.difference.coverage == metrics.ThicknessCoverage(both=1, truth_only=4, pred_only=0)
  assert FEMORAL.difference.coverage == metrics.ThicknessCoverage(both=3, truth_only=1, pred_only=1)


def test_thickness_csv_has_the_coverage_columns(tmp_path):
  rows = [row for r in RESULTS for row in report.thickness_rows(r)]
  path = report.write_csv(str(tmp_path / 'thickness.csv'), report.THICKNESS_COLUMNS, rows)
  with open(path, newline='') as f:
    read = {(r['case_id'], r['plate']): r for r in csv.DictReader(f)}
  expected = {  # cells compared, truth only, prediction only; fractions of the truth's cells
    ('c0', 'femoral'): (3, 1, 1, 3 / 4, 1 / 4, 1 / 4),
    ('c0', 'tibial'): (1, 4, 0, 1 / 5, 4 / 5, 0.0),
    ('c1', 'femoral'): (2, 0, 0, 1.0, 0.0, 0.0),
    ('c1', 'tibial'): (0, 2, 0, 0.0, 1.0, 0.0),
  }
  for key, (both, truth_only, pred_only, f_both, f_truth, f_pred) in expected.items():
    row = read[key]
    assert (
      int(row['cells_compared']),
      int(row['cells_truth_only']),
      int(row['cells_pred_only']),
    ) == (both, truth_only, pred_only), key
    assert float(row['fraction_compared']) == pytest.approx(f_both)
    assert float(row['fraction_truth_only']) == pytest.approx(f_truth)
    assert float(row['fraction_pred_only']) == pytest.approx(f_pred)
  unmeasured = read[('c2', 'tibial')]
  assert unmeasured['status'] == 'not_measured' and unmeasured['cells_truth_only'] == ''
  assert math.isnan(float(unmeasured['fraction_truth_only']))


def test_coverage_table_under_table_5():
  lines = report.thickness_table(RESULTS, 'nearest')
  start = lines.index('### Coverage of the thickness maps')
  table = [line for line in lines[start:] if line.startswith('|')]
  header, _, femoral, tibial = (
    [c.strip() for c in line.strip()[1:-1].split('|')] for line in table
  )
  assert header == [
    'Plate',
    'compared (both)',
    'truth only (missed)',
    'prediction only',
    'truth cells',
  ]

  def cell(values, digits=3, missed=0):
    text = f'{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f} (n=2)'
    return text + (f'; {missed} missed' if missed else '')

  assert femoral == [
    'femoral',
    cell([3 / 4, 1.0]),
    cell([1 / 4, 0.0]),
    cell([1 / 4, 0.0]),
    cell([4, 2], 0),
  ]
  # The volume whose tibial plate is missed counts with all its truth cells missed.
  assert tibial == [
    'tibial',
    cell([1 / 5, 0.0], missed=1),
    cell([4 / 5, 1.0], missed=1),
    cell([0.0, 0.0], missed=1),
    cell([5, 2], 0, missed=1),
  ]
  # Table 5 itself is unchanged: its own header comes first.
  assert lines[0] == '## Cartilage thickness (paper Table 5)'


def test_table_5_names_the_thickness_measure():
  assert "Thickness measure 'nearest'" in report.thickness_table(RESULTS, 'nearest')[2]
  assert "Thickness measure 'normal'" in report.thickness_table(RESULTS, 'normal')[2]
