"""Sweep aggregation with two seeds, variants whose case sets differ, zero differences and a
structure empty in both, checked cell by cell against numbers worked out here.

Rows are summary.csv rows (variant, seed, case_id, tissue, status, metrics). Pairs of a variant
and its baseline are the (seed, case) keys both have, a structure empty in both excluded; the
Wilcoxon signed-rank test drops zero differences (Wilcoxon's rule, scipy's default
zero_method='wilcox') and is exact for these small samples without ties: its p is worked out
below by enumerating all 2^n sign patterns.
"""

from __future__ import annotations

import itertools
import math

import ml_collections
import numpy as np
import pytest
from scipy import stats

from imask_jax import sweep
from imask_jax.evaluation import sweep_summary

FC, TC = 'femoral_cartilage', 'tibial_cartilage'

# Dice by (seed, case). The imask runs miss case c3 at seed 1 and have an extra case c9 there:
# the case sets differ, so only 7 (seed, case) pairs exist. Differences imask - standard:
#   (0,c0) +0.02  (0,c1) 0  (0,c2) -0.01  (0,c3) +0.03  (1,c0) 0  (1,c1) +0.04  (1,c2) +0.05
STANDARD = {
  (0, 'c0'): 0.70,
  (0, 'c1'): 0.72,
  (0, 'c2'): 0.74,
  (0, 'c3'): 0.71,
  (1, 'c0'): 0.69,
  (1, 'c1'): 0.73,
  (1, 'c2'): 0.75,
  (1, 'c3'): 0.70,
}
IMASK = {
  (0, 'c0'): 0.72,
  (0, 'c1'): 0.72,
  (0, 'c2'): 0.73,
  (0, 'c3'): 0.74,
  (1, 'c0'): 0.69,
  (1, 'c1'): 0.77,
  (1, 'c2'): 0.80,
  (1, 'c9'): 0.90,
}


def _row(variant, seed, case, tissue, dice, status='ok'):
  """A summary.csv row; distances follow the Dice so that each metric has its own numbers."""
  row = {c: math.nan for c in sweep_summary.SUMMARY_COLUMNS}
  row.update(
    variant=variant,
    seed=seed,
    case_id=case,
    tissue=tissue,
    status=status,
    dice=dice,
    hausdorff_voxels=round(20 * (1 - dice), 6),
    assd_mm=round(2 * (1 - dice), 6),
    average_hausdorff_voxels=round(5 * (1 - dice), 6),
    ap=0.5,
  )
  return row


def _rows():
  rows = []
  for variant, table in (('standard', STANDARD), ('imask', IMASK)):
    for (seed, case), dice in table.items():
      rows.append(_row(variant, seed, case, FC, dice))
      # The tibial cartilage of c0 at seed 0 is empty in truth and prediction for both
      # variants: no pair, and it stays out of the means.
      if (seed, case) == (0, 'c0'):
        rows.append(_row(variant, seed, case, TC, 1.0, status='both_empty'))
      else:
        rows.append(_row(variant, seed, case, TC, dice - 0.1))
  return rows


def exact_two_sided_p(differences):
  """Wilcoxon signed-rank p by enumeration: zeros dropped, ranks of |d| (no ties here), p =
  P(min(W+, W-) <= observed) under random signs, doubled, at most 1."""
  d = [x for x in differences if x != 0]
  magnitudes = sorted(abs(x) for x in d)
  assert len(set(magnitudes)) == len(magnitudes), 'ties: not the exact table'
  rank = {m: i + 1 for i, m in enumerate(magnitudes)}
  w_plus = sum(rank[abs(x)] for x in d if x > 0)
  total = len(d) * (len(d) + 1) // 2
  observed = min(w_plus, total - w_plus)
  ranks = range(1, len(d) + 1)
  extreme = sum(
    1
    for signs in itertools.product((0, 1), repeat=len(d))
    if min(s := sum(r for r, b in zip(ranks, signs) if b), total - s) <= observed
  )
  return min(1.0, extreme / 2 ** len(d))


