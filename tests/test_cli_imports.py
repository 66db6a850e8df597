"""Issue 33: every command answers --help and an argument mistake without importing JAX or
TensorFlow (seconds of CPU each), so that both come back in about a second. A test of what is
imported (the interpreter's -X importtime record of the real `python -m` command), not a
timed test."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ('jax', 'tensorflow')
# Each command and an option its help lists.
COMMANDS = {
  'imask_jax.main': '--workdir',
  'imask_jax.evaluate': '--workdir',
  'imask_jax.predict': '--workdir',
  'imask_jax.sweep': '--workdir',
  'imask_jax.convert_weights': '--arch',
  'data_pipelines.phantoms': '--num',
  'data_pipelines.prepare': '--mask_axcodes',
  'imask_jax.change': '--table',
  'imask_jax.evaluation.paper': '--run',
}


def run_and_list_imports(module: str, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
  """`python -X importtime -m module args`, and the top-level packages it imported."""
  done = subprocess.run(
    [sys.executable, '-X', 'importtime', '-m', module, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  imported = {
    line.rsplit('|', 1)[1].strip().split('.')[0]
    for line in done.stderr.splitlines()
    if line.startswith('import time:') and line.count('|') == 2
  }
  assert 'argparse' in imported or 'absl' in imported, done.stderr[-2000:]  # the record is there
  return done, imported


@pytest.mark.parametrize('module', COMMANDS)
def test_help_imports_neither_jax_nor_tensorflow(module):
  done, imported = run_and_list_imports(module, '--help')
  # argparse exits with status 0 after its help, absl with 1
  assert done.returncode in (0, 1) and COMMANDS[module] in done.stdout, done.stderr[-2000:]
  assert not imported & set(HEAVY), f'{module} --help imported {sorted(imported & set(HEAVY))}'


@pytest.mark.parametrize('module', COMMANDS)
def test_an_argument_mistake_imports_neither_jax_nor_tensorflow(module):
  done, imported = run_and_list_imports(module, '--no-such-option')
  assert done.returncode != 0
  assert 'no-such-option' in done.stderr or 'required' in done.stderr, done.stderr[-2000:]
  assert 'Traceback' not in done.stderr
  assert not imported & set(HEAVY), f'{module}: a bad option imported {imported & set(HEAVY)}'
