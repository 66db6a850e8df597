"""The side a scan declares (data_pipelines/laterality.py): DICOM laterality tags and OAI's series
descriptions in tiny series written tag by tag as tests/test_dicom.py writes them, JSON sidecars
beside NIfTI files (ours and dcm2niix's keys), --side overriding them, and contradictions named
in one line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from test_dicom import PERMUTED, write_series

from data_pipelines import laterality
from data_pipelines.errors import DataError

LATERALITY, IMAGE_LATERALITY, DESCRIPTION, PROTOCOL = (
  '0020|0060',
  '0020|0062',
  '0008|103e',
  '0018|1030',
)


def _series(folder, tags=(), per_slice=None):
  """A 3-slice series whose every file carries `tags` ((tag, value) pairs); per_slice(k) adds
  slice k's own."""
  return write_series(
    folder,
    np.zeros((4, 5, 3), np.int16),
    PERMUTED,
    tags=lambda k: (*tags, *(per_slice(k) if per_slice else ())),
  )


def _nifti(folder, name='scan.nii.gz', sidecar=None):
  path = folder / name
  nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.int16), PERMUTED), str(path))
  if sidecar is not None:
    (folder / 'scan.json').write_text(json.dumps(sidecar))
  return str(path)


@pytest.mark.parametrize(
  'text, side',
  [
    ('SAG_3D_DESS_RIGHT', 'right'),
    ('SAG_3D_DESS_LEFT', 'left'),
    ('sag 3d dess right', 'right'),
    ('SAG_IW_TSE_LEFT', 'left'),
    ('COR_MPR_L', 'left'),  # a single letter where no word names a side
    ('Knee R', 'right'),
    ('LEFT_KNEE_R', 'left'),  # the word decides over the letter
    ('UPRIGHT', None),  # word-bounded: no RIGHT inside a word
    ('BRIGHT_FS', None),
    ('SAG_PD_RL', None),  # a phase-encoding direction, not a side
    ('RIGHT LEFT', None),  # names both sides: none
    ('T2 R L', None),
    ('AX_T2_MAP', None),
    ('', None),
    (None, None),
  ],
)
def test_a_side_in_a_series_description(text, side):
  assert laterality.side_in_text(text) == side


def test_laterality_codes():
  assert [laterality.side_of_code(v) for v in ('R', 'l ', 'Right', 'LEFT')] == [
    'right',
    'left',
    'right',
    'left',
  ]
  assert [laterality.side_of_code(v) for v in ('B', 'U', '', None, 1)] == [None] * 5


@pytest.mark.parametrize(
  'tags, side, source',
  [
    (((LATERALITY, 'R'),), 'right', "DICOM Laterality (0020,0060) 'R'"),
    (((IMAGE_LATERALITY, 'L'),), 'left', "DICOM ImageLaterality (0020,0062) 'L'"),
    (
      ((DESCRIPTION, 'SAG_3D_DESS_LEFT'),),
      'left',
      "SeriesDescription (0008,103E) 'SAG_3D_DESS_LEFT'",
    ),
    (((PROTOCOL, 'SAG_3D_DESS_RIGHT'),), 'right', "ProtocolName (0018,1030) 'SAG_3D_DESS_RIGHT'"),
    # Tags that agree: the first in the order of trust is the basis.
    (((DESCRIPTION, 'SAG_3D_DESS_RIGHT'), (LATERALITY, 'R')), 'right', 'Laterality'),
  ],
)
def test_a_dicom_series_declares_its_side_by_its_tags(tmp_path, tags, side, source):
  declared = laterality.declared_side(_series(tmp_path / 'knee', tags))
  assert declared.side == side
  assert declared.basis.startswith('DICOM ') and source in declared.basis


def test_a_series_without_a_side_declares_none(tmp_path):
  assert laterality.declared_side(_series(tmp_path / 'plain')) is None
  both = _series(tmp_path / 'both', ((LATERALITY, 'B'), (DESCRIPTION, 'SAG_PD_FS')))
  assert laterality.declared_side(both) is None
  assert 'no side in the series' in laterality.sources_read(both)


