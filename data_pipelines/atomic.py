"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Everything users keep (datasets, predictions, checkpoints' sidecars) goes through these, so a
crash or a bad input never leaves a half-written file that a later run would read as whole.

Temporaries are hidden (readers skip names starting with '.') and named after their final
name and the writing process: `.<name>.<pid>-<random>.tmp<suffix>` beside the file (folders:
`.<name>.<pid>-<random>.tmp`, and `.<name>.<pid>-<random>.old` while an old folder is swapped
out). A process killed mid-write (SIGKILL, power loss) leaves its temporary behind;
`remove_stale_temporaries(path)` removes those of `path` whose writer is no longer running on
this machine, and never touches a file of any other naming.
"""

from __future__ import annotations

import contextlib
import os
import re
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
  fd, tmp = tempfile.mkstemp(prefix=_prefix(base), suffix=f'.tmp{suffix}', dir=directory)
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
  base = os.path.basename(path)
  tmp = tempfile.mkdtemp(prefix=_prefix(base), suffix='.tmp', dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=_prefix(base), suffix='.old', dir=parent)
      os.replace(path, os.path.join(old, 'x'))
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def stale_temporaries(path: str | os.PathLike) -> list[str]:
  """The temporaries of `atomic_path(path)` / `atomic_dir(path)` beside `path` whose writing
  process is no longer running on this machine (sorted absolute paths).

  Only names of exactly our form count; a temporary of a live process (this one included) is
  never listed. A process on another machine writing into a shared folder is not seen: its
  temporaries would be listed if its pid is not in use here, so two machines must not write
  the same output at once (they would overwrite each other's results anyway).
  """
  path = os.path.abspath(os.fspath(path).rstrip(os.sep))
  directory, base = os.path.dirname(path), os.path.basename(path)
  suffix = re.escape(''.join(_suffixes(base)))
  pattern = re.compile(rf'\.{re.escape(base)}\.(\d+)-[a-z0-9_]+\.(?:tmp(?:{suffix})?|old)\Z')
  try:
    names = os.listdir(directory)
  except (FileNotFoundError, NotADirectoryError):
    return []
  found = []
  for name in sorted(names):
    match = pattern.match(name)
    if not match or _running(int(match.group(1))):
      continue
    if name.endswith('.old') and not os.path.exists(path):
      continue  # killed mid-swap: the old folder is all there is under this name; keep it
    found.append(os.path.join(directory, name))
  return found


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
  """Removes `stale_temporaries(path)` (files, or folders of atomic_dir); returns their paths.

  A `.old` folder (atomic_dir's swap) is removed only while `path` exists: then the swap had
  either not moved the old folder yet or had already put the new one in place. Killed between
  its two renames, `path` is missing and `.old/x` is the previous folder; it is kept.
  """
  removed = []
  for leftover in stale_temporaries(path):
    if os.path.isdir(leftover) and not os.path.islink(leftover):
      shutil.rmtree(leftover, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(leftover)
    removed.append(leftover)
  return removed


def _prefix(base: str) -> str:
  return f'.{base}.{os.getpid()}-'


def _running(pid: int) -> bool:
  """Whether a process with this id runs on this machine (this process counts as running)."""
  if pid == os.getpid():
    return True
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  except OverflowError:
    return False
  return True


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _suffixes(name: str) -> list[str]:
  """File suffixes that carry format meaning, e.g. ['.nii', '.gz'] for 'a.nii.gz'."""
  parts = name.split('.')[1:]
  return ['.' + p for p in parts[-2:]] if parts else []
