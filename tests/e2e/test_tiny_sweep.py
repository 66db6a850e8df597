"""A tiny sweep end to end (python -m imask_jax.sweep in a subprocess): both runs train and
are evaluated, the sweep survives a SIGKILL of itself and its run, skips the finished run when
started again, and aggregates both into summary.csv / summary.md."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, subprocess_cache_env
from imask_jax import sweep
from imask_jax import workdir as workdir_lib

ABLATIONS = os.path.join(REPO, 'experiments', 'ablations.py')
TISSUES = ('femur', 'femoral_cartilage', 'tibia', 'tibial_cartilage')


def _sweep_command(workdir: str) -> list[str]:
  return [
    sys.executable,
    '-m',
    'imask_jax.sweep',
    f'--config={ABLATIONS}:dataset=phantom_knee,backbones=resnet18,base=smoke+steps=3',
    f'--workdir={workdir}',
  ]


def test_tiny_sweep_trains_evaluates_survives_a_kill_and_aggregates(
  tmp_path, smoke_workdir, xla_cache_dir
):
  # The runs read the smoke dataset the session fixture already built. They share the
  # session's persistent compilation cache (conftest): a program one of their processes
  # compiled (a run's detection, then again in its evaluation) is loaded by the next.
  env = dict(
    os.environ,
    IMASK_DATA_DIR=os.path.join(os.path.dirname(smoke_workdir), 'tfds'),
    TF_CPP_MIN_LOG_LEVEL='2',
    CUDA_VISIBLE_DEVICES='',
    **subprocess_cache_env(xla_cache_dir),
  )
  workdir = str(tmp_path / 'sweep')
  second_started = os.path.join(workdir, 'imask-resnet18', 'seed0', 'config.json')

  # Start the sweep and kill it (the sweep and its run, SIGKILL) once the second run began.
  first = subprocess.Popen(
    _sweep_command(workdir),
    cwd=REPO,
    env=env,
    start_new_session=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  # No deadline: the sweep either starts its second run or ends by itself.
  while not os.path.exists(second_started) and first.poll() is None:
    time.sleep(0.2)
  assert first.poll() is None, first.communicate()[0][-3000:]
  os.killpg(first.pid, signal.SIGKILL)
  first.communicate()
  standard = sweep.Run(
    'standard-resnet18', 0, '', '', os.path.join(workdir, 'standard-resnet18', 'seed0')
  )
  standard_eval = sweep.finished_eval_dir(standard, 'test')
  assert standard_eval is not None
  assert not os.path.exists(os.path.join(workdir, 'summary.md'))

  # Started again: the finished run is skipped, the killed one runs, both are aggregated.
  before = os.stat(os.path.join(standard_eval, 'metrics.csv')).st_mtime_ns
  again = subprocess.run(_sweep_command(workdir), cwd=REPO, env=env, capture_output=True, text=True)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert '[1/2] standard-resnet18/seed0: finished before, skipped' in again.stdout
  assert '[2/2] imask-resnet18/seed0: finished in' in again.stdout
  assert os.stat(os.path.join(standard_eval, 'metrics.csv')).st_mtime_ns == before

  with open(os.path.join(workdir, 'summary.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  imask = sweep.Run('imask-resnet18', 0, '', '', os.path.join(workdir, 'imask-resnet18', 'seed0'))
  for run in (standard, imask):
    with open(os.path.join(sweep.finished_eval_dir(run, 'test'), 'metrics.csv'), newline='') as f:
      truth = {(r['case_id'], r['tissue']): r['dice'] for r in csv.DictReader(f)}
    mine = {(r['case_id'], r['tissue']): r['dice'] for r in rows if r['variant'] == run.variant}
    assert mine == truth and set(t for _, t in truth) == set(TISSUES)
  with open(os.path.join(workdir, 'summary.md')) as f:
    text = f.read()
  assert 'runs finished: 2 of 2' in text
  # One row in the Table 3 layout, one in the HD95 / thickness table.
  assert [line.startswith('| standard-resnet18 |') for line in text.splitlines()].count(True) == 2
  assert '## Surface distance, thickness and volume' in text
  assert '| imask-resnet18 | standard-resnet18 | FC |' in text
  # Both runs read the one shared dataset, and their configs say so.
  for run in (standard, imask):
    assert workdir_lib.load_config(run.workdir).data.data_dir == env['IMASK_DATA_DIR']
    assert workdir_lib.load_config(run.workdir).train.steps == 3