def test_pairs_are_matched_by_seed_and_case_and_zero_differences_are_dropped():
  rows = _rows()
  keys = sorted(set(STANDARD) & set(IMASK))
  assert len(keys) == 7
  differences = [IMASK[k] - STANDARD[k] for k in keys]
  assert differences.count(0.0) == 2
  # Hand-worked: nonzero |d| 0.01 (-), 0.02, 0.03, 0.04, 0.05 (+) have ranks 1 (-), 2..5 (+):
  # W- = 1, and of the 32 sign patterns of 5 ranks, 2 have a sum <= 1 ({} and {1}) and 2 more
  # mirror them: p = 4 / 32.
  assert exact_two_sided_p(differences) == 4 / 32
  n, mean, p, dropped, (low, high) = sweep_summary.paired_comparison(
    rows, 'imask', 'standard', FC, 'dice'
  )
  assert (n, dropped) == (7, 0)
  assert mean == pytest.approx(np.mean(differences), abs=1e-12)
  assert mean == pytest.approx(0.13 / 7, abs=1e-12)
  assert p == pytest.approx(4 / 32, abs=1e-12)
  assert p == pytest.approx(stats.wilcoxon(differences, zero_method='wilcox').pvalue, abs=1e-12)
  # The 95 % t-interval by hand: mean -+ t(0.975, n - 1) * s / sqrt(n).
  half = stats.t.ppf(0.975, 6) * np.std(differences, ddof=1) / math.sqrt(7)
  assert (low, high) == pytest.approx((mean - half, mean + half), abs=1e-12)
  # Distances pair the same way; lower is better, so their differences have the other sign.
  n, mean, p, _, _ = sweep_summary.paired_comparison(rows, 'imask', 'standard', FC, 'assd_mm')
  assert n == 7 and mean == pytest.approx(-2 * np.mean(differences), abs=1e-9)
  assert p == pytest.approx(4 / 32, abs=1e-12)
  # Tibial cartilage: the pair empty in both is not a pair.
  n, mean, p, dropped, _ = sweep_summary.paired_comparison(rows, 'imask', 'standard', TC, 'dice')
  assert (n, dropped) == (6, 0)
  assert mean == pytest.approx(np.mean(differences[1:]), abs=1e-9)


