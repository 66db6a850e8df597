"""Evaluated runs named on the command line: `--run NAME=PATH`, PATH a workdir evaluated by
`python -m imask_jax.evaluate` (its newest evaluation of the split) or one evaluation folder
(`DIR/eval/<step>/`). What evaluate wrote there is read back as it is: metrics.csv, ap.csv,
thickness.csv, volumes.csv and eval.json (docs/evaluation.md); nothing is measured again.

A name given several times is one model at several seeds (or trainings): its tables pool
the volumes of every run. Every run of one command must have evaluated the same cases."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

# The paper's names of the two models; any other run name is shown as given.
DISPLAY_NAMES = {'mask_rcnn': 'Mask R-CNN', 'imask': 'iMaskRCNN'}
# Columns read as numbers (everything else stays text).
TEXT_COLUMNS = frozenset({'case_id', 'tissue', 'status', 'scope', 'plate', 'note', 'rater'})


class RunError(ValueError):
  """A run that cannot be used: not evaluated, unreadable, or not comparable with the others.
  The command prints its message as one line."""


def display_name(name: str) -> str:
  return DISPLAY_NAMES.get(name, name)


@dataclasses.dataclass(frozen=True, eq=False)
class EvaluatedRun:
  """One evaluation folder of one run: its CSV rows (numbers as floats, NaN where blank) and
  eval.json. thickness / volumes are empty lists where the dataset has none."""

  name: str
  eval_dir: str
  info: dict[str, Any]
  metrics: list[dict[str, Any]]
  ap: list[dict[str, Any]]
  thickness: list[dict[str, Any]]
  volumes: list[dict[str, Any]]

  @property
  def cases(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r['case_id'] for r in self.metrics))

  @property
  def workdir(self) -> str:
    return str(self.info.get('workdir') or os.path.dirname(os.path.dirname(self.eval_dir)))

  def describe(self) -> str:
    """One line of provenance: the folder, step, split, model and the number of volumes."""
    info = self.info
    model = (
      'U-Net'
      if info.get('model_kind') == 'unet'
      else f'mask head {info.get("mask_head", "?")}, backbone {info.get("backbone", "?")}'
    )
    return (
      f'{self.eval_dir} (step {info.get("checkpoint_step", "?")}, split '
      f'{info.get("split", "?")}, {model}, {len(self.cases)} volumes)'
    )


def parse_run(text: str) -> tuple[str, str]:
  """'NAME=PATH' -> (NAME, PATH)."""
  name, sep, path = text.partition('=')
  if not sep or not name or not path:
    raise RunError(f'--run {text!r}: expected NAME=PATH, e.g. imask=runs/oai_imask')
  return name, path


def find_eval_dir(path: str, split: str) -> str:
  """`path` itself when it holds metrics.csv, else the newest evaluation of `split` in the
  workdir `path` (the highest step of eval/<step>/ or eval/<step>_<split>/ with metrics.csv
  and an eval.json naming that split)."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, 'metrics.csv')):
    return path
  folder = os.path.join(path, 'eval')
  if not os.path.isdir(folder):
    raise RunError(
      f'{path}: neither an evaluation folder (no metrics.csv) nor an evaluated workdir (no '
      'eval/); run python -m imask_jax.evaluate --workdir on it first'
    )
  found = []
  for entry in os.listdir(folder):
    step = entry.split('_', 1)[0]
    candidate = os.path.join(folder, entry)
    if not step.isdigit() or not os.path.isfile(os.path.join(candidate, 'metrics.csv')):
      continue
    if _read_info(candidate).get('split') == split:
      found.append((int(step), candidate))
  if not found:
    raise RunError(
      f'{path}: no evaluation of split {split!r} under {folder}; run python -m '
      f'imask_jax.evaluate --workdir {path} --split {split}'
    )
  return max(found)[1]


def _read_info(eval_dir: str) -> dict[str, Any]:
  path = os.path.join(eval_dir, 'eval.json')
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _number(text: str) -> float:
  return float(text) if text != '' else math.nan


def read_rows(path: str) -> list[dict[str, Any]]:
  """A CSV evaluate wrote, numbers as floats (blank -> NaN); [] where the file is absent."""
  if not os.path.isfile(path):
    return []
  with open(path, newline='', encoding='utf-8') as f:
    return [
      {k: v if k in TEXT_COLUMNS else _number(v) for k, v in row.items()}
      for row in csv.DictReader(f)
    ]


def load_run(name: str, path: str, split: str = 'test') -> EvaluatedRun:
  eval_dir = find_eval_dir(path, split)
  run = EvaluatedRun(
    name=name,
    eval_dir=eval_dir,
    info=_read_info(eval_dir),
    metrics=read_rows(os.path.join(eval_dir, 'metrics.csv')),
    ap=read_rows(os.path.join(eval_dir, 'ap.csv')),
    thickness=read_rows(os.path.join(eval_dir, 'thickness.csv')),
    volumes=read_rows(os.path.join(eval_dir, 'volumes.csv')),
  )
  if not run.metrics:
    raise RunError(f'{eval_dir}: metrics.csv has no rows')
  return run


def check_same_cases(runs: Sequence[EvaluatedRun]) -> tuple[str, ...]:
  """The cases every run evaluated (in the first run's order); a RunError naming the first run
  that differs and the cases only one side has."""
  first = runs[0]
  for run in runs[1:]:
    if set(run.cases) != set(first.cases):
      only_first = sorted(set(first.cases) - set(run.cases))
      only_run = sorted(set(run.cases) - set(first.cases))
      raise RunError(
        f'the runs evaluated different cases: {first.name} ({first.eval_dir}) and {run.name} '
        f'({run.eval_dir}); only in {first.name}: {_few(only_first)}; only in {run.name}: '
        f'{_few(only_run)}. Evaluate both on the same split of the same data'
      )
  return first.cases


def _few(ids: Sequence[str], shown: int = 5) -> str:
  if not ids:
    return 'none'
  more = f' and {len(ids) - shown} more' if len(ids) > shown else ''
  return ', '.join(ids[:shown]) + more


def by_model(runs: Sequence[EvaluatedRun]) -> dict[str, list[EvaluatedRun]]:
  """Runs grouped by name, in the order the names were first given."""
  groups: dict[str, list[EvaluatedRun]] = {}
  for run in runs:
    groups.setdefault(run.name, []).append(run)
  return groups


def load_runs(specs: Sequence[str], split: str = 'test') -> list[EvaluatedRun]:
  """Every `--run NAME=PATH`, loaded, with the same cases (else RunError)."""
  if not specs:
    raise RunError('no --run given: name each evaluated run as --run NAME=WORKDIR')
  runs = [load_run(*parse_run(spec), split=split) for spec in specs]
  check_same_cases(runs)
  return runs


def rows_of(runs: Sequence[EvaluatedRun], table: str, **where: Any) -> list[Mapping[str, Any]]:
  """The rows of CSV `table` ('metrics', 'ap', 'thickness', 'volumes') of every run that match
  every column = value in `where`."""
  return [
    row
    for run in runs
    for row in getattr(run, table)
    if all(row.get(k) == v for k, v in where.items())
  ]
