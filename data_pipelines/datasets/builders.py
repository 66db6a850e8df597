"""TFDS builders of per-slice examples: phantom_knee, phantom_hip, oai_zib, nifti_folder.

Each builder reads its raw folder through `sources` (cases, splits by subject, `load_volume`)
and stores the examples of `slice_examples.slice_examples` for the splits 'train',
'validation' and 'test' (a split with no case is left out). The builder config is made from
the experiment config (`builder_for(config, data_dir)`); its name is a digest of every setting
that changes what is stored, so different settings never share a cache.

A build that fails part-way leaves nothing loadable: TFDS writes into an `incomplete.*` folder
beside the version folder and renames it only when every split is written (and removes it on a
Python exception); a killed build's `incomplete.*` folder is never read as a version, and the
next build makes a fresh one. Bump VERSION whenever the stored examples change meaning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from data_pipelines import readers, slice_examples, tissues
from data_pipelines.datasets import params as params_lib
from data_pipelines.datasets import sources
from data_pipelines.datasets.params import DatasetParams, params_from_config
from data_pipelines.errors import DataError

VERSION = tfds.core.Version('1.0.0')

# Building and reading datasets is CPU work: keep TensorFlow off the GPUs, which belong to JAX.
# (Only possible before TensorFlow's first op; later, a GPU would already be visible to it.)
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass


@dataclasses.dataclass(eq=False, repr=False)
class SliceBuilderConfig(tfds.core.BuilderConfig):
  """A TFDS builder config carrying the `DatasetParams` it was named after."""

  params: DatasetParams | None = None

  def __repr__(self) -> str:  # TFDS logs it; the settings are in `description`
    return f'SliceBuilderConfig({self.name!r})'


def builder_config(params: DatasetParams) -> SliceBuilderConfig:
  return SliceBuilderConfig(
    name=params.config_name, version=VERSION, description=params.describe(), params=params
  )


def features(channels: int) -> tfds.features.FeaturesDict:
  """The stored example (see `slice_examples`); H, W and the instance count N vary."""
  levels = len(slice_examples.PERCENTILE_LEVELS)
  tensor = tfds.features.Tensor
  return tfds.features.FeaturesDict(
    {
      # Raw bytes: MR intensities barely compress, and decoding stays cheap.
      'image': tensor(shape=(None, None, channels), dtype=np.float32, encoding='bytes'),
      'classes': tensor(shape=(None,), dtype=np.int32),
      'boxes': tensor(shape=(None, 4), dtype=np.float32),
      'masks': tensor(shape=(None, None, None), dtype=np.uint8, encoding='zlib'),
      'case_id': tfds.features.Text(),
      'slice_index': tensor(shape=(), dtype=np.int32),
      'pixel_spacing': tensor(shape=(2,), dtype=np.float32),
      'slice_thickness': tensor(shape=(), dtype=np.float32),
      'intensity_percentiles': tensor(shape=(levels,), dtype=np.float32),
    }
  )


class SliceDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body of the slice builders; subclasses only name the dataset."""

  VERSION = VERSION
  RELEASE_NOTES = {'1.0.0': 'Per-slice instances, 2.5D context, per-volume percentiles.'}

  def __init__(self, *, config: SliceBuilderConfig, **kwargs: Any):
    if not isinstance(config, SliceBuilderConfig) or config.params is None:
      raise ValueError(
        f'{type(self).__name__} needs a SliceBuilderConfig made by builder_config(params)'
      )
    if config.params.dataset != self.name:
      raise ValueError(f'builder {self.name!r} given params of dataset {config.params.dataset!r}')
    super().__init__(config=config, **kwargs)

  @property
  def params(self) -> DatasetParams:
    return self.builder_config.params

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=(
        f'{self.name}: 2D slices of 3D MRI with instance classes, boxes and masks. '
        f'Settings: {self.params.describe()}. Percentile levels: '
        f'{slice_examples.PERCENTILE_LEVELS}.'
      ),
      features=features(self.params.channels),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    if not self.params.is_phantom:
      dl_manager.manual_dir  # noqa: B018 -- raises TFDS's instructions if the folder is missing
    return {
      split: self._generate_examples(source)
      for split, source in sources.volume_sources(self.params, self.data_dir_root).items()
      if source.cases
    }

  def _generate_examples(self, source: sources.VolumeSource):
    p = self.params
    settings = slice_examples.SliceSettings(
      class_map=p.class_map,
      instance_mode=p.instance_mode,
      min_pixels=p.min_instance_pixels,
      empty_slice_rate=p.empty_slice_rate,
      context_slices=p.context_slices,
      seed=p.seed,
    )
    count = 0
    values_seen: set[int] = set()
    for case in source.cases:
      volume = source.load(case)
      values_seen.update(int(v) for v in np.unique(volume.labels))
      for key, example in slice_examples.slice_examples(volume, settings):
        count += 1
        yield key, example
    if source.split == 'train':
      check_classes_present(p, values_seen - {0}, source)
    if not count:  # TFDS cannot store an empty split; say why it is empty
      raise DataError(
        f'split {source.split!r} of {self.name}',
        'no slice to store',
        found=f'{len(source.cases)} case(s) {[c.case_id for c in source.cases]} '
        f'without any instance of label values {p.class_label_values} '
        f'(min_instance_pixels={p.min_instance_pixels}) and '
        f'empty_slice_rate={p.empty_slice_rate}',
        expected='a positive data.empty_slice_rate, or other data.split_fractions (now '
        f'{p.split_fractions}, {params_lib.pattern_note(p.subject_pattern)})',
      )


