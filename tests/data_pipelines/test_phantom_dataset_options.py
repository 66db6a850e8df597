"""data.phantom_shape_family and data.phantom_contrast: the phantom_knee builder draws the varied
or held-out shape family and a contrast; at their defaults the stored datasets keep their names."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from data_pipelines.datasets import params as params_lib
from data_pipelines.datasets import sources
from imask_jax import configs

# The config names of the default phantom_knee dataset and of its 0.5 mm / 140 mm grid as the
# code named them before these fields existed (computed with the parent commit's params.py):
# prepared datasets on disk are found under these names, so they must not move.
DEFAULT_NAME = 'sagittal_ctx0_92b932595de4'
GRID_NAME = 'sagittal_ctx0_aa8ae5f4d1d4'


def _params(tmp_path, **data):
  config = configs.default_config()
  for key, value in data.items():
    setattr(config.data, key, value)
  return params_lib.params_from_config(config, tmp_path)


def test_defaults_keep_the_stored_names(tmp_path):
  assert _params(tmp_path).config_name == DEFAULT_NAME
  for family, contrast in (('', ''), ('default', 'dess'), ('default', ''), ('', 'dess')):
    params = _params(tmp_path, phantom_shape_family=family, phantom_contrast=contrast)
    assert params.config_name == DEFAULT_NAME
    assert (params.phantom_shape_family, params.phantom_contrast) == (None, None)
    assert 'phantom_shape_family' not in params.describe()
  grid = dict(phantom_spacing_mm=0.5, phantom_fov_mm=140.0)
  assert _params(tmp_path, **grid, phantom_contrast='dess').config_name == GRID_NAME


def test_a_family_or_contrast_gets_its_own_name_and_folder(tmp_path):
  base = _params(tmp_path)
  variants = [
    _params(tmp_path, phantom_shape_family='varied'),
    _params(tmp_path, phantom_shape_family='held_out'),
    _params(tmp_path, phantom_contrast='iw_fs'),
    _params(tmp_path, phantom_contrast='t1'),
    _params(tmp_path, phantom_shape_family='varied', phantom_contrast='t1'),
  ]
  names = {base.config_name} | {v.config_name for v in variants}
  folders = {sources.phantom_dir(base, tmp_path)} | {
    sources.phantom_dir(v, tmp_path) for v in variants
  }
  assert len(names) == len(folders) == len(variants) + 1
  assert variants[0].phantom_shape_family == 'varied'
  assert "phantom_contrast='t1'" in variants[3].describe()


def test_bad_values_and_hips_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"data.phantom_shape_family='wide'.*'varied'"):
    _params(tmp_path, phantom_shape_family='wide')
  with pytest.raises(ValueError, match=r"data.phantom_contrast='t2'.*'iw_fs'"):
    _params(tmp_path, phantom_contrast='t2')
  with pytest.raises(ValueError, match='phantom_hip: config data.phantom_contrast'):
    _params(tmp_path, dataset='phantom_hip', phantom_contrast='t1')
  with pytest.raises(ValueError, match='phantom_hip: config data.phantom_shape_family'):
    _params(tmp_path, dataset='phantom_hip', phantom_shape_family='varied')


def _volume(folder):
  with open(os.path.join(folder, 'dataset.json')) as f:
    meta = json.load(f)
  image = nib.load(os.path.join(folder, 'imagesTr', 'knee_0000_0000.nii.gz')).get_fdata()
  labels = nib.load(os.path.join(folder, 'labelsTr', 'knee_0000.nii.gz')).get_fdata()
  return meta, image, labels


@pytest.mark.slow
def test_the_builder_source_draws_the_family_and_contrast(tmp_path):
  """One knee of each: the varied family changes the anatomy (the label map), a contrast only
  the image (the same label map); dataset.json records what was drawn."""
  base = _params(tmp_path, num_volumes=1)
  meta, image, labels = _volume(sources.ensure_phantoms(base, tmp_path))
  assert 'shape_family' not in meta and 'contrast' not in meta

  varied = _params(tmp_path, num_volumes=1, phantom_shape_family='varied')
  meta_v, image_v, labels_v = _volume(sources.ensure_phantoms(varied, tmp_path))
  assert meta_v['shape_family'] == 'varied'
  assert labels_v.shape == labels.shape and np.mean(labels_v != labels) > 0.001

  t1 = _params(tmp_path, num_volumes=1, phantom_contrast='t1')
  meta_t, image_t, labels_t = _volume(sources.ensure_phantoms(t1, tmp_path))
  assert meta_t['contrast'] == 't1'
  np.testing.assert_array_equal(labels_t, labels)
  # T1: marrow bright, fluid dark, the reverse of DESS: the femur's median intensity rises
  # above the effusion's (label 5), where DESS has it far below.
  femur, effusion = labels == 1, labels == 5
  assert np.median(image[femur]) < np.median(image[effusion])
  assert np.median(image_t[femur]) > np.median(image_t[effusion])
