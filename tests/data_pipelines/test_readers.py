"""Dataset folders -> cases -> canonical volumes -> slices -> back onto the original grid."""

from __future__ import annotations

import itertools
import json
import os

import nibabel as nib
import numpy as np
import pytest
from support import write_metaimage

from data_pipelines import dataset_folders, readers
from data_pipelines.errors import DataError
from data_pipelines.nifti_io import load_nifti_labels, save_nifti

SHAPE = (7, 6, 5)  # stored as (columns, rows, slices) of a sagittal DICOM series
IN_PLANE, SLICE = 0.365, 0.7


def _sagittal_dicom_affine(slice_direction: str = 'L', row_direction: str = 'I') -> np.ndarray:
  """A converter's affine for a sagittal series stored [column, row, slice]: columns run to
  posterior, rows to `row_direction`, slices to `slice_direction` (RAS+ mm)."""
  affine = np.zeros((4, 4))
  affine[3, 3] = 1.0
  affine[:3, 0] = [0.0, -IN_PLANE, 0.0]
  affine[:3, 1] = [0.0, 0.0, -IN_PLANE if row_direction == 'I' else IN_PLANE]
  affine[:3, 2] = [-SLICE if slice_direction == 'L' else SLICE, 0.0, 0.0]
  affine[:3, 3] = [30.0, 50.0, 20.0]
  return affine


def _knee_labels(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 5, size=SHAPE).astype(np.uint8)


