"""Reads PyTorch state dicts (`torch.save` files, `.pth` / `.pt`) into NumPy without torch.

    state = read_state_dict('resnet50-0676ba61.pth')  # {'conv1.weight': [64, 3, 7, 7], ...}

A `torch.save` file is a pickle of the state dict in which every tensor is a call
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and every storage a
persistent id naming a block of raw little-endian numbers kept beside the pickle. Two layouts:

* zip (torch >= 1.6, the default since): `<name>/data.pkl` is the pickle, `<name>/data/<key>`
  the raw bytes of storage `<key>`, `<name>/byteorder` 'little' or 'big' (absent: little).
* legacy (older torchvision weights, e.g. the 2017-2019 ImageNet and COCO files): one stream of
  pickles -- a magic number, the protocol version 1001, a system-info dict, the object, the
  list of storage keys -- followed, per key, by an int64 element count and the raw bytes.

Unpickling is restricted: the unpickler resolves only the globals a state dict needs
(`collections.OrderedDict`, torch's tensor rebuild functions and storage classes), each mapped
to a harmless local stand-in; any other global (the way a pickle runs code) raises
`UnsafeCheckpointError` naming it, before anything is called. Tensors come back as NumPy
arrays with torch's shape and element order (C order; views are copied out of their storage).

A `.npz` (`np.savez(path, **{k: v.numpy() for k, v in state.items()})`) is read too, with
`allow_pickle=False`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

# Storage classes (pickled by name as `torch.<Name>`) -> element type.
STORAGE_DTYPES = {
  'DoubleStorage': np.dtype(np.float64),
  'FloatStorage': np.dtype(np.float32),
  'HalfStorage': np.dtype(np.float16),
  'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
  'LongStorage': np.dtype(np.int64),
  'IntStorage': np.dtype(np.int32),
  'ShortStorage': np.dtype(np.int16),
  'CharStorage': np.dtype(np.int8),
  'ByteStorage': np.dtype(np.uint8),
  'BoolStorage': np.dtype(np.bool_),
}

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The pickle asks for something a state dict never contains (a global or persistent id)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  """A storage named in the pickle; `data` is filled from the file after unpickling."""

  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None
  # Legacy views: (root storage, element offset) of a storage that is a slice of another.
  view_of: tuple[_Storage, int] | None = None

  def elements(self) -> np.ndarray:
    if self.view_of is not None:
      root, offset = self.view_of
      return root.elements()[offset : offset + self.numel]
    if self.data is None:
      raise pickle.UnpicklingError(f'storage {self.key!r} has no data in the file')
    return self.data


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """A tensor as the pickle describes it; materialised once the storages are read."""

  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _TensorRef:
  """Stand-in for torch._utils._rebuild_tensor(_v2): records where the tensor's numbers are."""
  del unused  # requires_grad, backward hooks, metadata: nothing a NumPy array keeps
  if not isinstance(storage, _Storage):
    raise UnsafeCheckpointError(f'tensor rebuilt from {type(storage).__name__}, not a storage')
  return _TensorRef(
    storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
  )


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused) -> _TensorRef:
  """Stand-in for torch._utils._rebuild_parameter: an nn.Parameter is its tensor."""
  del requires_grad, backward_hooks, unused
  return data


ALLOWED_GLOBALS = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
  ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  **{('torch', name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
  """Admits only ALLOWED_GLOBALS and storage persistent ids; records the storages it meets."""

  def __init__(self, file: BinaryIO, source: str, legacy: bool):
    super().__init__(file)
    self.source = source
    self.legacy = legacy
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
        f'{self.source}: the pickle asks for {module}.{name}, which a state dict of tensors '
        'never contains; refusing to load it (only OrderedDict, torch tensor rebuilds and '
        'storage types are admitted)'
      ) from None

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and pid and pid[0] in ('storage', b'storage')):
      raise UnsafeCheckpointError(f'{self.source}: unexpected persistent id {pid!r:.80}')
    if self.legacy:
      if len(pid) != 6:
        raise UnsafeCheckpointError(f'{self.source}: malformed storage id {pid!r:.80}')
      _, storage_type, key, _, numel, view = pid
    else:
      if len(pid) != 5:
        raise UnsafeCheckpointError(f'{self.source}: malformed storage id {pid!r:.80}')
      _, storage_type, key, _, numel = pid
      view = None
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f'{self.source}: storage of type {storage_type!r:.80}')
    key = key.decode() if isinstance(key, bytes) else str(key)
    if key not in self.storages:
      self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
    if view is None:
      return self.storages[key]
    view_key, offset, view_size = view
    view_key = view_key.decode() if isinstance(view_key, bytes) else str(view_key)
    if view_key not in self.storages:
      self.storages[view_key] = _Storage(
        view_key, storage_type.dtype, int(view_size), view_of=(self.storages[key], int(offset))
      )
    return self.storages[view_key]


class _PlainUnpickler(pickle.Unpickler):
  """For the legacy header pickles (ints, dicts, a list of strings): admits no global."""

  def __init__(self, file: BinaryIO, source: str):
    super().__init__(file)
    self.source = source

  def find_class(self, module: str, name: str) -> Any:
    raise UnsafeCheckpointError(f'{self.source}: header pickle asks for {module}.{name}')


