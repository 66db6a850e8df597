"""MetaImage (`.mhd` + data file, or single-file `.mha`), as used by OAI-ZIB masks: read and
written by SimpleITK, after a header check of our own.

Axis order: arrays are indexed [x, y, z] in the order of the header's DimSize, x being the
fastest-varying axis in the data file (the same convention nibabel uses for NIfTI). SimpleITK's
`GetArrayFromImage` returns the reverse, [z, y, x]; it is transposed here.

The header check (`check_header`) runs before SimpleITK touches the data, so that a hostile or
broken file is refused with a DataError naming it rather than read in part or silently as
zeros (SimpleITK fills the image with zeros when a zlib stream is corrupt, and reports a
truncated file as "Reason: Success"):
* the header is ASCII `Key = Value` lines with NDims, DimSize, ElementType, ElementDataFile;
* ElementDataFile is LOCAL or one file name relative to the header's folder: an absolute name
  or one that climbs out of that folder (`..`) is refused, as are file lists and patterns;
* DimSize x element size is at most MAX_DATA_BYTES (a header may not make us allocate more);
* element types of platform-dependent size (MET_LONG, MET_ULONG), ASCII data, several channels
  and conflicting byte-order keys are refused;
* uncompressed data must have exactly the size the header implies; zlib data must declare a
  CompressedDataSize that the file holds and that can inflate to that size (zlib cannot
  compress more than ZLIB_MAX_RATIO : 1), and the stream is inflated once in bounded chunks,
  discarding the output, to prove it yields exactly that many bytes.
Spatial keys (Offset, TransformMatrix, AnatomicalOrientation) are returned in the header
dictionary but not interpreted: OAI-ZIB masks carry no usable pose.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np
import SimpleITK as sitk

from data_pipelines.errors import DataError

ELEMENT_TYPES: dict[str, np.dtype] = {
  'MET_CHAR': np.dtype(np.int8),
  'MET_UCHAR': np.dtype(np.uint8),
  'MET_SHORT': np.dtype(np.int16),
  'MET_USHORT': np.dtype(np.uint16),
  'MET_INT': np.dtype(np.int32),
  'MET_UINT': np.dtype(np.uint32),
  'MET_LONG_LONG': np.dtype(np.int64),
  'MET_ULONG_LONG': np.dtype(np.uint64),
  'MET_FLOAT': np.dtype(np.float32),
  'MET_DOUBLE': np.dtype(np.float64),
}
_REQUIRED_KEYS = ('NDims', 'DimSize', 'ElementType', 'ElementDataFile')
_MAX_HEADER_BYTES = 1 << 16
MAX_DATA_BYTES = 4 << 30  # 4 GiB: a 1024^3 float32 volume; an OAI-ZIB mask is 23.6 MB
ZLIB_MAX_RATIO = 1032  # deflate's largest possible compression ratio (long runs of a byte)
_INFLATE_CHUNK = 1 << 22


@dataclasses.dataclass(frozen=True, eq=False)
class MetaImage:
  """data: [x, y, z] (DimSize order) in native byte order; spacing: ElementSpacing in mm (ones
  when the header has none), same axis order; header: every key of the header as text."""

  path: str
  data: np.ndarray
  spacing: tuple[float, ...]
  header: dict[str, str]


def read_metaimage(path: str | os.PathLike) -> MetaImage:
  """Reads a `.mhd` (or single-file `.mha`) MetaImage; a problem is a DataError naming the file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(path, 'file not found' if not os.path.exists(path) else 'is not a file')
  header, data_offset = read_header(path)
  dims, dtype = check_header(path, header, data_offset)
  try:
    image = sitk.ReadImage(path, imageIO='MetaImageIO')
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    raise DataError(path, f'SimpleITK cannot read the MetaImage: {reason}') from e
  data = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose())
  if data.shape != dims or data.dtype != dtype:
    raise DataError(
      path,
      'SimpleITK read a different array than the header describes',
      found=f'{data.dtype} {data.shape}',
      expected=f'{dtype} {dims}',
    )
  return MetaImage(path, data, tuple(float(s) for s in image.GetSpacing()), header)


# --- the header check ---------------------------------------------------------------------------


