"""The report's "side" block (scan_report.side_report) and its quality flags (quality.py:
side_unknown, side_disagrees, side_conflict) on the truth label map of a left knee phantom: what
is declared beside what the anatomy shows, and which one the report keeps."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import laterality, orientation
from data_pipelines.phantoms import generate_knee
from imask_jax import metrics
from imask_jax.predict import quality, scan_report

KNEE = metrics.KneeLabelValues()


@pytest.fixture(scope='module')
def left_knee():
  phantom = generate_knee(5, 'cpu', side='left')
  grid = orientation.SourceGrid.from_affine(phantom.labels.shape, phantom.affine)
  return grid.to_canonical(phantom.labels), grid.canonical_spacing


def _side(labels, spacing, declared=None, conflict=None, path='/scans/knee.nii.gz'):
  block = scan_report.side_report(
    labels, spacing, KNEE, declared=declared, conflict=conflict, input_path=path
  )
  return block, [f['code'] for f in quality.side_flags(block)]


def test_nothing_declared_takes_the_estimate(left_knee):
  block, codes = _side(*left_knee)
  assert set(block) == {
    'side',
    'basis',
    'declared',
    'conflict',
    'estimated',
    'estimate_margin',
    'estimate_basis',
  }
  assert block['side'] == block['estimated'] == 'left' and block['declared'] is None
  assert block['basis'] == (
    'estimated from the anatomy (nothing declared: no --side, no sidecar knee.json)'
  )
  assert block['estimate_margin'] > 0.04 and 'a left knee' in block['estimate_basis']
  assert codes == []


def test_a_declared_side_is_kept_and_checked_against_the_anatomy(left_knee):
  agreeing = laterality.DeclaredSide('left', "DICOM Laterality (0020,0060) 'L' in 1.dcm")
  block, codes = _side(*left_knee, declared=agreeing)
  assert block['side'] == 'left' and block['basis'] == f'declared: {agreeing.basis}'
  assert codes == []
  wrong = laterality.DeclaredSide('right', 'sidecar knee.json "side": \'right\'')
  block, codes = _side(*left_knee, declared=wrong)
  assert block['side'] == block['declared'] == 'right' and block['estimated'] == 'left'
  assert codes == ['side_disagrees']
  (flag,) = quality.side_flags(block)
  assert flag['message'].startswith(
    'declared: sidecar knee.json "side": \'right\', but the anatomy suggests a left knee ('
  )


def test_a_conflict_takes_the_estimate_and_is_flagged(left_knee):
  conflict = "DICOM Laterality (0020,0060) 'R' in 1.dcm says right, but ... says left"
  block, codes = _side(*left_knee, conflict=conflict)
  assert block['side'] == 'left' and block['conflict'] == conflict
  assert block['basis'].startswith('estimated from the anatomy (the declarations contradict')
  assert codes == ['side_conflict']


def test_neither_declared_nor_estimated_is_flagged(left_knee):
  labels, spacing = left_knee
  block, codes = _side(np.zeros_like(labels), spacing, path='/scans/series_folder_gone')
  assert block['side'] is None and block['estimated'] is None
  assert block['basis'].startswith('unknown: nothing declared: no --side, no sidecar')
  assert 'the anatomy does not tell: too little tibial cartilage' in block['basis']
  assert codes == ['side_unknown']
  assert quality.side_flags(None) == []