def _image(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(200, 40, size=SHAPE).astype(np.float32)


def _save(path, data, affine) -> str:
  nib.save(nib.Nifti1Image(data, affine), path)
  return str(path)


def _write_hip_dataset(root, *, readers_key=True, labels_style='v2') -> None:
  os.makedirs(root / 'imagesTr')
  os.makedirs(root / 'imagesTs')
  for folder in ('labelsTr', 'labelsTr_reader1', 'labelsTr_reader2'):
    os.makedirs(root / folder)
  labels = (
    {'background': 0, 'effusion': 1}
    if labels_style == 'v2'
    else {'0': 'background', '1': 'effusion'}
  )
  meta = {
    'channel_names': {'0': 'STIR'},
    'labels': labels,
    'numTraining': 2,
    'file_ending': '.nii.gz',
    'plane': 'coronal',
  }
  if readers_key:
    meta['readers'] = ['reader1', 'reader2']
  (root / 'dataset.json').write_text(json.dumps(meta))
  affine = _sagittal_dicom_affine()
  for i, case_id in enumerate(['hip_0001', 'hip_0000']):
    _save(root / 'imagesTr' / f'{case_id}_0000.nii.gz', _image(i), affine)
    for j, folder in enumerate(('labelsTr', 'labelsTr_reader1', 'labelsTr_reader2')):
      _save(
        root / folder / f'{case_id}.nii.gz', (_knee_labels(10 * i + j) > 2).astype(np.uint8), affine
      )
  _save(root / 'imagesTs' / 'hip_0100_0000.nii.gz', _image(7), affine)
  # A half-written temporary of an atomic write must be invisible.
  (root / 'imagesTr' / '.hip_0002_0000.nii.gz.x.tmp.nii.gz').write_bytes(b'partial')


def test_nnunet_folder_lists_cases_readers_labels_and_plane(tmp_path):
  _write_hip_dataset(tmp_path)
  folder = dataset_folders.NnunetFolder(tmp_path)
  assert folder.labels == {'background': 0, 'effusion': 1}
  assert folder.plane == 'coronal'
  assert folder.readers == ('default', 'reader1', 'reader2')
  cases = folder.cases()
  assert [c.case_id for c in cases] == ['hip_0000', 'hip_0001']
  assert cases[0].image == str(tmp_path / 'imagesTr' / 'hip_0000_0000.nii.gz')
  assert dict(cases[0].labels) == {
    'default': str(tmp_path / 'labelsTr' / 'hip_0000.nii.gz'),
    'reader1': str(tmp_path / 'labelsTr_reader1' / 'hip_0000.nii.gz'),
    'reader2': str(tmp_path / 'labelsTr_reader2' / 'hip_0000.nii.gz'),
  }
  (test_case,) = folder.cases('test')
  assert test_case.case_id == 'hip_0100' and dict(test_case.labels) == {}


def test_readers_are_found_without_the_readers_key_and_v1_labels_parse(tmp_path):
  _write_hip_dataset(tmp_path, readers_key=False, labels_style='v1')
  folder = dataset_folders.NnunetFolder(tmp_path)
  assert folder.readers == ('default', 'reader1', 'reader2')
  assert folder.labels == {'background': 0, 'effusion': 1}


def test_load_volume_is_the_closest_canonical_image_and_the_chosen_reader(tmp_path):
  _write_hip_dataset(tmp_path)
  case = dataset_folders.NnunetFolder(tmp_path).cases()[1]
  volume = readers.load_volume(case, plane='coronal', label_values={1: 1}, reader='reader2')
  image_file = nib.as_closest_canonical(nib.load(case.image))
  label_file = nib.as_closest_canonical(nib.load(case.labels['reader2']))
  assert volume.case_id == 'hip_0001' and volume.reader == 'reader2'
  assert volume.image.dtype == np.float32 and volume.labels.dtype == np.uint8
  np.testing.assert_array_equal(volume.image, image_file.get_fdata().astype(np.float32))
  np.testing.assert_array_equal(volume.labels, np.asarray(label_file.dataobj))
  np.testing.assert_allclose(volume.spacing, image_file.header.get_zooms(), rtol=1e-6)
  np.testing.assert_allclose(volume.spacing, (SLICE, IN_PLANE, IN_PLANE), rtol=1e-6)
  np.testing.assert_allclose(volume.grid.affine, nib.load(case.image).affine)
  assert volume.label_path == case.labels['reader2'] and volume.image_path == case.image
  default = readers.load_volume(
    case, plane='coronal', label_values={'background': 0, 'effusion': 1}
  )
  assert default.reader == 'default' and default.label_path == case.labels['default']
  unlabelled = readers.load_volume(
    dataset_folders.NnunetFolder(tmp_path).cases('test')[0], plane='coronal', label_values=[1]
  )
  assert unlabelled.labels is None and unlabelled.reader is None


@pytest.mark.parametrize('plane', ['sagittal', 'coronal', 'axial'])
def test_slices_carry_spacing_and_predictions_go_back_to_the_original_grid(tmp_path, plane):
  _write_hip_dataset(tmp_path)
  case = dataset_folders.NnunetFolder(tmp_path).cases()[0]
  volume = readers.load_volume(case, plane='coronal', label_values=[1])
  stack = readers.slices(volume, plane)
  axis = {'sagittal': 0, 'coronal': 1, 'axial': 2}[plane]
  assert len(stack) == volume.image.shape[axis]
  spacing_of = dict(zip('XYZ', volume.spacing))
  expected_pixel = {'sagittal': ('Z', 'Y'), 'coronal': ('Z', 'X'), 'axial': ('Y', 'X')}[plane]
  assert stack.pixel_spacing == tuple(spacing_of[a] for a in expected_pixel)
  assert stack.thickness == volume.spacing[axis]
  third = stack[2]
  assert third.index == 2 and third.case_id == case.case_id
  np.testing.assert_array_equal(third.image, stack.images[2])
  np.testing.assert_array_equal(third.labels, stack.labels[2])
  assert sum(s.labels.sum() for s in stack) == volume.labels.sum()
  # A "prediction" that equals the reference, written back on the file's grid, is the file.
  back = stack.to_original(stack.labels)
  original = load_nifti_labels(case.labels['default'])
  np.testing.assert_array_equal(back, original.data)
  out = save_nifti(back, volume.grid.affine, tmp_path / 'pred.nii.gz', like=case.image)
  written = load_nifti_labels(out)
  np.testing.assert_array_equal(written.data, original.data)
  np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)


def _zib_mask_from_image_labels(labels: np.ndarray) -> np.ndarray:
  """The ZIB mask for labels stored like dicom2nifti (reorient off) stores them: [column,
  row, slice], slices ordered toward patient left. The published nnU-Net conversion recipe for
  OAI-ZIB maps NIfTI mask (x, y, z) onto that image as image[c, r, s] = mask[s, c, R-1-r];
  written out here voxel by voxel."""
  columns, rows, slices_ = labels.shape
  mask = np.zeros((slices_, columns, rows), np.uint8)
  for c, r, s in itertools.product(range(columns), range(rows), range(slices_)):
    mask[s, c, rows - 1 - r] = labels[c, r, s]
  return mask