def read_header(path: str) -> tuple[dict[str, str], int]:
  """Parses `Key = Value` lines up to ElementDataFile; returns them and the byte offset after."""
  header: dict[str, str] = {}
  offset = 0
  with open(path, 'rb') as f:
    for raw_line in f:
      offset += len(raw_line)
      if offset > _MAX_HEADER_BYTES and 'ElementDataFile' not in header:
        break
      try:
        line = raw_line.decode('ascii').strip()
      except UnicodeDecodeError as e:
        position = offset - len(raw_line) + e.start
        raise DataError(
          path,
          'MetaImage header is not ASCII text (corrupt file or not a header?)',
          found=f'byte {raw_line[e.start]:#04x} at offset {position}',
          expected='lines of the form "Key = Value"',
        ) from e
      if not line or line.startswith('#'):
        continue
      key, sep, value = line.partition('=')
      if not sep:
        raise DataError(
          path, 'malformed MetaImage header line', found=repr(line), expected='"Key = Value"'
        )
      header[key.strip()] = value.strip()
      if key.strip() == 'ElementDataFile':
        break
  missing = [k for k in _REQUIRED_KEYS if k not in header]
  if missing:
    raise DataError(
      path,
      'MetaImage header lacks required keys',
      found=sorted(header),
      expected=f'also {", ".join(missing)}',
    )
  return header, offset


def check_header(
  path: str, header: dict[str, str], data_offset: int
) -> tuple[tuple[int, ...], np.dtype]:
  """Refuses (DataError) what SimpleITK should not be asked to read (module docstring).
  Returns the DimSize and the native element type of the array the file holds."""
  ndims = _parse_int(header, 'NDims', path)
  dims = _parse_ints(header, 'DimSize', path)
  if ndims < 1 or len(dims) != ndims or any(n <= 0 for n in dims):
    raise DataError(
      path,
      'DimSize does not match NDims',
      found=header['DimSize'],
      expected=f'{ndims} positive integers',
    )
  if 'ElementSpacing' in header:
    spacing = _parse_floats(header, 'ElementSpacing', path)
    if len(spacing) != ndims or any(not s > 0 for s in spacing):
      raise DataError(
        path,
        'ElementSpacing does not match NDims',
        found=header['ElementSpacing'],
        expected=f'{ndims} positive numbers',
      )
  if header.get('ObjectType', 'Image') != 'Image':
    raise DataError(path, 'unsupported ObjectType', found=header['ObjectType'], expected='Image')
  channels = (
    _parse_int(header, 'ElementNumberOfChannels', path)
    if 'ElementNumberOfChannels' in header
    else 1
  )
  if channels != 1:
    raise DataError(path, 'unsupported number of channels', found=channels, expected=1)
  if not _parse_bool(header, 'BinaryData', path, default=True):
    raise DataError(
      path,
      'ASCII MetaImage data is not supported',
      found='BinaryData = False',
      expected='BinaryData = True',
    )
  element_type = header['ElementType']
  if element_type not in ELEMENT_TYPES:
    raise DataError(
      path, 'unsupported ElementType', found=element_type, expected=' / '.join(ELEMENT_TYPES)
    )
  orders = {
    k: _parse_bool(header, k, path, default=False)
    for k in ('BinaryDataByteOrderMSB', 'ElementByteOrderMSB')
    if k in header
  }
  if len(set(orders.values())) > 1:
    raise DataError(
      path,
      'the byte-order keys contradict each other',
      found=', '.join(f'{k} = {v}' for k, v in orders.items()),
      expected='one byte order',
    )
  dtype = ELEMENT_TYPES[element_type]
  expected_bytes = int(np.prod(dims, dtype=object)) * dtype.itemsize
  if expected_bytes > MAX_DATA_BYTES:
    raise DataError(
      path,
      'DimSize is implausibly large',
      found=f'{header["DimSize"]} of {element_type} = {expected_bytes} bytes',
      expected=f'at most {MAX_DATA_BYTES} bytes ({MAX_DATA_BYTES >> 30} GiB)',
    )
  data_path, start, available = _data_extent(path, header, data_offset, expected_bytes)
  if not _parse_bool(header, 'CompressedData', path, default=False):
    if available != expected_bytes:
      raise DataError(
        data_path,
        'data size does not match the header',
        found=f'{available} bytes',
        expected=f'{expected_bytes} bytes for DimSize {dims} of {element_type}',
      )
    return dims, dtype
  if 'CompressedDataSize' not in header:
    raise DataError(
      path,
      'zlib-compressed data without CompressedDataSize (refusing to inflate '
      'a stream of unknown length)',
      expected='CompressedDataSize = <bytes>',
    )
  compressed = _parse_int(header, 'CompressedDataSize', path)
  if not 0 < compressed <= available:
    raise DataError(
      data_path,
      'compressed data size is impossible for this file',
      found=f'CompressedDataSize = {compressed}',
      expected=f'1 to {available} bytes (what the file holds)',
    )
  if expected_bytes > ZLIB_MAX_RATIO * compressed + 64:
    raise DataError(
      path,
      "CompressedDataSize is too small for DimSize (beyond zlib's largest "
      f'compression ratio of {ZLIB_MAX_RATIO}:1)',
      found=f'{compressed} bytes for {expected_bytes}',
      expected=f'at least {(expected_bytes - 64) // ZLIB_MAX_RATIO} bytes',
    )
  _check_inflates_to(data_path, start, compressed, expected_bytes)
  return dims, dtype


