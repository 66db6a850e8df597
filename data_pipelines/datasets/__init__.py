"""Slice datasets: settings and splits (`params`), raw folders and whole volumes (`sources`),
TFDS builders (`builders`, imported on demand: it pulls in TensorFlow)."""

from data_pipelines.datasets.params import (
  DATASETS,
  SPLITS,
  SUBJECT_TIMEPOINT_PATTERN,
  DatasetParams,
  assign_splits,
  params_from_config,
  split_sizes,
  subject_and_timepoint,
)
from data_pipelines.datasets.sources import VolumeSource, open_folder, volume_source, volume_sources

__all__ = [
  'DATASETS',
  'SPLITS',
  'SUBJECT_TIMEPOINT_PATTERN',
  'DatasetParams',
  'VolumeSource',
  'assign_splits',
  'open_folder',
  'params_from_config',
  'split_sizes',
  'subject_and_timepoint',
  'volume_source',
  'volume_sources',
]
