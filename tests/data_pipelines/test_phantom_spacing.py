"""Phantoms at other in-plane spacings and fields of view (spacing_mm, fov_mm, --spacing, --fov).

Four small volumes in all (two knees, two hips, a few seconds) plus one tiny hip through the CLI.
The checks hold against geometry and physics: the grid follows from fov / spacing, the field of
view stays centred on the same anatomy, and the anatomy's physical volumes do not depend on the
pixel size.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from data_pipelines.phantoms import __main__ as cli
from data_pipelines.phantoms import hip, hip_anatomy, knee, knee_anatomy, mri, writer

KNEE_FOV = 72.0  # mm: 90 pixels at 0.8 mm, 60 at 1.2 mm (the cpu preset: 102.4 mm)
KNEE_SPACINGS = (0.8, 1.2)
HIP_SPACING = 1.76  # mm, with the preset's 352 mm field of view: 200 pixels (preset 160 at 2.2)


@pytest.fixture(scope='module')
def knees():
  return {sp: knee.generate_knee(0, spacing_mm=sp, fov_mm=KNEE_FOV) for sp in KNEE_SPACINGS}


@pytest.fixture(scope='module')
def hips():
  """The cpu preset's hip (key None) and the same seed at another spacing, same field of view."""
  return {None: hip.generate_hip(0), HIP_SPACING: hip.generate_hip(0, spacing_mm=HIP_SPACING)}


def spacing_of(affine: np.ndarray) -> np.ndarray:
  return np.linalg.norm(affine[:3, :3], axis=0)


def world_centre(affine: np.ndarray, shape) -> np.ndarray:
  """World position of the grid's centre (the middle of the central voxel span)."""
  return affine[:3, :3] @ ((np.asarray(shape[:3], float) - 1) / 2) + affine[:3, 3]


def physical_ml(ph, label: int) -> float:
  """Voxel count x voxel volume of one label (mL)."""
  return float((ph.labels == label).sum() * np.prod(spacing_of(ph.affine)) / 1000.0)


def centroid_world(ph, label: int) -> np.ndarray:
  return ph.affine[:3, :3] @ np.argwhere(ph.labels == label).mean(axis=0) + ph.affine[:3, 3]


# ---- the acquisition a request resolves to ----------------------------------------------------


def test_acquisition_resolves_overrides():
  for module in (knee, hip):
    for name, p in module.PRESETS.items():
      plain = mri.acquisition(module.PRESETS, name)
      assert plain['shape'] == tuple(p['shape']) and plain['spacing'] == tuple(p['spacing'])
      assert plain['fwhm'] == tuple(p['fwhm']) and plain['noise'] == p['noise']
      # The preset's own spacing and field of view, asked for explicitly: the preset exactly.
      fov = p['shape'][0] * p['spacing'][0]
      assert mri.acquisition(module.PRESETS, name, p['spacing'][0], fov) == plain
  cpu = knee.PRESETS['cpu']
  # A spacing alone keeps the preset's field of view (102.4 mm); slices stay the preset's.
  a = mri.acquisition(knee.PRESETS, 'cpu', spacing_mm=0.5)
  assert a['shape'] == (round(128 * 0.8 / 0.5), round(128 * 0.8 / 0.5), 64)
  assert a['spacing'] == (0.5, 0.5, 1.5) and a['noise'] == cpu['noise']
  # The PSF keeps the preset's FWHM / spacing ratio in-plane and its FWHM through-plane.
  assert a['fwhm'] == pytest.approx((0.9 / 0.8 * 0.5, 0.9 / 0.8 * 0.5, 1.2))
  # The brief's example: 0.365 mm over 140 mm.
  b = mri.acquisition(knee.PRESETS, 'cpu', spacing_mm=0.365, fov_mm=140.0)
  assert b['shape'] == (round(140 / 0.365), round(140 / 0.365), 64) == (384, 384, 64)
  assert b['fov_mm'][:2] == pytest.approx((384 * 0.365,) * 2)
  assert abs(b['fov_mm'][0] - 140) <= 0.365 / 2
  # A field of view alone keeps the preset's spacing and PSF.
  c = mri.acquisition(hip.PRESETS, 'cpu', fov_mm=220.0)
  assert c['shape'] == (100, 100, 20) and c['spacing'] == (2.2, 2.2, 3.0)
  assert c['fwhm'] == tuple(hip.PRESETS['cpu']['fwhm'])


# ---- (1) shape, affine, field-of-view centre ----------------------------------------------------


