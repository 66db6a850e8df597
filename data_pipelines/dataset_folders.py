"""The two dataset folder layouts, listed into cases (`readers.Case`) with their dataset.json
labels checked; `readers.load_volume` then reads a case.

* `NnunetFolder`: the nnU-Net layout (`dataset.json`, `imagesTr/<id>_0000.nii.gz`,
  `labelsTr/<id>.nii.gz`, `imagesTs/`), plus one `labelsTr_<reader>/` folder per extra reader
  (effusion studies, phantoms). The public NIfTI release of OAI-ZIB (OAIZIB-CM) uses it.
* `OaiZibFolder`: the original OAI-ZIB release, MetaImage masks `<id>.segmentation_masks.mhd`
  next to the OAI DESS images converted to NIfTI; the masks carry no pose and are put on the
  image grid by `readers.MaskAlignment` (docs/data.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from data_pipelines import nifti_io, orientation
from data_pipelines.errors import DataError
from data_pipelines.readers import (
  DEFAULT_READER,
  OAI_ZIB_LABELS,
  OAI_ZIB_MASK_SUFFIX,
  Case,
  MaskAlignment,
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
