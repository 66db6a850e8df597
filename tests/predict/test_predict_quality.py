"""Per-scan quality flags (issue 15.7): the rules of imask_jax/quality.py on hand-made numbers at
their boundaries, the training reference against voxel counts read with nibabel, and predict
flagging an all-zero scan and a tiny 8 x 8 x 3 one (in the report and on screen)."""

from __future__ import annotations

import io
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from data_pipelines.datasets import params as dataset_params
from data_pipelines.datasets import sources
from data_pipelines.phantoms import generate_knee
from imask_jax import configs, errors
from imask_jax import workdir as workdir_lib
from imask_jax.predict import quality, scan_report
from imask_jax.predict.command import predict_command

# A reference as compute_reference writes it: 10 training volumes.
REFERENCE = {
  'volumes': 10,
  'spacing_mm': {'min': [1.0, 0.5, 0.5], 'max': [1.5, 0.8, 0.8]},
  'shape': {'min': [40, 100, 100], 'max': [64, 128, 128]},
  'extent_mm': {'min': [60.0, 80.0, 80.0], 'max': [96.0, 102.4, 102.4]},
  'tissues_ml': {
    'femur': {'present_in': 10, 'min_ml': 20.0, 'max_ml': 40.0},
    'effusion': {'present_in': 4, 'min_ml': 1.0, 'max_ml': 3.0},
    'meniscus': {'present_in': 0, 'min_ml': 0.0, 'max_ml': 0.0},
  },
}
GOOD = dict(
  image_constant=False,
  volumes_ml={'femur': 30.0, 'effusion': 0.0},
  spacing=(1.2, 0.6, 0.6),
  shape=(50, 120, 120),
  scores=[0.9, 0.95, 0.3],
  score_threshold=0.5,
  reference=REFERENCE,
)


def _codes(**changes) -> list[str]:
  return [f['code'] for f in quality.quality_flags(**dict(GOOD, **changes))['flags']]


def test_a_scan_like_the_training_data_raises_no_flag():
  result = quality.quality_flags(**GOOD)
  assert result == {
    'review': False,
    'flags': [],
    'painting_detections': 2,
    'mean_detection_score': pytest.approx(0.925),
  }


def test_detection_rules():
  assert _codes(image_constant=True) == ['blank_image']
  assert _codes(scores=[0.3, 0.49]) == ['no_detections']
  assert _codes(scores=[]) == ['no_detections']
  # Mean of the painting detections (>= 0.5): (0.5 + 0.99) / 2 = 0.745 < 0.75; 0.51 gives 0.75.
  assert _codes(scores=[0.5, 0.99, 0.1]) == ['low_detection_score']
  assert _codes(scores=[0.51, 0.99, 0.1]) == []
  # Painting detections without a mask slot (model.paint_slots_per_class too small).
  assert _codes(unpainted=3) == ['paint_slots_full']
  assert _codes(unpainted=0) == _codes(unpainted=None) == []


def test_tissue_rules_at_their_boundaries():
  # Missing: femur is in 10 of 10 training volumes; effusion in 4 of 10 (< half): not missing.
  assert _codes(volumes_ml={'femur': 0.0, 'effusion': 0.0}) == ['tissue_missing']
  assert _codes(volumes_ml={'femur': 30.0, 'effusion': 0.0}) == []
  # Volume: allowed [min / 2, max x 2] = [10, 80] mL for femur, [0.5, 6] for effusion.
  assert _codes(volumes_ml={'femur': 10.0}) == [] and _codes(volumes_ml={'femur': 80.0}) == []
  assert _codes(volumes_ml={'femur': 9.99}) == ['tissue_volume']
  assert _codes(volumes_ml={'femur': 80.01}) == ['tissue_volume']
  assert _codes(volumes_ml={'femur': 30.0, 'effusion': 6.5}) == ['tissue_volume']
  # A tissue no training volume holds has no range to compare with.
  assert _codes(volumes_ml={'femur': 30.0, 'meniscus': 5.0}) == []