def test_knee_grid_shape_affine_and_centre(knees):
  cpu = knee.PRESETS['cpu']
  preset_grid = knee.make_grid(knee_anatomy.sample_anatomy(np.random.default_rng(0)), 'cpu')
  for sp, ph in knees.items():
    n = round(KNEE_FOV / sp)
    assert ph.image.shape == ph.labels.shape == (n, n, cpu['shape'][2])
    np.testing.assert_allclose(spacing_of(ph.affine), (sp, sp, cpu['spacing'][2]), rtol=1e-12)
    assert nib.aff2axcodes(ph.affine) == knee.AXIS_CODES
    # Same world centre as the preset's (102.4 mm) grid: the field of view shrank about it.
    centre = world_centre(ph.affine, ph.image.shape)
    preset_centre = world_centre(preset_grid.affine, preset_grid.shape)
    assert np.abs(centre - preset_centre).max() <= sp / 2
    # And the knee sits where it sits in the preset's grid.
    np.testing.assert_array_equal(ph.truth['model_to_world'], preset_grid.model_to_world)
    t = ph.truth
    assert t['shape'] == list(ph.image.shape)
    assert t['spacing_mm'] == pytest.approx([sp, sp, cpu['spacing'][2]])
    assert t['fov_mm'] == pytest.approx([n * sp, n * sp, cpu['shape'][2] * cpu['spacing'][2]])
    ratio = np.asarray(cpu['fwhm']) / np.asarray(cpu['spacing'])
    assert np.asarray(t['psf_fwhm_mm'][:2]) / sp == pytest.approx(ratio[:2])
    assert t['psf_fwhm_mm'][2] == cpu['fwhm'][2]


def test_hip_grid_shape_affine_and_centre(hips):
  cpu = hip.PRESETS['cpu']
  preset, other = hips[None], hips[HIP_SPACING]
  fov = cpu['shape'][0] * cpu['spacing'][0]
  n = round(fov / HIP_SPACING)
  assert other.image.shape == other.labels.shape == (n, n, cpu['shape'][2])
  for reader in other.reader_labels.values():
    assert reader.shape == other.labels.shape
  np.testing.assert_allclose(
    spacing_of(other.affine), (HIP_SPACING, HIP_SPACING, cpu['spacing'][2]), rtol=1e-12
  )
  assert nib.aff2axcodes(other.affine) == hip.AXIS_CODES
  assert other.truth['fov_mm'][:2] == pytest.approx([n * HIP_SPACING] * 2)
  assert abs(other.truth['fov_mm'][0] - fov) <= HIP_SPACING / 2  # spacing alone keeps the FOV
  centre = world_centre(other.affine, other.image.shape)
  assert np.abs(centre - world_centre(preset.affine, preset.image.shape)).max() <= HIP_SPACING / 2
  assert other.truth['model_to_world'] == preset.truth['model_to_world']


# ---- (2) the anatomy is physical ---------------------------------------------------------------


def test_knee_anatomy_does_not_depend_on_the_pixel_size(knees):
  fine, coarse = knees[0.8], knees[1.2]
  # Both grids cover the same 72 mm field of view, so they cut the bones at the same planes.
  # Labelling by voxel centre errs by a fraction of the surface area x a voxel, with random
  # sign along the surface: well under 2 % for bones tens of mL large.
  for label, tol in ((1, 0.02), (3, 0.02), (2, 0.05), (4, 0.05)):  # femur, tibia, cartilages
    v_fine, v_coarse = physical_ml(fine, label), physical_ml(coarse, label)
    assert v_fine > 1.0
    assert v_coarse == pytest.approx(v_fine, rel=tol), label
  for label in (1, 3):  # the bones sit at the same world position (half a fine pixel)
    assert np.abs(centroid_world(fine, label) - centroid_world(coarse, label)).max() <= 0.4
  # The analytic cartilage thickness (model frame, mapped to the same world) is the same.
  assert fine.truth['cartilage_thickness'] == coarse.truth['cartilage_thickness']
  assert fine.truth['anatomy'] == coarse.truth['anatomy']


def test_hip_effusion_does_not_depend_on_the_pixel_size(hips):
  preset, other = hips[None], hips[HIP_SPACING]
  assert preset.truth['anatomy'] == other.truth['anatomy']
  # Effusion pockets are a few mm thick, sampled at about 2 mm: within 5 %.
  v_preset, v_other = physical_ml(preset, 1), physical_ml(other, 1)
  assert v_preset > 1.0
  assert v_other == pytest.approx(v_preset, rel=0.05)
  assert other.truth['effusion']['total_ml'] == pytest.approx(v_other, abs=1e-3)


