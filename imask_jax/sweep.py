"""Ablation sweeps: train and evaluate every variant of a sweep, then one comparison table.

  python -m imask_jax.sweep --config experiments/ablations.py:dataset=phantom_knee --workdir DIR
  python -m imask_jax.sweep --config ... --workdir DIR --dry_run         # commands, run nothing
  python -m imask_jax.sweep --config ... --workdir DIR --aggregate_only  # tables from what is done

A sweep config (experiments/ablations.py) names a base experiment, its argument for every run,
the seeds, and the variants as (name, config arguments, baseline). Each run, a variant at a
seed, is an ordinary training workdir DIR/<variant>/seed<k>/: `python -m imask_jax.main` trains
it (resuming from its latest checkpoint) and `python -m imask_jax.evaluate` evaluates its last
checkpoint on the sweep's split. A run is finished when that evaluation exists, so a sweep
started again skips finished runs and resumes the others, however it was stopped. A failing run
is reported with the end of its log and the others still run; the exit status is then 1.
All runs share one prepared dataset in DIR/tfds (or $IMASK_DATA_DIR, or the experiment's own
data.data_dir).

Then DIR/summary.csv (a row per variant, seed, test volume and tissue) and DIR/summary.md:
the paper's Table 3 layout (Dice, Hausdorff in pixels, average symmetric surface distance in mm
as the boundary measure, mask AP; mean ± SD over volumes and seeds) and paired Wilcoxon
signed-rank tests of each variant against its baseline over the same volumes and seeds
(evaluation/sweep_summary.py).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from data_pipelines.atomic import atomic_path
from imask_jax import configs, errors
from imask_jax.errors import SettingsChangedError, SweepLockedError
from imask_jax.evaluation.sweep_summary import (
  SUMMARY_COLUMNS,
  pooled_ap,
  run_rows,
  summary_markdown,
)
from imask_jax.models.spec import model_kind

LOG_NAME = 'sweep.log'
PLAN_NAME = 'sweep_plan.json'


@dataclasses.dataclass(frozen=True)
class Run:
  """One variant at one seed: the experiment argument and the workdir it trains in."""

  variant: str
  seed: int
  baseline: str
  arg: str
  workdir: str
  data_dir: str | None = None  # TFDS data_dir given to the run; None: the experiment's own

  @property
  def name(self) -> str:
    return f'{self.variant}/seed{self.seed}'


def check_run_config(config: ml_collections.ConfigDict) -> None:
  """What can be checked of a run's config without data: the training settings and the
  network's fields (a U-Net's, or the backbone and mask head names)."""
  from imask_jax.models.backbones import build_backbone
  from imask_jax.models.mask_rcnn import ModelSpec

  configs.check_train_config(config)
  if model_kind(config) == 'unet':
    from imask_jax.models.unet import UNetSpec

    UNetSpec.from_config(config)
    return
  build_backbone(str(config.model.backbone), norm=str(config.model.norm))
  # Every model field present and typed, and a mask head the registry knows:
  ModelSpec.from_config(config).build_mask_head(parent=None)


def check_sweep(sweep: ml_collections.ConfigDict) -> None:
  """Variant names unique and usable as folder names; every baseline a variant of the sweep."""
  names = [str(v[0]) for v in sweep.variants]
  if not names:
    raise ValueError('sweep config: no variants')
  if len(set(names)) != len(names):
    raise ValueError(f'sweep config: variant names repeat: {names}')
  for name, _, baseline in sweep.variants:
    # A run's folder is DIR/<name>/seed<k>: '.', '..' or a hidden name would land outside
    # DIR or out of sight, a path separator in another folder.
    if not name or name.startswith('.') or any(not (c.isalnum() or c in '-_.') for c in name):
      raise ValueError(
        f'sweep config: variant name {name!r} must be letters, digits, - _ . '
        "and not start with '.' (it names the run's folder)"
      )
    if baseline and baseline not in names:
      raise ValueError(
        f'sweep config: variant {name!r} is compared with {baseline!r}, which is '
        f'not a variant of the sweep ({names})'
      )
  if not sweep.seeds:
    raise ValueError('sweep config: no seeds')


def plan(sweep: ml_collections.ConfigDict, workdir: str) -> list[Run]:
  """Every run of the sweep, variants in order and seeds within each, with its full argument.

  Each argument is loaded and checked here, so a typo in a variant fails before anything
  trains."""
  check_sweep(sweep)
  # Runs whose experiment names no data_dir share one prepared dataset.
  shared = os.environ.get('IMASK_DATA_DIR') or os.path.join(os.path.abspath(workdir), 'tfds')
  runs = []
  for name, variant_arg, baseline in sweep.variants:
    for seed in sweep.seeds:
      arg = ','.join(a for a in (str(sweep.base_arg), str(variant_arg), f'seed={int(seed)}') if a)
      try:
        config = configs.load_experiment(str(sweep.experiment), arg)
        check_run_config(config)
      except Exception as error:  # noqa: BLE001 -- named and re-raised with its cause
        raise ValueError(
          f'sweep variant {name!r}: {sweep.experiment}:{arg} does not load: {error}'
        ) from error
      runs.append(
        Run(
          str(name),
          int(seed),
          str(baseline),
          arg,
          os.path.join(os.path.abspath(workdir), str(name), f'seed{int(seed)}'),
          None if config.data.data_dir else shared,
        )
      )
  return runs


def train_command(sweep: ml_collections.ConfigDict, run: Run) -> list[str]:
  command = [
    sys.executable,
    '-m',
    'imask_jax.main',
    f'--config={sweep.experiment}:{run.arg}',
    f'--workdir={run.workdir}',
  ]
  if run.data_dir:
    command.append(f'--config.data.data_dir={run.data_dir}')
  return command


def evaluate_command(sweep: ml_collections.ConfigDict, run: Run) -> list[str]:
  return [
    sys.executable,
    '-m',
    'imask_jax.evaluate',
    f'--workdir={run.workdir}',
    f'--split={sweep.split}',
  ]


def finished_eval_dir(run: Run, split: str) -> str | None:
  """The run's evaluation of its last training step on `split`, if it exists (an evaluation
  folder appears whole or not at all), else None."""
  from imask_jax import workdir as workdir_lib
  from imask_jax.evaluation import held_out

  if not os.path.exists(os.path.join(run.workdir, 'config.json')):
    return None
  config = workdir_lib.load_config(run.workdir)
  folder = held_out.eval_dir(run.workdir, int(config.train.steps), split, config)
  return folder if os.path.exists(os.path.join(folder, 'metrics.csv')) else None


# --- running ---------------------------------------------------------------------------------


class SweepLock:
  """An exclusive lock on DIR/.sweep.lock for as long as this sweep or a run it started lives:
  the runs inherit the open lock file, so even after the sweep itself is killed, a second
  sweep cannot start a second trainer on a workdir still being written."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, '.sweep.lock')
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self.fd)
      raise SweepLockedError(
        f'{self.path}: another sweep (or a run it started) is still working '
        f'in {workdir}; wait for it or stop it first'
      ) from None

  def close(self) -> None:
    os.close(self.fd)


