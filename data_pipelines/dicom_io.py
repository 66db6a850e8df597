"""A DICOM series folder -> the `NiftiVolume` a NIfTI file of the same scan gives.

`load_dicom_series(folder)` reads the one series in a folder (files grouped by
SeriesInstanceUID, ordered by SimpleITK / GDCM; a folder of several series, or none, is
refused) as float32 [i, j, k] = [x, y, z] (x along a slice's rows, y down its columns, z along
the slice normal) with its voxel -> RAS+ mm affine (SimpleITK's LPS geometry, x and y negated),
so that everything after it treats the series as a NIfTI file. Every check fails with a
DataError naming the folder or the file. `series_tags` reads named tags of every file of the
series (headers only), e.g. the laterality data_pipelines/laterality.py reads.

The axes and affine in full, and every check (from the headers before any pixel data is read,
then after reading): docs/data.md, 'DICOM series'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import locale
import os
from collections.abc import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from data_pipelines import nifti_io
from data_pipelines.errors import DataError

SLICE_POSITION_RTOL = 0.01  # of the slice step: well above the rounding of positions in files
SLICE_POSITION_ATOL_MM = 0.01
ORIENTATION_ATOL = 1e-3  # direction cosines of two slices of one series may differ by this
PIXEL_SPACING_RTOL = 1e-3
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
NOT_IMAGES = frozenset({'DICOMDIR'})  # the index file of a DICOM medium, no image


@contextlib.contextmanager
def preserved_locale() -> Iterator[None]:
  """Restores the process's C locale after the block. GDCM switches it to "C" when it writes
  a DICOM file (and may when it parses one), which turns Python's default text encoding into
  ASCII for the rest of the process: every later open() of a file with a '±' then fails."""
  saved = locale.setlocale(locale.LC_ALL)
  try:
    yield
  finally:
    locale.setlocale(locale.LC_ALL, saved)


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
  """ITK's warnings off (GDCM's "No Series were found", the reader's non-uniform sampling, which
  is checked and reported here instead), restored afterwards, and the locale kept."""
  shown = sitk.ProcessObject.GetGlobalWarningDisplay()
  sitk.ProcessObject.SetGlobalWarningDisplay(False)
  try:
    with preserved_locale():
      yield
  finally:
    sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def holds_dicom_files(folder: str | os.PathLike) -> bool:
  """Whether `folder` directly holds a visible file that SimpleITK reads as DICOM (DICOMDIR
  aside). Stops at the first such file, so a series folder is recognised at once."""
  folder = os.fspath(folder)
  reader = sitk.ImageFileReader()
  with _quiet_itk():
    for name in sorted(os.listdir(folder)):
      path = os.path.join(folder, name)
      if name.startswith('.') or name in NOT_IMAGES or not os.path.isfile(path):
        continue
      try:
        if reader.GetImageIOFromFileName(path) == 'GDCMImageIO':
          return True
      except RuntimeError:
        continue
  return False


def series_in_folder(folder: str | os.PathLike) -> dict[str, tuple[str, ...]]:
  """SeriesInstanceUID -> the series' files in slice order, for the DICOM files in `folder`."""
  folder = os.fspath(folder)
  with _quiet_itk():
    return {
      uid: tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
      for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    }


