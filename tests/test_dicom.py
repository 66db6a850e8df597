"""DICOM series input (data_pipelines/dicom_io.py, predict's rules (c) and (d)).

The series are written here slice by slice with SimpleITK from a NIfTI-style array and affine,
their geometry only in the tags (ImagePositionPatient, ImageOrientationPatient, PixelSpacing),
as a scanner writes them. Independent truths: the same array and affine written as NIfTI with
nibabel and read by the NIfTI path give the same canonical volume; each voxel lies where the
DICOM equation puts it (PS3.3 C.7.6.2.1.1: P = S + i dc X + j dr Y, S the slice's
ImagePositionPatient, X and Y its ImageOrientationPatient, dr and dc its PixelSpacing, in LPS;
RAS = (-x, -y, z)), read back from each file's tags and pixels; predict on the series writes the
label map it writes for the NIfTI file, on the series' grid.
"""

from __future__ import annotations

import io
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_pipelines import dicom_io, readers
from data_pipelines.errors import DataError
from data_pipelines.phantoms import generate_knee
from imask_jax import errors
from imask_jax.predict import plan as predict_plan
from imask_jax.predict.command import predict_command

SHAPE = (12, 20, 16)  # [i, j, k]: 16 slices of 20 rows x 12 columns
# i -> anterior 0.5 mm, j -> superior 0.75 mm, k -> right 2 mm: a right-handed permutation,
# every entry exact in float32 and in a DICOM decimal string.
PERMUTED = np.array(
  [[0.0, 0.0, 2.0, -15.0], [0.5, 0.0, 0.0, 20.0], [0.0, 0.75, 0.0, -30.5], [0.0, 0.0, 0.0, 1.0]]
)
# The same slices with k running left (a left-handed grid, as many NIfTI files are): the series
# stores no handedness, so its k axis runs along the normal, the reverse of this one.
MIRRORED = PERMUTED @ np.array(
  [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, -1.0, SHAPE[2] - 1], [0, 0, 0, 1.0]]
)


def _rotation(about_z: float, about_x: float) -> np.ndarray:
  cz, sz, cx, sx = np.cos(about_z), np.sin(about_z), np.cos(about_x), np.sin(about_x)
  rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
  rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
  return rz @ rx


OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _rotation(0.3, 0.2) @ PERMUTED[:3, :3]
OBLIQUE[:3, 3] = (10.25, -20.5, 30.75)
GRIDS = {'permuted': PERMUTED, 'mirrored': MIRRORED, 'oblique': OBLIQUE}
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _ds(values) -> str:
  """A DICOM decimal string list (each value at most 16 characters)."""
  return '\\'.join(f'{float(v):.10g}' for v in values)


def write_series(
  folder, volume, affine, *, uid='1.2.826.0.1.3680043.2.1125.7.1', where=None, tags=None
):
  """Writes `volume` [i, j, k] with the RAS+ `affine` as one DICOM file per slice k. `where(k)`:
  the voxel coordinate (0, 0, k') whose position slice k states (default k: a true grid).
  `tags(k)`: more (tag, value) pairs for slice k's file, e.g. (('0020|0060', 'R'),)."""
  os.makedirs(folder, exist_ok=True)
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  x, y = (RAS_TO_LPS @ affine[:3, c] / spacing[c] for c in (0, 1))
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()
  for k in range(volume.shape[2]):
    pixels = sitk.GetImageFromArray(np.ascontiguousarray(volume[:, :, k].T))  # [rows, columns]
    # SimpleITK writes PixelSpacing of an MR image from the image's spacing, not from the tag.
    pixels.SetSpacing((float(spacing[0]), float(spacing[1])))
    position = RAS_TO_LPS @ (affine @ [*(where(k) if where else (0, 0, k)), 1.0])[:3]
    for tag, value in (
      ('0008|0060', 'MR'),
      ('0020|000e', uid),
      ('0020|0013', str(k + 1)),
      ('0020|0032', _ds(position)),
      ('0020|0037', _ds([*x, *y])),
      ('0028|0030', _ds([spacing[1], spacing[0]])),  # between rows, between columns
      ('0018|0050', _ds([spacing[2]])),
      *(tags(k) if tags else ()),
    ):
      pixels.SetMetaData(tag, value)
    writer.SetFileName(os.path.join(folder, f'{uid}-{k:03d}.dcm'))
    with dicom_io.preserved_locale():  # GDCM's writer leaves the process in the C locale
      writer.Execute(pixels)
  return str(folder)


