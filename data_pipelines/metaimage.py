"""A small reader and writer for MetaImage (`.mhd` header + `.raw` data), as used by OAI-ZIB masks.

Axis order: arrays are indexed [x, y, z] in the order of the header's DimSize, x being the
fastest-varying axis in the data file (the same convention nibabel uses for NIfTI). Note that
SimpleITK's `GetArrayFromImage` returns the reverse, [z, y, x].

Supported: NDims >= 1, ElementType MET_(U)CHAR, MET_(U)SHORT, MET_(U)INT, MET_(U)LONG_LONG,
MET_FLOAT, MET_DOUBLE; one channel; binary data in a separate file or LOCAL (after the header);
little- or big-endian (BinaryDataByteOrderMSB / ElementByteOrderMSB, the latter wins when both
are given); zlib-compressed data (CompressedData = True); HeaderSize to skip bytes of the data
file (-1: the data are the last bytes of the file). Refused with a DataError: ASCII data, several
channels, file lists and file-name patterns, and element types of platform-dependent size.
Spatial keys (Offset, TransformMatrix, AnatomicalOrientation) are returned in the header
dictionary but not interpreted: OAI-ZIB masks carry no usable pose.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np

from data_pipelines.atomic import atomic_path
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
_TYPE_NAMES = {dtype: name for name, dtype in ELEMENT_TYPES.items()}
_REQUIRED_KEYS = ('NDims', 'DimSize', 'ElementType', 'ElementDataFile')
_MAX_HEADER_BYTES = 1 << 16


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
  header, data_offset = _read_header(path)
  ndims = _parse_int(header, 'NDims', path)
  dims = _parse_ints(header, 'DimSize', path)
  if len(dims) != ndims or any(n <= 0 for n in dims):
    raise DataError(path, 'DimSize does not match NDims', found=header['DimSize'],
                    expected=f'{ndims} positive integers')
  spacing = tuple(float(s) for s in _parse_floats(header, 'ElementSpacing', path)) \
      if 'ElementSpacing' in header else (1.0,) * ndims
  if len(spacing) != ndims or any(not s > 0 for s in spacing):
    raise DataError(path, 'ElementSpacing does not match NDims', found=header['ElementSpacing'],
                    expected=f'{ndims} positive numbers')
  if header.get('ObjectType', 'Image') != 'Image':
    raise DataError(path, 'unsupported ObjectType', found=header['ObjectType'], expected='Image')
  channels = int(header.get('ElementNumberOfChannels', '1'))
  if channels != 1:
    raise DataError(path, 'unsupported number of channels', found=channels, expected=1)
  if not _parse_bool(header, 'BinaryData', path, default=True):
    raise DataError(path, 'ASCII MetaImage data is not supported', found='BinaryData = False',
                    expected='BinaryData = True')
  element_type = header['ElementType']
  if element_type not in ELEMENT_TYPES:
    raise DataError(path, 'unsupported ElementType', found=element_type,
                    expected=' / '.join(ELEMENT_TYPES))
  msb = _parse_bool(header, 'BinaryDataByteOrderMSB', path, default=False)
  msb = _parse_bool(header, 'ElementByteOrderMSB', path, default=msb)
  dtype = ELEMENT_TYPES[element_type].newbyteorder('>' if msb else '<')
  expected_bytes = int(np.prod(dims)) * dtype.itemsize

  raw, data_path = _read_data_bytes(path, header, data_offset)
  if _parse_bool(header, 'CompressedData', path, default=False):
    try:
      raw = zlib.decompress(raw)
    except zlib.error as e:
      raise DataError(data_path, f'cannot decompress the zlib data: {e}') from e
  if len(raw) != expected_bytes:
    raise DataError(data_path, 'data size does not match the header',
                    found=f'{len(raw)} bytes',
                    expected=f'{expected_bytes} bytes for DimSize {dims} of {element_type}')
  # The file stores x fastest: a C-order [z, y, x] block, transposed to [x, y, z].
  data = np.frombuffer(raw, dtype=dtype).reshape(dims[::-1]).transpose()
  data = np.ascontiguousarray(data.astype(dtype.newbyteorder('=')))
  return MetaImage(path, data, spacing, header)


def write_metaimage(path: str | os.PathLike, data: np.ndarray,
                    spacing: tuple[float, ...] | None = None, *, compressed: bool = False,
                    msb: bool = False, extra_header: dict[str, str] | None = None) -> str:
  """Writes `data` ([x, y, z], DimSize order) as `path` (.mhd) plus a data file beside it.

  The data file is `<stem>.raw` (`<stem>.zraw` when `compressed`, zlib). Both files are written
  atomically, the data first, so a header never points at missing data. `extra_header` keys
  (e.g. `{'Offset': '0 0 0'}`) are written before ElementDataFile. Returns the header path.
  """
  path = os.fspath(path)
  if not path.endswith('.mhd'):
    raise DataError(path, 'MetaImage header name must end in .mhd', found=os.path.basename(path))
  data = np.asarray(data)
  if data.dtype == bool:
    data = data.astype(np.uint8)
  native = data.dtype.newbyteorder('=')
  if native not in _TYPE_NAMES:
    raise DataError(path, 'unsupported array type for MetaImage', found=data.dtype,
                    expected=', '.join(str(t) for t in _TYPE_NAMES))
  spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * data.ndim
  if len(spacing) != data.ndim:
    raise DataError(path, 'spacing does not match the array', found=spacing,
                    expected=f'{data.ndim} values')
  stem = path[:-len('.mhd')]
  data_path = stem + ('.zraw' if compressed else '.raw')
  payload = data.astype(native.newbyteorder('>' if msb else '<')).tobytes(order='F')
  if compressed:
    payload = zlib.compress(payload)
  lines = [
      ('ObjectType', 'Image'),
      ('NDims', str(data.ndim)),
      ('BinaryData', 'True'),
      ('BinaryDataByteOrderMSB', str(bool(msb))),
      ('CompressedData', str(bool(compressed))),
  ]
  if compressed:
    lines.append(('CompressedDataSize', str(len(payload))))
  lines += [
      ('DimSize', ' '.join(str(n) for n in data.shape)),
      ('ElementSpacing', ' '.join(repr(s) for s in spacing)),
      ('ElementType', _TYPE_NAMES[native]),
  ]
  lines += list((extra_header or {}).items())
  lines.append(('ElementDataFile', os.path.basename(data_path)))
  with atomic_path(data_path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(payload)
  with atomic_path(path) as tmp:
    with open(tmp, 'w', encoding='ascii') as f:
      f.write(''.join(f'{k} = {v}\n' for k, v in lines))
  return path


def _read_header(path: str) -> tuple[dict[str, str], int]:
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
        raise DataError(path, 'MetaImage header is not ASCII text (corrupt file or not a header?)',
                        found=f'byte {raw_line[e.start]:#04x} at offset {position}',
                        expected='lines of the form "Key = Value"') from e
      if not line or line.startswith('#'):
        continue
      key, sep, value = line.partition('=')
      if not sep:
        raise DataError(path, 'malformed MetaImage header line', found=repr(line),
                        expected='"Key = Value"')
      header[key.strip()] = value.strip()
      if key.strip() == 'ElementDataFile':
        break
  missing = [k for k in _REQUIRED_KEYS if k not in header]
  if missing:
    raise DataError(path, 'MetaImage header lacks required keys', found=sorted(header),
                    expected=f'also {", ".join(missing)}')
  return header, offset


def _read_data_bytes(path: str, header: dict[str, str], data_offset: int) -> tuple[bytes, str]:
  """Returns the (possibly compressed) data bytes and the path they came from."""
  name = header['ElementDataFile']
  header_size = _parse_int(header, 'HeaderSize', path) if 'HeaderSize' in header else 0
  compressed_size = (_parse_int(header, 'CompressedDataSize', path)
                     if 'CompressedDataSize' in header else None)
  if name == 'LOCAL':
    if header_size:
      raise DataError(path, 'HeaderSize together with LOCAL data is not supported',
                      found=f'HeaderSize = {header_size}', expected='no HeaderSize')
    with open(path, 'rb') as f:
      f.seek(data_offset)
      raw = f.read()
    data_path = path
  else:
    if name.upper().startswith('LIST') or '%' in name or ' ' in name:
      raise DataError(path, 'multi-file MetaImage data is not supported', found=name,
                      expected='LOCAL or one data file name')
    data_path = os.path.join(os.path.dirname(path), name)
    if not os.path.isfile(data_path):
      raise DataError(data_path, f'data file named by {os.path.basename(path)} not found')
    with open(data_path, 'rb') as f:
      raw = f.read()
    if header_size > 0:
      raw = raw[header_size:]
    elif header_size == -1:
      dims = _parse_ints(header, 'DimSize', path)
      itemsize = ELEMENT_TYPES.get(header['ElementType'], np.dtype(np.uint8)).itemsize
      raw = raw[len(raw) - int(np.prod(dims)) * itemsize:]
  if compressed_size is not None:
    if len(raw) < compressed_size:
      raise DataError(data_path, 'compressed data shorter than the header says',
                      found=f'{len(raw)} bytes', expected=f'CompressedDataSize = {compressed_size}')
    raw = raw[:compressed_size]
  return raw, data_path


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
