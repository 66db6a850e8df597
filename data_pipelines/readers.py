"""Cases -> checked volumes in canonical orientation -> slices.

The two dataset folder layouts (nnU-Net's, and the original OAI-ZIB release whose MetaImage
masks `MaskAlignment` puts on the image grid) are listed into `Case`s by dataset_folders.py.

`load_volume` reads one case into a `Volume` (canonical RAS+ arrays, spacing, the `SourceGrid`
to go back), and `slices` cuts it along an anatomical plane. A case's image may also be a
folder holding one DICOM series (`dicom_io`; predict's input), read to the same `Volume`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from nibabel import orientations as ornts

from data_pipelines import dicom_io, metaimage, nifti_io, orientation, tissues
from data_pipelines.errors import DataError

DEFAULT_READER = 'default'  # the reader name of `labelsTr/` (the reference segmentation)
AFFINE_ATOL_MM = 1e-3  # image/label affines must agree entry-wise to within this (mm)
OAI_ZIB_LABELS = tissues.OAI_ZIB_LABELS
OAI_ZIB_MASK_SUFFIX = '.segmentation_masks.mhd'


@dataclasses.dataclass(frozen=True)
class MaskAlignment:
  """How a pose-less MetaImage mask ([x, y, z] in DimSize order) lands on its image's voxel array.

  axcodes: the anatomical direction each mask axis points to. The mask is permuted/flipped so
  that its axes point the way the image's axes do (read from the image affine), whatever tool
  converted the image from DICOM. The OAI-ZIB default ('L', 'P', 'S') is derived in docs/data.md.
  ornt: an explicit nibabel orientation array, row i = (image axis that mask axis i becomes,
  +1 or -1 for a flip); when given it is applied as is and the image affine is not consulted.
  """

  axcodes: tuple[str, str, str] = ('L', 'P', 'S')
  ornt: tuple[tuple[int, int], ...] | None = None

  def mask_to_image(self, image_affine: np.ndarray) -> np.ndarray:
    """The orientation transform [3, 2] from mask array axes to image array axes."""
    if self.ornt is not None:
      return np.asarray(self.ornt, dtype=np.float64)
    return ornts.ornt_transform(
      ornts.axcodes2ornt(self.axcodes), ornts.io_orientation(image_affine)
    )

  def describe(self) -> str:
    return f'ornt={self.ornt}' if self.ornt is not None else f'axcodes={self.axcodes}'


@dataclasses.dataclass(frozen=True)
class Case:
  """One scan: its image file and its label files by reader name (empty when unlabelled)."""

  case_id: str
  image: str
  labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
  mask_alignment: MaskAlignment | None = None  # for MetaImage label files only


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
  """A case in canonical RAS+ orientation.

  image: float32 [X, Y, Z]; labels: uint8 [X, Y, Z] or None; spacing: mm along X, Y, Z;
  grid: the original grid (to write predictions back exactly); plane: the anatomical plane the
  volume is meant to be sliced along; image_path / label_path / reader: where it came from.
  """

  case_id: str
  image: np.ndarray
  labels: np.ndarray | None
  spacing: tuple[float, float, float]
  grid: orientation.SourceGrid
  plane: str
  image_path: str
  label_path: str | None
  reader: str | None


@dataclasses.dataclass(frozen=True, eq=False)
class Slice:
  """One 2D slice. image: float32 [H, W]; labels: uint8 [H, W] or None; index: position along
  the plane's slice axis in the canonical volume; pixel_spacing: (row_mm, col_mm)."""

  case_id: str
  index: int
  image: np.ndarray
  labels: np.ndarray | None
  pixel_spacing: tuple[float, float]
  thickness: float


