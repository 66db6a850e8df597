"""MetaImage reading (SimpleITK behind our header check) against files written byte by byte
here, the writer's round trip, and every hostile header refused before any data is read."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from support import write_metaimage

from data_pipelines.errors import DataError
from data_pipelines.metaimage import read_metaimage

# A small volume indexed [x, y, z] with a distinct value per voxel.
DIMS = (4, 3, 2)
VALUES = {
  (x, y, z): 100 * z + 10 * y + x
  for z in range(DIMS[2])
  for y in range(DIMS[1])
  for x in range(DIMS[0])
}


def _expected() -> np.ndarray:
  expected = np.zeros(DIMS, np.int64)
  for (x, y, z), value in VALUES.items():
    expected[x, y, z] = value
  return expected


def _payload(fmt: str) -> bytes:
  """The data bytes as MetaImage stores them: x fastest, then y, then z."""
  return b''.join(
    struct.pack(fmt, VALUES[(x, y, z)])
    for z in range(DIMS[2])
    for y in range(DIMS[1])
    for x in range(DIMS[0])
  )


def _write(
  tmp_path,
  header_lines: list[str],
  payload: bytes,
  name: str = 'mask',
  data_name: str | None = 'mask.raw',
) -> str:
  header = os.path.join(tmp_path, f'{name}.mhd')
  if data_name is not None:
    with open(os.path.join(tmp_path, data_name), 'wb') as f:
      f.write(payload)
  with open(header, 'w') as f:
    f.write('\n'.join(header_lines) + '\n')
  return header


def _header(element_type: str, extra: list[str] = (), data_file: str = 'mask.raw') -> list[str]:
  return [
    'ObjectType = Image',
    'NDims = 3',
    f'DimSize = {DIMS[0]} {DIMS[1]} {DIMS[2]}',
    'ElementSpacing = 0.7 0.365 0.365',
    f'ElementType = {element_type}',
    *extra,
    f'ElementDataFile = {data_file}',
  ]


def test_reads_unsigned_char_in_x_fastest_order(tmp_path):
  values = {k: v % 256 for k, v in VALUES.items()}
  payload = bytes(
    values[(x, y, z)] for z in range(DIMS[2]) for y in range(DIMS[1]) for x in range(DIMS[0])
  )
  image = read_metaimage(_write(tmp_path, _header('MET_UCHAR'), payload))
  assert image.data.dtype == np.uint8 and image.data.shape == DIMS
  np.testing.assert_array_equal(image.data, _expected() % 256)
  assert image.spacing == (0.7, 0.365, 0.365)
  assert image.header['ObjectType'] == 'Image'


@pytest.mark.parametrize(
  'element_type,fmt,dtype',
  [
    ('MET_SHORT', '<h', np.int16),
    ('MET_USHORT', '<H', np.uint16),
    ('MET_INT', '<i', np.int32),
    ('MET_FLOAT', '<f', np.float32),
    ('MET_DOUBLE', '<d', np.float64),
  ],
)
def test_reads_little_endian_types(tmp_path, element_type, fmt, dtype):
  image = read_metaimage(_write(tmp_path, _header(element_type), _payload(fmt)))
  assert image.data.dtype == dtype
  np.testing.assert_array_equal(image.data, _expected())


def test_reads_big_endian_under_either_byte_order_key(tmp_path):
  big = _payload('>h')
  for key in ('BinaryDataByteOrderMSB', 'ElementByteOrderMSB'):
    path = _write(tmp_path, _header('MET_SHORT', [f'{key} = True']), big)
    np.testing.assert_array_equal(read_metaimage(path).data, _expected())
    assert read_metaimage(path).data.dtype.isnative
  # Both keys, disagreeing: readers differ on which wins (SimpleITK takes
  # BinaryDataByteOrderMSB), so the file is refused rather than read one way or the other.
  path = _write(
    tmp_path,
    _header('MET_SHORT', ['BinaryDataByteOrderMSB = False', 'ElementByteOrderMSB = True']),
    big,
  )
  with pytest.raises(DataError, match=r'mask\.mhd: the byte-order keys contradict each other'):
    read_metaimage(path)


def test_reads_zlib_compressed_data(tmp_path):
  packed = zlib.compress(_payload('<H'))
  path = _write(
    tmp_path,
    _header(
      'MET_USHORT',
      ['CompressedData = True', f'CompressedDataSize = {len(packed)}'],
      data_file='mask.zraw',
    ),
    packed,
    data_name='mask.zraw',
  )
  np.testing.assert_array_equal(read_metaimage(path).data, _expected())


def test_reads_local_data_and_header_size(tmp_path):
  path = os.path.join(tmp_path, 'single.mha')
  with open(path, 'wb') as f:
    f.write(('\n'.join(_header('MET_SHORT', data_file='LOCAL')) + '\n').encode('ascii'))
    f.write(_payload('<h'))
  np.testing.assert_array_equal(read_metaimage(path).data, _expected())
  skipped = _write(tmp_path, _header('MET_SHORT', ['HeaderSize = 5']), b'12345' + _payload('<h'))
  np.testing.assert_array_equal(read_metaimage(skipped).data, _expected())
  at_end = _write(tmp_path, _header('MET_SHORT', ['HeaderSize = -1']), b'xyz' + _payload('<h'))
  np.testing.assert_array_equal(read_metaimage(at_end).data, _expected())


@pytest.mark.parametrize(
  'dtype,compressed', [(np.uint8, False), (np.int16, False), (np.float32, True), (np.uint16, True)]
)
def test_writer_round_trip(tmp_path, dtype, compressed):
  data = np.random.default_rng(3).integers(0, 200, size=(5, 4, 3)).astype(dtype)
  path = write_metaimage(
    os.path.join(tmp_path, 'out.mhd'), data, (0.5, 0.25, 2.0), compressed=compressed
  )
  image = read_metaimage(path)
  assert image.data.dtype == dtype
  np.testing.assert_array_equal(image.data, data)
  assert image.spacing == (0.5, 0.25, 2.0)
  data_file = 'out.zraw' if compressed else 'out.raw'
  assert sorted(os.listdir(tmp_path)) == sorted(['out.mhd', data_file])


def test_writer_output_is_x_fastest(tmp_path):
  data = _expected().astype(np.int16)
  write_metaimage(os.path.join(tmp_path, 'w.mhd'), data)
  with open(os.path.join(tmp_path, 'w.raw'), 'rb') as f:
    assert f.read() == _payload('<h')


# Bad input: one test each, the message names the file and the problem.


def test_missing_header_file(tmp_path):
  path = os.path.join(tmp_path, 'absent.mhd')
  with pytest.raises(DataError, match='absent.mhd: file not found'):
    read_metaimage(path)


def test_missing_data_file(tmp_path):
  path = _write(tmp_path, _header('MET_UCHAR'), b'', data_name=None)
  with pytest.raises(DataError, match=r'mask\.raw: data file named by mask\.mhd not found'):
    read_metaimage(path)


def test_truncated_data_file(tmp_path):
  path = _write(tmp_path, _header('MET_SHORT'), _payload('<h')[:-3])
  with pytest.raises(DataError) as info:
    read_metaimage(path)
  message = str(info.value)
  assert 'mask.raw: data size does not match the header' in message
  assert '45 bytes' in message and '48 bytes' in message


def test_unsupported_element_type(tmp_path):
  path = _write(tmp_path, _header('MET_LONG'), _payload('<i'))
  with pytest.raises(DataError, match=r'mask\.mhd: unsupported ElementType \(found MET_LONG'):
    read_metaimage(path)


def test_ascii_data_refused(tmp_path):
  path = _write(tmp_path, _header('MET_UCHAR', ['BinaryData = False']), b'1 2 3')
  with pytest.raises(DataError, match=r'mask\.mhd: ASCII MetaImage data is not supported'):
    read_metaimage(path)


def test_several_channels_refused(tmp_path):
  path = _write(tmp_path, _header('MET_UCHAR', ['ElementNumberOfChannels = 3']), b'')
  with pytest.raises(DataError, match=r'mask\.mhd: unsupported number of channels \(found 3'):
    read_metaimage(path)


def test_corrupt_compressed_data(tmp_path):
  # SimpleITK alone returns an all-zero image for this (and only prints to stderr).
  path = _write(
    tmp_path,
    _header('MET_UCHAR', ['CompressedData = True', 'CompressedDataSize = 15']),
    b'not zlib at all',
  )
  with pytest.raises(DataError, match=r'mask\.raw: cannot decompress the zlib data'):
    read_metaimage(path)


def test_compressed_data_must_inflate_to_exactly_the_header_size(tmp_path):
  def compressed(payload: bytes, declared: int | None = None) -> str:
    size = len(payload) if declared is None else declared
    return _write(
      tmp_path,
      _header('MET_SHORT', ['CompressedData = True', f'CompressedDataSize = {size}']),
      payload,
    )

  packed = zlib.compress(_payload('<h'))
  with pytest.raises(
    DataError,
    match=r'mask\.raw: zlib data does not inflate to the size the '
    r'header gives \(found \d+ bytes from an incomplete stream; expected 48',
  ):
    read_metaimage(compressed(packed[:-12]))  # a truncated stream
  with pytest.raises(DataError, match=r'\(found 40 bytes; expected 48 bytes\)'):
    read_metaimage(compressed(zlib.compress(_payload('<h')[:40])))  # a whole, shorter stream
  # A zip bomb: 10 MB of zeros in a few kB, for a header of 48 bytes. Refused after inflating
  # at most one bounded chunk past the declared size.
  with pytest.raises(
    DataError,
    match=r'\(found more than 48 bytes \(inflating stopped there\); '
    r'expected 48 bytes\)',
  ):
    read_metaimage(compressed(zlib.compress(bytes(10_000_000))))
  with pytest.raises(
    DataError,
    match=r'mask\.mhd: zlib-compressed data without '
    r'CompressedDataSize',
  ):
    read_metaimage(_write(tmp_path, _header('MET_SHORT', ['CompressedData = True']), packed))
  with pytest.raises(
    DataError,
    match=r'mask\.raw: compressed data size is impossible for this '
    rf'file \(found CompressedDataSize = 999; expected 1 to {len(packed)}',
  ):
    read_metaimage(compressed(packed, declared=999))


def test_implausible_sizes_are_refused_before_any_data_is_read(tmp_path):
  # No data file at all: the header alone is refused.
  huge = _header('MET_FLOAT')
  huge[2] = 'DimSize = 2048 2048 2048'
  with pytest.raises(
    DataError,
    match=r'mask\.mhd: DimSize is implausibly large \(found 2048 '
    r'2048 2048 of MET_FLOAT = 34359738368 bytes; expected at most 4294967296',
  ):
    read_metaimage(_write(tmp_path, huge, b'', data_name=None))
  # 1 GB claimed from 100 compressed bytes: beyond what deflate can do (1032:1).
  bomb = _header('MET_UCHAR', ['CompressedData = True', 'CompressedDataSize = 100'])
  bomb[2] = 'DimSize = 1000 1000 1000'
  with pytest.raises(DataError, match=r'mask\.mhd: CompressedDataSize is too small for DimSize'):
    read_metaimage(_write(tmp_path, bomb, bytes(100)))


@pytest.mark.parametrize('name', ['/etc/passwd', '../secret.raw', 'sub/../../secret.raw', '..'])
def test_data_file_outside_the_header_folder_is_refused(tmp_path, name):
  folder = tmp_path / 'masks'
  folder.mkdir()
  (tmp_path / 'secret.raw').write_bytes(_payload('<h'))
  path = _write(folder, _header('MET_SHORT', data_file=name), b'', data_name=None)
  with pytest.raises(
    DataError,
    match=r"mask\.mhd: ElementDataFile points outside the header's "
    'folder',
  ):
    read_metaimage(path)


def test_data_file_in_a_subfolder_of_the_header_is_read(tmp_path):
  (tmp_path / 'data').mkdir()
  path = _write(
    tmp_path,
    _header('MET_SHORT', data_file='data/mask.raw'),
    _payload('<h'),
    data_name='data/mask.raw',
  )
  np.testing.assert_array_equal(read_metaimage(path).data, _expected())


def test_header_without_required_keys(tmp_path):
  path = _write(
    tmp_path, ['NDims = 3', 'ElementType = MET_UCHAR', 'ElementDataFile = mask.raw'], b''
  )
  with pytest.raises(DataError, match=r'mask\.mhd: MetaImage header lacks required keys.*DimSize'):
    read_metaimage(path)


def test_binary_file_given_as_header(tmp_path):
  path = os.path.join(tmp_path, 'data.mhd')
  with open(path, 'wb') as f:
    f.write(bytes(range(128, 256)))
  with pytest.raises(DataError, match=r'data\.mhd: MetaImage header is not ASCII text'):
    read_metaimage(path)


def test_dim_size_disagrees_with_ndims(tmp_path):
  lines = _header('MET_UCHAR')
  lines[2] = 'DimSize = 4 3'
  path = _write(tmp_path, lines, b'')
  with pytest.raises(
    DataError,
    match=r'mask\.mhd: DimSize does not match NDims \(found 4 3; '
    r'expected 3 positive integers\)',
  ):
    read_metaimage(path)
