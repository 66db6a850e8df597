"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Everything users keep (datasets, predictions, checkpoints' sidecars) goes through these, so a
crash or a bad input never leaves a half-written file that a later run would read as whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path beside `path`; on success it is renamed onto `path`.

  The temporary name keeps the final suffix (so writers that infer the format from the
  extension, like nibabel's `.nii.gz`, behave the same). On an exception the temporary file is
  removed and `path` is left untouched.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  base = os.path.basename(path)
  suffix = ''.join(s for s in _suffixes(base))
  fd, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix=f'.tmp{suffix}', dir=directory)
  os.close(fd)
  try:
    yield tmp
    if os.path.exists(tmp):
      os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary folder beside `path`; on success it replaces `path` as a whole.

  An existing folder at `path` is replaced only after the new one is complete.
  """
  path = os.fspath(path).rstrip(os.sep)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.', suffix='.old', dir=parent)
      os.replace(path, os.path.join(old, 'x'))
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _suffixes(name: str) -> list[str]:
  """File suffixes that carry format meaning, e.g. ['.nii', '.gz'] for 'a.nii.gz'."""
  parts = name.split('.')[1:]
  return ['.' + p for p in parts[-2:]] if parts else []