def _run_logged(
  command: Sequence[str], log_path: str, echo: Callable[[str], None] | None, lock: SweepLock
) -> int:
  """Runs `command`, appending its output to `log_path` (and echoing each line); returns its
  exit status. Stopping the sweep (SIGTERM, Ctrl-C) stops the command too."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '2'))
  with open(log_path, 'a', encoding='utf-8') as log:
    log.write(f'$ {shlex.join(command)}\n')
    log.flush()
    child = subprocess.Popen(
      command,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
      pass_fds=(lock.fd,),
    )
    try:
      for line in child.stdout:
        log.write(line)
        log.flush()
        if echo is not None:
          echo(line.rstrip('\n'))
      return child.wait()
    finally:
      if child.poll() is None:
        child.terminate()
        child.wait()


def _tail(path: str, lines: int = 15) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    return ''.join(f.readlines()[-lines:])


def run_settings(sweep: ml_collections.ConfigDict, run: Run) -> dict[str, Any]:
  """The experiment config the run trains with, as JSON types (what main.py will load)."""
  return json.loads(configs.load_experiment(str(sweep.experiment), run.arg).to_json())


def check_plan(
  sweep: ml_collections.ConfigDict, workdir: str, runs: Sequence[Run]
) -> dict[str, dict[str, Any]]:
  """Records every run's settings in DIR/sweep_plan.json at the sweep's first start and
  refuses to go on if a recorded run's settings have changed since (an edited experiment file,
  another base_arg): the table would compare runs made with different settings. A field the
  code added since counts as recorded with its legacy value or default. New variants are added
  to the record. Returns the settings of `runs`."""
  from imask_jax import workdir as workdir_lib

  path = os.path.join(workdir, PLAN_NAME)
  recorded: dict[str, dict[str, Any]] = {}
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
  current = {run.name: run_settings(sweep, run) for run in runs}
  then = {name: workdir_lib.with_added_fields(settings) for name, settings in recorded.items()}
  changed = [
    f'{name}: {"; ".join(diff)}'
    for name, settings in current.items()
    if name in then and (diff := workdir_lib.changed_fields(then[name], settings))
  ]
  if changed:
    raise SettingsChangedError(
      f'{path}: the settings of {len(changed)} run(s) changed since this sweep started '
      f'({" | ".join(changed)}). Use a new --workdir, or delete {path} to accept the new '
      'settings (finished runs keep the results of the old ones).'
    )
  with atomic_path(path) as tmp:
    with open(tmp, 'w') as f:
      json.dump({**recorded, **current}, f, indent=1)
  return current


def run_sweep(
  sweep: ml_collections.ConfigDict,
  workdir: str,
  runs: Sequence[Run],
  *,
  echo: Callable[[str], None] | None = print,
) -> list[str]:
  """Trains and evaluates every unfinished run in turn; returns the names of failed runs.

  Raises SettingsChangedError before anything runs if the recorded plan no longer holds; a run
  whose experiment file changes while the sweep is going fails (the others still run)."""
  say = echo or (lambda line: None)
  lock = SweepLock(workdir)
  failed = []
  try:
    planned = check_plan(sweep, workdir, runs)
    for index, run in enumerate(runs):
      head = f'[{index + 1}/{len(runs)}] {run.name}'
      if finished_eval_dir(run, str(sweep.split)):
        say(f'{head}: finished before, skipped')
        continue
      if run_settings(sweep, run) != planned[run.name]:
        failed.append(run.name)
        say(
          f'{head}: not started: {sweep.experiment} changed while the sweep was running, '
          f'so this run would not train with the settings recorded in {PLAN_NAME}'
        )
        continue
      os.makedirs(run.workdir, exist_ok=True)
      log_path = os.path.join(run.workdir, LOG_NAME)
      started = time.time()
      for what, command in (
        ('training', train_command(sweep, run)),
        ('evaluating', evaluate_command(sweep, run)),
      ):
        say(f'{head}: {what} (log: {log_path})')
        status = _run_logged(
          command, log_path, None if echo is None else (lambda line: echo(f'  {line}')), lock
        )
        if status != 0:
          failed.append(run.name)
          say(
            f'{head}: {what} failed with exit status {status}; the end of its log:\n'
            f'{_tail(log_path)}'
          )
          break
      else:
        if not finished_eval_dir(run, str(sweep.split)):
          failed.append(run.name)
          say(f'{head}: ran, but its last checkpoint has no evaluation (see {log_path})')
        else:
          say(f'{head}: finished in {time.time() - started:.0f} s')
  finally:
    lock.close()
  return failed


def dry_run_commands(
  sweep: ml_collections.ConfigDict, workdir: str, runs: Sequence[Run], sweep_flags: str
) -> list[str]:
  """One shell line per run (train, then evaluate), then the aggregation command."""
  lines = [
    f'# {len(runs)} runs; the first one prepares the shared dataset, so start it '
    'alone or wait until its training has begun'
  ]
  for run in runs:
    lines.append(
      shlex.join(train_command(sweep, run)) + ' && ' + shlex.join(evaluate_command(sweep, run))
    )
  lines.append(
    f'# when all have finished:\n{shlex.join([sys.executable, "-m", "imask_jax.sweep"])}'
    f' {sweep_flags} --workdir={shlex.quote(os.path.abspath(workdir))} '
    '--aggregate_only'
  )
  return lines


# --- aggregation -----------------------------------------------------------------------------


def aggregate(
  sweep: ml_collections.ConfigDict, workdir: str, runs: Sequence[Run]
) -> tuple[str, list[str]]:
  """Writes DIR/summary.csv and DIR/summary.md from the finished runs; returns the markdown
  and the names of runs not finished."""
  from imask_jax.evaluation.report import write_csv, write_text

  rows, ap_by_run, missing = [], {}, []
  for run in runs:
    eval_dir = finished_eval_dir(run, str(sweep.split))
    if eval_dir is None:
      missing.append(run.name)
      continue
    rows += run_rows(run, eval_dir)
    ap_by_run[run.name] = pooled_ap(eval_dir)
  text = summary_markdown(sweep, runs, rows, ap_by_run, missing)
  write_csv(os.path.join(workdir, 'summary.csv'), SUMMARY_COLUMNS, rows)
  write_text(os.path.join(workdir, 'summary.md'), text)
  return text, missing


# --- the command -----------------------------------------------------------------------------


def _define_flags() -> None:
  """The command's flags, defined only when it runs: `python -m imask_jax.main` defines its own
  --config, and both modules may be imported into one process (the tests do)."""
  global _CONFIG, _WORKDIR, _DRY_RUN, _AGGREGATE_ONLY, _QUIET
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Sweep file and argument, e.g. experiments/ablations.py:dataset='
    'phantom_knee (fields overridable with --config.base_arg=... and the like).',
    lock_config=True,
  )
  _WORKDIR = flags.DEFINE_string('workdir', None, 'The sweep folder (one subfolder per run).')
  _DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Print one shell command per run (for a scheduler); run nothing.'
  )
  _AGGREGATE_ONLY = flags.DEFINE_bool(
    'aggregate_only', False, 'Write the summary from the runs finished so far; run nothing.'
  )
  _QUIET = flags.DEFINE_bool(
    'quiet', False, "Show one line per run and phase, not the runs' own output."
  )
  flags.mark_flags_as_required(['config', 'workdir'])


def _flags_without(argv: Sequence[str], names: Sequence[str]) -> list[str]:
  """argv less the flags `names` (as --name=value, --name value or a bare boolean --name)."""
  out, skip_value = [], False
  for arg in argv:
    if skip_value:
      skip_value = False
      continue
    name = arg.lstrip('-').split('=', 1)[0]
    if arg.startswith('-') and name in names:
      skip_value = '=' not in arg and not flags.FLAGS[name.removeprefix('no')].boolean
      continue
    out.append(arg)
  return out


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  sweep, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  runs = plan(sweep, workdir)
  if _DRY_RUN.value:
    sweep_flags = shlex.join(_flags_without(sys.argv[1:], ('dry_run', 'nodry_run', 'workdir')))
    print('\n'.join(dry_run_commands(sweep, workdir, runs, sweep_flags)))
    return errors.EXIT_OK
  os.makedirs(workdir, exist_ok=True)
  with atomic_path(os.path.join(workdir, 'sweep.json')) as tmp:
    with open(tmp, 'w') as f:
      f.write(sweep.to_json(indent=2))
  failed = []
  if not _AGGREGATE_ONLY.value:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stops the current run too
    quiet = _QUIET.value
    try:
      failed = run_sweep(
        sweep,
        workdir,
        runs,
        echo=lambda line: None if quiet and line.startswith('  ') else print(line, flush=True),
      )
    except (SettingsChangedError, SweepLockedError) as error:
      print(f'{type(error).__name__}: {error}', file=sys.stderr)
      return errors.EXIT_REFUSED
  text, _ = aggregate(sweep, workdir, runs)
  print(text)
  print(f'written: {os.path.join(workdir, "summary.md")} and summary.csv beside it')
  if failed:
    print(f'failed runs: {", ".join(failed)}', file=sys.stderr)
    return errors.EXIT_FAILED
  return errors.EXIT_OK


if __name__ == '__main__':
  _define_flags()
  app.run(main)