def _volume(seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(-1000, 3000, SHAPE).astype(np.int16)


def _tags(path) -> dict[str, np.ndarray]:
  reader = sitk.ImageFileReader()
  reader.SetFileName(str(path))
  reader.ReadImageInformation()
  tags = {'S': '0020|0032', 'XY': '0020|0037', 'spacing': '0028|0030'}
  return {
    name: np.array([float(v) for v in reader.GetMetaData(tag).split('\\')])
    for name, tag in tags.items()
  }


@pytest.mark.parametrize('grid', sorted(GRIDS))
def test_a_series_reads_to_the_canonical_volume_of_the_same_nifti(grid, tmp_path):
  affine, volume = GRIDS[grid], _volume()
  nifti = str(tmp_path / 'scan.nii.gz')
  nib.save(nib.Nifti1Image(volume, affine), nifti)
  series = write_series(tmp_path / 'scan', volume, affine)
  from_nifti, from_dicom = (
    readers.load_volume(readers.Case('scan', path), plane='sagittal', label_values=None)
    for path in (nifti, series)
  )
  np.testing.assert_array_equal(from_dicom.image, from_nifti.image)
  assert from_dicom.image.dtype == np.float32
  np.testing.assert_allclose(from_dicom.spacing, from_nifti.spacing, rtol=1e-7)
  np.testing.assert_allclose(
    from_dicom.grid.canonical_affine, from_nifti.grid.canonical_affine, rtol=0, atol=1e-5
  )
  assert from_dicom.image_path == series and from_dicom.grid.shape == SHAPE
  # The series' own grid: the NIfTI's, with k along the slice normal (MIRRORED reversed in k
  # is PERMUTED).
  expected = OBLIQUE if grid == 'oblique' else PERMUTED
  np.testing.assert_allclose(from_dicom.grid.affine, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('grid', ['mirrored', 'oblique'])
def test_every_voxel_lies_where_the_dicom_equation_puts_it(grid, tmp_path):
  volume = _volume(1)
  series = write_series(tmp_path / 'scan', volume, GRIDS[grid])
  loaded = dicom_io.load_dicom_series(series)
  assert loaded.path == series and loaded.shape == SHAPE
  i, j = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing='ij')
  matched = set()
  for name in sorted(os.listdir(series)):
    path = os.path.join(series, name)
    tags = _tags(path)
    x, y, (dr, dc) = tags['XY'][:3], tags['XY'][3:], tags['spacing']
    lps = tags['S'] + (i * dc)[..., None] * x + (j * dr)[..., None] * y  # [i, j, 3]
    ras = lps * [-1.0, -1.0, 1.0]
    # The slice k whose first voxel the affine puts at this file's position.
    origins = loaded.affine[:3, 3] + np.arange(SHAPE[2])[:, None] * loaded.affine[:3, 2]
    k = int(np.argmin(np.linalg.norm(origins - ras[0, 0], axis=1)))
    voxels = np.stack([i, j, np.full_like(i, k), np.ones_like(i)], axis=-1)
    np.testing.assert_allclose(voxels @ loaded.affine[:3].T, ras, rtol=0, atol=1e-4)
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(path))[0]  # [rows, columns]
    np.testing.assert_array_equal(loaded.data[:, :, k], pixels.T)
    matched.add(k)
  assert matched == set(range(SHAPE[2]))