def test_geometry_rules_at_their_boundaries():
  # Voxel size along x: training 1.0 to 1.5 mm, so [0.5, 3.0] mm passes.
  assert _codes(spacing=(0.5, 0.6, 0.6), shape=(120, 120, 120)) == []
  assert _codes(spacing=(3.0, 0.6, 0.6), shape=(20, 120, 120)) == []
  assert _codes(spacing=(3.01, 0.6, 0.6), shape=(20, 120, 120)) == ['spacing']
  # Voxel count along z: [50, 256]; the extent (count x size) is checked as well.
  assert _codes(shape=(50, 120, 49)) == ['size', 'size']  # 49 voxels and 29.4 mm
  assert _codes(spacing=(1.2, 0.6, 0.4), shape=(50, 120, 250)) == []
  flags = quality.quality_flags(**dict(GOOD, spacing=(1.5, 0.8, 0.8), shape=(8, 8, 3)))['flags']
  assert [f['code'] for f in flags] == ['size', 'size']
  assert flags[0]['message'].startswith('voxel count x 8 voxels (training 40 to 64), y 8 voxels')
  # Without a reference only the detection checks run.
  assert _codes(reference=None, shape=(8, 8, 3), volumes_ml={'femur': 0.0}) == []


def test_training_reference_matches_the_label_files_and_is_stored(smoke_model, tmp_path):
  config, workdir = smoke_model.config, smoke_model.workdir
  data_dir = workdir_lib.data_dir_for(config, workdir)
  names = smoke_model.scheme.names_by_value
  reference, where = quality.training_reference(workdir, config, data_dir, names)
  stored = os.path.join(workdir, quality.REFERENCE_FILE)
  assert where.startswith(stored)
  # Independent truth: the training split's label files read with nibabel, voxels counted with
  # NumPy, voxel sizes and counts along RAS+ from nibabel's own closest-canonical image.
  params = dataset_params.params_from_config(config, data_dir)
  cases = sources.split_assignment(params, sources.open_folder(params, data_dir))['train']
  assert reference['volumes'] == len(cases) > 0
  ml = {name: [] for name in names.values()}
  spacing, shape = [], []
  for case in cases:
    canonical = nib.as_closest_canonical(nib.load(case.image))
    spacing.append(canonical.header.get_zooms()[:3])
    shape.append(canonical.shape[:3])
    labels = np.asarray(nib.load(case.labels['default']).dataobj)
    for value, name in names.items():
      ml[name].append(np.count_nonzero(labels == value) * np.prod(spacing[-1]) / 1000)
  np.testing.assert_allclose(reference['spacing_mm']['min'], np.min(spacing, axis=0), rtol=1e-6)
  np.testing.assert_allclose(reference['spacing_mm']['max'], np.max(spacing, axis=0), rtol=1e-6)
  assert reference['shape'] == {
    'min': np.min(shape, axis=0).tolist(),
    'max': np.max(shape, axis=0).tolist(),
  }
  for name, values in ml.items():
    entry = reference['tissues_ml'][name]
    present = [v for v in values if v > 0]
    assert entry['present_in'] == len(present)
    assert entry['min_ml'] == pytest.approx(min(present), rel=1e-6)
    assert entry['max_ml'] == pytest.approx(max(values), rel=1e-6)
  # Stored: the next call reads it back; with the data gone it is used as stored; with neither,
  # the reference is unavailable.
  with open(stored) as f:
    assert json.load(f) == reference
  again, where = quality.training_reference(workdir, config, data_dir, names)
  assert again == reference and where == stored
  elsewhere = str(tmp_path / 'no_data')
  again, where = quality.training_reference(workdir, config, elsewhere, names)
  assert again == reference and 'not checked against the data' in where
  empty_workdir = tmp_path / 'copy'
  empty_workdir.mkdir()
  with pytest.raises(quality.ReferenceUnavailable, match='not on this machine'):
    quality.training_reference(str(empty_workdir), config, elsewhere, names)


