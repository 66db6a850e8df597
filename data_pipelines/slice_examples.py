"""One volume -> the per-slice training examples every dataset builder stores.

A slice example holds what the input pipeline needs and nothing model-specific:

  image                  float32 [H, W, C]   C = 2 * context_slices + 1 neighbouring slices, the
                                             centre slice in channel `context_slices`; slices
                                             beyond the volume's ends repeat the end slice
  classes                int32 [N]           instance class ids (>= 1)
  boxes                  float32 [N, 4]      tight (y1, x1, y2, x2) in pixels of this slice
  masks                  uint8 [N, H, W]     0/1 instance masks
  case_id                str
  slice_index            int32               position along the plane's slice axis
  pixel_spacing          float32 [2]         (row_mm, col_mm)
  slice_thickness        float32             mm between neighbouring slice centres
  intensity_percentiles  float32 [K]         the whole volume's intensity at PERCENTILE_LEVELS

The percentiles are of the whole volume so that every slice of a volume is normalised the same
way (per-volume percentile normalisation), whatever slices were kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import instances as instances_lib
from data_pipelines import readers
from data_pipelines.errors import DataError

# Percent levels stored with every slice; the input pipeline picks its normalisation range from
# these (config `data.normalize_percentiles` must name two of them).
PERCENTILE_LEVELS = (0.0, 0.5, 1.0, 2.0, 5.0, 50.0, 95.0, 98.0, 99.0, 99.5, 100.0)


@dataclasses.dataclass(frozen=True)
class SliceSettings:
  """How a labelled volume becomes slice examples.

  class_map: label value -> class id (>= 1); other label values are background.
  instance_mode / min_pixels: see `instances.extract_instances`.
  empty_slice_rate: fraction of the slices without any instance that are kept.
  context_slices: neighbours on each side stacked as extra channels (2.5D); 0 = single slice.
  seed: for the choice of the kept empty slices (with the case id as key).
  """

  class_map: Mapping[int, int]
  instance_mode: str = 'per_class'
  min_pixels: int = 1
  empty_slice_rate: float = 0.0
  context_slices: int = 0
  seed: int = 0

  def __post_init__(self):
    if self.context_slices < 0:
      raise ValueError(f'context_slices must be >= 0, got {self.context_slices}')
    if self.instance_mode not in instances_lib.MODES:
      raise ValueError(
        f'instance_mode must be one of {instances_lib.MODES}, got {self.instance_mode!r}'
      )
    if self.min_pixels < 1:
      raise ValueError(f'min_pixels must be >= 1, got {self.min_pixels}')
    if not 0.0 <= self.empty_slice_rate <= 1.0:
      raise ValueError(f'empty_slice_rate must be in [0, 1], got {self.empty_slice_rate}')

  @property
  def channels(self) -> int:
    return 2 * self.context_slices + 1


def context_indices(index: int, num_slices: int, context_slices: int) -> np.ndarray:
  """Slice indices of the channels of slice `index`: index - k .. index + k, clamped to the
  volume (the end slice is repeated), int64 [2k + 1]."""
  offsets = np.arange(-context_slices, context_slices + 1)
  return np.clip(index + offsets, 0, num_slices - 1)


def context_image(images: np.ndarray, index: int, context_slices: int) -> np.ndarray:
  """float32 [H, W, 2k + 1]: slice `index` of `images` [n, H, W] with its neighbours."""
  picks = context_indices(index, images.shape[0], context_slices)
  return np.ascontiguousarray(np.moveaxis(images[picks], 0, -1), dtype=np.float32)


def intensity_percentiles(
  image: np.ndarray, levels: Sequence[float] = PERCENTILE_LEVELS
) -> np.ndarray:
  """float32 [len(levels)]: the intensity of `image` (any shape) at each percent level."""
  return np.percentile(np.asarray(image, np.float32), levels).astype(np.float32)


def slice_examples(
  volume: readers.Volume, settings: SliceSettings
) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (key, example) for the kept slices of a labelled `volume`, in slice order.

  Slices are cut along `volume.plane`. The key '<case_id>/<slice index, 4 digits>' is unique
  within a dataset. Kept: every slice with at least one instance, and
  round(empty_slice_rate * number of empty slices) empty ones (`instances.select_slices`).
  """
  if volume.labels is None:
    raise DataError(
      volume.image_path,
      'case has no label map; training slices need labels',
      expected=f'a label file for case {volume.case_id}',
    )
  stack = readers.slices(volume)
  per_slice = [
    instances_lib.extract_instances(
      stack.labels[i],
      settings.class_map,
      mode=settings.instance_mode,
      min_pixels=settings.min_pixels,
    )
    for i in range(len(stack))
  ]
  keep = instances_lib.select_slices(
    np.array([len(x) > 0 for x in per_slice]),
    settings.empty_slice_rate,
    settings.seed,
    key=volume.case_id,
  )
  percentiles = intensity_percentiles(volume.image)
  for index in np.flatnonzero(keep):
    found = per_slice[index]
    yield (
      f'{volume.case_id}/{index:04d}',
      {
        'image': context_image(stack.images, int(index), settings.context_slices),
        'classes': found.classes.astype(np.int32),
        'boxes': found.boxes.astype(np.float32),
        'masks': found.masks.astype(np.uint8),
        'case_id': volume.case_id,
        'slice_index': np.int32(index),
        'pixel_spacing': np.array(stack.pixel_spacing, np.float32),
        'slice_thickness': np.float32(stack.thickness),
        'intensity_percentiles': percentiles,
      },
    )
