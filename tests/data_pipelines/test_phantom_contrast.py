"""The knee phantom's held-out contrasts (data_pipelines/phantoms/contrast.py).

Truth: the spin-echo signal equation evaluated here by hand from the cited relaxation times,
sequence timings and the physics of each contrast (which tissue is brightest); the generator's
own label maps and sidecar for the anatomy, which a contrast must not touch.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines.phantoms import __main__ as cli
from data_pipelines.phantoms import contrast, knee, mri, writer

GRID = dict(spacing_mm=0.8, fov_mm=72.0)  # the cpu preset's voxels in a smaller field of view


@pytest.fixture(scope='module')
def knees():
  """Seed 4 with a large effusion in each contrast."""
  return {
    name: knee.generate_knee(4, 'cpu', contrast=name, effusion_ml=14.0, **GRID)
    for name in contrast.CONTRASTS
  }


def test_dess_is_the_default_table_and_the_default_output():
  assert contrast.signal_table('dess') is mri.DESS
  plain = knee.generate_knee(1, 'cpu', **GRID)
  named = knee.generate_knee(1, 'cpu', contrast='dess', **GRID)
  assert np.array_equal(plain.image, named.image)
  assert np.array_equal(plain.labels, named.labels)
  assert plain.truth == named.truth and 'contrast' not in plain.truth


def test_tables_follow_the_spin_echo_equation_and_the_physics_of_each_contrast():
  """Ratios to the brightest tissue by hand: IW FS (TR 3200, TE 30): fluid brightest,
  cartilage / fluid = 0.75 (1 - e^(-3200/1240)) e^(-30/36.4) / ((1 - e^(-3200/3620))
  e^(-30/767)); fat suppressed below muscle. T1 SE (TR 600, TE 15): fat and marrow brightest,
  fluid below muscle below cartilage. Spin echoes: vessels a flow void, cortex the floor."""
  iw, t1 = contrast.signal_table('iw_fs'), contrast.signal_table('t1')
  fluid_iw = (1 - math.exp(-3200 / 3620)) * math.exp(-30 / 767)
  cart_iw = 0.75 * (1 - math.exp(-3200 / 1240)) * math.exp(-30 / 36.4)
  assert iw['fluid'] == max(iw.values()) == 900.0
  assert iw['cartilage'] / iw['fluid'] == pytest.approx(cart_iw / fluid_iw, abs=2e-4)
  assert iw['cartilage'] > iw['muscle'] > iw['fat'] and iw['marrow'] < 0.2 * iw['fluid']
  fat_t1 = 0.9 * (1 - math.exp(-600 / 371)) * math.exp(-15 / 124)
  fluid_t1 = (1 - math.exp(-600 / 3620)) * math.exp(-15 / 767)
  assert t1['fat'] == t1['marrow'] == max(t1.values()) == 900.0
  assert t1['fluid'] / t1['fat'] == pytest.approx(fluid_t1 / fat_t1, abs=2e-4)
  assert t1['cartilage'] > t1['muscle'] > t1['fluid']
  for table in (iw, t1):
    assert set(table) == set(mri.DESS)
    assert table['vessel'] < 0.1 * max(table.values()) and table['cortex'] <= 20
    assert table['fibrous'] < table['muscle'] and table['ligament'] < table['muscle']


def test_held_out_contrasts_keep_the_anatomy_and_change_only_the_signal(knees):
  """Same label map and anatomy truth as DESS; the sidecar names the contrast; the images'
  interior medians (femoral marrow, effusion; voxels 2 deep) sit within 20 % of the table
  (texture, bias field and noise), and their order is the contrast's."""
  dess = knees['dess']
  for name in ('iw_fs', 't1'):
    ph = knees[name]
    assert np.array_equal(ph.labels, dess.labels)
    extra = {'contrast', 'sequence'}
    assert {k: v for k, v in ph.truth.items() if k not in extra} == {
      k: v for k, v in dess.truth.items() if k not in extra
    }
    assert ph.truth['contrast'] == {'name': name, 'signal': contrast.signal_table(name)}
    assert ph.truth['sequence'] == contrast.SEQUENCE_NAMES[name]
  medians = {}
  for name, ph in knees.items():
    table = contrast.signal_table(name)
    got = {}
    for label, tissue in ((1, 'marrow'), (5, 'fluid')):
      core = ndimage.binary_erosion(ph.labels == label, iterations=2)
      assert core.sum() > 200
      got[tissue] = float(np.median(ph.image[core]))
      assert got[tissue] == pytest.approx(table[tissue], rel=0.2)
    got['cartilage'] = float(np.median(ph.image[ph.labels == 2]))
    medians[name] = got
  assert medians['iw_fs']['fluid'] > medians['iw_fs']['cartilage'] > medians['iw_fs']['marrow']
  assert medians['t1']['marrow'] > medians['t1']['cartilage'] > medians['t1']['fluid']
  assert medians['dess']['fluid'] > medians['dess']['cartilage'] > medians['dess']['marrow']


def test_written_dataset_records_a_contrast_only_when_given(tmp_path):
  meta = writer.write_dataset('knee', 1, 2, str(tmp_path / 'iw'), contrast='iw_fs', **GRID)
  assert meta['contrast'] == 'iw_fs' and meta['channel_names'] == {'0': 'IW-TSE-FS-like'}
  truth = json.loads((tmp_path / 'iw' / 'truth' / 'knee_0000.json').read_text())
  assert truth['contrast']['name'] == 'iw_fs'
  plain = writer.write_dataset('knee', 1, 2, str(tmp_path / 'plain'), **GRID)
  assert 'contrast' not in plain and plain['channel_names'] == {'0': 'DESS'}
  with pytest.raises(ValueError, match=r"contrast='pd'.*'dess', 'iw_fs', 't1'"):
    writer.write_dataset('knee', 1, 2, str(tmp_path / 'bad'), contrast='pd')
  with pytest.raises(ValueError, match='knees only'):
    writer.write_dataset('hip', 1, 2, str(tmp_path / 'hip'), contrast='t1')
  assert not (tmp_path / 'bad').exists() and not (tmp_path / 'hip').exists()


def test_cli_passes_the_contrast_and_refuses_it_for_hips(tmp_path, capsys):
  args = ['knee', '--out', str(tmp_path / 'k'), '--contrast', 't1', '--spacing', '0.8']
  assert cli.main([*args, '--fov', '64']) == 0
  meta = json.loads((tmp_path / 'k' / 'dataset.json').read_text())
  assert meta['contrast'] == 't1'
  with pytest.raises(SystemExit):
    cli.parse_args(['hip', '--out', str(tmp_path / 'h'), '--contrast', 't1'])
  assert 'knees only' in capsys.readouterr().err