def series_files(folder: str | os.PathLike) -> tuple[str, ...]:
  """The files of the one series in `folder`, in slice order; a DataError when there is none or
  several."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise DataError(folder, 'not a folder' if os.path.exists(folder) else 'folder not found')
  series = series_in_folder(folder)
  if not series:
    raise DataError(
      folder,
      'no DICOM series in the folder',
      expected='the DICOM files of one series (files SimpleITK reads as DICOM)',
    )
  if len(series) > 1:
    raise DataError(
      folder,
      f'the folder holds {len(series)} DICOM series',
      found=', '.join(f'{uid} ({len(files)} files)' for uid, files in series.items()),
      expected='one series per folder: move each into a subfolder of its own and pass the '
      'parent folder (one label map per series)',
    )
  return next(iter(series.values()))


def load_dicom_series(folder: str | os.PathLike) -> nifti_io.NiftiVolume:
  """Reads the one DICOM series in `folder` (docs/data.md, 'DICOM series'): float32 [i, j, k]
  and the voxel -> RAS+ mm affine; `path` is the folder."""
  folder = os.path.abspath(os.fspath(folder))
  files = series_files(folder)
  headers = _check_headers(folder, files)
  try:
    with _quiet_itk():
      reader = sitk.ImageSeriesReader()
      reader.SetFileNames(list(files))
      image = reader.Execute()
  except RuntimeError as error:
    raise DataError(folder, f'SimpleITK cannot read the series: {_reason(error)}') from error
  size = (*headers.size, len(files))
  if tuple(image.GetSize()) != size or image.GetNumberOfComponentsPerPixel() != 1:
    raise DataError(
      folder,
      'SimpleITK read a different volume than the slice headers describe',
      found=f'size {image.GetSize()} with {image.GetNumberOfComponentsPerPixel()} components',
      expected=f'size {size}, grey-scale',
    )
  affine = nifti_io.check_affine(lps_to_ras_affine(image), folder)
  _check_grid(folder, files, headers.positions @ LPS_TO_RAS.T, affine)
  data = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))
  data = nifti_io.image_to_float32(data, folder)
  return nifti_io.NiftiVolume(folder, data, affine, nifti_io.affine_zooms(affine))


def series_tags(folder: str | os.PathLike, tags: Sequence[str]) -> dict[str, dict[str, str]]:
  """The values the files of the one series in `folder` hold for each of `tags` (SimpleITK's
  keys, 'gggg|eeee', e.g. '0020|0060' Laterality): tag -> {value (stripped of padding): the
  name of the first file holding it}, in slice order; a tag no file holds, or holds empty, maps
  to {}. Headers only (no pixel data); a DataError as `series_files` raises one."""
  found: dict[str, dict[str, str]] = {tag: {} for tag in tags}
  for path, reader in _headers(series_files(folder)):
    for tag in tags:
      try:
        value = reader.GetMetaData(tag).strip(' \x00') if reader.HasMetaDataKey(tag) else ''
      except (RuntimeError, UnicodeDecodeError):  # a value that is not text: not a side
        value = ''
      if value:
        found[tag].setdefault(value, os.path.basename(path))
  return found


def lps_to_ras_affine(image: sitk.Image) -> np.ndarray:
  """The [4, 4] voxel (x, y, z) -> RAS+ mm affine of a 3D SimpleITK image."""
  direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
  affine = np.eye(4)
  affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
  affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
  return affine


@dataclasses.dataclass(frozen=True, eq=False)
class SliceHeaders:
  """What a series' file headers say: the in-plane size (columns, rows), pixel spacing (mm)
  and direction [3, 3] (LPS; columns: along a row, down a column, the normal) of its slices,
  and each slice's position [n, 3] (LPS mm, ImagePositionPatient) in slice order."""

  size: tuple[int, int]
  spacing: tuple[float, float]
  direction: np.ndarray
  positions: np.ndarray


def _headers(files: Sequence[str]) -> Iterator[tuple[str, sitk.ImageFileReader]]:
  """(path, a reader holding that file's header) for each file, headers only (no pixel
  data); an unreadable header is a DataError naming the file."""
  reader = sitk.ImageFileReader()
  with _quiet_itk():
    for path in files:
      reader.SetFileName(path)
      try:
        reader.ReadImageInformation()
      except RuntimeError as error:
        raise DataError(path, f'cannot read the DICOM header: {_reason(error)}') from error
      yield path, reader


def _reason(error: Exception) -> str:
  return str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)