# ---- (3) bad values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  'generate, options, name',
  [
    (knee.generate_knee, dict(spacing_mm=0.0), 'spacing_mm'),
    (knee.generate_knee, dict(spacing_mm=-0.5), 'spacing_mm'),
    (knee.generate_knee, dict(spacing_mm=float('nan')), 'spacing_mm'),
    (knee.generate_knee, dict(spacing_mm='0.5'), 'spacing_mm'),
    (hip.generate_hip, dict(fov_mm=0.0), 'fov_mm'),
    (hip.generate_hip, dict(fov_mm=float('inf')), 'fov_mm'),
    # 10 mm at 0.8 mm: 12 pixels; 102.4 mm at 0.04 mm: 2560 pixels.
    (knee.generate_knee, dict(fov_mm=10.0), 'fov_mm'),
    (knee.generate_knee, dict(spacing_mm=0.04), 'spacing_mm'),
    (hip.generate_hip, dict(spacing_mm=30.0, fov_mm=400.0), 'fov_mm'),
  ],
)
def test_bad_values_raise(generate, options, name):
  with pytest.raises(ValueError, match=name):
    generate(0, **options)


def test_bad_values_are_refused_before_writing(tmp_path, capsys):
  out = tmp_path / 'new'
  with pytest.raises(ValueError, match='spacing_mm'):
    writer.write_dataset('knee', 1, 0, str(out), spacing_mm=-1.0)
  with pytest.raises(ValueError, match='fov_mm'):
    writer.generate('hip', 0, 'cpu', None, 5.0)
  assert not out.exists()
  with pytest.raises(SystemExit):
    cli.main(['hip', '--out', str(out), '--spacing', '0'])
  assert '--spacing' in capsys.readouterr().err
  assert cli.main(['hip', '--out', str(out), '--fov', '20']) == 2  # 9 pixels at 2.2 mm
  assert 'fov_mm' in capsys.readouterr().err
  assert not out.exists()


# ---- (4) the command line ----------------------------------------------------------------------


def test_cli_writes_a_dataset_at_the_requested_grid(tmp_path):
  out = tmp_path / 'hip'
  assert cli.main(['hip', '--seed', '4', '--out', str(out), '--spacing', '3', '--fov', '120']) == 0
  meta = json.loads((out / 'dataset.json').read_text())
  assert meta['spacing_mm'] == 3.0 and meta['fov_mm'] == 120.0 and meta['preset'] == 'cpu'
  slices = hip.PRESETS['cpu']['shape'][2], hip.PRESETS['cpu']['spacing'][2]
  rng = np.random.default_rng(4)  # generate_hip's draws: the model, then the grid's pose
  hip_anatomy.HipModel(rng)
  preset_grid = hip.make_grid(rng, 'cpu')
  for path in ('imagesTr/hip_0000_0000.nii.gz', 'labelsTr/hip_0000.nii.gz'):
    img = nib.load(out / path)
    assert img.shape == (40, 40, slices[0])
    np.testing.assert_allclose(img.header.get_zooms(), (3.0, 3.0, slices[1]), rtol=1e-6)
    centre = world_centre(img.affine, img.shape)
    assert np.abs(centre - world_centre(preset_grid.affine, preset_grid.shape)).max() <= 1.5
  truth = json.loads((out / 'truth/hip_0000.json').read_text())
  np.testing.assert_allclose(truth['model_to_world'], preset_grid.model_to_world)
  assert truth['spacing_mm'] == pytest.approx([3.0, 3.0, slices[1]])
  assert truth['fov_mm'] == pytest.approx([120.0, 120.0, slices[0] * slices[1]])
  # Without overrides dataset.json keeps its old keys.
  plain = writer.dataset_json('hip', [], 0, 'cpu', [])
  assert 'spacing_mm' not in plain and 'fov_mm' not in plain


def test_chosen_volumes_are_written_with_their_own_ids_and_seeds(tmp_path):
  # Volumes 1 and 3 of 5, on a small grid: the same ids and anatomy as in the whole dataset.
  grid = dict(spacing_mm=2.5, fov_mm=100.0)
  out = str(tmp_path / 'some')
  meta = writer.write_dataset('hip', 5, 7, out, indices=[3, 1, 3], **grid)
  assert [case['id'] for case in meta['training']] == ['hip_0001', 'hip_0003']
  for i in (1, 3):
    labels = np.asarray(nib.load(tmp_path / 'some' / 'labelsTr' / f'hip_{i:04d}.nii.gz').dataobj)
    np.testing.assert_array_equal(labels, writer.generate('hip', 7 + i, 'cpu', **grid).labels)
  for bad in ([], [5], [-1]):
    with pytest.raises(ValueError, match='indices'):
      writer.write_dataset('hip', 5, 7, str(tmp_path / 'bad'), indices=bad, **grid)
  assert not (tmp_path / 'bad').exists()
