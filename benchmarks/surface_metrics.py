"""Times surface metrics for one tissue of a 384 x 384 x 160 volume: ours against medpy (and
SimpleITK), in one run, on one core.

The tissue is a thick ellipsoidal shell about the size of a distal femur (semi-axes 35, 30,
40 mm, walls 14-16 mm thick) at OAI DESS spacing (0.365, 0.365, 0.7) mm; the prediction is the
same shell with its surfaces moved by a smooth field of up to ~1 mm and shifted 0.5 mm.

  .venv/bin/python benchmarks/surface_metrics.py [--repeats 3]

Prints the median wall time and the median CPU time of this process for each method (on a
shared machine the CPU time is the steadier figure: single-threaded code waiting for a core
does not accumulate it), and the ratios to ours. medpy needs one call per
metric (hd, hd95, assd), each recomputing the borders and both distance transforms on the
whole volume; SimpleITK's HausdorffDistanceImageFilter gives the Hausdorff and an average
distance measured from every object voxel (not surface to surface), with one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

# One core, as the target says; set before NumPy/SciPy load their thread pools.
for variable in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ.setdefault(variable, '1')

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imask_jax.metrics.surface import surface_metrics  # noqa: E402

SHAPE = (384, 384, 160)
SPACING = (0.365, 0.365, 0.7)
SEMI_AXES_MM = (35.0, 30.0, 40.0)
INNER_SCALE = 0.6


def shell(
  shape: tuple[int, int, int],
  spacing: tuple[float, float, float],
  wobble_mm: float,
  shift_mm: float,
) -> np.ndarray:
  """Ellipsoidal shell centred in the volume; its outer and inner surfaces are moved outward
  by wobble_mm * (smooth angular field) and the whole shell by shift_mm along axis 0."""
  axes = [(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing)]
  x = axes[0][:, None, None] - shift_mm
  y = axes[1][None, :, None]
  z = axes[2][None, None, :]
  # Normalised ellipsoidal radius: 1 on the outer surface.
  rho = np.sqrt(
    (x / SEMI_AXES_MM[0]) ** 2 + (y / SEMI_AXES_MM[1]) ** 2 + (z / SEMI_AXES_MM[2]) ** 2
  )
  field = np.sin(3 * np.arctan2(y, x)) * np.cos(2 * np.arctan2(z, np.hypot(x, y)))
  scale = 1 + wobble_mm * field / SEMI_AXES_MM[1]
  return (rho < scale) & (rho >= INNER_SCALE * scale)


def median_seconds(
  function: Callable[[], object], repeats: int
) -> tuple[tuple[float, float], object]:
  """((median wall s, median CPU s of this process), the last result) over `repeats` calls."""
  wall, cpu, result = [], [], None
  for _ in range(repeats):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = function()
    wall.append(time.perf_counter() - start_wall)
    cpu.append(time.process_time() - start_cpu)
  return (statistics.median(wall), statistics.median(cpu)), result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  truth = shell(SHAPE, SPACING, wobble_mm=0.0, shift_mm=0.0)
  pred = shell(SHAPE, SPACING, wobble_mm=1.0, shift_mm=0.5)
  print(
    f'volume {SHAPE}, spacing {SPACING} mm, truth {int(truth.sum())} voxels, '
    f'prediction {int(pred.sum())} voxels, {args.repeats} repeats (median)'
  )

  rows = []
  ours_s, ours = median_seconds(lambda: surface_metrics(pred, truth, SPACING), args.repeats)
  rows.append(('ours: HD, HD95, ASSD, signed mean/SD (mm)', ours_s))
  ours_vox_s, _ = median_seconds(
    lambda: surface_metrics(pred, truth, SPACING, voxel_hausdorff=True), args.repeats
  )
  rows.append(('ours: the same + Hausdorff in voxels', ours_vox_s))
  print(
    f'ours: HD {ours.hausdorff_mm:.3f}, HD95 {ours.hd95_mm:.3f}, ASSD {ours.assd_mm:.3f}, '
    f'signed {ours.signed_mean_mm:+.3f} +- {ours.signed_sd_mm:.3f} mm'
  )

  try:
    import medpy
    from medpy.metric import binary as medpy_binary
  except ImportError:
    print('medpy not installed: skipped')
  else:
    values = {}

    def run_medpy() -> dict[str, float]:
      values['hd'] = medpy_binary.hd(pred, truth, SPACING)
      values['hd95'] = medpy_binary.hd95(pred, truth, SPACING)
      values['assd'] = medpy_binary.assd(pred, truth, SPACING)
      return values

    medpy_s, _ = median_seconds(run_medpy, args.repeats)
    rows.append((f'medpy {medpy.__version__}: hd + hd95 + assd (3 calls)', medpy_s))
    hd_s, _ = median_seconds(lambda: medpy_binary.hd(pred, truth, SPACING), 1)
    rows.append((f'medpy {medpy.__version__}: hd alone (1 repeat)', hd_s))
    print(
      f'medpy: hd {values["hd"]:.3f}, hd95 (pooled) {values["hd95"]:.3f}, '
      f'assd {values["assd"]:.3f} mm'
    )

  try:
    import SimpleITK as sitk
  except ImportError:
    print('SimpleITK not installed: skipped')
  else:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)

    def run_sitk() -> tuple[float, float]:
      images = []
      for mask in (pred, truth):
        image = sitk.GetImageFromArray(mask.astype(np.uint8))  # axes reversed in ITK
        image.SetSpacing(SPACING[::-1])
        images.append(image)
      hausdorff = sitk.HausdorffDistanceImageFilter()
      hausdorff.Execute(*images)
      return hausdorff.GetHausdorffDistance(), hausdorff.GetAverageHausdorffDistance()

    sitk_s, (sitk_hd, sitk_average) = median_seconds(run_sitk, args.repeats)
    rows.append((f'SimpleITK {sitk.Version.VersionString()}: HausdorffDistance, 1 thread', sitk_s))
    print(f'SimpleITK: Hausdorff {sitk_hd:.3f}, average (all voxels) {sitk_average:.3f} mm')

  print()
  print(f'{"method":58s} {"wall s":>7s} {"CPU s":>7s} {"x ours (CPU)":>13s}')
  for name, (wall, cpu) in rows:
    print(f'{name:58s} {wall:7.2f} {cpu:7.2f} {cpu / ours_s[1]:13.1f}')


if __name__ == '__main__':
  main()