@dataclasses.dataclass(frozen=True, eq=False)
class SliceStack:
  """All slices of a volume along one plane, and the way back to the original grid.

  images: float32 [n, H, W]; labels: uint8 [n, H, W] or None. `to_original` turns a stack of
  per-slice predictions [n, H, W, ...] into an array on the file's grid, for `grid.affine`.
  """

  case_id: str
  plane: str
  images: np.ndarray
  labels: np.ndarray | None
  pixel_spacing: tuple[float, float]
  thickness: float
  grid: orientation.SourceGrid

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def __getitem__(self, index: int) -> Slice:
    index = range(len(self))[index]
    labels = None if self.labels is None else self.labels[index]
    return Slice(
      self.case_id, index, self.images[index], labels, self.pixel_spacing, self.thickness
    )

  def __iter__(self) -> Iterator[Slice]:
    return (self[i] for i in range(len(self)))

  def to_canonical(self, stack: np.ndarray) -> np.ndarray:
    """[n, H, W, ...] -> canonical [X, Y, Z, ...]."""
    return orientation.slices_to_volume(stack, self.plane)

  def to_original(self, stack: np.ndarray) -> np.ndarray:
    """[n, H, W, ...] -> [I, J, K, ...] on the original grid (save with `grid.affine`)."""
    return self.grid.to_original(self.to_canonical(stack))


def slices(volume: Volume, plane: str | None = None) -> SliceStack:
  """Cuts `volume` into upright 2D slices along `plane` (default: the volume's own plane)."""
  plane = plane or volume.plane
  labels = None if volume.labels is None else orientation.volume_to_slices(volume.labels, plane)
  return SliceStack(
    case_id=volume.case_id,
    plane=plane,
    images=orientation.volume_to_slices(volume.image, plane),
    labels=labels,
    pixel_spacing=orientation.pixel_spacing(volume.spacing, plane),
    thickness=orientation.slice_thickness(volume.spacing, plane),
    grid=volume.grid,
  )


def load_volume(
  case: Case,
  *,
  plane: str,
  label_values: Iterable[int] | Mapping[int, int] | Mapping[str, int] | None,
  reader: str | None = None,
  affine_atol: float = AFFINE_ATOL_MM,
  allow_missing_pose: bool = False,
) -> Volume:
  """Reads and checks one case, and returns it in canonical RAS+ orientation.

  label_values: the label values the config knows; 0 is always allowed. Either values, a
    value -> class id map (its keys are used) or a name -> value map like dataset.json "labels"
    (its values are used). Any other value in the label file is a DataError listing the values
    and their voxel counts. None skips the check.
  reader: which label file (`case.labels` key). None: DEFAULT_READER if present, else the only
    reader; a case without labels gives labels=None.
  affine_atol: the image and a NIfTI label map must have the same shape and affines equal
    entry-wise to within this many mm (MetaImage masks take the image's affine).
  allow_missing_pose: read an image whose header lost the scanner pose
    (`nifti_io.pose_problem`) as if its array axes were R, A, S; refused by default.
  """
  orientation.plane_axes(plane)
  image = load_image_file(case.image, allow_missing_pose=allow_missing_pose)
  grid = orientation.SourceGrid.from_affine(image.shape, image.affine)
  label_path = _pick_reader(case, reader)
  labels = None
  if label_path is not None:
    if label_path.endswith('.mhd'):
      labels = aligned_mask(label_path, image, case.mask_alignment or MaskAlignment())
    else:
      labels = _matching_labels(label_path, image, affine_atol)
    if label_values is not None:
      _check_label_values(labels, label_path, label_values)
    labels = grid.to_canonical(labels)
  return Volume(
    case_id=case.case_id,
    image=grid.to_canonical(image.data),
    labels=labels,
    spacing=grid.canonical_spacing,
    grid=grid,
    plane=plane,
    image_path=image.path,
    label_path=label_path,
    reader=None if label_path is None else _reader_name(case, label_path),
  )


