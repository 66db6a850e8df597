"""Reading and writing NIfTI volumes, with the checks every reader in this package relies on.

Loaders return the array in the file's own voxel order ([X, Y, Z], i = fastest axis on disk, as
nibabel gives it) with its voxel -> RAS+ mm affine; reorientation happens in `orientation.py`.
Every problem with a file becomes a `DataError` naming the file, what was found and what was
expected.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, ImageDataError

from data_pipelines.atomic import atomic_path
from data_pipelines.errors import DataError

NIFTI_SUFFIXES = ('.nii.gz', '.nii')

# What nibabel, gzip and numpy raise for a truncated or corrupt file (header or voxel data).
_READ_ERRORS = (
  ImageFileError,
  HeaderDataError,
  ImageDataError,
  OSError,
  EOFError,
  ValueError,
  zlib.error,
  struct.error,
)


@dataclasses.dataclass(frozen=True, eq=False)
class NiftiVolume:
  """One 3D volume as stored in a file.

  data: [X, Y, Z] float32 for images, uint8 for label maps, in the file's voxel order.
  affine: [4, 4] float64, voxel index -> RAS+ world coordinates in mm.
  zooms: voxel size in mm along X, Y, Z (the lengths of the affine's columns).
  pose_problem: why the affine cannot be the scanner pose (`pose_problem`), or None.
  """

  path: str
  data: np.ndarray
  affine: np.ndarray
  zooms: tuple[float, float, float]
  pose_problem: str | None = None

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(int(n) for n in self.data.shape)


def is_nifti_path(path: str | os.PathLike) -> bool:
  return os.fspath(path).endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
  """'knee_0001_0000.nii.gz' -> 'knee_0001_0000'."""
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return name


def load_nifti_image(path: str | os.PathLike) -> NiftiVolume:
  """Loads an image volume as float32 [X, Y, Z]; NaN or infinite voxels are an error. Its
  `pose_problem` says whether the header lost the scanner pose (the caller decides)."""
  path, data, affine, header = _load_3d(path)
  return NiftiVolume(
    path,
    image_to_float32(data, path),
    affine,
    affine_zooms(affine),
    pose_problem=pose_problem(header, affine),
  )


def pose_problem(header: Any, affine: np.ndarray) -> str | None:
  """Why a NIfTI header's affine cannot be the scanner pose, or None when it can be.

  Both the qform and the sform code 0 means no pose was stored (nibabel then makes up an
  affine from the voxel size); an affine that is exactly the identity is what converters write
  when they drop the DICOM orientation. Either way the anatomical directions of the array axes
  are unknown: a sagittal slice may be cut along the wrong axis and a pose-less mask aligned
  transposed, and nothing downstream could tell.
  """
  try:
    codes = int(header['qform_code']), int(header['sform_code'])
  except (KeyError, TypeError, ValueError):  # not a NIfTI header (a DICOM-built volume)
    codes = (1, 1)
  if codes == (0, 0):
    return 'no orientation stored (qform_code and sform_code are both 0)'
  if np.array_equal(np.asarray(affine, np.float64), np.eye(4)):
    return 'the affine is the identity (the scanner pose was lost in conversion)'
  return None


def image_to_float32(data: np.ndarray, path: str) -> np.ndarray:
  """Checks that an image array is real-valued and finite within float32's range (a DataError
  naming `path` otherwise) and returns it as float32."""
  if data.dtype.kind not in 'biuf':
    raise DataError(
      path,
      'image has an unsupported data type',
      found=data.dtype,
      expected='a real-valued integer or float type',
    )
  # Checked before the cast: a float64 value beyond float32's range would turn infinite in it
  # and be reported as an infinite voxel of the file.
  if data.dtype.kind == 'f':
    bad = ~np.isfinite(data)
    if bad.any():
      raise DataError(
        path,
        'image has non-finite voxels',
        found=f'{int(np.isnan(data).sum())} NaN and {int(np.isinf(data).sum())} '
        f'infinite of {data.size} voxels',
        expected='finite intensities only',
      )
    limit = float(np.finfo(np.float32).max)
    beyond = np.abs(data) > limit
    if beyond.any():
      raise DataError(
        path,
        'image has voxels beyond the float32 range',
        found=f'{int(beyond.sum())} of {data.size} voxels, largest magnitude '
        f'{float(np.abs(data).max()):.4g}',
        expected=f'magnitudes up to {limit:.4g}',
      )
  return data.astype(np.float32)


def load_nifti_labels(path: str | os.PathLike) -> NiftiVolume:
  """Loads a label map as uint8 [X, Y, Z]; values must be whole numbers in 0..255."""
  path, data, affine, _ = _load_3d(path)
  data = labels_to_uint8(data, path)
  return NiftiVolume(path, data, affine, affine_zooms(affine))


def labels_to_uint8(data: np.ndarray, path: str) -> np.ndarray:
  """Checks that a label array holds whole numbers in 0..255 and returns it as uint8."""
  if data.dtype.kind not in 'biuf':
    raise DataError(
      path,
      'label map has an unsupported data type',
      found=data.dtype,
      expected='an integer or float type',
    )
  if data.dtype.kind == 'f':
    if not np.isfinite(data).all():
      raise DataError(
        path,
        'label map has non-finite values',
        found=f'{int((~np.isfinite(data)).sum())} NaN/inf voxels',
        expected='whole numbers 0..255',
      )
    fractional = data != np.round(data)
    if fractional.any():
      raise DataError(
        path,
        'label map has fractional values',
        found=f'{int(fractional.sum())} voxels, e.g. {data[fractional][0]!r}',
        expected='whole numbers 0..255',
      )
  if data.size and (data.min() < 0 or data.max() > 255):
    raise DataError(
      path,
      'label values out of range',
      found=f'min {data.min()}, max {data.max()}',
      expected='0..255',
    )
  return data.astype(np.uint8)


def affine_zooms(affine: np.ndarray) -> tuple[float, float, float]:
  """Voxel size in mm along each array axis: the lengths of the affine's first three columns."""
  return tuple(float(z) for z in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def check_affine(affine: Any, path: str) -> np.ndarray:
  """Returns `affine` as float64 [4, 4] if it is finite and invertible, else a DataError."""
  affine = np.asarray(affine, dtype=np.float64)
  if affine.shape != (4, 4):
    raise DataError(path, 'affine has the wrong shape', found=affine.shape, expected=(4, 4))
  if not np.isfinite(affine).all():
    raise DataError(
      path,
      'affine has non-finite entries',
      found=np.array2string(affine),
      expected='a finite voxel -> mm matrix',
    )
  det = float(np.linalg.det(affine[:3, :3]))
  if abs(det) < 1e-12 or not np.array_equal(affine[3], [0, 0, 0, 1]):
    raise DataError(
      path,
      'affine is not invertible',
      found=f'determinant {det:.3g} of\n{np.array2string(affine, precision=4)}',
      expected='a non-zero voxel volume and last row [0, 0, 0, 1]',
    )
  return affine


def save_nifti(
  array: np.ndarray,
  affine: np.ndarray,
  path: str | os.PathLike,
  like: str | os.PathLike | nib.Nifti1Image | None = None,
) -> str:
  """Writes `array` ([X, Y, Z] or [X, Y, Z, C]) with `affine` to `path` (.nii / .nii.gz) atomically.

  `like` (a path or an image) supplies the header template (units, description, intent...);
  the voxel size, qform and sform are always set from `affine`, and any intensity scaling of
  the template is dropped, so the stored values are exactly `array` (bool is stored as uint8).
  Returns the path written.
  """
  path = os.fspath(path)
  if not is_nifti_path(path):
    raise DataError(
      path,
      'output name has the wrong extension',
      found=os.path.basename(path),
      expected=' or '.join(NIFTI_SUFFIXES),
    )
  array = np.asarray(array)
  if array.ndim not in (3, 4):
    raise DataError(
      path,
      'array to save has the wrong number of dimensions',
      found=array.shape,
      expected='[X, Y, Z] or [X, Y, Z, C]',
    )
  if array.dtype == bool:
    array = array.astype(np.uint8)
  affine = check_affine(affine, path)
  header = None
  if like is not None:
    template = like if isinstance(like, nib.Nifti1Image) else nib.load(os.fspath(like))
    header = template.header.copy()
  image = nib.Nifti1Image(array, affine, header=header)
  image.header.set_data_dtype(array.dtype)
  image.header.set_slope_inter(1.0, 0.0)
  image.set_sform(affine, code=int(image.header['sform_code']) or 1)
  image.set_qform(affine, code=int(image.header['qform_code']) or 1)
  with atomic_path(path) as tmp:
    nib.save(image, tmp)
  return path


@dataclasses.dataclass(frozen=True)
class NiftiHeader:
  """What a NIfTI header says of its volume, the voxels unread: shape [X, Y, Z], affine [4, 4]
  (voxel -> RAS+ mm), zooms (mm) and `pose_problem` (see that function)."""

  path: str
  shape: tuple[int, int, int]
  affine: np.ndarray
  zooms: tuple[float, float, float]
  pose_problem: str | None


def read_header(path: str | os.PathLike) -> NiftiHeader:
  """The checked header of a 3D NIfTI file (a DataError as for the loaders), voxels unread."""
  path, image, shape, affine = _open_3d(path)
  return NiftiHeader(
    path, shape[:3], affine, affine_zooms(affine), pose_problem(image.header, affine)
  )


def _load_3d(path: str | os.PathLike) -> tuple[str, np.ndarray, np.ndarray, Any]:
  """Opens a NIfTI file and returns (path, data [X, Y, Z] as stored, affine, header), checked."""
  path, image, shape, affine = _open_3d(path)
  try:
    data = np.asanyarray(image.dataobj)
  except _READ_ERRORS as e:
    raise DataError(path, f'cannot read the voxel data (truncated or corrupt file?): {e}') from e
  return path, np.asarray(data).reshape(shape[:3]), affine, image.header


def _open_3d(path: str | os.PathLike) -> tuple[str, Any, tuple[int, ...], np.ndarray]:
  """(path, the nibabel image, its shape, its checked affine) of a 3D NIfTI file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError(path, 'file not found')
  if os.path.isdir(path):
    raise DataError(path, 'is a folder', expected='a NIfTI file')
  if not is_nifti_path(path):
    raise DataError(
      path,
      'not a NIfTI file name',
      found=os.path.basename(path),
      expected=' or '.join(NIFTI_SUFFIXES),
    )
  try:
    image = nib.load(path)
  except _READ_ERRORS as e:
    raise DataError(path, f'cannot read the NIfTI header (truncated or corrupt file?): {e}') from e
  if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
    raise DataError(
      path, 'not a NIfTI image', found=type(image).__name__, expected='NIfTI-1 or NIfTI-2'
    )
  shape = tuple(int(n) for n in image.shape)
  if len(shape) < 3 or any(n != 1 for n in shape[3:]):
    raise DataError(
      path,
      f'not a 3D volume ({len(shape)}D)',
      found=f'shape {shape}',
      expected='shape [X, Y, Z] (a trailing 4th dimension of size 1 is allowed)',
    )
  affine = check_affine(image.affine, path)
  return path, image, shape, affine