def check_classes_present(
  params: DatasetParams, values_seen: set[int], source: sources.VolumeSource
) -> None:
  """A DataError when a class has no voxel in any training label map: the model would learn
  nothing of it and validation could not tell. When the values found are those of another
  known label scheme (tissues.KNOWN_SCHEMES, e.g. ZIB's bone-only classification masks), the
  message names it."""
  canonical = {params.class_map[v] for v in values_seen if v in params.class_map}
  absent = [
    entry
    for class_id, entry in enumerate(params.class_label_values, start=1)
    if class_id not in canonical
  ]
  if not absent:
    return
  found = f'label values {sorted(values_seen)} in the {len(source.cases)} training case(s)'
  schemes = [
    name
    for name, labels in tissues.KNOWN_SCHEMES.items()
    if {v for v in labels.values() if v} == values_seen
    and set(labels.values()) - {0} != set(params.all_label_values)
  ]
  if schemes:
    found += f', which are those of {schemes[0]} ({_scheme_text(schemes[0])})'
  first = source.cases[0]
  label_path = first.labels.get(source.reader or readers.DEFAULT_READER) or next(
    iter(first.labels.values()), None
  )
  raise DataError(
    os.path.dirname(label_path) if label_path else f'training split of {params.dataset}',
    f'config data.class_label_values entries {absent} never occur in the training labels; '
    'the model would never learn them',
    found=found,
    expected='label maps holding every class (the right label folder or files), or '
    'data.class_names / data.class_label_values naming only the classes they hold',
  )


def _scheme_text(name: str) -> str:
  return ', '.join(f'{v} {n}' for n, v in tissues.KNOWN_SCHEMES[name].items() if v)


class PhantomKnee(SliceDatasetBuilder):
  """Procedural knee MRI phantoms (labels 1 femur, 2 femoral cartilage, 3 tibia,
  4 tibial cartilage, 5 effusion), generated locally; nothing is downloaded."""


class PhantomHip(SliceDatasetBuilder):
  """Procedural hip MRI phantoms (label 1 effusion; two simulated readers), generated locally."""


class OaiZib(SliceDatasetBuilder):
  """The original OAI-ZIB release (MetaImage masks) beside the OAI DESS images as NIfTI."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the OAI-ZIB data in the manual folder (config data.manual_dir):
    images/<id>.nii.gz                                 the OAI DESS scans, converted from DICOM
                                                       to NIfTI by a converter that writes a
                                                       correct affine (dicom2nifti, dcm2niix)
    segmentation_masks/<id>.segmentation_masks.mhd     the ZIB masks (+ .raw), from
                                                       https://pubdata.zib.de (OAI-ZIB)
  The OAI images need an OAI data use agreement (https://nda.nih.gov/oai). See docs/data.md
  for how the pose-less masks are aligned to the images.
  """


class NiftiFolder(SliceDatasetBuilder):
  """Any nnU-Net-style NIfTI folder (e.g. OAIZIB-CM, effusion studies)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Point config data.manual_dir at an nnU-Net-style folder:
    dataset.json                      "labels" (name -> value), optional "plane", "readers"
    imagesTr/<id>_0000.nii.gz         single-channel images
    labelsTr/<id>.nii.gz              reference label maps
    labelsTr_<reader>/<id>.nii.gz     optional, one folder per extra reader
  See docs/data.md.
  """


BUILDERS = {cls.name: cls for cls in (PhantomKnee, PhantomHip, OaiZib, NiftiFolder)}


def builder_for(config: Any, data_dir: str | os.PathLike) -> SliceDatasetBuilder:
  """The (possibly not yet prepared) builder of an experiment config, stored under data_dir."""
  params = params_from_config(config, data_dir)
  return BUILDERS[params.dataset](config=builder_config(params), data_dir=os.fspath(data_dir))


def prepare(config: Any, data_dir: str | os.PathLike) -> SliceDatasetBuilder:
  """`builder_for` after building the dataset if it is not stored yet (a no-op when it is)."""
  builder = builder_for(config, data_dir)
  if not builder.is_prepared():
    manual_dir = builder.params.source_dir
    tfds.disable_progress_bar()  # a bar per split and a line per shard would fill the screen
    # TFDS prints 'Downloading and preparing dataset ...' (nothing is downloaded): log it.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
      )
    logging.info('%s', printed.getvalue().strip())
  return builder