def load_image_file(
  path: str | os.PathLike, *, allow_missing_pose: bool = False
) -> nifti_io.NiftiVolume:
  """A scan as stored: a NIfTI file, or a folder holding one DICOM series (`dicom_io`, read to
  the array and affine a NIfTI file of it has). A NIfTI file without the scanner pose is a
  DataError unless `allow_missing_pose` (then its array axes are taken as R, A, S)."""
  if os.path.isdir(path):
    return dicom_io.load_dicom_series(path)
  image = nifti_io.load_nifti_image(path)
  if image.pose_problem and not allow_missing_pose:
    raise DataError(
      image.path,
      f'image has no scanner pose: {image.pose_problem}',
      expected='a NIfTI converted with its orientation (dcm2niix, dicom2nifti), or config '
      'data.allow_missing_pose=True (predict: --allow_missing_pose) to read its array axes '
      'as R, A, S',
    )
  return image


def _pick_reader(case: Case, reader: str | None) -> str | None:
  if reader is not None:
    if reader not in case.labels:
      raise DataError(
        f'case {case.case_id}',
        f'no labels from reader {reader!r}',
        expected=f'one of {sorted(case.labels)}',
      )
    return case.labels[reader]
  if not case.labels:
    return None
  if DEFAULT_READER in case.labels:
    return case.labels[DEFAULT_READER]
  if len(case.labels) == 1:
    return next(iter(case.labels.values()))
  raise DataError(
    f'case {case.case_id}',
    'several readers and none chosen',
    found=sorted(case.labels),
    expected='reader=<one of them>',
  )


def _reader_name(case: Case, label_path: str) -> str:
  return next(name for name, path in case.labels.items() if path == label_path)


def _matching_labels(path: str, image: nifti_io.NiftiVolume, atol: float) -> np.ndarray:
  labels = nifti_io.load_nifti_labels(path)
  if labels.shape != image.shape:
    raise DataError(
      path,
      f'label map shape differs from its image {image.path}',
      found=labels.shape,
      expected=image.shape,
    )
  difference = np.abs(labels.affine - image.affine).max()
  if difference > atol:
    raise DataError(
      path,
      f'label map affine differs from its image {image.path} by up to {difference:.4g} mm',
      found=np.array2string(labels.affine, precision=4),
      expected=f'{np.array2string(image.affine, precision=4)} (tolerance {atol} mm)',
    )
  return labels.data


def aligned_mask(
  path: str, image: nifti_io.NiftiVolume | nifti_io.NiftiHeader, alignment: MaskAlignment
) -> np.ndarray:
  """A pose-less MetaImage mask as uint8 on its image's voxel array ([X, Y, Z] of `image`)."""
  mask = metaimage.read_metaimage(path)
  if mask.data.ndim != 3:
    raise DataError(
      path, 'mask is not a 3D volume', found=f'shape {mask.data.shape}', expected='3 dimensions'
    )
  data = nifti_io.labels_to_uint8(mask.data, path)
  transform = alignment.mask_to_image(image.affine)
  aligned = ornts.apply_orientation(data, transform)
  if aligned.shape != image.shape:
    image_axes = ''.join(ornts.aff2axcodes(image.affine))
    raise DataError(
      path,
      f'mask does not fit its image {image.path} (image axes {image_axes}) '
      f'under the alignment {alignment.describe()}',
      found=f'mask shape {mask.data.shape} -> {aligned.shape}',
      expected=f'image shape {image.shape}',
    )
  return np.ascontiguousarray(aligned)


def _check_label_values(
  labels: np.ndarray, path: str, label_values: Iterable[int] | Mapping[int | str, int]
) -> None:
  if isinstance(label_values, Mapping) and any(isinstance(k, str) for k in label_values):
    label_values = label_values.values()
  allowed = {0} | {int(v) for v in label_values}
  values, counts = np.unique(labels, return_counts=True)
  bad = [(int(v), int(c)) for v, c in zip(values, counts) if int(v) not in allowed]
  if bad:
    raise DataError(
      path,
      'label values outside the label map',
      found=', '.join(f'value {v}: {c} voxels' for v, c in bad),
      expected=f'values in {sorted(allowed)}',
    )
