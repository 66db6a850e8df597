"""benchmarks/train_step.py: its synthetic batch, the shared settings and the result table."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from imask_jax import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark():
  """The benchmark module (benchmarks/ is a folder of scripts, not a package)."""
  path = os.path.join(REPO, 'benchmarks', 'train_step.py')
  spec = importlib.util.spec_from_file_location('benchmark_train_step', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load_benchmark()


def test_ellipse_mask_matches_a_per_pixel_loop():
  size, centre, axes, angle = 24, (10.3, 13.1), (7.0, 3.5), 0.6
  mask = bench.ellipse_mask(size, centre, axes, angle)
  expected = np.zeros((size, size), np.uint8)
  for row in range(size):
    for col in range(size):
      # Rotate the pixel centre's offset into the ellipse's frame.
      dy, dx = row + 0.5 - centre[0], col + 0.5 - centre[1]
      u = np.cos(angle) * dy + np.sin(angle) * dx
      v = -np.sin(angle) * dy + np.cos(angle) * dx
      expected[row, col] = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0
  np.testing.assert_array_equal(mask, expected)
  assert 0 < mask.sum() < size * size


def test_synthetic_batch_boxes_classes_and_padding():
  batch = bench.synthetic_batch(2, 64, seed=3)
  m, k = bench.MAX_INSTANCES, bench.OBJECTS_PER_IMAGE
  assert batch['image'].shape == (2, 64, 64, bench.CHANNELS)
  assert batch['image'].dtype == np.float32
  assert batch['gt_masks'].shape == (2, m, 64, 64) and batch['gt_masks'].dtype == np.uint8
  np.testing.assert_array_equal(batch['gt_valid'], np.arange(m)[None].repeat(2, 0) < k)
  np.testing.assert_array_equal(batch['gt_classes'][:, :k], np.tile(np.arange(1, k + 1), (2, 1)))
  assert not batch['gt_classes'][:, k:].any() and not batch['gt_masks'][:, k:].any()
  assert not batch['gt_boxes'][:, k:].any()
  for b in range(2):
    for slot in range(k):
      mask = batch['gt_masks'][b, slot]
      # Tight box by scanning rows and columns: first/last occupied index, end exclusive.
      rows = [r for r in range(64) if mask[r].any()]
      cols = [c for c in range(64) if mask[:, c].any()]
      np.testing.assert_array_equal(
        batch['gt_boxes'][b, slot], [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]
      )
  again = bench.synthetic_batch(2, 64, seed=3)
  for key, value in batch.items():
    np.testing.assert_array_equal(value, again[key])


def test_synthetic_batch_rejects_tiny_images():
  with pytest.raises(ValueError, match='image size must be >= 32'):
    bench.synthetic_batch(1, 16)


def test_model_spec_matches_the_settings_sent_to_torchvision():
  settings = bench.torch_settings()
  for head, mask_size in (('standard', 28), ('imask', 56)):
    spec = bench.model_spec(256, head, data_parallel=False)
    assert spec.mask_head == head and spec.mask_size == mask_size
    assert spec.num_classes == int(settings['num_classes'])
    assert spec.rpn_pre_nms_topk_train == int(settings['rpn_pre_nms_train']) == 2000
    assert spec.rpn_post_nms_topk_train == int(settings['rpn_post_nms_train']) == 1000
    assert spec.roi_batch_size == int(settings['roi_batch_size']) == 512
    assert spec.roi_positive_fraction == float(settings['roi_positive_fraction']) == 0.25
    assert spec.max_detections == int(settings['max_detections'])
    # The mask head's slots per image: the benchmark's cap (32) below 25 % of 512 ROIs.
    assert spec.num_mask_rois == bench.MASK_ROIS_PER_IMAGE == 32
    # The fine path at the width the model trains by default (experiments/oai.py's).
    assert spec.imask.fine_dim == configs.default_config().model.imask.fine_dim == 32
    assert spec.axis_name is None
  wide = bench.model_spec(
    512, 'imask', data_parallel=True, mask_rois_per_image=200, fine_dim=64, fuse_convs=2
  )
  assert wide.axis_name == 'data' and wide.num_mask_rois == 128  # capped by 25 % of 512
  assert (wide.imask.fine_dim, wide.imask.fuse_convs) == (64, 2)


def test_combine_rounds_takes_medians_of_round_medians():
  def run(median, cpu, rss, positives):
    return dict(
      median_s=median,
      median_cpu_s=cpu,
      first_s=median,
      compile_s=None,
      peak_rss_mb=rss,
      positive_rois_per_image=positives,
      versions='v',
    )

  combined = bench.combine_rounds(
    [run(3.0, 6.0, 100.0, [1, 2]), None, run(1.0, 2.0, 300.0, [3]), run(2.0, 5.0, 200.0, [4])]
  )
  assert combined['median_s'] == 2.0 and combined['median_cpu_s'] == 5.0
  assert combined['compile_s'] is None and combined['peak_rss_mb'] == 300.0
  assert combined['positive_rois_per_image'] == [1, 2, 3, 4] and combined['rounds'] == 3
  assert bench.combine_rounds([None, None]) is None


def test_pieces_rows_sum_the_pieces():
  pieces = {
    name: dict(median_s=0.01 * (i + 1), median_cpu_s=0.02 * (i + 1))
    for i, name in enumerate(bench.PIECES)
  }
  results = {
    (256, 'standard'): dict(pieces=pieces, whole=dict(median_s=1.0, median_cpu_s=1.5)),
    (256, 'imask'): None,
  }
  header, rows = bench.pieces_rows(results, [256], ['standard', 'imask'])
  assert header == ['piece', 'standard 256 ms (CPU)', 'imask 256 ms (CPU)']
  n = len(bench.PIECES)
  assert rows[0] == [bench.PIECES[0], '10 (20)', '-']
  total = 10 * n * (n + 1) // 2  # 10 ms * (1 + 2 + ... + n)
  assert rows[-2] == ['sum of the pieces', f'{total} ({2 * total})', '-']
  assert rows[-1] == ['whole train step', '1000 (1500)', '-']


def test_table_rows_ratios_and_images_per_second():
  def result(median, positives=None):
    return dict(
      compile_s=None,
      first_s=1.0,
      median_s=median,
      median_cpu_s=2 * median,
      peak_rss_mb=1000.0,
      positive_rois_per_image=positives,
    )

  results = {
    (256, 'train', 'torchvision', 'standard'): result(2.0, [10, 20, 30]),
    (256, 'train', 'ours', 'standard'): result(3.0, [5, 7]),
    (256, 'train', 'ours', 'imask'): result(4.5, [5, 7]),
    (256, 'infer', 'ours', 'standard'): None,
  }
  rows = bench.table_rows(results, 256, batch=2)
  by_model = {(r[1], r[2]): dict(zip(bench.HEADER, r)) for r in rows}
  torch_row = by_model[('train', 'torchvision')]
  assert torch_row['img/s'] == '1.00' and torch_row['pos ROIs'] == '20'
  assert torch_row['x torchvision'] == '-' and torch_row['compile s'] == '-'
  assert by_model[('train', 'ours standard')]['x torchvision'] == '1.50'
  imask = by_model[('train', 'ours imask')]
  assert imask['x torchvision'] == '2.25' and imask['imask / std'] == '1.50'
  assert imask['median s'] == '4.50' and imask['CPU s'] == '9.00'
  assert by_model[('infer', 'ours standard')]['compile s'] == 'failed'
