"""tools/held_out_table.py: Dice and thickness offsets against a held-out folder's truth, on a
phantom knee whose 'prediction' is its truth (Dice 1, offsets 0) or the truth with half of the
femur's voxels removed (femur Dice 2/3, the other classes 1); the flags' calibration table
counts the flagged and unflagged scans and those of them below the aims (Dice 2/3 < 0.95)."""

from __future__ import annotations

import importlib.util
import json
import os

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO
from data_pipelines.phantoms import writer


def load_tool():
  spec = importlib.util.spec_from_file_location(
    'held_out_table', os.path.join(REPO, 'tools', 'held_out_table.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_rows_against_known_predictions(tmp_path, capsys):
  tool = load_tool()
  truth_dir = tmp_path / 'truth'
  writer.write_dataset('knee', 1, 2, str(truth_dir), spacing_mm=0.8, fov_mm=72.0)
  label_path = truth_dir / 'labelsTr' / 'knee_0000.nii.gz'
  image = nib.load(label_path)
  truth = np.asarray(image.dataobj)

  def predicted(name, labels):
    folder = tmp_path / name
    folder.mkdir()
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), image.affine), folder / 'knee_0000.nii.gz')
    return str(folder)

  same = predicted('same', truth)
  halved = truth.copy()
  femur = np.argwhere(truth == 1)
  drop = femur[: len(femur) // 2]
  halved[tuple(drop.T)] = 0
  half = predicted('half', halved)
  assert tool.main(['--truth', str(truth_dir), '--pred', same, '--pred', half]) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| /')]
  cells = [[c.strip() for c in line.split('|')[1:-1]] for line in lines]
  assert cells[0][2:6] == ['1.000 (1.00)'] * 4 and cells[0][6:] == ['+0 %', '+0 %']
  assert float(cells[1][2].split()[0]) == pytest.approx(2 / 3, abs=1e-3)
  assert cells[1][3:6] == ['1.000 (1.00)'] * 3

  # --flags: the halved femur's report carries a 'size' flag, the exact one none; truths paired.
  for folder, flags in ((same, []), (half, ['size'])):
    report = {
      'quality': {'review': bool(flags), 'flags': [{'code': c, 'message': ''} for c in flags]}
    }
    with open(os.path.join(folder, 'knee_0000.json'), 'w') as f:
      json.dump(report, f)
  args = ['--truth', str(truth_dir), '--pred', same, '--truth', str(truth_dir), '--pred', half]
  assert tool.main([*args, '--flags']) == 0
  out = capsys.readouterr().out
  table = {
    cells[0]: cells[1:]
    for cells in ([c.strip() for c in line.split('|')[1:-1]] for line in out.splitlines())
    if cells and cells[0] in ('size', '(any flag)', '(no flag)')
  }
  assert table == {
    'size': ['1', '1', '100%'],
    '(any flag)': ['1', '1', '100%'],
    '(no flag)': ['1', '0', '0%'],
  }
  with pytest.raises(SystemExit):
    tool.main(['--truth', 'a', '--truth', 'b', '--pred', same, '--pred', half, '--pred', same])
