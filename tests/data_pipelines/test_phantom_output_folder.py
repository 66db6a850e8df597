"""The phantom generator replaces only a folder it wrote itself (issue 15.2): a user's own
nnU-Net dataset, or any other non-empty folder or file, given as --out is refused and left
byte for byte as it was."""

from __future__ import annotations

import json
import os

import pytest

from data_pipelines.phantoms import __main__ as cli
from data_pipelines.phantoms import writer


def _snapshot(folder) -> dict[str, bytes]:
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def _user_dataset(root) -> None:
  """A user's own nnU-Net dataset: a dataset.json and an image, not made by the generator."""
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'imagesTr' / 'knee_0000_0000.nii.gz').write_bytes(b'a real scan')
  (root / 'dataset.json').write_text(json.dumps({'labels': {'background': 0, 'femur': 1}}))


def test_a_users_dataset_is_refused_not_deleted(tmp_path, capsys):
  # Before: any folder with a dataset.json was replaced whole.
  root = tmp_path / 'my_dataset'
  _user_dataset(root)
  before = _snapshot(root)
  assert cli.main(['knee', '--out', str(root)]) == 2
  message = capsys.readouterr().err
  assert (
    f"phantoms: output folder '{root}' holds a dataset.json the generator did not write "
    f'(no {writer.MARKER}); refusing to replace it' in message
  )
  assert _snapshot(root) == before
  assert sorted(os.listdir(tmp_path)) == ['my_dataset']  # no temporary left beside it


@pytest.mark.parametrize('what', ['other_files', 'file'])
def test_other_outputs_are_refused(tmp_path, what):
  out = tmp_path / 'out'
  if what == 'file':
    out.write_text('a file')
  else:
    out.mkdir()
    (out / 'notes.txt').write_text('keep me')
  before = _snapshot(tmp_path)
  with pytest.raises(ValueError, match='refusing to replace it'):
    writer.write_dataset('hip', 1, 0, str(out))
  assert _snapshot(tmp_path) == before


def test_a_folder_the_generator_wrote_is_replaced_and_leftovers_removed(tmp_path):
  out = tmp_path / 'phantoms'
  out.mkdir()
  # What an earlier run left: its marker and a file the new dataset does not have.
  (out / writer.MARKER).write_text('{}')
  (out / 'stale.txt').write_text('from an earlier run')
  # The temporary of a run killed mid-write (writer pid 2**22 + 1 is above Linux's pid_max
  # of 2**22, so no running process has it).
  leftover = tmp_path / f'.phantoms.{2**22 + 1}-abcd1234.tmp'
  leftover.mkdir()
  (leftover / 'imagesTr').mkdir()
  writer.write_dataset('hip', 1, 0, str(out))
  names = sorted(os.listdir(out))
  assert 'stale.txt' not in names and writer.MARKER in names and 'dataset.json' in names
  assert sorted(os.listdir(tmp_path)) == ['phantoms']
  with open(out / writer.MARKER) as f:
    assert json.load(f)['kind'] == 'hip'
