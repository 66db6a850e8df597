"""A shared model (`inference/export.py`): the smoke run's variables written without the
optimiser's state restore bit for bit, in a fraction of the bytes; a taken --out and a missing
workdir are refused in one line, leaving nothing behind."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from imask_jax.inference import export, loading


def _bytes(folder: str) -> int:
  walk = os.walk(folder)
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in walk for name in names)


def test_exported_variables_restore_bit_for_bit_without_the_optimiser(
  smoke_workdir, smoke_model, tmp_path
):
  out = str(tmp_path / 'shared')
  step = export.export_model(smoke_workdir, out)
  assert step == smoke_model.step
  assert sorted(os.listdir(out)) == ['checkpoints', 'config.json', 'metrics.jsonl']
  assert os.listdir(os.path.join(out, 'checkpoints')) == [str(step)]
  shared = loading.load_model(out)
  assert shared.step == step
  want = jax.tree_util.tree_leaves_with_path(jax.device_get(smoke_model.variables))
  got = jax.tree_util.tree_leaves_with_path(jax.device_get(shared.variables))
  assert [path for path, _ in got] == [path for path, _ in want]
  for (path, a), (_, b) in zip(got, want):
    assert a.dtype == b.dtype and np.array_equal(a, b), path
  # Adam keeps two moments per parameter: without them the step is well under half the size.
  source = os.path.join(smoke_workdir, 'checkpoints', str(step))
  assert _bytes(os.path.join(out, 'checkpoints', str(step))) < 0.5 * _bytes(source)

  # A taken --out is refused and left as it was.
  before = _bytes(out)
  with pytest.raises(FileExistsError, match='shared: exists'):
    export.export_model(smoke_workdir, out)
  assert _bytes(out) == before


def test_a_missing_workdir_is_one_line_and_writes_nothing(tmp_path, capsys):
  out = str(tmp_path / 'shared')
  code = export.main(['--workdir', str(tmp_path / 'nowhere'), '--out', out])
  assert code == 2
  message = capsys.readouterr().err.strip()
  assert len(message.splitlines()) == 1 and 'nowhere' in message
  assert not os.path.exists(out) and not os.path.exists(out + '.partial')