def test_non_uniform_slice_spacing_is_refused(tmp_path):
  # Slice 5 moved 1.2 mm (0.6 of the 2 mm spacing) towards slice 6.
  moved = write_series(
    tmp_path / 'moved', _volume(), PERMUTED, where=lambda k: (0, 0, k + 0.6 * (k == 5))
  )
  with pytest.raises(DataError) as error:
    dicom_io.load_dicom_series(moved)
  message = str(error.value)
  assert message.startswith(f'{moved}: non-uniform slice spacing')
  assert 'gaps of 0.8 to 3.2 mm between neighbouring slices' in message
  # A missing slice: gaps of 2 and 4 mm.
  missing = write_series(tmp_path / 'missing', _volume(), PERMUTED)
  os.remove(os.path.join(missing, sorted(os.listdir(missing))[7]))
  with pytest.raises(DataError, match='gaps of 2 to 4 mm'):
    dicom_io.load_dicom_series(missing)
  # Two slices at one position (e.g. two echoes in one series).
  repeated = write_series(
    tmp_path / 'repeated', _volume(), PERMUTED, where=lambda k: (0, 0, k - (k == 5))
  )
  with pytest.raises(DataError, match=f'^{re.escape(repeated)}: two slices at one position'):
    dicom_io.load_dicom_series(repeated)
  # Uniform along the normal but each slice 0.5 mm further along i (a gantry tilt).
  sheared = write_series(tmp_path / 'sheared', _volume(), PERMUTED, where=lambda k: (k, 0, k))
  with pytest.raises(DataError, match=f'^{re.escape(sheared)}: the slices are not stacked along'):
    dicom_io.load_dicom_series(sheared)


def test_a_folder_of_two_series_one_slice_or_none_is_refused(tmp_path):
  uids = ('1.2.826.0.1.3680043.2.1125.7.1', '1.2.826.0.1.3680043.2.1125.7.2')
  both = tmp_path / 'both'
  for uid in uids:
    write_series(both, _volume(), PERMUTED, uid=uid)
  with pytest.raises(DataError) as error:
    dicom_io.load_dicom_series(both)
  message = str(error.value)
  assert message.startswith(f'{both}: the folder holds 2 DICOM series')
  assert all(f'{uid} (16 files)' in message for uid in uids)
  assert 'a subfolder of its own' in message
  single = write_series(tmp_path / 'single', _volume()[:, :, :1], PERMUTED)
  with pytest.raises(DataError, match=f'^{re.escape(single)}: a single slice, not a volume'):
    dicom_io.load_dicom_series(single)
  (tmp_path / 'none').mkdir()
  (tmp_path / 'none' / 'notes.txt').write_text('not a scan\n')
  with pytest.raises(DataError, match='no DICOM series in the folder'):
    dicom_io.load_dicom_series(tmp_path / 'none')


def test_predict_reads_a_series_folder_or_a_folder_of_series(tmp_path):
  # (c) one series folder: itself the input, the output named after it.
  series = write_series(tmp_path / 'knee_0007_0000', _volume(), PERMUTED)
  assert predict_plan.list_inputs(series) == ([series], [])
  (job,) = predict_plan.plan_jobs(series, [series], str(tmp_path / 'out'))
  assert job.label_map == str(tmp_path / 'out' / 'knee_0007_0000.nii.gz')
  (job,) = predict_plan.plan_jobs(series, [series], str(tmp_path / 'out' / 'seg.nii.gz'))
  assert job.report == str(tmp_path / 'out' / 'seg.json')
  # Never among the slices: the folder would then be read as a NIfTI folder.
  for output in (series, os.path.join(series, 'seg.nii.gz')):
    stream = io.StringIO()
    assert predict_command('/nonexistent', series, output, stream=stream) == errors.EXIT_REFUSED
    assert f'is inside the DICOM series folder {series}' in stream.getvalue()
  assert len(os.listdir(series)) == SHAPE[2]
  # (d) a folder of series folders; other entries are skipped.
  root = tmp_path / 'study'
  paths = [write_series(root / name, _volume(), PERMUTED) for name in ('sag_pd', 'sag_t2')]
  (root / 'empty').mkdir()
  (root / 'notes.txt').write_text('not a scan\n')
  assert predict_plan.list_inputs(str(root)) == (paths, ['empty', 'notes.txt'])
  jobs = predict_plan.plan_jobs(str(root), paths, str(tmp_path / 'out'))
  assert [os.path.basename(j.label_map) for j in jobs] == ['sag_pd.nii.gz', 'sag_t2.nii.gz']
  stream = io.StringIO()
  assert predict_command('/nonexistent', str(root), paths[0], stream=stream) == errors.EXIT_REFUSED
  assert f'is inside the DICOM series folder {paths[0]}' in stream.getvalue()
  # (b) NIfTI files first: a folder holding one reads only that, the series is skipped.
  nib.save(nib.Nifti1Image(_volume(), PERMUTED), str(root / 'scan.nii.gz'))
  assert predict_plan.list_inputs(str(root)) == (
    [str(root / 'scan.nii.gz')],
    ['empty', 'notes.txt', 'sag_pd', 'sag_t2'],
  )
  with pytest.raises(ValueError, match='holds no NIfTI file .* no DICOM files'):
    predict_plan.list_inputs(str(root / 'empty'))


