"""Every kind of bad input gets a DataError whose message names the file and the problem."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from support import write_metaimage

from conftest import POSED_AFFINE
from data_pipelines import dataset_folders, readers
from data_pipelines.errors import DataError
from data_pipelines.nifti_io import load_nifti_image, load_nifti_labels

SHAPE = (4, 5, 3)
KNEE_VALUES = (1, 2, 3, 4)


def _save(path, data, affine=None) -> str:
  nib.save(nib.Nifti1Image(np.asarray(data), POSED_AFFINE if affine is None else affine), path)
  return str(path)


def _case(tmp_path, labels, image=None, label_affine=None) -> readers.Case:
  image_path = _save(
    tmp_path / 'img_0000.nii.gz', np.ones(SHAPE, np.float32) if image is None else image
  )
  label_path = _save(tmp_path / 'lab.nii.gz', labels, label_affine)
  return readers.Case('img', image_path, {readers.DEFAULT_READER: label_path})


def _message(call) -> str:
  with pytest.raises(DataError) as info:
    call()
  return str(info.value)


def test_missing_file(tmp_path):
  path = str(tmp_path / 'nowhere.nii.gz')
  assert _message(lambda: load_nifti_image(path)) == f'{path}: file not found'


def test_truncated_gzip_nifti(tmp_path):
  path = _save(tmp_path / 'cut.nii.gz', np.random.default_rng(0).normal(size=(20, 20, 20)))
  with open(path, 'rb') as f:
    content = f.read()
  with open(path, 'wb') as f:
    f.write(content[: len(content) // 2])
  message = _message(lambda: load_nifti_image(path))
  assert message.startswith(f'{path}: cannot read the voxel data (truncated or corrupt file?)')


def test_truncated_uncompressed_nifti(tmp_path):
  path = _save(tmp_path / 'cut.nii', np.zeros((10, 10, 10), np.float32))
  with open(path, 'r+b') as f:
    f.truncate(1000)
  message = _message(lambda: load_nifti_image(path))
  assert message.startswith(f'{path}: cannot read the voxel data (truncated or corrupt file?)')


def test_corrupt_header(tmp_path):
  path = str(tmp_path / 'garbage.nii.gz')
  with gzip.open(path, 'wb') as f:
    f.write(b'this is not a NIfTI header' * 20)
  message = _message(lambda: load_nifti_image(path))
  assert message.startswith(f'{path}: cannot read the NIfTI header (truncated or corrupt file?)')


def test_not_gzip_at_all(tmp_path):
  path = str(tmp_path / 'plain.nii.gz')
  with open(path, 'wb') as f:
    f.write(b'\x00' * 400)
  message = _message(lambda: load_nifti_image(path))
  assert message.startswith(f'{path}: cannot read the NIfTI header')


def test_image_label_shape_mismatch(tmp_path):
  case = _case(tmp_path, np.zeros((4, 5, 2), np.uint8))
  message = _message(lambda: readers.load_volume(case, plane='sagittal', label_values=KNEE_VALUES))
  assert message == (
    f'{case.labels["default"]}: label map shape differs from its image '
    f'{case.image} (found (4, 5, 2); expected (4, 5, 3))'
  )


def test_image_label_affine_mismatch(tmp_path):
  shifted = POSED_AFFINE.copy()
  shifted[0, 3] += 0.5
  case = _case(tmp_path, np.zeros(SHAPE, np.uint8), label_affine=shifted)
  message = _message(lambda: readers.load_volume(case, plane='sagittal', label_values=KNEE_VALUES))
  assert message.startswith(
    f'{case.labels["default"]}: label map affine differs from its image '
    f'{case.image} by up to 0.5 mm'
  )
  assert 'tolerance 0.001 mm' in message


def test_label_values_outside_the_label_map(tmp_path):
  labels = np.zeros(SHAPE, np.uint8)
  labels[0, 0, :] = 7
  labels[1, 1, 1] = 9
  labels[2, 2, 2] = 3
  case = _case(tmp_path, labels)
  message = _message(lambda: readers.load_volume(case, plane='sagittal', label_values=KNEE_VALUES))
  assert message == (
    f'{case.labels["default"]}: label values outside the label map '
    '(found value 7: 3 voxels, value 9: 1 voxels; expected values in '
    '[0, 1, 2, 3, 4])'
  )


def test_fractional_label_values(tmp_path):
  path = _save(tmp_path / 'soft.nii.gz', np.full(SHAPE, 0.5, np.float32))
  assert _message(lambda: load_nifti_labels(path)).startswith(
    f'{path}: label map has fractional values (found 60 voxels, e.g. '
  )


def test_2d_volume(tmp_path):
  path = _save(tmp_path / 'flat.nii.gz', np.zeros((4, 5), np.float32))
  assert _message(lambda: load_nifti_image(path)) == (
    f'{path}: not a 3D volume (2D) (found shape (4, 5); expected shape [X, Y, Z] '
    '(a trailing 4th dimension of size 1 is allowed))'
  )


def test_4d_volume_nibabel_example():
  path = os.path.join(data_path, 'example4d.nii.gz')
  assert _message(lambda: load_nifti_image(path)).startswith(
    f'{path}: not a 3D volume (4D) (found shape (128, 96, 24, 2)'
  )


def test_nan_and_inf_voxels(tmp_path):
  data = np.ones(SHAPE, np.float32)
  data[0, 0, 0] = np.nan
  data[1, 1, 1] = np.inf
  data[2, 2, 2] = -np.inf
  path = _save(tmp_path / 'nan.nii.gz', data)
  assert _message(lambda: load_nifti_image(path)) == (
    f'{path}: image has non-finite voxels (found 1 NaN and 2 infinite of 60 voxels; '
    'expected finite intensities only)'
  )


def test_values_beyond_float32_are_not_called_infinite(tmp_path):
  # Issue 15.6: float64 voxels of 1e39 became inf in the float32 cast and were reported as
  # "infinite" voxels of a file that has none.
  data = np.ones(SHAPE, np.float64)
  data[0, 0, 0] = 1e39
  data[1, 1, 1] = -3e40
  path = _save(tmp_path / 'huge.nii.gz', data)
  assert _message(lambda: load_nifti_image(path)) == (
    f'{path}: image has voxels beyond the float32 range (found 2 of 60 voxels, largest '
    f'magnitude 3e+40; expected magnitudes up to {float(np.finfo(np.float32).max):.4g})'
  )
  # Just inside the range it loads, as float32.
  data[0, 0, 0], data[1, 1, 1] = 3.4e38, -3.4e38
  assert load_nifti_image(_save(tmp_path / 'big.nii.gz', data)).data.dtype == np.float32


def test_non_invertible_affine(tmp_path):
  image = nib.Nifti1Image(np.zeros(SHAPE, np.float32), None)
  singular = np.diag([1.0, 1.0, 0.0, 1.0])
  image.set_sform(singular, code=1)
  image.set_qform(None, code=0)
  path = str(tmp_path / 'flat_affine.nii.gz')
  nib.save(image, path)
  assert _message(lambda: load_nifti_image(path)).startswith(
    f'{path}: affine is not invertible (found determinant 0 of'
  )


def test_dataset_json_missing(tmp_path):
  assert _message(lambda: dataset_folders.NnunetFolder(tmp_path)) == (
    f'{tmp_path / "dataset.json"}: file not found'
  )


def test_dataset_json_not_json(tmp_path):
  (tmp_path / 'dataset.json').write_text('{"labels": {"background": 0,')
  assert _message(lambda: dataset_folders.NnunetFolder(tmp_path)).startswith(
    f'{tmp_path / "dataset.json"}: not valid JSON'
  )


def _nnunet(tmp_path, readers_key=None) -> None:
  meta = {
    'labels': {'background': 0, 'effusion': 1},
    'channel_names': {'0': 'STIR'},
    'file_ending': '.nii.gz',
    'plane': 'coronal',
  }
  if readers_key is not None:
    meta['readers'] = readers_key
  (tmp_path / 'dataset.json').write_text(json.dumps(meta))
  for folder in ('imagesTr', 'labelsTr_reader1'):
    (tmp_path / folder).mkdir()
  _save(tmp_path / 'imagesTr' / 'hip_0000_0000.nii.gz', np.zeros(SHAPE, np.float32))
  _save(tmp_path / 'imagesTr' / 'hip_0001_0000.nii.gz', np.zeros(SHAPE, np.float32))
  _save(tmp_path / 'labelsTr_reader1' / 'hip_0000.nii.gz', np.zeros(SHAPE, np.uint8))


def test_reader_label_file_missing(tmp_path):
  _nnunet(tmp_path, ['reader1'])
  folder = dataset_folders.NnunetFolder(tmp_path)
  assert _message(folder.cases) == (
    f"{tmp_path / 'labelsTr_reader1' / 'hip_0001.nii.gz'}: label file of reader 'reader1' "
    'not found (expected one label per image in imagesTr/)'
  )


def test_label_file_without_an_image(tmp_path):
  _nnunet(tmp_path, ['reader1'])
  _save(tmp_path / 'labelsTr_reader1' / 'hip_0001.nii.gz', np.zeros(SHAPE, np.uint8))
  _save(tmp_path / 'labelsTr_reader1' / 'hip_0009.nii.gz', np.zeros(SHAPE, np.uint8))
  assert _message(dataset_folders.NnunetFolder(tmp_path).cases) == (
    f'{tmp_path / "labelsTr_reader1" / "hip_0009.nii.gz"}: label file has no image in imagesTr/ '
    f"(found 1 such label file(s) for reader 'reader1'; expected "
    f'{tmp_path / "imagesTr" / "hip_0009"}_0000.nii.gz)'
  )


def test_reader_folder_listed_but_missing(tmp_path):
  _nnunet(tmp_path, ['reader1', 'reader2'])
  assert _message(lambda: dataset_folders.NnunetFolder(tmp_path)) == (
    f"{tmp_path / 'labelsTr_reader2'}: label folder of reader 'reader2' (listed in "
    'dataset.json) not found'
  )


def test_image_without_channel_suffix(tmp_path):
  _nnunet(tmp_path)
  _save(tmp_path / 'imagesTr' / 'loose.nii.gz', np.zeros(SHAPE, np.float32))
  assert _message(dataset_folders.NnunetFolder(tmp_path).cases) == (
    f'{tmp_path / "imagesTr" / "loose.nii.gz"}: image name lacks the nnU-Net channel suffix '
    '(expected <case id>_0000.nii.gz)'
  )


def test_oai_zib_mask_that_does_not_fit_its_image(tmp_path):
  (tmp_path / 'images').mkdir()
  (tmp_path / 'segmentation_masks').mkdir()
  image = _save(tmp_path / 'images' / '9001104.nii.gz', np.zeros((6, 6, 4), np.float32))
  mask = write_metaimage(
    str(tmp_path / 'segmentation_masks' / '9001104.segmentation_masks.mhd'),
    np.zeros((5, 6, 6), np.uint8),
  )
  (case,) = dataset_folders.OaiZibFolder(tmp_path).cases()
  message = _message(lambda: readers.load_volume(case, plane='sagittal', label_values=KNEE_VALUES))
  assert message == (
    f'{mask}: mask does not fit its image {image} (image axes RAS) under the '
    "alignment axcodes=('L', 'P', 'S') (found mask shape (5, 6, 6) -> (5, 6, 6); "
    'expected image shape (6, 6, 4))'
  )


def test_several_readers_and_none_chosen(tmp_path):
  image = _save(tmp_path / 'i.nii.gz', np.zeros(SHAPE, np.float32))
  case = readers.Case('hip_0003', image, {'reader1': image, 'reader2': image})
  assert _message(lambda: readers.load_volume(case, plane='coronal', label_values=(1,))) == (
    "case hip_0003: several readers and none chosen (found ['reader1', 'reader2']; "
    'expected reader=<one of them>)'
  )


def _knee_folder(root, labels: dict[str, int], values=None):
  """An nnU-Net knee folder with two cases whose label maps hold every declared value."""
  from data_pipelines.datasets import params as params_lib

  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  (root / 'dataset.json').write_text(
    json.dumps({'labels': labels, 'channel_names': {'0': 'MR'}, 'file_ending': '.nii.gz'})
  )
  label_map = np.zeros(SHAPE, np.uint8)
  label_map.flat[: len(labels)] = sorted(labels.values())
  for case in ('knee_0000', 'knee_0001'):
    _save(root / 'imagesTr' / f'{case}_0000.nii.gz', np.ones(SHAPE, np.float32))
    _save(root / 'labelsTr' / f'{case}.nii.gz', label_map)
  params = params_lib.DatasetParams(
    dataset='nifti_folder',
    plane='sagittal',
    class_label_values=KNEE_VALUES if values is None else values,
    reader='',
    instance_mode='per_class',
    min_instance_pixels=1,
    empty_slice_rate=1.0,
    context_slices=0,
    seed=0,
    split_fractions=(0.5, 0.0, 0.5),
    source_dir=str(root),
  )
  return params, dataset_folders.NnunetFolder(root)


def test_declared_label_values_the_config_does_not_train_are_refused(tmp_path):
  # Issue 15.6: values were checked against dataset.json only, so a knee dataset that splits
  # tibial cartilage into medial (4) and lateral (5) passed with a config training 1-4, and
  # the lateral half was learnt as background.
  from data_pipelines.datasets import sources

  split = {
    'background': 0,
    'femur': 1,
    'femoral_cartilage': 2,
    'tibia': 3,
    'medial_tibial_cartilage': 4,
    'lateral_tibial_cartilage': 5,
  }
  params, folder = _knee_folder(tmp_path / 'split', split)
  message = _message(lambda: sources.labelled_cases(params, folder))
  # The split tissue is named, and how to merge its parts back into one class.
  assert message == (
    f"{tmp_path / 'split' / 'dataset.json'}: the dataset splits ['tibial_cartilage'] into "
    "parts ['lateral_tibial_cartilage'] that config data.class_label_values=(1, 2, 3, 4) does "
    'not all train; the untrained part would silently become background (found '
    "{'lateral_tibial_cartilage': 5}; expected the parts merged into one class, e.g. the entry "
    '(4, 5) in data.class_label_values (experiments/oai.py:oaizib_cm), or each part a class)'
  )
  # Any other untrained value is refused as before.
  other = {**split, 'medial_tibial_cartilage': 4, 'lateral_tibial_cartilage': 5, 'meniscus': 6}
  params, folder = _knee_folder(tmp_path / 'other', other, values=(1, 2, 3, (4, 5)))
  message = _message(lambda: sources.labelled_cases(params, folder))
  assert message == (
    f'{tmp_path / "other" / "dataset.json"}: the dataset declares label values that config '
    'data.class_label_values=(1, 2, 3, (4, 5)) does not train; their voxels would silently '
    "become background (found {'meniscus': 6}; expected every declared value trained "
    'as a class (data.class_names, data.class_label_values), or relabelled in the label files '
    'and dropped from dataset.json)'
  )
  # A tissue of the vocabulary that the config leaves out is background on purpose (the knee
  # phantoms' effusion, 5), and is read.
  phantom_like = {
    'background': 0,
    'femur': 1,
    'femoral_cartilage': 2,
    'tibia': 3,
    'tibial_cartilage': 4,
    'effusion': 5,
  }
  params, folder = _knee_folder(tmp_path / 'phantom_like', phantom_like)
  cases = sources.labelled_cases(params, folder)
  assert [c.case_id for c in cases] == ['knee_0000', 'knee_0001']
  volume = sources.VolumeSource(
    'train', tuple(cases), 'sagittal', dict(folder.labels), params.class_map, None
  ).load(cases[0])
  assert set(np.unique(volume.labels)) == {0, 1, 2, 3, 4, 5}
