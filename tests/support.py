"""What tests build their inputs with and the package itself never needs: static-shape padding
of a slice's instances (the input pipeline pads in tf.data, `slice_transforms.select_instances`)
and a MetaImage writer (the original OAI-ZIB masks are .mhd files; the package only reads
them)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import numpy as np
import SimpleITK as sitk

from data_pipelines.atomic import remove_stale_temporaries
from data_pipelines.errors import DataError
from data_pipelines.instances import Instances

OVERFLOW_POLICIES = ('error', 'keep_largest')
_WRITABLE = {
  np.dtype(t)
  for t in (
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float32,
    np.float64,
  )
}


@dataclasses.dataclass(frozen=True, eq=False)
class PaddedInstances:
  """Static-shape instances. classes: int32 [M] (0 = padding); boxes: float32 [M, 4] (zeros for
  padding); masks: uint8 [M, H, W]; valid: bool [M]; num_dropped: instances left out by the
  'keep_largest' overflow policy."""

  classes: np.ndarray
  boxes: np.ndarray
  masks: np.ndarray
  valid: np.ndarray
  num_dropped: int = 0


def pad_instances(
  instances: Instances, max_instances: int, *, overflow: str = 'error', source: str = 'slice'
) -> PaddedInstances:
  """Pads (or trims) `instances` to exactly `max_instances` rows.

  overflow: what to do with more than `max_instances` instances. 'error' raises a DataError
    naming `source` (e.g. 'case knee_0001 slice 37'); 'keep_largest' keeps the largest masks
    (ties: earlier first), in their original order, and reports how many were dropped.
  """
  if overflow not in OVERFLOW_POLICIES:
    raise ValueError(f'overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}')
  if max_instances < 1:
    raise ValueError(f'max_instances must be >= 1, got {max_instances}')
  count = len(instances)
  keep = np.arange(count)
  if count > max_instances:
    if overflow == 'error':
      raise DataError(
        source,
        'more instances than the static maximum',
        found=count,
        expected=f'at most max_instances = {max_instances} (raise it, or use '
        "overflow='keep_largest')",
      )
    by_size = np.argsort(-instances.areas, kind='stable')[:max_instances]
    keep = np.sort(by_size)
  kept = len(keep)
  height, width = instances.masks.shape[1:]
  classes = np.zeros([max_instances], np.int32)
  boxes = np.zeros([max_instances, 4], np.float32)
  masks = np.zeros([max_instances, height, width], np.uint8)
  valid = np.zeros([max_instances], bool)
  classes[:kept] = instances.classes[keep]
  boxes[:kept] = instances.boxes[keep]
  masks[:kept] = instances.masks[keep]
  valid[:kept] = True
  return PaddedInstances(classes, boxes, masks, valid, num_dropped=count - kept)


def write_metaimage(
  path: str | os.PathLike,
  data: np.ndarray,
  spacing: tuple[float, ...] | None = None,
  *,
  compressed: bool = False,
) -> str:
  """Writes `data` ([x, y, z], DimSize order) as `path` (.mhd) plus a data file beside it.

  The data file is `<stem>.raw` (`<stem>.zraw` when `compressed`, zlib), little-endian. Both
  are written by SimpleITK into a hidden folder beside `path`, then moved into place data
  first, so a header never points at missing data. Returns the header path.
  """
  path = os.fspath(path)
  if not path.endswith('.mhd'):
    raise DataError(path, 'MetaImage header name must end in .mhd', found=os.path.basename(path))
  data = np.asarray(data)
  if data.dtype == bool:
    data = data.astype(np.uint8)
  native = data.dtype.newbyteorder('=')
  if native not in _WRITABLE:
    raise DataError(
      path,
      'unsupported array type for MetaImage',
      found=data.dtype,
      expected=', '.join(sorted(str(t) for t in _WRITABLE)),
    )
  spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * data.ndim
  if len(spacing) != data.ndim:
    raise DataError(
      path, 'spacing does not match the array', found=spacing, expected=f'{data.ndim} values'
    )
  image = sitk.GetImageFromArray(np.ascontiguousarray(data.astype(native).transpose()))
  image.SetSpacing(spacing)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  name = os.path.basename(path)
  data_name = name[: -len('.mhd')] + ('.zraw' if compressed else '.raw')
  remove_stale_temporaries(os.path.join(directory, name))
  tmp = tempfile.mkdtemp(prefix=f'.{name}.{os.getpid()}-', suffix='.tmp', dir=directory)
  try:
    sitk.WriteImage(image, os.path.join(tmp, name), useCompression=bool(compressed))
    os.replace(os.path.join(tmp, data_name), os.path.join(directory, data_name))
    os.replace(os.path.join(tmp, name), os.path.join(directory, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path
