"""The paper's Table 7 with its four raters side by side: the readers and two models, joined
from two evaluations on the case id.

Each hip evaluation's volumes.csv holds, per case, every reader's effusion volume (right,
left, total mL; `labelsTr_<name>/` is rater `<name>`, `labelsTr/` is `reference`) and the
model's (rater `model`). The readers come from the data, so both evaluations must hold the
same cases with the same reader volumes; the models' rows are renamed after their runs. The
table itself is evaluate's (report.hip.hip_volume_lines: per hip at baseline, Right / Left /
Overall, differences and CoV between every pair of raters)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from imask_jax.evaluation.paper.runs import (
  EvaluatedRun,
  RunError,
  by_model,
  check_same_cases,
  display_name,
)
from imask_jax.evaluation.paper.segmentation import provenance
from imask_jax.evaluation.report.hip import hip_volume_lines
from imask_jax.evaluation.report.rows import MODEL_RATER, CaseResult

SIDES = ('right_ml', 'left_ml', 'total_ml')
REFERENCE = 'reference'  # labelsTr/: the reference labels, not one of the paper's readers


def reader_names(run: EvaluatedRun) -> list[str]:
  """The readers of an evaluation, in volumes.csv's order."""
  return list(dict.fromkeys(r['rater'] for r in run.volumes if r['rater'] != MODEL_RATER))


def default_readers(run: EvaluatedRun) -> list[str]:
  """The named readers (labelsTr_<name>/); `reference` only where it is the only one."""
  named = [r for r in reader_names(run) if r != REFERENCE]
  return named or reader_names(run)


def _volumes(run: EvaluatedRun) -> dict[tuple[str, str], dict[str, float]]:
  return {(r['case_id'], r['rater']): {s: r[s] for s in SIDES} for r in run.volumes}


def joined_results(
  runs: Sequence[EvaluatedRun], readers: Sequence[str]
) -> tuple[list[CaseResult], list[str]]:
  """One CaseResult per case holding only rater_ml (the readers', then each run's model
  volumes under the run's display name), and the raters in that order. RunError when the
  runs' cases differ, a reader is missing, or the runs' reader volumes disagree."""
  cases = check_same_cases(runs)
  tables = [_volumes(run) for run in runs]
  first = runs[0]
  for reader in readers:
    if reader not in reader_names(first):
      raise RunError(
        f'reader {reader!r} is not in {first.eval_dir}/volumes.csv; its readers: '
        f'{", ".join(reader_names(first)) or "none"}'
      )
  for run, table in zip(runs[1:], tables[1:]):
    for case in cases:
      for reader in readers:
        a, b = tables[0].get((case, reader)), table.get((case, reader))
        same = b is not None and all(
          math.isclose(a[s], b[s], rel_tol=1e-6, abs_tol=1e-9) for s in SIDES
        )
        if not same:
          raise RunError(
            f'case {case}: reader {reader} measures {a} in {first.eval_dir} but '
            f'{b} in {run.eval_dir}; the runs were not evaluated on the same data'
          )
  raters = list(readers) + [display_name(run.name) for run in runs]
  results = []
  for case in cases:
    rater_ml = {reader: tables[0][(case, reader)] for reader in readers}
    for run, table in zip(runs, tables):
      if (case, MODEL_RATER) not in table:
        raise RunError(f'{run.eval_dir}/volumes.csv has no model row for case {case}')
      rater_ml[display_name(run.name)] = table[(case, MODEL_RATER)]
    results.append(CaseResult(case, {}, {}, {}, {}, rater_ml=rater_ml))
  return results, raters


def table7(runs: Sequence[EvaluatedRun], readers: Sequence[str] | None = None) -> str:
  """Table 7: effusion volumes per hip at baseline of the readers and every model."""
  groups = by_model(runs)
  several = [name for name, group in groups.items() if len(group) > 1]
  if several:
    raise RunError(
      f'Table 7 compares one evaluated run per model; {", ".join(several)} is given '
      f'{len(groups[several[0]])} times'
    )
  if not all(run.volumes for run in runs):
    missing = next(run for run in runs if not run.volumes)
    raise RunError(f'Table 7 needs hip evaluations with volumes.csv; {missing.eval_dir} has none')
  readers = list(readers) if readers else default_readers(runs[0])
  results, raters = joined_results(runs, readers)
  patterns = {str(run.info.get('subject_pattern') or '') for run in runs}
  if len(patterns) > 1:
    raise RunError(f'the runs split case ids into subjects differently: {sorted(patterns)}')
  lines = hip_volume_lines(results, raters, patterns.pop())
  lines[0] = '# Table 7: effusion volumes of the readers and the models'
  return '\n'.join(lines + [''] + provenance(runs))
