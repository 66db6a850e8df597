"""Change between visits (imask_jax/change.py): flat tibial plateaus of known thickness as label
maps, one voxel layer (0.5 mm) taken off one plate at the follow-up; predict-style reports;
a cohort table with an interval whose sides disagree."""

from __future__ import annotations

import csv
import io
import json
import math

import nibabel as nib
import numpy as np
import pytest

from conftest import POSED_AFFINE
from imask_jax import change

SPACING = 0.5


def _plateaus(path, smaller_r_voxels: int, larger_r_voxels: int) -> str:
  labels = np.zeros((110, 60, 40), np.uint8)
  labels[:, :, :20] = 3
  labels[5:45, 5:55, 20 : 20 + smaller_r_voxels] = 4
  labels[65:105, 5:55, 20 : 20 + larger_r_voxels] = 4
  affine = POSED_AFFINE.copy()
  affine[:3, :3] *= SPACING
  nib.save(nib.Nifti1Image(labels, affine), str(path))
  return str(path)


def test_a_layer_off_one_plate_is_its_change_and_nothing_else_moves(tmp_path, capsys):
  baseline = _plateaus(tmp_path / 'v0.nii.gz', 4, 6)
  followup = _plateaus(tmp_path / 'v1.nii.gz', 4, 5)  # the plate at larger R: 3.0 -> 2.5 mm
  options = dict(side='right', thickness_method='nearest')  # right knee: medial at smaller R
  a = change.read_visit(baseline, **options)
  b = change.read_visit(followup, **options)
  delta = change.change(a, b)
  assert delta['cLT_thickness_cab_mm_change'] == pytest.approx(-0.5)
  assert delta['cLT_thickness_cab_mm_change_percent'] == pytest.approx(-100 * 0.5 / 3.0)
  assert delta['cMT_thickness_cab_mm_change'] == 0.0
  assert delta['MT_volume_mm3_change'] == 0.0
  assert delta['LT_volume_mm3_change'] < 0
  assert 'cMF_thickness_cab_mm_change' not in delta  # no femur in these maps
  assert change.main([baseline, followup, '--side', 'right', '--thickness_method', 'nearest']) == 0
  out = capsys.readouterr().out
  assert 'right knee (declared: --side right)' in out
  assert next(line for line in out.splitlines() if line.startswith('cLT ')).split()[3] == '-0.500'


def _report(path, side: str, cmt: float) -> str:
  regions = {name: {m: 1.0 for m in change.REGION_MEASURES} for name in ('cMT', 'MT', 'cLF')}
  regions['cMT']['thickness_cab_mm'] = cmt
  regions['cLF']['denuded_percent'] = None  # not measurable: null in predict's JSON
  report = {
    'side': {'side': side, 'basis': 'declared: --side'},
    'subregions': {'status': 'measured', 'side': side, 'regions': regions},
  }
  path.write_text(json.dumps(report))
  return str(path)


def test_a_cohort_table_gives_one_row_per_interval(tmp_path):
  files = {
    ('k1', 'v10'): _report(tmp_path / 'k1_v10.json', 'left', 1.6),
    ('k1', 'v2'): _report(tmp_path / 'k1_v2.json', 'left', 1.8),
    ('k1', 'v1'): _report(tmp_path / 'k1_v1.json', 'left', 2.0),
    ('k2', 'v1'): _report(tmp_path / 'k2_v1.json', 'left', 2.0),
    ('k2', 'v2'): _report(tmp_path / 'k2_v2.json', 'right', 2.0),
  }
  table = tmp_path / 'cohort.csv'
  with open(table, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['visit', 'subject', 'file', 'site'])
    for (subject, visit), file in files.items():
      writer.writerow([visit, subject, file.replace(str(tmp_path) + '/', ''), 'A'])
  rows = change.cohort_rows(change.read_table(str(table)))
  assert [(r['subject'], r['visit_from'], r['visit_to']) for r in rows] == [
    ('k1', 'v1', 'v2'),
    ('k1', 'v2', 'v10'),  # natural order: v2 before v10
    ('k2', 'v1', 'v2'),
  ]
  assert rows[0]['cMT_thickness_cab_mm_change'] == pytest.approx(-0.2)
  assert rows[1]['cMT_thickness_cab_mm_change_percent'] == pytest.approx(-100 * 0.2 / 1.8)
  assert math.isnan(rows[0]['cLF_denuded_percent_change'])
  assert 'is a left knee' in rows[2]['note'] and 'a right knee' in rows[2]['note']
  stream = io.StringIO()
  change.write_rows(stream, rows)
  header = stream.getvalue().splitlines()[0].split(',')
  assert header[:7] == list(change.LEAD_COLUMNS)
  assert header.index('MT_cab_mm2_change') < header.index('cMT_cab_mm2_change')  # region order


def test_a_report_without_subregions_is_named(tmp_path):
  path = tmp_path / 'r.json'
  path.write_text(json.dumps({'subregions': {'status': 'not_measured', 'reason': 'no side'}}))
  with pytest.raises(ValueError, match=r'r.json: no subregions in the report \(no side\)'):
    change.read_visit(str(path))


def test_the_change_figure_needs_label_maps(tmp_path, capsys):
  baseline = _plateaus(tmp_path / 'v0.nii.gz', 4, 6)
  followup = _plateaus(tmp_path / 'v1.nii.gz', 4, 5)
  figure = tmp_path / 'change.png'
  argv = [baseline, followup, '--side', 'right', '--thickness_method', 'nearest']
  assert change.main([*argv, '--figure', str(figure)]) == 0
  assert figure.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  reports = [_report(tmp_path / f'{v}.json', 'left', 2.0) for v in ('a', 'b')]
  with pytest.raises(SystemExit):
    change.main([*reports, '--figure', str(tmp_path / 'no.png')])
  assert '--figure needs label-map inputs' in capsys.readouterr().err
