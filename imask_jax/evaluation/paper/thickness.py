"""The paper's Table 5 with the models side by side, from evaluated runs' thickness.csv: per
plate, the mean ± SD over volumes (x runs) of each volume's mean difference between the
truth's and the model's thickness maps and of that difference's SD, then our extras (mean
thickness of truth and prediction, the maps' coverage).

Sign (`convention`): 'paper' gives truth - prediction, the paper's "GT - P" rows (positive =
the model under-estimates, the red of its Figure 8); 'ours' gives prediction - truth, the sign
evaluate's summary.md and thickness.csv use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from imask_jax.evaluation.paper.runs import EvaluatedRun, RunError, by_model, display_name, rows_of
from imask_jax.evaluation.paper.segmentation import provenance
from imask_jax.evaluation.report.cells import markdown_table, rows_cell

CONVENTIONS = ('paper', 'ours')
MEASURED = ('ok', 'missed', 'false_positive', 'both_empty')


def signed_rows(rows: Sequence[Mapping[str, Any]], convention: str) -> list[dict[str, Any]]:
  """thickness.csv rows with difference_mean_mm in the convention's sign."""
  if convention not in CONVENTIONS:
    raise ValueError(f'convention {convention!r}; expected one of {CONVENTIONS}')
  sign = -1.0 if convention == 'paper' else 1.0
  return [dict(r, difference_mean_mm=sign * r['difference_mean_mm']) for r in rows]


def plates_of(runs: Sequence[EvaluatedRun]) -> list[str]:
  return list(dict.fromkeys(r['plate'] for run in runs for r in run.thickness))


def table5(runs: Sequence[EvaluatedRun], convention: str = 'paper') -> str:
  plates = plates_of(runs)
  if not plates:
    raise RunError('Table 5 needs knee evaluations with thickness.csv; the runs have none')
  difference = 'truth - prediction' if convention == 'paper' else 'prediction - truth'
  lines = [
    '# Table 5: cartilage thickness, truth map against prediction map',
    '',
    f'Per volume and plate, the {difference} thickness difference map (mm; cells where both '
    "maps have cartilage); columns: mean ± SD over volumes (x runs) of each volume's mean "
    'difference and of its SD. '
    + (
      'The sign is the paper\'s "GT - P": positive = the model under-estimates.'
      if convention == 'paper'
      else "The sign is evaluate's: positive = the model over-estimates (the paper's rows, "
      '"GT - P", have the other sign).'
    )
    + ' Volumes whose plate was not measured (the truth lacks it) are left out and counted.',
    '',
  ]
  rows, extras = [], []
  for plate in plates:
    for name, group in by_model(runs).items():
      all_rows = rows_of(group, 'thickness', plate=plate)
      measured = signed_rows([r for r in all_rows if r['status'] in MEASURED], convention)
      skipped = len(all_rows) - len(measured)
      note = f' ({skipped} not measured)' if skipped else ''
      label = f'GT - {display_name(name)}' if convention == 'paper' else display_name(name)
      if not measured:
        rows.append([plate, label, 'n/a' + note, 'n/a'])
        extras.append([plate, display_name(name)] + ['n/a'] * 4)
        continue
      rows.append(
        [
          plate,
          label,
          rows_cell(measured, 'difference_mean_mm', 2) + note,
          rows_cell(measured, 'difference_sd_mm', 2),
        ]
      )
      extras.append(
        [plate, display_name(name)]
        + [
          rows_cell(measured, column, digits)
          for column, digits in (
            ('truth_mean_mm', 2),
            ('pred_mean_mm', 2),
            ('fraction_compared', 3),
            ('fraction_pred_only', 3),
          )
        ]
      )
  header = [
    'Plate',
    'Thickness difference',
    'Average of mean differences (mm)',
    'Average of SD of differences (mm)',
  ]
  lines += markdown_table(header, rows) + ['', '## Our figures beside it', '']
  lines += [
    'Mean thickness of each map, and the cells compared / only in the prediction as '
    "fractions of the truth's cells (a region the model misses has no difference, so the "
    'mean difference alone cannot show it). Mean ± SD over volumes (x runs).',
    '',
  ]
  lines += markdown_table(
    [
      'Plate',
      'Model',
      'truth mean thickness (mm)',
      'predicted mean thickness (mm)',
      'cells compared',
      'cells only predicted',
    ],
    extras,
  )
  return '\n'.join(lines + [''] + provenance(runs))