def test_predict_flags_a_blank_and_a_tiny_scan(smoke_model, tmp_path):
  # The smoke phantoms are 64 sagittal slices of 128 x 128 at 1.5 x 0.8 x 0.8 mm (RAS+).
  scans = tmp_path / 'scans'
  scans.mkdir()
  affine = np.diag([1.5, 0.8, 0.8, 1.0])
  nib.save(nib.Nifti1Image(np.zeros((64, 128, 128), np.int16), affine), str(scans / 'blank.nii.gz'))
  tiny = np.random.default_rng(0).normal(300, 50, (8, 8, 3)).astype(np.float32)
  nib.save(nib.Nifti1Image(tiny, affine), str(scans / 'tiny.nii.gz'))
  out = tmp_path / 'out'
  stream = io.StringIO()
  assert (
    predict_command(smoke_model.workdir, str(scans), str(out), model=smoke_model, stream=stream)
    == errors.EXIT_OK
  )
  log = stream.getvalue()
  blank = json.loads((out / 'blank.json').read_text())['quality']
  tiny_q = json.loads((out / 'tiny.json').read_text())['quality']
  blank_codes = [f['code'] for f in blank['flags']]
  tiny_codes = [f['code'] for f in tiny_q['flags']]
  assert blank['review'] and 'blank_image' in blank_codes
  assert 'size' not in blank_codes and 'spacing' not in blank_codes
  assert tiny_q['review'] and 'size' in tiny_codes and 'blank_image' not in tiny_codes
  assert f'CHECK {scans / "blank.nii.gz"}: blank_image: every voxel' in log
  assert f'CHECK {scans / "tiny.nii.gz"}: ' in log and 'size: voxel count x 8 voxels' in log
  assert (
    'predict: 2 of 2 flagged for review ("quality" in their reports): blank.nii.gz, '
    'tiny.nii.gz' in log
  )
  assert 'quality checks against the training reference' in log


def test_a_scale_true_model_checks_only_the_extent_along_the_axes_it_resamples():
  # Sagittal slices (rows z, columns y) at 0.2 mm, 500 voxels: voxel size and count outside
  # the training range, the extent (100 mm) inside it. Resampled: no flag.
  fine = dict(spacing=(1.2, 0.2, 0.2), shape=(50, 500, 500))
  assert _codes(**fine) == ['spacing', 'size']
  assert _codes(**fine, resampled_axes=(2, 1)) == []
  # The extent is still checked, and the slice axis (x) is not resampled.
  assert _codes(spacing=(1.2, 0.2, 0.2), shape=(50, 500, 100), resampled_axes=(2, 1)) == ['size']
  assert _codes(spacing=(3.5, 0.6, 0.6), shape=(20, 120, 120), resampled_axes=(2, 1)) == ['spacing']
  config = configs.default_config()
  assert scan_report.resampled_axes(config) == ()
  config.data.pixel_spacing_mm = 0.8
  assert scan_report.resampled_axes(config) == (2, 1)  # sagittal rows z, columns y


def test_predict_paints_from_the_painting_slots_and_flags_what_did_not_fit(
  smoke_workdir, smoke_model, tmp_path
):
  """predict restores the model with paint_only (model.paint_slots_per_class). With a slot
  for every detection its label map is the full pass's, byte for byte; with one slot per
  class the smoke model (which paints every detection above 0.05) leaves detections out, and
  the report flags it."""
  scans = tmp_path / 'scans'
  scans.mkdir()
  image = generate_knee(2).image  # axes I, P, L; saved as P, I, L at 0.5 x 0.5 x 1.5 mm
  crop = np.transpose(image[36:100, 30:94, 24:32], (1, 0, 2)).astype(np.int16)
  affine = np.array(
    [[0.0, 0.0, -1.5, 20.0], [-0.5, 0.0, 0.0, 30.0], [0.0, -0.5, 0.0, 40.0], [0, 0, 0, 1.0]]
  )
  nib.save(nib.Nifti1Image(crop, affine), str(scans / 'knee.nii.gz'))
  full = tmp_path / 'full'
  assert (
    predict_command(smoke_workdir, str(scans), str(full), model=smoke_model, stream=io.StringIO())
    == errors.EXIT_OK
  )
  for slots in (int(smoke_model.config.model.max_detections), 1):
    workdir = tmp_path / f'run_{slots}'
    shutil.copytree(smoke_workdir, workdir)
    config = json.loads((workdir / 'config.json').read_text())
    config['model']['paint_slots_per_class'] = slots
    (workdir / 'config.json').write_text(json.dumps(config))
    out = tmp_path / f'out_{slots}'
    status = predict_command(str(workdir), str(scans), str(out), stream=io.StringIO())
    assert status == errors.EXIT_OK
    codes = [f['code'] for f in json.loads((out / 'knee.json').read_text())['quality']['flags']]
    if slots > 1:
      labels = [np.asarray(nib.load(str(d / 'knee.nii.gz')).dataobj) for d in (out, full)]
      np.testing.assert_array_equal(*labels)
      assert labels[0].any()
      assert 'paint_slots_full' not in codes
    else:
      assert 'paint_slots_full' in codes