def _materialise(ref: _TensorRef, source: str, name: str) -> np.ndarray:
  elements = ref.storage.elements()
  if any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride):
    raise pickle.UnpicklingError(f'{source}: tensor {name!r} has a negative size or stride')
  if 0 in ref.size:
    return np.zeros(ref.size, elements.dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
  if ref.offset < 0 or last >= elements.size:
    raise pickle.UnpicklingError(
      f'{source}: tensor {name!r} (size {ref.size}, stride {ref.stride}, offset '
      f'{ref.offset}) reads past its storage of {elements.size} elements'
    )
  item = elements.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    elements[ref.offset :],
    shape=ref.size,
    strides=tuple(s * item for s in ref.stride),
    writeable=False,
  )
  return np.array(view, dtype=elements.dtype.newbyteorder('='), order='C')


def _tensors(obj: Any, source: str) -> dict[str, np.ndarray]:
  """The state dict inside `obj` as {name: array}.

  Accepts a state dict, or a training checkpoint dict holding one under 'model' or
  'state_dict' (torchvision's reference scripts, Lightning); non-tensor entries of such a
  wrapper are ignored, inside the state dict they are an error.
  """
  if not isinstance(obj, dict):
    raise ValueError(
      f'{source}: expected a state dict (a dict of tensors), got {type(obj).__name__}'
    )
  if obj and not all(isinstance(v, _TensorRef) for v in obj.values()):
    for wrapper_key in ('model', 'state_dict'):
      if isinstance(obj.get(wrapper_key), dict):
        return _tensors(obj[wrapper_key], f'{source}[{wrapper_key!r}]')
    bad = next(k for k, v in obj.items() if not isinstance(v, _TensorRef))
    raise ValueError(
      f'{source}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor; '
      "expected a state dict (or a checkpoint with one under 'model')"
    )
  return {str(k): _materialise(v, source, str(k)) for k, v in obj.items()}


def _read_zip(path: str, archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
  pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(pickles) != 1:
    raise ValueError(
      f'{path}: a torch zip checkpoint has exactly one <name>/data.pkl, found {pickles}'
    )
  prefix = pickles[0][: -len('data.pkl')]
  order = '<'
  if prefix + 'byteorder' in archive.namelist():
    order = {'little': '<', 'big': '>'}[archive.read(prefix + 'byteorder').decode().strip()]
  unpickler = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), path, legacy=False)
  obj = unpickler.load()
  for storage in unpickler.storages.values():
    raw = archive.read(f'{prefix}data/{storage.key}')
    dtype = storage.dtype.newbyteorder(order)
    if len(raw) < storage.numel * dtype.itemsize:
      raise ValueError(
        f'{path}: storage {storage.key} holds {len(raw)} bytes, expected '
        f'{storage.numel} x {dtype.itemsize}'
      )
    storage.data = np.frombuffer(raw, dtype, count=storage.numel)
  return _tensors(obj, path)


def _read_legacy(path: str, f: BinaryIO) -> dict[str, np.ndarray]:
  try:
    magic = _PlainUnpickler(f, path).load()
  except (pickle.UnpicklingError, EOFError, ValueError) as e:
    raise ValueError(
      f'{path}: neither a torch zip checkpoint, a legacy torch.save file nor an .npz ({e})'
    ) from e
  if magic != LEGACY_MAGIC:
    raise ValueError(f'{path}: not a torch.save file (magic number {magic!r:.40})')
  protocol = _PlainUnpickler(f, path).load()
  if protocol != LEGACY_PROTOCOL:
    raise ValueError(f'{path}: legacy torch.save protocol {protocol}, expected {LEGACY_PROTOCOL}')
  info = _PlainUnpickler(f, path).load()
  if not info.get('little_endian', True):
    raise ValueError(f'{path}: written on a big-endian machine; not supported')
  unpickler = _StateDictUnpickler(f, path, legacy=True)
  obj = unpickler.load()
  keys = _PlainUnpickler(f, path).load()
  for key in keys:
    key = key.decode() if isinstance(key, bytes) else str(key)
    storage = unpickler.storages.get(key)
    if storage is None:
      raise ValueError(f'{path}: storage {key!r} listed but never used')
    numel = int(np.frombuffer(f.read(8), '<i8')[0])
    nbytes = numel * storage.dtype.itemsize
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise ValueError(f'{path}: storage {key!r} truncated ({len(raw)} of {nbytes} bytes)')
    storage.data = np.frombuffer(raw, storage.dtype.newbyteorder('<'), count=numel)
    storage.numel = numel
  return _tensors(obj, path)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{tensor name: NumPy array} of a torch.save file (zip or legacy) or an .npz.

  Raises UnsafeCheckpointError for a pickle that asks for anything but tensors, and
  ValueError for files that are not state dicts.
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      if names and all(n.endswith('.npy') for n in names):
        with np.load(path, allow_pickle=False) as npz:
          return {k: np.asarray(npz[k]) for k in npz.files}
      return _read_zip(path, archive)
  with open(path, 'rb') as f:
    return _read_legacy(path, f)