def test_contradicting_tags_are_one_line_naming_both(tmp_path):
  series = _series(tmp_path / 'knee', ((LATERALITY, 'R'), (DESCRIPTION, 'SAG_3D_DESS_LEFT')))
  with pytest.raises(laterality.SideConflict) as error:
    laterality.declared_side(series)
  message = str(error.value)
  assert '\n' not in message
  assert "Laterality (0020,0060) 'R'" in message and 'says right' in message
  assert "SeriesDescription (0008,103E) 'SAG_3D_DESS_LEFT'" in message and 'says left' in message
  # Two files of one series that disagree.
  mixed = _series(tmp_path / 'mixed', per_slice=lambda k: ((IMAGE_LATERALITY, 'LR'[k > 0]),))
  with pytest.raises(laterality.SideConflict, match=r"'L' in .*-000\.dcm says left, but .*'R' in"):
    laterality.declared_side(mixed)


def test_the_flag_overrides_what_the_scan_declares(tmp_path):
  series = _series(tmp_path / 'knee', ((LATERALITY, 'R'),))
  overridden = laterality.declared_side(series, explicit='Left')
  assert overridden.side == 'left'
  assert overridden.basis.startswith('--side left (overrides DICOM Laterality (0020,0060)')
  agreeing = laterality.declared_side(series, explicit='right')
  assert agreeing.side == 'right' and 'agrees' in agreeing.basis
  conflicting = _series(tmp_path / 'c', ((LATERALITY, 'R'), (DESCRIPTION, 'X_LEFT')))
  assert laterality.declared_side(conflicting, explicit='left').side == 'left'
  plain = _nifti(tmp_path)
  assert laterality.declared_side(plain, explicit='right') == laterality.DeclaredSide(
    'right', '--side right'
  )
  with pytest.raises(ValueError, match="--side 'up': expected left or right"):
    laterality.declared_side(plain, explicit='up')


@pytest.mark.parametrize(
  'sidecar, side, key',
  [
    ({'side': 'left'}, 'left', '"side"'),
    ({'side': 'R'}, 'right', '"side"'),
    ({'Laterality': 'L', 'Modality': 'MR'}, 'left', '"Laterality"'),
    # What dcm2niix writes beside a converted OAI series.
    (
      {'SeriesDescription': 'SAG_3D_DESS_RIGHT', 'ProtocolName': 'SAG_3D_DESS_RIGHT'},
      'right',
      '"SeriesDescription"',
    ),
    ({'ProtocolName': 'SAG_3D_DESS_LEFT'}, 'left', '"ProtocolName"'),
    ({'side': 'right', 'SeriesDescription': 'SAG_3D_DESS_RIGHT'}, 'right', '"side"'),
  ],
)
def test_a_sidecar_declares_the_side_of_a_nifti_file(tmp_path, sidecar, side, key):
  declared = laterality.declared_side(_nifti(tmp_path, sidecar=sidecar))
  assert declared.side == side and declared.basis.startswith(f'sidecar scan.json {key}')


def test_sidecars_that_declare_nothing_contradict_or_are_broken(tmp_path):
  assert laterality.sidecar_path('/a/scan.nii.gz') == '/a/scan.json'
  assert laterality.sidecar_path('/a/scan.nii') == '/a/scan.json'
  plain = _nifti(tmp_path, name='scan.nii')
  assert laterality.declared_side(plain) is None
  assert laterality.sources_read(plain) == 'no sidecar scan.json'
  (tmp_path / 'scan.json').write_text(json.dumps({'SeriesDescription': 'SAG_PD', 'EchoTime': 5}))
  assert laterality.declared_side(plain) is None
  (tmp_path / 'scan.json').write_text(
    json.dumps({'side': 'left', 'SeriesDescription': 'SAG_3D_DESS_RIGHT'})
  )
  with pytest.raises(
    laterality.SideConflict, match=r'^sidecar scan.json "side": .left. says left, but'
  ):
    laterality.declared_side(plain)
  (tmp_path / 'scan.json').write_text(json.dumps({'side': 'both'}))
  with pytest.raises(DataError, match='"side" is not a side'):
    laterality.declared_side(plain)
  (tmp_path / 'scan.json').write_text('{not json')
  with pytest.raises(DataError, match='cannot read the JSON sidecar'):
    laterality.declared_side(plain)
  # --side settles both.
  assert laterality.declared_side(plain, explicit='left').side == 'left'
