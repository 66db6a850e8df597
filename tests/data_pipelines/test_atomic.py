"""Atomic writes: the temporaries a killed writer leaves are recognised by name and writer pid,
removed only when that writer is gone, and nothing of any other naming is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from data_pipelines.atomic import (
  atomic_dir,
  atomic_path,
  remove_stale_temporaries,
  stale_temporaries,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _killed_writer(target: str, kind: str) -> None:
  """Runs a process that opens atomic_path / atomic_dir on `target`, writes into the
  temporary and is killed with SIGKILL before the rename."""
  code = (
    'import os, signal, sys\n'
    'from data_pipelines import atomic\n'
    f'writer = atomic.{kind}(sys.argv[1])\n'
    'tmp = writer.__enter__()\n'
    'if os.path.isdir(tmp):\n'
    '  open(os.path.join(tmp, "part"), "w").write("half")\n'
    'else:\n'
    '  open(tmp, "w").write("half")\n'
    'os.kill(os.getpid(), signal.SIGKILL)\n'
  )
  done = subprocess.run([sys.executable, '-c', code, target], cwd=REPO, check=False)
  assert done.returncode == -signal.SIGKILL


def test_a_killed_file_write_leaves_a_temporary_that_is_then_removed(tmp_path):
  target = tmp_path / 'seg.nii.gz'
  target.write_bytes(b'previous result')
  _killed_writer(str(target), 'atomic_path')
  (leftover,) = [n for n in os.listdir(tmp_path) if n != 'seg.nii.gz']
  assert leftover.startswith('.seg.nii.gz.') and leftover.endswith('.tmp.nii.gz')
  assert target.read_bytes() == b'previous result'  # the old file is untouched
  # Other names are never touched: another file's temporary, a user's hidden file.
  (tmp_path / '.seg.nii.gz.backup').write_text('mine')
  (tmp_path / '.seg.nii.99999999-abc.tmp.nii').write_text('another file (seg.nii)')
  assert stale_temporaries(target) == [str(tmp_path / leftover)]
  assert remove_stale_temporaries(target) == [str(tmp_path / leftover)]
  assert sorted(os.listdir(tmp_path)) == [
    '.seg.nii.99999999-abc.tmp.nii',
    '.seg.nii.gz.backup',
    'seg.nii.gz',
  ]


def test_the_temporary_of_a_live_writer_is_kept(tmp_path):
  target = tmp_path / 'report.json'
  with atomic_path(target) as tmp:
    with open(tmp, 'w') as f:
      f.write('{}')
    # This process is alive (and so is its temporary).
    assert stale_temporaries(target) == []
    assert remove_stale_temporaries(target) == []
    assert os.path.exists(tmp)
  assert os.listdir(tmp_path) == ['report.json']


def test_a_killed_folder_write_is_removed_and_a_mid_swap_old_folder_is_kept(tmp_path):
  target = tmp_path / 'dataset'
  target.mkdir()
  (target / 'a').write_text('old dataset')
  _killed_writer(str(target), 'atomic_dir')
  (leftover,) = [n for n in os.listdir(tmp_path) if n != 'dataset']
  assert leftover.startswith('.dataset.') and leftover.endswith('.tmp')
  assert remove_stale_temporaries(target) == [str(tmp_path / leftover)]
  assert os.listdir(tmp_path) == ['dataset']
  # Killed between atomic_dir's two renames: the old folder sits in `.old/x` and `dataset` is
  # gone; that `.old` is all there is of it, so it is kept (the new `.tmp` may go).
  dead = subprocess.run(
    [sys.executable, '-c', 'import os; print(os.getpid())'],
    capture_output=True,
    text=True,
    check=True,
  )
  pid = int(dead.stdout)
  old = tmp_path / f'.dataset.{pid}-abcd1234.old'
  old.mkdir()
  os.replace(target, old / 'x')
  new = tmp_path / f'.dataset.{pid}-efgh5678.tmp'
  new.mkdir()
  if pid_in_use(pid):
    pytest.fail(f'pid {pid} was reused at once; rerun')
  assert stale_temporaries(target) == [str(new)]
  remove_stale_temporaries(target)
  assert (old / 'x' / 'a').read_text() == 'old dataset'


def test_atomic_dir_replaces_whole_and_keeps_old_on_failure(tmp_path):
  target = tmp_path / 'out'
  with atomic_dir(target) as tmp:
    open(os.path.join(tmp, 'one'), 'w').write('1')
  with pytest.raises(RuntimeError):
    with atomic_dir(target) as tmp:
      open(os.path.join(tmp, 'two'), 'w').write('2')
      raise RuntimeError('writer failed')
  assert os.listdir(target) == ['one'] and os.listdir(tmp_path) == ['out']


def pid_in_use(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True
