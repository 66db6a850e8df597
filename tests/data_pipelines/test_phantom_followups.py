"""Knee phantom follow-ups (docs/phantoms.md, "Follow-ups"): visit 0 is today's scan, a
follow-up without thinning is a test-retest rescan of the same knee, a drawn thinning lowers
the analytic thickness of its region by the amount and no other plate's, and the truth label
maps measured through metrics show the change."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines import orientation
from data_pipelines.datasets import params
from data_pipelines.phantoms import __main__ as cli
from data_pipelines.phantoms import generate_knee, knee_anatomy, knee_regions, write_dataset
from imask_jax import metrics

SEED = 0
TIBIAL = ('MT', 'cMT', 'eMT', 'iMT', 'aMT', 'pMT', 'LT', 'cLT', 'eLT', 'iLT', 'aLT', 'pLT')
LATERAL_FEMUR = ('cLF', 'ecLF', 'ccLF', 'icLF', 'pLF')


@pytest.fixture(scope='module')
def visits():
  """Seed 0 (cpu preset, 140 mm field of view): visit 0, a rescan, a cMF=0.1 follow-up."""
  kw = dict(fov_mm=140.0)
  return {
    'base': generate_knee(SEED, visit=0, **kw),
    'rescan': generate_knee(SEED, visit=1, **kw),
    'thinned': generate_knee(SEED, visit=1, thinning={'cMF': 0.1}, **kw),
  }


def _files(folder) -> dict[str, bytes]:
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, folder)] = open(path, 'rb').read()
  return out


@pytest.mark.slow
def test_visit_0_is_todays_scan_and_the_dataset_is_longitudinal(tmp_path):
  single, longitudinal = tmp_path / 'single', tmp_path / 'longitudinal'
  write_dataset('knee', 1, 4, str(single))
  assert (
    cli.main(
      ['knee', '--seed', '4', '--visits', '2', '--thinning', 'cMF=0.1', '--out', str(longitudinal)]
    )
    == 0
  )
  a, b = _files(single), _files(longitudinal)
  # Visit 0's image and label map are today's bytes; its sidecar is today's (every key, value
  # and their order) with the follow-up blocks before the case id.
  assert b['imagesTr/knee_0000_v0_0000.nii.gz'] == a['imagesTr/knee_0000_0000.nii.gz']
  assert b['labelsTr/knee_0000_v0.nii.gz'] == a['labelsTr/knee_0000.nii.gz']
  today = json.loads(a['truth/knee_0000.json'])
  v0 = json.loads(b['truth/knee_0000_v0.json'])
  assert list(today)[-1] == 'case_id'
  assert list(v0) == list(today)[:-1] + ['visit', 'subregion_thickness', 'case_id']
  assert {k: v for k, v in v0.items() if k in today} == dict(today, case_id='knee_0000_v0')
  assert v0['visit']['thinning_mm'] == {} and v0['visit']['pose_change'] is None
  # Visit 1: the drawn change in its sidecar; a new scan of the same knee.
  v1 = json.loads(b['truth/knee_0000_v1.json'])
  assert v1['visit']['visit'] == 1 and v1['visit']['thinning_mm'] == {'cMF': 0.1}
  assert v1['anatomy'] == today['anatomy'] and v1['seed'] == today['seed']
  assert v1['subregion_thickness']['drawn_change']['cMF']['thickness_cab_mm'] < -0.09
  assert b['imagesTr/knee_0000_v1_0000.nii.gz'] != a['imagesTr/knee_0000_0000.nii.gz']
  # One subject per knee under the visit pattern; dataset.json says how it was drawn.
  meta = json.loads(b['dataset.json'])
  ids = [case['id'] for case in meta['training']]
  assert ids == ['knee_0000_v0', 'knee_0000_v1']
  assert meta['visits'] == 2 and meta['thinning_mm_per_visit'] == {'cMF': 0.1}
  assert meta['subject_pattern'] == params.SUBJECT_VISIT_PATTERN
  assert [params.subject_and_timepoint(i, meta['subject_pattern']) for i in ids] == [
    ('knee_0000', 'v0'),
    ('knee_0000', 'v1'),
  ]
  # The single-visit dataset.json has none of the longitudinal keys.
  assert 'visits' not in json.loads(a['dataset.json'])


def test_bad_follow_up_requests_are_refused(tmp_path):
  with pytest.raises(ValueError, match='needs a follow-up visit'):
    generate_knee(0, visit=0, thinning={'cMF': 0.1})
  with pytest.raises(ValueError, match='not a femorotibial region'):
    generate_knee(0, visit=1, thinning={'cMFX': 0.1})
  with pytest.raises(ValueError, match='expected 0 to 1.0 mm'):
    generate_knee(0, visit=1, thinning={'cMF': -0.1})
  with pytest.raises(ValueError, match='visit='):
    generate_knee(0, visit=-1)
  with pytest.raises(ValueError, match='knees only'):
    write_dataset('hip', 1, 0, str(tmp_path / 'h'), visits=2)
  with pytest.raises(ValueError, match='needs visits >= 2'):
    write_dataset('knee', 1, 0, str(tmp_path / 'k'), thinning={'cMF': 0.1})
  # The last visit's thinning (3 x 0.4 mm) is checked before anything is written.
  with pytest.raises(ValueError, match='expected 0 to 1.0 mm'):
    write_dataset('knee', 1, 0, str(tmp_path / 'k'), visits=4, thinning={'cMF': 0.4})
  assert not os.path.exists(tmp_path / 'k')
  with pytest.raises(SystemExit):
    cli.parse_args(['knee', '--out', 'x', '--thinning', 'cMF=0.1'])
  with pytest.raises(SystemExit):
    cli.parse_args(['knee', '--out', 'x', '--visits', '2', '--thinning', 'cMF'])
  assert cli.parse_args(['knee', '--out', 'x', '--visits', '2', '--thinning', 'cMF=0.1,cMT=0.05'])
  assert cli.parse_thinning('cMF=0.1, cMT=0.05') == {'cMF': 0.1, 'cMT': 0.05}


@pytest.mark.slow
def test_a_follow_up_without_thinning_is_a_rescan_of_the_same_knee(visits):
  base, rescan = visits['base'], visits['rescan']
  # The same knee: anatomy, analytic thickness fields and subregion thickness, exactly.
  assert rescan.truth['anatomy'] == base.truth['anatomy']
  for plate in ('femoral_cartilage', 'tibial_cartilage'):
    assert (
      rescan.truth['cartilage_thickness'][plate]['thickness_mm']
      == base.truth['cartilage_thickness'][plate]['thickness_mm']
    )
  regions = rescan.truth['subregion_thickness']
  assert regions['regions'] == base.truth['subregion_thickness']['regions']
  assert all(v == 0.0 for change in regions['drawn_change'].values() for v in change.values())
  # Repositioned by the recorded change: 1-2 degrees about an axis through the centre of the
  # field of view, 1-2 mm of shift.
  m0, m1 = (np.array(p.truth['model_to_world']) for p in (base, rescan))
  change = m1 @ np.linalg.inv(m0)
  recorded = rescan.truth['visit']['pose_change']
  angle = np.degrees(np.arccos(np.clip((np.trace(change[:3, :3]) - 1) / 2, -1, 1)))
  assert 1.0 <= angle <= 2.0 and angle == pytest.approx(recorded['rotation_deg'], abs=1e-4)
  assert np.allclose(change[:3, 3], recorded['shift_mm'], atol=1e-5)
  assert 1.0 <= np.linalg.norm(change[:3, 3]) <= 2.0
  # The label maps are the same anatomy in the new position: resampled through the recorded
  # change they overlap (nearest-neighbour resampling of 0.8 x 0.8 x 1.5 mm voxels costs
  # cartilage 2-3 voxels thick about 0.14 Dice: 0.856-0.874 on seeds 0-2, bones 0.979-0.990),
  # and far better than without it.
  index = np.linalg.inv(rescan.affine) @ change @ base.affine
  moved = ndimage.affine_transform(rescan.labels, index, order=0, mode='constant', cval=0)
  for label, least in ((1, 0.97), (2, 0.83), (3, 0.97), (4, 0.83)):
    a, b = base.labels == label, moved == label
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    raw = 2 * (a & (rescan.labels == label)).sum() / (a.sum() + (rescan.labels == label).sum())
    assert dice >= least and dice > raw + 0.02, (label, dice, raw)
  # Cartilage volume (voxel count) the same within the voxelisation's pose dependence at these
  # voxels (seeds 0-5: up to 1.5 % femoral, 2.7 % tibial).
  for name in ('femoral_cartilage', 'tibial_cartilage'):
    v0, v1 = (p.truth['tissues'][name]['voxels'] for p in (base, rescan))
    assert abs(v1 / v0 - 1) <= 0.04, name
  # New noise, bias field and texture: the images differ almost everywhere, and the noise
  # outside the body (signal 0) is uncorrelated between the visits.
  assert np.mean(base.image != rescan.image) > 0.9
  air = (base.labels == 0) & (ndimage.uniform_filter(base.image, 5) < 60)
  air &= ndimage.uniform_filter(rescan.image, 5) < 60
  assert air.sum() > 1000
  r = np.corrcoef(base.image[air], rescan.image[air])[0, 1]
  assert abs(r) < 0.1


@pytest.mark.slow
def test_thinning_cmf_lowers_the_analytic_cmf_only(visits):
  base, thinned = visits['base'], visits['thinned']
  block = thinned.truth['subregion_thickness']
  assert block['baseline'] == base.truth['subregion_thickness']['regions']
  drawn = block['drawn_change']
  # The whole cMF (its rim, where the cartilage is under 0.2 mm, loses half of it) and each of
  # its thirds: -0.1 mm within 0.005 mm; ThCtAB alike (thinning uncovers nothing).
  for name in ('cMF', 'ecMF', 'ccMF', 'icMF'):
    for measure in ('thickness_cab_mm', 'thickness_tab_mm'):
      assert drawn[name][measure] == pytest.approx(-0.1, abs=0.005), (name, measure)
  assert drawn['ccMF']['thickness_cab_mm'] == pytest.approx(-0.1, abs=1e-5)
  # No tibial or lateral femoral region changes at all; the margin reaches into the medial
  # posterior condyle and the trochlea a little.
  for name in TIBIAL + LATERAL_FEMUR + ('LFTC',):
    assert drawn[name] == {'thickness_cab_mm': 0.0, 'thickness_tab_mm': 0.0, 'volume_mm3': 0.0}
    assert block['regions'][name] == block['baseline'][name]
  assert (
    -0.05 < drawn['pMF']['thickness_cab_mm'] < 0 and -0.02 < drawn['TrF']['thickness_cab_mm'] < 0
  )

  # Node by node on the analytic grids: exactly 0.1 mm less wherever cMF's cartilage is at least
  # 0.2 mm thick, half as thick where thinner; the lateral condyle and the tibia untouched.
  model = knee_anatomy.KneeModel(knee_anatomy.sample_anatomy(np.random.default_rng(SEED)))
  grids = knee_regions.surface_grids(model)
  masks = knee_regions.region_masks(grids)
  model.thinning = knee_regions.thinning_zones(grids, masks, {'cMF': 0.1}, model.s)
  fem = grids['femur']
  after = model.thinned('femur', fem.base, *np.meshgrid(*fem.axes, indexing='ij'))
  cmf = masks['cMF'][1]
  thick = cmf & (fem.base >= 0.2)
  assert thick.sum() > 1000
  np.testing.assert_allclose(after[thick], fem.base[thick] - 0.1, atol=1e-6)
  rim = cmf & (fem.base > 0) & (fem.base < 0.2)
  np.testing.assert_allclose(after[rim], fem.base[rim] / 2, atol=1e-6)
  for name in LATERAL_FEMUR:
    assert np.array_equal(after[masks[name][1]], fem.base[masks[name][1]])
  assert 'tibia' not in model.thinning
  # The sidecar's thickness fields at visit 1 are the thinned ones (on their coarser grid).
  f0 = np.array(base.truth['cartilage_thickness']['femoral_cartilage']['thickness_mm'])
  f1 = np.array(thinned.truth['cartilage_thickness']['femoral_cartilage']['thickness_mm'])
  assert np.all(f1 <= f0 + 1e-9) and (f1 < f0 - 0.09).sum() > 20
  assert (
    thinned.truth['cartilage_thickness']['tibial_cartilage']['thickness_mm']
    == base.truth['cartilage_thickness']['tibial_cartilage']['thickness_mm']
  )


def _measured(phantom) -> dict[str, metrics.RegionMeasures]:
  """metrics.knee_subregions of a phantom's truth label map read in canonical RAS+, with the
  surface-normal thickness maps evaluate uses and the sidecar's side."""
  grid = orientation.SourceGrid.from_affine(phantom.labels.shape, phantom.affine)
  labels, spacing = grid.to_canonical(phantom.labels), grid.canonical_spacing
  femoral = metrics.femoral_thickness_map(
    labels, spacing, angle_bin_deg=metrics.femoral_angle_bin_deg(spacing), method='normal'
  )
  tibial = metrics.tibial_thickness_map(labels, spacing, method='normal')
  return metrics.knee_subregions(femoral, tibial, phantom.truth['anatomy']['side'])


