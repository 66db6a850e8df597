"""Issue 15.3 and 15.5: a corrupt newest checkpoint and the common user mistakes end in one line
that names the folder and the problem (the traceback only with --verbose), and training falls
back to the newest checkpoint that restores, setting the broken one aside.

The independent truths: the bytes of the broken checkpoint (moved, not deleted or rewritten),
and the parameters of the uninterrupted smoke run, which the recovered run must reproduce bit
for bit (a run resumed at a checkpoint repeats the same steps exactly)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from conftest import POSED_AFFINE, persistent_compilation_cache
from imask_jax import errors, evaluate
from imask_jax import workdir as workdir_lib
from imask_jax.inference import loading
from imask_jax.predict.command import main as predict_main
from imask_jax.predict.command import predict_command
from imask_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy(smoke_workdir, tmp_path) -> str:
  """A copy of the smoke workdir (checkpoints at steps 3 and 6, the same data_dir)."""
  copy = str(tmp_path / 'run')
  shutil.copytree(
    smoke_workdir, copy, ignore=shutil.ignore_patterns('tensorboard', 'eval', 'predictions')
  )
  return copy


def _truncate_data_files(step_dir: str) -> None:
  """Cuts every array data file of a checkpoint to half its size (which arrays share a file
  is orbax's choice, so every file, to break the model's variables as well as the optimiser's
  moments)."""
  data = os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):
    path = os.path.join(data, name)
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _snapshot(folder: str) -> dict[str, bytes]:
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      with open(os.path.join(dirpath, name), 'rb') as f:
        out[os.path.relpath(os.path.join(dirpath, name), folder)] = f.read()
  return out


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
  )


# --- a corrupt newest checkpoint -----------------------------------------------------------------


def test_a_corrupt_checkpoint_is_one_line_in_evaluate_and_predict(smoke_workdir, tmp_path, capsys):
  copy = _copy(smoke_workdir, tmp_path)
  step6 = os.path.join(copy, 'checkpoints', '6')
  metadata = os.path.join(step6, 'state', '_METADATA')
  with open(metadata, 'r+b') as f:
    f.truncate(500)
  with pytest.raises(errors.CheckpointError) as info:
    loading.load_model(copy)
  message = str(info.value)
  assert message.startswith(
    f'checkpoint {step6}: cannot be restored: state/_METADATA is not valid JSON ('
  )
  assert message.endswith('(other stored steps: [3]; choose one with --checkpoint STEP)')
  assert '\n' not in message
  # The other stored step still loads.
  assert loading.load_model(copy, 3).step == 3

  # A truncated data file: TensorStore's own one-line reason, which names the file.
  shutil.copy(os.path.join(smoke_workdir, 'checkpoints', '6', 'state', '_METADATA'), metadata)
  _truncate_data_files(step6)
  scan = tmp_path / 'scan.nii.gz'
  nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), POSED_AFFINE), str(scan))
  status = predict_main(
    ['--workdir', copy, '--input', str(scan), '--output', str(tmp_path / 'out')]
  )
  err = capsys.readouterr().err
  assert status == errors.EXIT_REFUSED
  (line,) = [x for x in err.splitlines() if x.startswith('predict: refused')]
  assert line.startswith(
    f'predict: refused: CheckpointError: checkpoint {step6}: cannot be restored: OUT_OF_RANGE: '
  )
  assert 'is not valid for value of size' in line
  assert not (tmp_path / 'out').exists()
  assert evaluate.main(['--workdir', copy]) == errors.EXIT_REFUSED
  err = capsys.readouterr().err
  assert (
    f'python -m imask_jax.evaluate: CheckpointError: checkpoint {step6}: cannot be restored' in err
    and 'Traceback' not in err
  )
  with pytest.raises(errors.CheckpointError):
    evaluate.main(['--workdir', copy, '--verbose'])


def test_training_resumes_from_the_newest_checkpoint_that_restores(
  smoke_workdir, smoke_model, tmp_path, caplog, xla_cache_dir
):
  copy = _copy(smoke_workdir, tmp_path)
  step6 = os.path.join(copy, 'checkpoints', '6')
  _truncate_data_files(step6)
  broken = _snapshot(step6)
  config = workdir_lib.load_config(copy)
  # The smoke run's compiled programs come from the session's cache (conftest).
  with caplog.at_level('WARNING'), persistent_compilation_cache(xla_cache_dir):
    train.train_and_evaluate(config, copy)
  # The broken checkpoint is set aside byte for byte, and the run says so in one line.
  aside = os.path.join(copy, workdir_lib.UNRESTORABLE_DIR, '6')
  assert _snapshot(aside) == broken
  (warning,) = [r.getMessage() for r in caplog.records if 'moved to' in r.getMessage()]
  assert warning.startswith(f'checkpoint {step6}: cannot be restored: OUT_OF_RANGE')
  assert warning.endswith(f'moved to {aside}; resuming from the checkpoint of step 3')
  # Steps 4-6 were trained again from step 3: the same parameters as the uninterrupted run.
  assert loading.checkpoint_steps(copy) == [3, 6]
  recovered = loading.load_model(copy)
  assert recovered.step == 6
  for a, b in zip(jax.tree.leaves(recovered.variables), jax.tree.leaves(smoke_model.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # metrics.jsonl was cut back to step 3 and logged again: the same losses and validation
  # Dice as the uninterrupted run's, step by step (timings aside).
  def logged(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f if line.strip()]
    return [
      {k: v for k, v in r.items() if k == 'step' or k.endswith('loss') or k.startswith('val/')}
      for r in records
    ]

  assert logged(copy) == logged(smoke_workdir)


def test_when_no_checkpoint_restores_nothing_is_moved(smoke_workdir, tmp_path):
  copy = _copy(smoke_workdir, tmp_path)
  for step in ('3', '6'):
    with open(os.path.join(copy, 'checkpoints', step, 'state', '_METADATA'), 'r+b') as f:
      f.truncate(100)
  before = _snapshot(os.path.join(copy, 'checkpoints'))
  config = workdir_lib.load_config(copy)
  with pytest.raises(
    errors.CheckpointError,
    match=r'checkpoint .*/checkpoints/6: cannot '
    r'be restored: state/_METADATA is not valid JSON .*no older checkpoint '
    r'restores either: \[3\]; nothing was moved',
  ):
    train.train_and_evaluate(config, copy)
  assert _snapshot(os.path.join(copy, 'checkpoints')) == before
  assert not os.path.exists(os.path.join(copy, workdir_lib.UNRESTORABLE_DIR))


# --- user mistakes: one line, exit 1 or 2 ---------------------------------------------------------


@pytest.mark.slow
def test_a_config_field_typo_is_one_line(tmp_path):
  done = _run(
    '-m',
    'imask_jax.main',
    '--config',
    'experiments/phantom_knee.py:smoke',
    '--config.train.stepz=5',
    '--workdir',
    str(tmp_path / 'w'),
  )
  assert done.returncode == 2
  assert done.stderr.strip() == (
    'python -m imask_jax.main: --config.train.stepz: the config has '
    "no field 'stepz' (did you mean 'steps'?)"
  )
  assert not (tmp_path / 'w').exists()
  verbose = _run(
    '-m',
    'imask_jax.main',
    '--config',
    'experiments/phantom_knee.py:smoke',
    '--config.train.stepz=5',
    '--workdir',
    str(tmp_path / 'w'),
    '--verbose',
  )
  assert verbose.returncode != 0 and 'Traceback' in verbose.stderr


def test_explicit_steps_win_over_the_experiments_epochs(smoke_workdir, tmp_path):
  # Before: experiments/oai.py --config.train.steps=3 trained 55200 steps (its 300 epochs won).
  # Here the experiment sets epochs=1 through its variant; steps=2 on the command line must win.
  # The copy's checkpoint is at step 6, so the job resolves its steps and stops at once.
  copy = _copy(smoke_workdir, tmp_path)
  data_dir = workdir_lib.load_config(copy).data.data_dir
  done = _run(
    '-m',
    'imask_jax.main',
    '--config',
    'experiments/phantom_knee.py:smoke,epochs=1',
    '--config.train.steps=2',
    f'--config.data.data_dir={data_dir}',
    '--workdir',
    copy,
  )
  assert done.returncode == 0, done.stderr
  assert (
    "train.steps=2 from the command line: the config's train.epochs=1.0 is not used" in done.stdout
  )
  assert 'nothing to do: the checkpoint is at step 6 of 2' in done.stdout
  saved = workdir_lib.load_config(copy)
  assert saved.train.steps == 2 and saved.train.epochs == 0
  both = _run(
    '-m',
    'imask_jax.main',
    '--config',
    'experiments/phantom_knee.py:smoke',
    '--config.train.steps=2',
    '--config.train.epochs=3',
    '--workdir',
    copy,
  )
  assert both.returncode == 2
  assert both.stderr.strip().endswith(
    '--config.train.steps=2 and --config.train.epochs=3.0 '
    'both given; give one (epochs > 0 decides the step count, '
    'steps alone replaces the epochs)'
  )


def test_a_changed_setting_on_resume_is_one_line(smoke_workdir, tmp_path):
  copy = _copy(smoke_workdir, tmp_path)
  data_dir = workdir_lib.load_config(copy).data.data_dir
  done = _run(
    '-m',
    'imask_jax.main',
    '--config',
    'experiments/phantom_knee.py:smoke',
    '--config.model.width=12',
    f'--config.data.data_dir={data_dir}',
    '--workdir',
    copy,
  )
  assert done.returncode == errors.EXIT_REFUSED
  assert done.stderr.strip().splitlines()[-1] == (
    f'SettingsChangedError: {copy}: its checkpoints were trained with other settings '
    f'(model.width: 8 -> 12); resume with the settings of {copy}/config.json or start a new '
    'workdir'
  )
  assert 'Traceback' not in done.stderr


def test_evaluate_without_config_and_a_missing_checkpoint_are_one_line(
  smoke_workdir, tmp_path, capsys
):
  assert evaluate.main(['--workdir', str(tmp_path)]) == errors.EXIT_REFUSED
  err = capsys.readouterr().err
  assert err == (
    f'python -m imask_jax.evaluate: NotAWorkdirError: {tmp_path}/config.json: no '
    f"config.json in the workdir; is '{tmp_path}' a training workdir (made by "
    'python -m imask_jax.main)?\n'
  )
  assert evaluate.main(['--workdir', smoke_workdir, '--checkpoint', '999']) == errors.EXIT_REFUSED
  err = capsys.readouterr().err
  assert err == (
    f'python -m imask_jax.evaluate: MissingCheckpointError: {smoke_workdir}/'
    'checkpoints: no checkpoint at step 999; stored steps: [3, 6]\n'
  )
  stream = io.StringIO()
  scan = tmp_path / 'scan.nii.gz'
  nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), POSED_AFFINE), str(scan))
  assert (
    predict_command(smoke_workdir, str(scan), str(tmp_path / 'out'), checkpoint=999, stream=stream)
    == errors.EXIT_REFUSED
  )
  assert stream.getvalue() == (
    f'predict: refused: MissingCheckpointError: {smoke_workdir}/'
    'checkpoints: no checkpoint at step 999; stored steps: [3, 6]\n'
  )