def _data_extent(
  path: str, header: dict[str, str], data_offset: int, expected_bytes: int
) -> tuple[str, int, int]:
  """(data file, offset of the data in it, bytes available from there)."""
  name = header['ElementDataFile']
  header_size = _parse_int(header, 'HeaderSize', path) if 'HeaderSize' in header else 0
  if name == 'LOCAL':
    if header_size:
      raise DataError(
        path,
        'HeaderSize together with LOCAL data is not supported',
        found=f'HeaderSize = {header_size}',
        expected='no HeaderSize',
      )
    return path, data_offset, os.path.getsize(path) - data_offset
  if name.upper().startswith('LIST') or '%' in name or ' ' in name:
    raise DataError(
      path,
      'multi-file MetaImage data is not supported',
      found=name,
      expected='LOCAL or one data file name',
    )
  normal = os.path.normpath(name)
  if (
    os.path.isabs(name)
    or normal == os.pardir
    or normal.startswith(os.pardir + os.sep)
    or '\\' in name
  ):
    raise DataError(
      path,
      "ElementDataFile points outside the header's folder",
      found=name,
      expected='a file name relative to the header, without ".."',
    )
  data_path = os.path.join(os.path.dirname(path), name)
  if not os.path.isfile(data_path):
    raise DataError(data_path, f'data file named by {os.path.basename(path)} not found')
  size = os.path.getsize(data_path)
  if header_size == -1:  # the data are the last bytes of the file
    if _parse_bool(header, 'CompressedData', path, default=False):
      raise DataError(path, 'HeaderSize = -1 with compressed data is not supported')
    start = max(size - expected_bytes, 0)
    return data_path, start, size - start
  if header_size < 0 or header_size > size:
    raise DataError(
      data_path,
      'HeaderSize is beyond the data file',
      found=header_size,
      expected=f'0 to {size} bytes, or -1',
    )
  return data_path, header_size, size - header_size


def _check_inflates_to(data_path: str, start: int, compressed: int, expected: int) -> None:
  """Inflates `compressed` bytes at `start` in chunks (never holding more than a chunk) and
  checks that they form one complete zlib stream of exactly `expected` bytes."""
  inflater = zlib.decompressobj()
  produced = 0
  with open(data_path, 'rb') as f:
    f.seek(start)
    left = compressed
    try:
      while not inflater.eof and produced <= expected:
        chunk = inflater.unconsumed_tail
        if not chunk:
          chunk = f.read(min(left, _INFLATE_CHUNK))
          left -= len(chunk)
          if not chunk:
            break
        produced += len(inflater.decompress(chunk, _INFLATE_CHUNK))
    except zlib.error as e:
      raise DataError(data_path, f'cannot decompress the zlib data: {e}') from e
  if produced > expected:
    found = f'more than {expected} bytes (inflating stopped there)'
  elif not inflater.eof:
    found = f'{produced} bytes from an incomplete stream'
  elif produced != expected:
    found = f'{produced} bytes'
  else:
    return
  raise DataError(
    data_path,
    'zlib data does not inflate to the size the header gives',
    found=found,
    expected=f'{expected} bytes',
  )


def _parse_int(header: dict[str, str], key: str, path: str) -> int:
  try:
    return int(header[key])
  except ValueError as e:
    raise DataError(path, f'{key} is not an integer', found=header[key]) from e


def _parse_ints(header: dict[str, str], key: str, path: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in header[key].split())
  except ValueError as e:
    raise DataError(path, f'{key} is not a list of integers', found=header[key]) from e


def _parse_floats(header: dict[str, str], key: str, path: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in header[key].split())
  except ValueError as e:
    raise DataError(path, f'{key} is not a list of numbers', found=header[key]) from e


def _parse_bool(header: dict[str, str], key: str, path: str, *, default: bool) -> bool:
  if key not in header:
    return default
  value = header[key].strip().lower()
  if value in ('true', '1'):
    return True
  if value in ('false', '0'):
    return False
  raise DataError(path, f'{key} is not a boolean', found=header[key], expected='True or False')