def _check_headers(folder: str, files: tuple[str, ...]) -> SliceHeaders:
  """Reads every file's header (no pixel data) and checks the slices against each other."""
  first: SliceHeaders | None = None
  positions = []
  for path, reader in _headers(files):
    if reader.GetNumberOfComponents() != 1:
      raise DataError(
        path,
        'not a grey-scale image',
        found=f'{reader.GetNumberOfComponents()} components per pixel',
        expected='1',
      )
    size = tuple(int(n) for n in reader.GetSize())
    if any(n != 1 for n in size[2:]):
      raise DataError(
        path,
        'a multi-frame DICOM file',
        found=f'{int(np.prod(size[2:]))} frames',
        expected='one slice per file (convert multi-frame DICOM to NIfTI, e.g. with dcm2niix)',
      )
    direction = np.asarray(reader.GetDirection(), dtype=np.float64)
    if len(size) != 3 or direction.size != 9:
      raise DataError(path, 'not a slice with a 3D position and orientation', found=size)
    headers = SliceHeaders(
      size[:2],
      tuple(float(s) for s in reader.GetSpacing()[:2]),
      direction.reshape(3, 3),
      np.zeros((0, 3)),
    )
    first = first or headers
    name, first_name = os.path.basename(path), os.path.basename(files[0])
    if headers.size != first.size:
      raise DataError(
        folder,
        'slices of different sizes',
        found=f'{headers.size} in {name}',
        expected=f'{first.size} as in {first_name}',
      )
    if not np.allclose(headers.spacing, first.spacing, rtol=PIXEL_SPACING_RTOL, atol=0):
      raise DataError(
        folder,
        'slices of different pixel spacing',
        found=f'{headers.spacing} mm in {name}',
        expected=f'{first.spacing} mm as in {first_name}',
      )
    if np.abs(headers.direction - first.direction).max() > ORIENTATION_ATOL:
      raise DataError(
        folder,
        'slices of different orientations (ImageOrientationPatient)',
        found=name,
        expected=f'the orientation of {first_name}',
      )
    positions.append(np.asarray(reader.GetOrigin(), dtype=np.float64))
  if len(files) < 2:
    raise DataError(
      folder,
      'a single slice, not a volume',
      found='1 slice',
      expected='at least 2 slices (their positions give the slice spacing)',
    )
  headers = dataclasses.replace(first, positions=np.stack(positions))
  _check_spacing(folder, files, headers)
  return headers


def _check_spacing(folder: str, files: tuple[str, ...], headers: SliceHeaders) -> None:
  """Distinct slice positions along the normal, one spacing apart to within the tolerance."""
  along = headers.positions @ headers.direction[:, 2]
  gaps = np.diff(along)
  step = (along[-1] - along[0]) / (len(along) - 1)
  tolerance = max(SLICE_POSITION_ATOL_MM, SLICE_POSITION_RTOL * abs(step))
  if np.abs(gaps).min() <= tolerance:
    i = int(np.argmin(np.abs(gaps)))
    raise DataError(
      folder,
      'two slices at one position (several echoes, time points or repeats in one series?)',
      found=f'{os.path.basename(files[i])} and {os.path.basename(files[i + 1])} '
      f'{abs(gaps[i]):.3g} mm apart',
      expected=f'slices at least {tolerance:.3g} mm apart along their normal',
    )
  off = np.abs(along - (along[0] + step * np.arange(len(along))))
  worst = int(np.argmax(off))
  if off[worst] > tolerance:
    raise DataError(
      folder,
      'non-uniform slice spacing (missing, moved or repeated slices?)',
      found=f'gaps of {gaps.min():.4g} to {gaps.max():.4g} mm between neighbouring slices; '
      f'{os.path.basename(files[worst])} lies {off[worst]:.3g} mm off a uniform spacing of '
      f'{abs(step):.4g} mm',
      expected=f'one spacing, to within {tolerance:.3g} mm',
    )


def _check_grid(folder: str, files: tuple[str, ...], positions: np.ndarray, affine: np.ndarray):
  """Every slice where the affine puts it: the first pixel of slice k (RAS mm) at
  affine @ (0, 0, k), to within the tolerance. Uniform spacing is checked already, so a slice
  off the grid here means slices not stacked along their normal."""
  k = np.arange(len(positions))
  off = np.linalg.norm(positions - (affine[:3, 3] + k[:, None] * affine[:3, 2]), axis=1)
  step = float(np.linalg.norm(affine[:3, 2]))
  tolerance = max(SLICE_POSITION_ATOL_MM, SLICE_POSITION_RTOL * step)
  worst = int(np.argmax(off))
  if off[worst] > tolerance:
    raise DataError(
      folder,
      'the slices are not stacked along their normal (sheared, e.g. a gantry tilt)',
      found=f'{os.path.basename(files[worst])} lies {off[worst]:.3g} mm off the grid of the '
      f'first slice, its orientation and a {step:.4g} mm step',
      expected=f'every slice on that grid to within {tolerance:.3g} mm',
    )
