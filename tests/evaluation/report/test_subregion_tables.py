"""Evaluation's subregion outputs (case_metrics.evaluate_case, subregion_tables, report): on a knee
phantom's truth given as its own prediction every difference is 0, the CSV holds one column per
region x measure with the values of metrics.subregions on the same maps, and a knee without a
known side gets a note instead of numbers."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from data_pipelines import nifti_io, orientation, phantoms, tissues
from imask_jax import metrics
from imask_jax.evaluation import case_metrics, knee_steps, report
from imask_jax.evaluation.report import subregion_tables


@pytest.fixture(scope='module')
def knee(tmp_path_factory):
  root = tmp_path_factory.mktemp('knee')
  phantoms.write_dataset('knee', 1, 3, str(root / 'k'))
  labels = nifti_io.load_nifti_labels(root / 'k' / 'labelsTr' / 'knee_0000.nii.gz')
  grid = orientation.SourceGrid.from_affine(labels.shape, labels.affine)
  truth = json.loads((root / 'k' / 'truth' / 'knee_0000.json').read_text())
  return grid.to_canonical(labels.data), grid.canonical_spacing, truth['anatomy']['side']


def test_truth_as_its_own_prediction_has_zero_differences(knee, tmp_path):
  canonical, spacing, side = knee
  scheme = tissues.LabelScheme.from_values(tissues.KNEE_CLASSES, (1, 2, 3, 4))
  prediction = type('Prediction', (), {'canonical': canonical, 'plane': 'sagittal'})()
  result = case_metrics.evaluate_case(
    'knee_0000',
    canonical,
    prediction,
    scheme,
    spacing,
    side=(side, 'phantom truth'),
    thickness_method='nearest',
  )
  assert result.side == side and result.subregion_note == ''
  truth, pred = result.subregions['truth'], result.subregions['prediction']
  assert set(truth) >= {'cMT', 'pLT', 'ccMF', 'icLF', 'MFTC', 'LFTC', 'FTJ', 'TrF'}
  for region, measures in truth.items():
    assert measures == pred[region], region
  # The same numbers as the subregions of the comparison's truth maps, measured directly.
  direct = metrics.knee_subregions(
    result.thickness['femoral'].truth, result.thickness['tibial'].truth, side
  )
  assert direct == truth
  table = subregion_tables.summary_table([('knee_0000', result.subregions)])
  row = next(line for line in table if line.startswith('| cMT |'))
  assert '| 0.000 (n=1) |' in row
  report.write_tables(str(tmp_path), [result], scheme, {}, {})
  with open(tmp_path / 'subregions.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['source'] for r in rows] == ['truth', 'prediction']
  assert list(rows[0]) == list(subregion_tables.csv_columns())
  for region in ('cMT', 'FTJ'):
    for measure in ('thickness_cab_mm', 'tab_mm2', 'denuded_percent'):
      value = float(rows[0][f'{region}_{measure}'])
      want = getattr(truth[region], measure)
      assert value == want or (math.isnan(value) and math.isnan(want))


def test_without_a_side_there_are_no_subregions_and_a_note(knee):
  canonical, spacing, _ = knee
  scheme = tissues.LabelScheme.from_values(tissues.KNEE_CLASSES, (1, 2, 3, 4))
  prediction = type('Prediction', (), {'canonical': canonical, 'plane': 'sagittal'})()
  empty = np.where(np.isin(canonical, (2, 4)), 0, canonical).astype(np.uint8)
  result = case_metrics.evaluate_case(
    'k', canonical, prediction, scheme, spacing, thickness_method='nearest'
  )
  assert result.subregions == {} and 'side is not known' in result.subregion_note
  # A prediction without cartilage: the truth's subregions, none for the prediction, and why.
  missing = type('Prediction', (), {'canonical': empty, 'plane': 'sagittal'})()
  result = case_metrics.evaluate_case(
    'k', canonical, missing, scheme, spacing, side=('left', 'x'), thickness_method='nearest'
  )
  assert 'truth' in result.subregions and 'prediction' not in result.subregions
  assert result.subregion_note.startswith('prediction: ')


def test_evaluation_names_the_sides_from_a_sidecar_or_the_truths_anatomy(knee, tmp_path):
  from data_pipelines import readers

  canonical, spacing, side = knee
  scheme = tissues.LabelScheme.from_values(tissues.KNEE_CLASSES, (1, 2, 3, 4))
  volume = type('Volume', (), {'labels': canonical, 'spacing': spacing})()
  image = tmp_path / 'knee_0000_0000.nii.gz'
  image.write_bytes(b'')  # only its name matters: the sidecar is found beside it
  case = readers.Case('knee_0000', str(image))
  estimated = knee_steps.case_side(case, volume, scheme)
  assert estimated[0] == side and estimated[1].startswith('estimated from the truth label map')
  other = 'left' if side == 'right' else 'right'
  (tmp_path / 'knee_0000_0000.json').write_text(json.dumps({'side': other}))
  declared = knee_steps.case_side(case, volume, scheme)
  assert declared[0] == other and declared[1].startswith('declared: sidecar')


def test_predicts_report_block_names_regions_by_side_and_is_strict_json(knee):
  from imask_jax.predict import scan_report

  canonical, spacing, side = knee
  knee_values = tissues.KneeLabelValues()
  maps = {}
  scan_report.femoral_thickness(canonical, spacing, knee_values, 'nearest', maps)
  scan_report.tibial_thickness(canonical, spacing, knee_values, 'nearest', maps)
  block = scan_report.subregion_report(maps, side)
  assert block['status'] == 'measured' and block['side'] == side
  direct = metrics.knee_subregions(maps['femoral'], maps['tibial'], side)
  assert block['regions']['cMT']['thickness_cab_mm'] == direct['cMT'].thickness_cab_mm
  json.dumps(block, allow_nan=False)  # what predict writes: no NaN
  assert scan_report.subregion_report(maps, None)['status'] == 'not_measured'
