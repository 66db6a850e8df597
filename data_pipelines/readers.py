"""Dataset folders -> cases -> checked volumes in canonical orientation -> slices.

Two folder layouts are read:

* `NnunetFolder`: the nnU-Net layout (`dataset.json`, `imagesTr/<id>_0000.nii.gz`,
  `labelsTr/<id>.nii.gz`, `imagesTs/`), plus one `labelsTr_<reader>/` folder per extra reader
  (effusion studies, phantoms). The public NIfTI release of OAI-ZIB (OAIZIB-CM) uses it.
* `OaiZibFolder`: the original OAI-ZIB release, MetaImage masks `<id>.segmentation_masks.mhd`
  next to the OAI DESS images converted to NIfTI. The masks carry no pose; they are put on the
  image grid by `MaskAlignment` (see docs/data.md for the default and how it was checked).

`load_volume` reads one case into a `Volume` (canonical RAS+ arrays, spacing, the `SourceGrid`
to go back), and `slices` cuts it along an anatomical plane. A case's image may also be a
folder holding one DICOM series (`dicom_io`; predict's input), read to the same `Volume`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

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


class NnunetFolder:
  """An nnU-Net-style dataset folder (single-channel images).

  Attributes: root; labels (name -> value, from dataset.json, v1 or v2 style); plane (our key
  "plane", or None); readers (DEFAULT_READER for labelsTr/ if present, then the names of the
  `labelsTr_<name>/` folders, from dataset.json "readers" or, without that key, as found);
  file_ending (".nii.gz" unless dataset.json says otherwise; our key "label_file_ending"
  may give the label files another one, e.g. compressed labels beside uncompressed images,
  as `data_pipelines.prepare` writes them). An official test set is
  `imagesTs/` with its labels in `labelsTs/` (and `labelsTs_<reader>/`), read as the 'test'
  split when present (`has_labelled_test`).
  """

  def __init__(self, root: str | os.PathLike):
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise DataError(self.root, 'dataset folder not found')
    json_path = os.path.join(self.root, 'dataset.json')
    meta = _read_json(json_path)
    self.labels = _parse_label_names(meta.get('labels'), json_path)
    self.plane = meta.get('plane')
    if self.plane is not None and self.plane not in orientation.PLANES:
      raise DataError(json_path, 'unknown "plane"', found=self.plane, expected=orientation.PLANES)
    self.file_ending = meta.get('file_ending', '.nii.gz')
    if self.file_ending not in nifti_io.NIFTI_SUFFIXES:
      raise DataError(
        json_path,
        'unsupported "file_ending"',
        found=self.file_ending,
        expected=nifti_io.NIFTI_SUFFIXES,
      )
    self.label_file_ending = meta.get('label_file_ending', self.file_ending)
    if self.label_file_ending not in nifti_io.NIFTI_SUFFIXES:
      raise DataError(
        json_path,
        'unsupported "label_file_ending"',
        found=self.label_file_ending,
        expected=nifti_io.NIFTI_SUFFIXES,
      )
    channels = meta.get('channel_names', meta.get('modality', {'0': 'image'}))
    if len(channels) != 1:
      raise DataError(
        json_path,
        'only single-channel datasets are supported',
        found=f'{len(channels)} channels {channels}',
        expected='1 channel',
      )
    self._reader_dirs = self._find_reader_dirs(meta.get('readers'), json_path)
    self.readers = tuple(self._reader_dirs)
    # labelsTr/ -> labelsTs/, labelsTr_<reader>/ -> labelsTs_<reader>/, where present.
    self._test_reader_dirs = {}
    for reader, folder in self._reader_dirs.items():
      suffix = os.path.basename(folder)[len('labelsTr') :]
      test_folder = os.path.join(self.root, 'labelsTs' + suffix)
      if os.path.isdir(test_folder):
        self._test_reader_dirs[reader] = test_folder

  @property
  def has_labelled_test(self) -> bool:
    """Whether the folder has an official labelled test set (`imagesTs/` with `labelsTs/`)."""
    return bool(self._test_reader_dirs) and os.path.isdir(os.path.join(self.root, 'imagesTs'))

  def cases(self, split: str = 'train') -> list[Case]:
    """Cases of `imagesTr` ('train', with labels of every reader) or `imagesTs` ('test', with
    the labels of `labelsTs/` and `labelsTs_<reader>/` where those folders exist)."""
    if split not in ('train', 'test'):
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_dir = os.path.join(self.root, 'imagesTr' if split == 'train' else 'imagesTs')
    if not os.path.isdir(images_dir):
      if split == 'test':
        return []
      raise DataError(images_dir, 'image folder not found')
    images = self._list_images(images_dir)
    reader_dirs = self._reader_dirs if split == 'train' else self._test_reader_dirs
    for reader, folder in reader_dirs.items():
      extra = sorted(set(_list_files(folder, self.label_file_ending)) - set(images))
      if extra:
        raise DataError(
          os.path.join(folder, extra[0] + self.label_file_ending),
          f'label file has no image in {os.path.basename(images_dir)}/',
          found=f'{len(extra)} such label file(s) for reader {reader!r}',
          expected=f'{os.path.join(images_dir, extra[0])}_0000{self.file_ending}',
        )
    cases = []
    for case_id, image_path in sorted(images.items()):
      labels = {}
      for reader, folder in reader_dirs.items():
        label_path = os.path.join(folder, case_id + self.label_file_ending)
        if not os.path.isfile(label_path):
          raise DataError(
            label_path,
            f'label file of reader {reader!r} not found',
            expected=f'one label per image in {os.path.basename(images_dir)}/',
          )
        labels[reader] = label_path
      cases.append(Case(case_id, image_path, labels))
    return cases

  def _list_images(self, images_dir: str) -> dict[str, str]:
    images = {}
    for name in _list_files(images_dir, self.file_ending):
      case_id, sep, channel = name.rpartition('_')
      if not sep or not channel.isdigit() or len(channel) != 4:
        raise DataError(
          os.path.join(images_dir, name + self.file_ending),
          'image name lacks the nnU-Net channel suffix',
          expected=f'<case id>_0000{self.file_ending}',
        )
      if channel != '0000':
        raise DataError(
          os.path.join(images_dir, name + self.file_ending),
          'only single-channel datasets are supported',
          found=f'channel {channel}',
          expected='channel 0000 only',
        )
      images[case_id] = os.path.join(images_dir, name + self.file_ending)
    return images

  def _find_reader_dirs(self, listed: Sequence[str] | None, json_path: str) -> dict[str, str]:
    dirs = {}
    default_dir = os.path.join(self.root, 'labelsTr')
    if os.path.isdir(default_dir):
      dirs[DEFAULT_READER] = default_dir
    if listed is None:
      listed = sorted(
        name[len('labelsTr_') :]
        for name in os.listdir(self.root)
        if name.startswith('labelsTr_') and os.path.isdir(os.path.join(self.root, name))
      )
    elif isinstance(listed, str) or not all(isinstance(r, str) for r in listed):
      raise DataError(json_path, '"readers" must be a list of names', found=listed)
    for reader in listed:
      folder = os.path.join(self.root, f'labelsTr_{reader}')
      if not os.path.isdir(folder):
        raise DataError(
          folder, f'label folder of reader {reader!r} (listed in dataset.json) not found'
        )
      dirs[reader] = folder
    return dirs


class OaiZibFolder:
  """The original OAI-ZIB layout: NIfTI images and MetaImage masks in two folders.

  `<root>/<images>/<id>.nii.gz` (or .nii): the OAI DESS scan converted from DICOM by any tool
  that writes a correct affine; `<root>/<masks>/<id>.segmentation_masks.mhd` (+ .raw): the ZIB
  mask, labels 0-4. Cases are the images; an image without a mask is an unlabelled case, and
  masks without an image are listed in `orphan_masks` (a converted subset is a normal setup).
  """

  def __init__(
    self,
    root: str | os.PathLike,
    *,
    images: str = 'images',
    masks: str = 'segmentation_masks',
    alignment: MaskAlignment = MaskAlignment(),
  ):
    self.root = os.fspath(root)
    self.images_dir = os.path.join(self.root, images)
    self.masks_dir = os.path.join(self.root, masks)
    for folder in (self.images_dir, self.masks_dir):
      if not os.path.isdir(folder):
        raise DataError(folder, 'OAI-ZIB folder not found')
    self.alignment = alignment
    self.labels = dict(OAI_ZIB_LABELS)
    self.plane = 'sagittal'
    self.readers = (DEFAULT_READER,)
    self._images = {}
    for name in sorted(os.listdir(self.images_dir)):
      if not name.startswith('.') and nifti_io.is_nifti_path(name):
        case_id = nifti_io.strip_nifti_suffix(name)
        if case_id in self._images:
          raise DataError(
            os.path.join(self.images_dir, name),
            'two images for one case',
            found=f'also {self._images[case_id]}',
            expected='one file per case',
          )
        self._images[case_id] = os.path.join(self.images_dir, name)
    self._masks = {
      name[: -len(OAI_ZIB_MASK_SUFFIX)]: os.path.join(self.masks_dir, name)
      for name in sorted(os.listdir(self.masks_dir))
      if name.endswith(OAI_ZIB_MASK_SUFFIX) and not name.startswith('.')
    }
    self.orphan_masks = tuple(self._masks[i] for i in sorted(set(self._masks) - set(self._images)))

  def cases(self, split: str = 'train') -> list[Case]:
    """'train': images that have a mask; 'test': images without one."""
    if split not in ('train', 'test'):
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    labelled = split == 'train'
    return [
      Case(
        case_id, path, {DEFAULT_READER: self._masks[case_id]} if labelled else {}, self.alignment
      )
      for case_id, path in sorted(self._images.items())
      if (case_id in self._masks) == labelled
    ]


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


def _parse_label_names(labels: object, json_path: str) -> dict[str, int]:
  """dataset.json "labels" in v2 style (name -> value) or v1 style ("value" -> name)."""
  if not isinstance(labels, dict) or not labels:
    raise DataError(
      json_path,
      '"labels" missing or empty',
      found=labels,
      expected='{"background": 0, "<name>": <value>, ...}',
    )
  try:
    if all(isinstance(v, str) for v in labels.values()):
      parsed = {name: int(value) for value, name in labels.items()}
    else:
      parsed = {name: int(value) for name, value in labels.items()}
  except (TypeError, ValueError) as e:
    raise DataError(
      json_path,
      '"labels" has a value that is not an integer',
      found=labels,
      expected='name -> integer value (region lists are not supported)',
    ) from e
  if any(not 0 <= v <= 255 for v in parsed.values()):
    raise DataError(json_path, '"labels" value out of range', found=parsed, expected='0..255')
  return parsed


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise DataError(path, 'file not found')
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(path, f'not valid JSON: {e}') from e
  if not isinstance(meta, dict):
    raise DataError(path, 'top level is not a JSON object', found=type(meta).__name__)
  return meta


def _list_files(folder: str, ending: str) -> list[str]:
  """Names (without `ending`) of the visible files in `folder` that end in `ending`; hidden
  files are skipped, so half-written temporaries of atomic writes are never read."""
  return sorted(
    name[: -len(ending)]
    for name in os.listdir(folder)
    if name.endswith(ending) and not name.startswith('.')
  )