# The knee crop of tests/predict/test_predict_command.py: axes P, I, L (left-handed), 8 slices
# of 64 x 64.
AFFINE_A = np.array(
  [[0.0, 0.0, -1.5, 20.0], [-0.5, 0.0, 0.0, 30.0], [0.0, -0.5, 0.0, 40.0], [0.0, 0.0, 0.0, 1.0]]
)


def test_predict_on_a_series_writes_the_label_map_of_the_same_nifti(smoke_model, tmp_path):
  knee = np.transpose(generate_knee(2).image[40:104, 30:94, 28:36], (1, 0, 2)).astype(np.int16)
  nifti = str(tmp_path / 'knee_a.nii.gz')
  nib.save(nib.Nifti1Image(knee, AFFINE_A), nifti)
  series = write_series(tmp_path / 'study' / 'knee_a', knee, AFFINE_A)
  for source, out in ((nifti, 'from_nifti'), (str(tmp_path / 'study'), 'from_dicom')):
    assert (
      predict_command(
        smoke_model.workdir, source, str(tmp_path / out), model=smoke_model, stream=io.StringIO()
      )
      == errors.EXIT_OK
    )
  from_nifti = nib.load(str(tmp_path / 'from_nifti' / 'knee_a.nii.gz'))
  from_dicom = nib.load(str(tmp_path / 'from_dicom' / 'knee_a.nii.gz'))
  labels = np.asarray(from_dicom.dataobj)
  # The series' grid: 64 columns, 64 rows, 8 slices; slice k's first voxel at the position its
  # file states (RAS of ImagePositionPatient).
  assert labels.shape == (64, 64, 8) and labels.dtype == np.uint8
  assert labels.any()  # the smoke model paints bone here, so the equality below is not vacuous
  assert from_dicom.header.get_xyzt_units()[0] == 'mm'
  positions = sorted(
    tuple(np.round(_tags(os.path.join(series, n))['S'] * [-1, -1, 1], 4))
    for n in os.listdir(series)
  )
  origins = sorted(tuple(np.round(from_dicom.affine @ [0, 0, k, 1], 4)[:3]) for k in range(8))
  assert origins == positions
  # AFFINE_A is left-handed: the series' k runs the other way, voxel for voxel the same labels.
  np.testing.assert_array_equal(labels, np.asarray(from_nifti.dataobj)[:, :, ::-1])
  canonical = [nib.as_closest_canonical(image) for image in (from_nifti, from_dicom)]
  np.testing.assert_array_equal(*(np.asarray(image.dataobj) for image in canonical))
  np.testing.assert_allclose(canonical[0].affine, canonical[1].affine, rtol=0, atol=1e-5)
  report = json.loads((tmp_path / 'from_dicom' / 'knee_a.json').read_text())
  assert report['input'] == series and report['shape'] == [64, 64, 8]


def test_gdcm_writes_leave_the_locale_and_text_encoding_as_they_were(tmp_path):
  import locale

  before = (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False))
  folder = write_series(tmp_path / 'series', _volume(), np.diag([0.5, 0.5, 2.0, 1.0]))
  dicom_io.load_dicom_series(folder)
  assert (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)) == before
  with dicom_io.preserved_locale():
    locale.setlocale(locale.LC_ALL, 'C')  # what GDCM's writer does
  assert locale.getpreferredencoding(False) == before[1]