def test_wilcoxon_zero_rules_by_hand_and_scipy():
  # Zeros only: no evidence either way.
  assert sweep_summary.wilcoxon([0.0, 0.0, 0.0, 0.0]) == 1.0
  # One zero among five positives: the zero is dropped, leaving 5 positives: p = 2 / 2^5.
  assert sweep_summary.wilcoxon([0.0, 0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)
  assert sweep_summary.wilcoxon([0.0, 0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(
    exact_two_sided_p([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
  )
  # Three zeros dropped (Wilcoxon), not ranked (Pratt, which gives 0.0625 here): seven left,
  # -0.3 with rank 3; subsets of 1..7 with sum <= 3: {}, {1}, {2}, {3}, {1, 2}: p = 2 * 5 / 128.
  d = [0.0, 0.0, 0.0, 0.1, 0.2, -0.3, 0.4, 0.5, 0.6, 0.7]
  assert exact_two_sided_p(d) == 10 / 128
  assert sweep_summary.wilcoxon(d) == pytest.approx(10 / 128)
  # A single nonzero difference among zeros: p = 1 (one sign pattern of two is as extreme).
  assert sweep_summary.wilcoxon([0.0, 0.0, 0.3]) == pytest.approx(
    exact_two_sided_p([0.0, 0.0, 0.3])
  )
  assert exact_two_sided_p([0.0, 0.0, 0.3]) == 1.0
  # Mixed signs, no zeros: |d| ranks 1 (+), 2 (-), 3..6 (+): W- = 2; subsets of 1..6 with sum
  # <= 2: {}, {1}, {2}: p = 2 * 3 / 64.
  d = [0.1, -0.2, 0.3, 0.4, 0.5, 0.6]
  assert sweep_summary.wilcoxon(d) == pytest.approx(6 / 64)
  assert sweep_summary.wilcoxon(d) == pytest.approx(stats.wilcoxon(d).pvalue)
  assert math.isnan(sweep_summary.wilcoxon([0.2]))


def test_mean_interval_edge_cases():
  assert all(math.isnan(v) for v in sweep_summary.mean_interval([0.3]))
  assert sweep_summary.mean_interval([0.2, 0.2, 0.2]) == (0.2, 0.2)
  d = [0.1, -0.2, 0.3, 0.4]
  half = stats.t.ppf(0.975, 3) * np.std(d, ddof=1) / 2
  assert sweep_summary.mean_interval(d) == pytest.approx((np.mean(d) - half, np.mean(d) + half))


def _cells(text, first, width):
  """The cells of the markdown table rows of `width` cells that start with `first`."""
  out = []
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if line.startswith('|') and len(cells) == width and tuple(cells[: len(first)]) == first:
      out.append(cells)
  return out


def test_summary_tables_cell_by_cell_over_seeds_and_differing_cases():
  rows = _rows()
  config = ml_collections.ConfigDict(
    dict(
      experiment='x.py',
      base_arg='',
      study='heads',
      seeds=(0, 1),
      split='test',
      variants=(('standard', 'head=standard', ''), ('imask', 'head=imask', 'standard')),
    )
  )
  runs = [
    sweep.Run(v, s, b, '', f'/nowhere/{v}/seed{s}') for v, _, b in config.variants for s in (0, 1)
  ]
  ap_by_run = {
    'standard/seed0': {FC: 0.20, TC: 0.10},
    'standard/seed1': {FC: 0.30, TC: 0.12},
    'imask/seed0': {FC: 0.40, TC: 0.20},
    'imask/seed1': {FC: 0.45, TC: 0.30},
  }
  text = sweep_summary.summary_markdown(config, runs, rows, ap_by_run, [])
  assert 'runs finished: 4 of 4' in text

  (header,) = _cells(text, ('Variant', 'Dice FC'), 11)
  assert header == [
    'Variant',
    'Dice FC',
    'Dice TC',
    'Hausdorff (px) FC',
    'Hausdorff (px) TC',
    'Ave. Hausdorff (px) FC',
    'Ave. Hausdorff (px) TC',
    'ASSD (mm) FC',
    'ASSD (mm) TC',
    'AP FC',
    'AP TC',
  ]

  def mean_sd(values, digits):
    return f'{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}'

  for variant, table in (('standard', STANDARD), ('imask', IMASK)):
    (cells,) = _cells(text, (variant,), 11)
    fc = list(table.values())  # 8 rows each
    tc = [d - 0.1 for k, d in table.items() if k != (0, 'c0')]  # both-empty row left out
    want = [
      variant,
      mean_sd(fc, 3),
      mean_sd(tc, 3),
      mean_sd([20 * (1 - d) for d in fc], 2),
      mean_sd([20 * (1 - d) for d in tc], 2),
      mean_sd([5 * (1 - d) for d in fc], 3),
      mean_sd([5 * (1 - d) for d in tc], 3),
      mean_sd([2 * (1 - d) for d in fc], 3),
      mean_sd([2 * (1 - d) for d in tc], 3),
      mean_sd([ap_by_run[f'{variant}/seed{s}'][FC] for s in (0, 1)], 3),
      mean_sd([ap_by_run[f'{variant}/seed{s}'][TC] for s in (0, 1)], 3),
    ]
    assert cells == want, variant

  keys = sorted(set(STANDARD) & set(IMASK))
  d_fc = [IMASK[k] - STANDARD[k] for k in keys]
  d_tc = [IMASK[k] - STANDARD[k] for k in keys if k != (0, 'c0')]

  def with_interval(d, scale, digits):
    half = stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d))
    low, high = sorted((scale * (np.mean(d) - half), scale * (np.mean(d) + half)))
    return f'{scale * np.mean(d):+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]'

  for tissue, d in (('FC', d_fc), ('TC', d_tc)):
    (cells,) = _cells(text, ('imask', 'standard', tissue), 10)
    p = exact_two_sided_p(d)
    want = [
      'imask',
      'standard',
      tissue,
      str(len(d)),
      with_interval(d, 1, 4),
      f'{p:.3g}',  # Dice
      with_interval(d, -2, 3),
      f'{p:.3g}',  # ASSD
      with_interval(d, -20, 2),
      f'{p:.3g}',
    ]  # Hausdorff (px)
    assert cells == want, tissue
  # The paper's granularity: one mean difference per tissue, tested over the two tissues
  # (with two values the exact two-sided p is at best 2 / 2^2 = 0.5; both positive here).
  (cells,) = _cells(text, ('imask', 'standard', '2'), 9)
  per_tissue = [np.mean(d_fc), np.mean(d_tc)]
  assert cells[3:5] == [f'{np.mean(per_tissue):+.4f}', f'{exact_two_sided_p(per_tissue):.3g}']
  assert exact_two_sided_p(per_tissue) == 0.5
  assert cells[5] == f'{-2 * np.mean(per_tissue):+.3f}'
  # Tibial: 4 nonzero, -0.01 the smallest: W- = 1, 2 of 16 patterns as low, p = 2 * 2 / 16.
  assert exact_two_sided_p(d_tc) == pytest.approx(4 / 16)


def _write_eval(folder, metrics, thickness, volumes):
  """An evaluation folder as evaluate writes it, with the columns the sweep reads."""
  import csv

  folder.mkdir(parents=True)
  metric_columns = [c for c in sweep_summary.SUMMARY_COLUMNS[5:14]]
  with open(folder / 'metrics.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['case_id', 'tissue', 'status', *metric_columns])
    for case, tissue, hd95 in metrics:
      w.writerow([case, tissue, 'ok', *[hd95 if c == 'hd95_mm' else 0.5 for c in metric_columns]])
  with open(folder / 'ap.csv', 'w', newline='') as f:
    f.write('scope,tissue,ap\nall,femur,0.5\n')
  with open(folder / 'thickness.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['case_id', 'plate', 'status', 'difference_mean_mm', 'difference_sd_mm'])
    w.writerows(thickness)
  with open(folder / 'volumes.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['case_id', 'rater', 'right_ml', 'left_ml', 'total_ml'])
    w.writerows(volumes)


def test_thickness_and_effusion_endpoints_are_tabled_and_paired(tmp_path):
  F, E = 'femur', 'effusion'
  cases = ('c0', 'c1', 'c2')
  hd95 = {'a': (1.0, 2.0, 4.0), 'b': (0.5, 1.5, 2.0)}
  offset = {'a': (0.30, -0.20, 0.10), 'b': (0.10, 0.05, -0.40)}
  cell_sd = {'a': (0.6, 0.5, 0.7), 'b': (0.3, 0.2, 0.4)}
  model_ml = {'a': (3.0, 5.5, 1.0), 'b': (2.6, 5.1, 1.8)}
  reference_ml = (2.5, 5.0, 1.5)
  runs, rows = [], []
  for variant, baseline in (('a', ''), ('b', 'a')):
    run = sweep.Run(variant, 0, baseline, '', str(tmp_path / variant / 'seed0'))
    runs.append(run)
    folder = tmp_path / variant / 'eval'
    _write_eval(
      folder,
      [(c, t, hd95[variant][i]) for i, c in enumerate(cases) for t in (F, FC, E)],
      # Variant a's c2 plate could not be measured: its pair drops out of the thickness tests.
      [
        (c, 'femoral', 'no_pred' if (variant, c) == ('a', 'c2') else 'ok', o, s)
        for c, o, s in zip(cases, offset[variant], cell_sd[variant])
      ],
      [
        (c, r, v, 0.0, v)
        for c, m, ref in zip(cases, model_ml[variant], reference_ml)
        for r, v in (('reference', ref), ('reader1', ref + 1.0), ('model', m))
      ],
    )
    rows += sweep_summary.run_rows(run, str(folder))
  cart = {(r['variant'], r['case_id']): r for r in rows if r['tissue'] == FC}
  assert cart['b', 'c2']['thickness_offset_mm'] == -0.40
  assert cart['b', 'c2']['abs_thickness_offset_mm'] == 0.40
  assert cart['b', 'c2']['thickness_sd_mm'] == 0.4
  assert math.isnan(cart['a', 'c2']['thickness_offset_mm'])
  assert all(math.isnan(r['thickness_offset_mm']) for r in rows if r['tissue'] != FC)
  effusion = {(r['variant'], r['case_id']): r for r in rows if r['tissue'] == E}
  assert effusion['a', 'c2']['volume_error_ml'] == pytest.approx(-0.5)
  assert effusion['a', 'c2']['abs_volume_error_ml'] == pytest.approx(0.5)

  config = ml_collections.ConfigDict(
    dict(
      experiment='x.py',
      base_arg='',
      study='baselines',
      seeds=(0,),
      split='test',
      variants=(('a', 'head=standard', ''), ('b', 'head=imask', 'a')),
    )
  )
  text = sweep_summary.summary_markdown(config, runs, rows, {}, [])

  def mean_sd(values, digits):
    return f'{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}'

  (header,) = _cells(text, ('Variant', 'HD95 (mm) F'), 7)
  assert header[4:] == ['Thickness offset (mm) FC', 'Thickness SD (mm) FC', 'Volume error (mL) E']
  (cells,) = _cells(text, ('b', mean_sd(hd95['b'], 2)), 7)
  errors_b = [m - r for m, r in zip(model_ml['b'], reference_ml)]
  assert cells[4:] == [mean_sd(offset['b'], 3), mean_sd(cell_sd['b'], 3), mean_sd(errors_b, 3)]
  (cells,) = _cells(text, ('a', mean_sd(hd95['a'], 2)), 7)
  assert cells[4] == f'{mean_sd(offset["a"][:2], 3)} (1 of 3 not found)'

  def with_interval(d, digits):
    half = stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d))
    m = np.mean(d)
    return f'{m:+.{digits}f} [{m - half:+.{digits}f}, {m + half:+.{digits}f}]'

  width = 4 + 2 * 7  # Dice, ASSD, Hausdorff, HD95, thickness offset and SD, volume error
  (cart_row,) = _cells(text, ('b', 'a', 'FC'), width)
  assert cart_row[3] == '3 (1 dropped)'
  d_abs = [abs(offset['b'][i]) - abs(offset['a'][i]) for i in range(2)]
  d_sd = [cell_sd['b'][i] - cell_sd['a'][i] for i in range(2)]
  assert cart_row[12] == with_interval(d_abs, 3)
  assert cart_row[14] == with_interval(d_sd, 3)
  assert cart_row[16:] == ['n/a', 'n/a']
  (bone_row,) = _cells(text, ('b', 'a', 'F'), width)
  assert bone_row[3] == '3' and bone_row[12:] == ['n/a'] * 6
  assert bone_row[10] == with_interval([b - a for a, b in zip(hd95['a'], hd95['b'])], 2)
  (fluid_row,) = _cells(text, ('b', 'a', 'E'), width)
  errors_a = [m - r for m, r in zip(model_ml['a'], reference_ml)]
  d_fluid = [abs(b) - abs(a) for a, b in zip(errors_a, errors_b)]
  assert fluid_row[16] == with_interval(d_fluid, 3)