# The same series as three converters store it: dicom2nifti (slices toward L, rows toward I),
# SimpleITK/GDCM (slices ordered along the normal, toward R), dcm2niix (rows flipped to S).
CONVERTERS = {
  'dicom2nifti': (('L', 'I'), lambda a: a),
  'gdcm': (('R', 'I'), lambda a: a[:, :, ::-1]),
  'dcm2niix': (('L', 'S'), lambda a: a[:, ::-1, :]),
}


@pytest.mark.parametrize('converter', sorted(CONVERTERS))
def test_oai_zib_masks_land_on_the_image_whatever_the_dicom_converter(tmp_path, converter):
  (slice_dir, row_dir), store = CONVERTERS[converter]
  labels = _knee_labels(5)  # on the dicom2nifti grid
  mask = _zib_mask_from_image_labels(labels)  # the ZIB file: independent of the converter
  affine = _sagittal_dicom_affine(slice_dir, row_dir)
  if slice_dir == 'R':
    affine[:3, 3] -= affine[:3, 2] * (SHAPE[2] - 1)
  if row_dir == 'S':
    affine[:3, 3] -= affine[:3, 1] * (SHAPE[1] - 1)
  os.makedirs(tmp_path / 'images')
  os.makedirs(tmp_path / 'segmentation_masks')
  _save(tmp_path / 'images' / '9001104.nii.gz', np.ascontiguousarray(store(_image(1))), affine)
  write_metaimage(
    str(tmp_path / 'segmentation_masks' / '9001104.segmentation_masks.mhd'),
    mask,
    (SLICE, IN_PLANE, IN_PLANE),
  )
  folder = dataset_folders.OaiZibFolder(tmp_path)
  assert folder.labels == readers.OAI_ZIB_LABELS and folder.plane == 'sagittal'
  (case,) = folder.cases()
  volume = readers.load_volume(case, plane=folder.plane, label_values=[1, 2, 3, 4])
  np.testing.assert_array_equal(volume.grid.to_original(volume.labels), store(labels))
  # And canonically every converter gives the same volume.
  reference = readers.load_volume(case, plane='sagittal', label_values=None)
  np.testing.assert_array_equal(volume.labels, reference.labels)
  expected_canonical = np.asarray(
    nib.as_closest_canonical(nib.Nifti1Image(np.ascontiguousarray(store(labels)), affine)).dataobj
  )
  np.testing.assert_array_equal(volume.labels, expected_canonical)


def test_oai_zib_explicit_axis_map_needs_no_affine(tmp_path):
  labels = _knee_labels(6)
  os.makedirs(tmp_path / 'img')
  os.makedirs(tmp_path / 'masks')
  _save(tmp_path / 'img' / '9002430.nii', _image(2), np.eye(4))  # a converter that lost the pose
  write_metaimage(
    str(tmp_path / 'masks' / '9002430.segmentation_masks.mhd'), _zib_mask_from_image_labels(labels)
  )
  write_metaimage(
    str(tmp_path / 'masks' / '9999999.segmentation_masks.mhd'), np.zeros((2, 2, 2), np.uint8)
  )
  # mask x -> image axis 2, mask y -> image axis 0, mask z -> image axis 1 reversed.
  alignment = readers.MaskAlignment(ornt=((2, 1), (0, 1), (1, -1)))
  folder = dataset_folders.OaiZibFolder(tmp_path, images='img', masks='masks', alignment=alignment)
  assert folder.orphan_masks == (str(tmp_path / 'masks' / '9999999.segmentation_masks.mhd'),)
  (case,) = folder.cases()
  # A pose-less image is refused unless asked for: its slices' direction is unknown.
  with pytest.raises(DataError, match='no scanner pose: the affine is the identity'):
    readers.load_volume(case, plane='sagittal', label_values=[1, 2, 3, 4])
  volume = readers.load_volume(
    case, plane='sagittal', label_values=[1, 2, 3, 4], allow_missing_pose=True
  )
  np.testing.assert_array_equal(volume.grid.to_original(volume.labels), labels)


def test_oai_zib_images_without_masks_are_the_test_split(tmp_path):
  os.makedirs(tmp_path / 'images')
  os.makedirs(tmp_path / 'segmentation_masks')
  _save(tmp_path / 'images' / '9003406.nii.gz', _image(3), np.eye(4))
  folder = dataset_folders.OaiZibFolder(tmp_path)
  assert folder.cases() == []
  (case,) = folder.cases('test')
  assert case.case_id == '9003406' and dict(case.labels) == {}
