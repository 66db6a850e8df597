"""Volumes and agreement statistics against analytic shapes, plainly written NumPy formulas,
Shrout & Fleiss (1979)'s published example, and the paper's own Table 7 arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib import image as mpimg

from imask_jax.evaluation.viz import save_bland_altman_figure
from imask_jax.metrics.volume import (
  ScanVolumes,
  baseline_scans,
  bland_altman,
  coefficient_of_variation,
  hip_volume_table,
  intraclass_correlation,
  natural_key,
  paired_difference,
  pairwise_agreement,
  volume_ml,
  volumes_ml_per_label,
)

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; published ICC(2,1) = .29,
# ICC(3,1) = .71, and mean squares BMS = 11.24, JMS = 32.49, EMS = 1.02.
SHROUT_FLEISS = np.array(
  [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float
)


def test_volume_of_an_ellipsoid_in_millilitres():
  spacing = (0.4, 0.5, 0.8)
  a, b, c = 12.0, 9.0, 7.0  # semi-axes in mm
  shape = tuple(int(2 * r / s) + 4 for r, s in zip((a, b, c), spacing))
  grid = np.indices(shape, dtype=float)
  centre = [(n - 1) * s / 2 for n, s in zip(shape, spacing)]
  inside = sum(((grid[i] * spacing[i] - centre[i]) / r) ** 2 for i, r in enumerate((a, b, c))) <= 1
  expected = 4 / 3 * math.pi * a * b * c / 1000
  # Voxelisation error of a ~3 mL ellipsoid with sub-mm voxels: well under 1% (measured 0.1%).
  assert volume_ml(inside, spacing) == pytest.approx(expected, rel=0.01)
  labels = inside.astype(np.uint8) * 2
  assert volumes_ml_per_label(labels, spacing, labels=(1, 2)) == {
    1: 0.0,
    2: volume_ml(inside, spacing),
  }


def test_volume_is_voxel_count_times_voxel_volume():
  mask = np.zeros((4, 5, 6), bool)
  mask[:2, :3, :4] = True
  assert volume_ml(mask, (0.5, 2.0, 3.0)) == pytest.approx(24 * 3.0 / 1000)


# ----------------------------------------------------------------------------- CoV


def plain_cov(table: np.ndarray) -> list[float]:
  result = []
  for row in table:
    mean = sum(row) / len(row)
    sd = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))
    result.append(sd / mean)
  return result


def test_cov_matches_a_plain_formula():
  rng = np.random.default_rng(0)
  table = rng.uniform(1, 20, size=(12, 3))
  per_subject = plain_cov(table)
  cov = coefficient_of_variation(table)
  np.testing.assert_allclose(cov.per_subject, per_subject)
  assert cov.rms_cov == pytest.approx(math.sqrt(sum(c * c for c in per_subject) / 12))
  assert cov.mean_cov == pytest.approx(sum(per_subject) / 12)
  assert cov.n_used == 12 and cov.n_zero_mean == 0


def test_cov_of_two_raters_uses_the_pair_sd_and_skips_all_zero_subjects():
  a = np.array([10.0, 4.0, 0.0, 6.0])
  b = np.array([12.0, 4.0, 0.0, 3.0])
  cov = coefficient_of_variation(np.stack([a, b], axis=1))
  expected = [abs(x - y) / math.sqrt(2) / ((x + y) / 2) for x, y in [(10, 12), (4, 4), (6, 3)]]
  np.testing.assert_allclose(cov.per_subject[[0, 1, 3]], expected)
  assert math.isnan(cov.per_subject[2]) and cov.n_zero_mean == 1 and cov.n_used == 3
  assert cov.rms_cov == pytest.approx(math.sqrt(np.mean(np.square(expected))))


# ----------------------------------------------------------------------------- ICC


def plain_icc(table: np.ndarray) -> tuple[float, float]:
  n, k = table.shape
  grand = sum(sum(row) for row in table) / (n * k)
  row_means = [sum(row) / k for row in table]
  col_means = [sum(table[i][j] for i in range(n)) / n for j in range(k)]
  bms = k * sum((m - grand) ** 2 for m in row_means) / (n - 1)
  jms = n * sum((m - grand) ** 2 for m in col_means) / (k - 1)
  residual = sum(
    (table[i][j] - row_means[i] - col_means[j] + grand) ** 2 for i in range(n) for j in range(k)
  )
  ems = residual / ((n - 1) * (k - 1))
  icc2 = (bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n)
  icc3 = (bms - ems) / (bms + (k - 1) * ems)
  return icc2, icc3


def test_icc_reproduces_shrout_and_fleiss_1979():
  icc = intraclass_correlation(SHROUT_FLEISS)
  assert round(icc.icc_2_1, 2) == 0.29
  assert round(icc.icc_3_1, 2) == 0.71
  assert (
    round(icc.between_subjects_ms, 2),
    round(icc.between_raters_ms, 2),
    round(icc.residual_ms, 2),
  ) == (11.24, 32.49, 1.02)


def test_icc_matches_a_plain_formula_and_penalises_offsets_only_for_agreement():
  rng = np.random.default_rng(1)
  truth = rng.uniform(2, 15, size=10)
  table = np.stack([truth + rng.normal(0, 0.5, 10), truth + rng.normal(0, 0.5, 10)], axis=1)
  icc = intraclass_correlation(table)
  assert (icc.icc_2_1, icc.icc_3_1) == pytest.approx(plain_icc(table))
  shifted = table + np.array([0.0, 3.0])  # rater 2 reads 3 mL high
  moved = intraclass_correlation(shifted)
  assert moved.icc_3_1 == pytest.approx(icc.icc_3_1)  # consistency ignores the offset
  assert moved.icc_2_1 < icc.icc_2_1 - 0.1  # absolute agreement does not


# ----------------------------------------------------------------------------- differences


def test_paired_difference_and_bland_altman_match_plain_formulas(tmp_path):
  a = np.array([7.7, 6.2, 9.3, 1.0, 4.4])
  b = np.array([8.6, 6.6, 10.1, 0.5, 5.5])
  d = [x - y for x, y in zip(a, b)]
  mean = sum(d) / 5
  sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
  difference = paired_difference(a, b)
  assert difference.mean_difference == pytest.approx(mean)
  assert difference.sd_difference == pytest.approx(sd)
  assert difference.mean_abs_difference == pytest.approx(sum(abs(x) for x in d) / 5)
  stats = bland_altman(a, b)
  assert stats.bias == pytest.approx(mean)
  assert (stats.loa_lower, stats.loa_upper) == pytest.approx((mean - 1.96 * sd, mean + 1.96 * sd))
  np.testing.assert_allclose(stats.means, (a + b) / 2)

  path = save_bland_altman_figure(stats, tmp_path / 'ba.png', name_a='reader 1', name_b='model')
  picture = mpimg.imread(path)
  assert picture.ndim == 3 and picture.shape[0] > 300 and picture.shape[1] > 400
  assert [p.name for p in tmp_path.iterdir()] == ['ba.png']  # no temporary file left over
  with pytest.raises(ValueError, match='must end in .png'):
    save_bland_altman_figure(stats, tmp_path / 'ba.pdf')


def test_pairwise_agreement_covers_every_pair():
  volumes = {'reader1': [7.0, 6.0, 9.0], 'reader2': [8.0, 6.5, 10.0], 'model': [9.0, 8.0, 9.5]}
  table = pairwise_agreement(volumes)
  assert list(table) == [('reader1', 'reader2'), ('reader1', 'model'), ('reader2', 'model')]
  pair = table[('reader1', 'model')]
  assert pair.difference.mean_difference == pytest.approx(np.mean([-2.0, -2.0, -0.5]))
  assert pair.cov.rms_cov == pytest.approx(
    coefficient_of_variation(np.stack([volumes['reader1'], volumes['model']], axis=1)).rms_cov
  )


def test_bad_tables_are_rejected_with_their_shape():
  with pytest.raises(ValueError, match=r'shape \(3,\); expected \[n_subjects >= 2'):
    intraclass_correlation([1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match='non-negative'):
    coefficient_of_variation([[1.0, -1.0], [2.0, 2.0]])
  with pytest.raises(ValueError, match=r'a \(3,\) and b \(2,\) must be 1-D of the same length'):
    bland_altman([1, 2, 3], [1, 2])


# ----------------------------------------------------------------------------- Table 7 per hip

# The paper's Table 7, "Fluid volumes (Baseline)": right mean, SD; left mean, SD; overall
# mean, SD (mL), per rater.
PAPER_TABLE_7 = {
  'reader1': (7.72, 5.33, 6.17, 6.28, 6.94, 5.85),
  'reader2': (8.65, 5.05, 6.63, 6.02, 7.64, 5.62),
  'mask_rcnn': (10.05, 3.76, 8.49, 3.56, 9.27, 3.73),
  'imask_rcnn': (11.81, 4.55, 9.72, 4.09, 10.76, 4.43),
}


def with_mean_and_sd(rng: np.random.Generator, n: int, mean: float, sd: float) -> np.ndarray:
  """n non-negative values with exactly this mean and sample SD (a skewed, volume-like
  shape: standardised log-normal draws, whose low tail stays above mean - sd)."""
  draws = rng.lognormal(0.0, 1.2, n)
  values = mean + sd * (draws - draws.mean()) / draws.std(ddof=1)
  assert values.min() >= 0
  return values


def test_overall_is_per_hip_as_in_the_papers_own_table_7_rows():
  # 50 test scans (the paper's STIHO test set), one per subject at baseline, plus a
  # follow-up scan of each that must be left out. Each rater's right and left hips have the
  # paper's means and SDs exactly; the per-hip "Overall" must then give the paper's overall
  # column: the mean of the right and left means (7.72 and 6.17 give 6.94) and the SD of the
  # 100 pooled hips. Tolerance: the paper rounds to 0.005, and its rounded right/left
  # inputs move our pooled SD by at most 0.005 * (0.45 + 0.53 + 0.07 + 0.07) < 0.006 (the
  # partial derivatives at these values), so 0.011.
  rng = np.random.default_rng(0)
  n = 50
  right = {r: with_mean_and_sd(rng, n, row[0], row[1]) for r, row in PAPER_TABLE_7.items()}
  left = {r: with_mean_and_sd(rng, n, row[2], row[3]) for r, row in PAPER_TABLE_7.items()}
  scans = []
  for i in range(n):
    scans.append(
      ScanVolumes(
        f's{i:03d}_v00', f's{i:03d}', 'v00', {r: (right[r][i], left[r][i]) for r in PAPER_TABLE_7}
      )
    )
    scans.append(
      ScanVolumes(f's{i:03d}_v01', f's{i:03d}', 'v01', {r: (100.0, 100.0) for r in PAPER_TABLE_7})
    )
  table = hip_volume_table(scans)
  assert len(table.scans) == n and len(table.left_out) == n
  assert all(s.endswith('_v00') for s in table.scans)
  for rater, (_, _, _, _, overall_mean, overall_sd) in PAPER_TABLE_7.items():
    row = PAPER_TABLE_7[rater]
    assert (table.right[rater].mean, table.right[rater].sd) == pytest.approx(row[0:2])
    assert (table.left[rater].mean, table.left[rater].sd) == pytest.approx(row[2:4])
    assert table.overall[rater].n == 2 * n
    assert table.overall[rater].mean == pytest.approx((row[0] + row[2]) / 2)
    assert abs(table.overall[rater].mean - overall_mean) <= 0.005 + 1e-9
    assert abs(table.overall[rater].sd - overall_sd) <= 0.011
    # The paper's arithmetic rules out a per-scan mean of the two hips: its SD is at most
    # (SD right + SD left) / 2, below the paper's overall SD in every row.
    assert (row[1] + row[3]) / 2 < overall_sd - 0.011
    # The scan total (a named extra) is another quantity: right + left.
    assert table.scan_total[rater].mean == pytest.approx(row[0] + row[2])


def test_hip_table_hand_worked_with_baseline_selection():
  # Subject a: v1 and v2; b: v1 only; c: v2 only. Raters r1, r2; (right, left) mL.
  scans = [
    ScanVolumes('a_v1', 'a', 'v1', {'r1': (4.0, 2.0), 'r2': (6.0, 2.0)}),
    ScanVolumes('a_v2', 'a', 'v2', {'r1': (9.0, 9.0), 'r2': (9.0, 9.0)}),
    ScanVolumes('b_v1', 'b', 'v1', {'r1': (0.0, 8.0), 'r2': (0.0, 4.0)}),
    ScanVolumes('c_v2', 'c', 'v2', {'r1': (1.0, 1.0), 'r2': (3.0, 3.0)}),
  ]
  table = hip_volume_table(scans, baseline='v1')
  assert table.scans == ('a_v1', 'b_v1') and set(table.left_out) == {'a_v2', 'c_v2'}
  assert table.subjects_without_baseline == ('c',)
  assert table.hips == (('a', 'right'), ('a', 'left'), ('b', 'right'), ('b', 'left'))
  # r1 hips 4, 2, 0, 8: overall 3.5 ± sqrt(35/3); right 4, 0: 2 ± sqrt(8); left 2, 8.
  assert (table.overall['r1'].mean, table.overall['r1'].sd) == pytest.approx(
    (3.5, math.sqrt(35 / 3))
  )
  assert (table.right['r1'].mean, table.right['r1'].sd) == pytest.approx((2.0, math.sqrt(8)))
  assert (table.left['r1'].mean, table.left['r1'].sd) == pytest.approx((5.0, math.sqrt(18)))
  assert (table.overall['r2'].mean, table.overall['r2'].sd) == pytest.approx(
    (3.0, math.sqrt(20 / 3))
  )
  # r1 - r2 per hip: -2, 0, 0, 4: |d| 1.5 ± sqrt(11/3). CoV per hip: |a - b| / sqrt(2) over
  # the hip's mean: 2/sqrt(2)/5, 0, none (both 0: left out and counted), 4/sqrt(2)/6.
  pair = table.pairs[('r1', 'r2')]
  assert pair.difference.mean_abs_difference == pytest.approx(1.5)
  assert pair.difference.sd_abs_difference == pytest.approx(math.sqrt(11 / 3))
  covs = [2 / math.sqrt(2) / 5, 0.0, 4 / math.sqrt(2) / 6]
  assert pair.cov.mean_cov == pytest.approx(np.mean(covs))
  assert pair.cov.rms_cov == pytest.approx(math.sqrt(np.mean(np.square(covs))))
  assert pair.cov.n_zero_mean == 1 and pair.cov.n_used == 3
  # Without a named baseline: each subject's first time point (c's only scan is v2).
  default = hip_volume_table(scans)
  assert default.scans == ('a_v1', 'b_v1', 'c_v2') and default.left_out == ('a_v2',)


def test_scans_without_time_points_are_one_per_subject():
  scans = [
    ScanVolumes('x', 'x', None, {'r1': (1.0, 2.0), 'r2': (1.0, 3.0)}),
    ScanVolumes('y', 'y', None, {'r1': (2.0, 2.0), 'r2': (2.0, 2.0)}),
  ]
  assert hip_volume_table(scans).scans == ('x', 'y')
  with pytest.raises(ValueError, match=r"subject 'x' has scans \['x', 'x2'\] and no time"):
    baseline_scans(scans + [ScanVolumes('x2', 'x', None, scans[0].volumes)])
  # A single-visit subject beside subjects with visits: its one scan is its baseline.
  used, left_out, _ = baseline_scans(
    [
      scans[0],
      ScanVolumes('y_v2', 'y', 'v2', scans[1].volumes),
      ScanVolumes('y_v1', 'y', 'v1', scans[1].volumes),
    ]
  )
  assert [s.scan_id for s in used] == ['x', 'y_v1'] and [s.scan_id for s in left_out] == ['y_v2']
  # One subject with a scan naming a time point and one naming none is ambiguous.
  with pytest.raises(ValueError, match=r"subject 'y': scans \['y'\] name no time point but"):
    baseline_scans([ScanVolumes('y', 'y', None, scans[1].volumes)] + used[1:])
  with pytest.raises(ValueError, match=r"scan 'y' has raters \['r1'\]; expected"):
    hip_volume_table([scans[0], ScanVolumes('y', 'y', None, {'r1': (1.0, 1.0)})])
  assert sorted(['v10', 'v2', 'v1'], key=natural_key) == ['v1', 'v2', 'v10']