@pytest.mark.slow
def test_label_maps_measure_the_drawn_cmf_loss():
  """The full preset's 0.365 x 0.365 x 0.7 mm voxels in a 100 mm in-plane field of view (274 x
  274 x 160, the preset's 140 mm take twice as long) that holds this knee's tibial cartilage and
  its femoral cartilage but for the top of the trochlea (seed 2: no OA thinning, scale 0.96).
  Over seeds 0-9 at the preset's field of view (docs/phantoms.md, "Follow-ups") the label maps
  read a drawn cMF loss of 0.095-0.099 mm as 0.056-0.096 mm (ThCcAB; mean 0.078, SD 0.013):
  tolerance 0.05 mm about -0.1. Test-retest movement there: MT and LT at most 0.020 mm, cLF
  0.038 mm; this knee: 0.007, 0.005 and 0.016 mm."""
  kw = dict(fov_mm=100.0)
  base = generate_knee(2, 'full', visit=0, **kw)
  follow = generate_knee(2, 'full', visit=1, thinning={'cMF': 0.1}, **kw)
  for phantom in (base, follow):
    shape = np.array(phantom.labels.shape)
    for label in (2, 4):  # inside the field of view (array axis 0: superior -> inferior)
      idx = np.argwhere(phantom.labels == label)
      low = idx.min(axis=0) > 0 if label == 4 else idx.min(axis=0)[1:] > 0
      assert np.all(low) and np.all(idx.max(axis=0) < shape - 1), label
  before, after = _measured(base), _measured(follow)
  change = {
    name: after[name].thickness_cab_mm - before[name].thickness_cab_mm
    for name in ('cMF', 'ccMF', 'MT', 'LT', 'cLF')
  }
  drawn = follow.truth['subregion_thickness']['drawn_change']['cMF']['thickness_cab_mm']
  assert drawn == pytest.approx(-0.1, abs=0.005)
  assert change['cMF'] < 0 and change['cMF'] == pytest.approx(-0.1, abs=0.05), change
  for name in ('MT', 'LT', 'cLF'):
    assert abs(change[name]) <= 0.04 and abs(change[name]) < abs(change['cMF']), (name, change)
