"""NIfTI loading and atomic saving: round trips, header consistency, nibabel's example files."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from data_pipelines.errors import DataError
from data_pipelines.nifti_io import load_nifti_image, load_nifti_labels, save_nifti


def _oblique_affine() -> np.ndarray:
  angle = np.deg2rad(20.0)
  rotation = np.array(
    [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
  )
  affine = np.eye(4)
  affine[:3, :3] = (
    rotation @ np.diag([0.365, 0.365, 0.7]) @ np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]])
  )  # stored as P, I, L-ish axes like a DICOM export
  affine[:3, 3] = [40.0, -60.5, 12.25]
  return affine


def test_image_round_trip_keeps_values_affine_and_consistent_header(tmp_path):
  data = np.random.default_rng(0).normal(100, 30, size=(6, 5, 4)).astype(np.float32)
  affine = _oblique_affine()
  path = save_nifti(data, affine, os.path.join(tmp_path, 'img.nii.gz'))
  loaded = load_nifti_image(path)
  assert loaded.data.dtype == np.float32
  np.testing.assert_array_equal(loaded.data, data)
  np.testing.assert_allclose(loaded.affine, affine, atol=1e-5)
  np.testing.assert_allclose(loaded.zooms, (0.365, 0.7, 0.365), atol=1e-6)
  header = nib.load(path).header
  np.testing.assert_allclose(header.get_zooms(), np.linalg.norm(affine[:3, :3], axis=0), atol=1e-6)
  np.testing.assert_allclose(header.get_qform(), affine, atol=1e-5)
  np.testing.assert_allclose(header.get_sform(), affine, atol=1e-5)
  assert os.listdir(tmp_path) == ['img.nii.gz']


def test_labels_written_like_a_scaled_image_keep_exact_values_and_new_geometry(tmp_path):
  template_path = os.path.join(tmp_path, 'template.nii')
  template = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.diag([3.0, 3.0, 3.0, 1.0]))
  template.header.set_slope_inter(2.0, 10.0)
  template.header['descrip'] = b'scanner export'
  template.header.set_xyzt_units('mm', 'sec')
  nib.save(template, template_path)
  labels = np.random.default_rng(1).integers(0, 5, size=(4, 3, 2)).astype(np.uint8)
  affine = np.diag([0.5, 0.6, 1.2, 1.0])
  path = save_nifti(labels, affine, os.path.join(tmp_path, 'lab.nii.gz'), like=template_path)
  loaded = load_nifti_labels(path)
  assert loaded.data.dtype == np.uint8
  np.testing.assert_array_equal(loaded.data, labels)
  written = nib.load(path)
  assert written.header.get_data_dtype() == np.uint8
  np.testing.assert_allclose(written.header.get_zooms(), (0.5, 0.6, 1.2), atol=1e-6)
  assert written.header['descrip'].tobytes().rstrip(b'\0') == b'scanner export'
  assert written.header.get_xyzt_units() == ('mm', 'sec')


def test_bool_masks_are_stored_as_uint8(tmp_path):
  mask = np.zeros((3, 3, 3), bool)
  mask[1, 2, 0] = True
  path = save_nifti(mask, np.eye(4), os.path.join(tmp_path, 'mask.nii'))
  np.testing.assert_array_equal(load_nifti_labels(path).data, mask.astype(np.uint8))


def test_float_labels_with_whole_values_are_accepted(tmp_path):
  labels = np.array([0.0, 1.0, 4.0, 2.0, 0.0, 3.0, 1.0, 0.0], np.float32).reshape(2, 2, 2)
  path = os.path.join(tmp_path, 'float_labels.nii.gz')
  nib.save(nib.Nifti1Image(labels, np.eye(4)), path)
  np.testing.assert_array_equal(load_nifti_labels(path).data, labels.astype(np.uint8))


def test_trailing_singleton_fourth_dimension_is_accepted(tmp_path):
  data = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
  path = os.path.join(tmp_path, 'single_channel.nii.gz')
  nib.save(nib.Nifti1Image(data, np.eye(4)), path)
  loaded = load_nifti_image(path)
  assert loaded.shape == (2, 3, 4)
  np.testing.assert_array_equal(loaded.data, data[..., 0])


def test_nibabel_example_anatomical_file():
  path = os.path.join(data_path, 'anatomical.nii')
  reference = nib.load(path)
  loaded = load_nifti_image(path)
  np.testing.assert_array_equal(loaded.data, reference.get_fdata().astype(np.float32))
  np.testing.assert_array_equal(loaded.affine, reference.affine)
  np.testing.assert_allclose(loaded.zooms, reference.header.get_zooms())


def test_nibabel_example_label_file():
  path = os.path.join(data_path, 'standard.nii.gz')
  reference = nib.load(path)
  loaded = load_nifti_labels(path)
  np.testing.assert_array_equal(loaded.data, np.asarray(reference.dataobj))
  assert loaded.data.dtype == np.uint8


def test_integer_images_are_scaled_like_nibabel_does(tmp_path):
  raw = np.arange(8, dtype=np.int16).reshape(2, 2, 2)
  image = nib.Nifti1Image(raw, np.eye(4))
  image.header.set_slope_inter(0.5, -1.0)
  path = os.path.join(tmp_path, 'scaled.nii')
  nib.save(image, path)
  np.testing.assert_allclose(load_nifti_image(path).data, raw * 0.5 - 1.0)


def test_failed_save_leaves_nothing_behind(tmp_path):
  path = os.path.join(tmp_path, 'out.nii.gz')
  with pytest.raises(DataError, match='affine is not invertible'):
    save_nifti(np.zeros((2, 2, 2)), np.zeros((4, 4)), path)
  with pytest.raises(DataError, match=r'out\.nii\.gz: array to save has the wrong number of dim'):
    save_nifti(np.zeros((2, 2)), np.eye(4), path)
  with pytest.raises(DataError, match=r'out\.mgz: output name has the wrong extension'):
    save_nifti(np.zeros((2, 2, 2)), np.eye(4), os.path.join(tmp_path, 'out.mgz'))
  assert os.listdir(tmp_path) == []
