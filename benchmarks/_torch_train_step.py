"""torchvision side of benchmarks/train_step.py: times maskrcnn_resnet50_fpn on the same batch.

Run by `benchmarks/train_step.py` with `.benchvenv/bin/python` (torch 2.14.1, torchvision
0.29.1), one process per (image size, mode) so that each peak RSS is its own:

  .benchvenv/bin/python benchmarks/_torch_train_step.py BATCH.npz train|infer WARMUP REPEATS THREADS

BATCH.npz holds what the JAX side trains on: `image` float32 [B, H, W, C], `gt_boxes` float32
[B, M, 4] (y1, x1, y2, x2) in pixels, `gt_classes` int32 [B, M] (1..K), `gt_masks` uint8
[B, M, H, W], `gt_valid` bool [B, M], and the settings `num_classes` (K, foreground),
`rpn_pre_nms_train`, `rpn_post_nms_train`, `rpn_pre_nms_test`, `rpn_post_nms_test`,
`roi_batch_size`, `roi_positive_fraction`, `max_detections`, `learning_rate`.
Prints one JSON object on stdout (times in seconds, peak RSS in MiB).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np
import torch
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn


def build_model(d: np.lib.npyio.NpzFile) -> torch.nn.Module:
  """Mask R-CNN R50-FPN from scratch (BatchNorm2d, every layer trainable), no rescaling."""
  height, width = d['image'].shape[1:3]
  channels = d['image'].shape[3]
  return maskrcnn_resnet50_fpn(
    weights=None,
    weights_backbone=None,
    num_classes=int(d['num_classes']) + 1,
    # min_size/max_size equal to the image: GeneralizedRCNNTransform's scale factor is 1.
    min_size=int(min(height, width)),
    max_size=int(max(height, width)),
    image_mean=[0.0] * channels,
    image_std=[1.0] * channels,
    rpn_pre_nms_top_n_train=int(d['rpn_pre_nms_train']),
    rpn_post_nms_top_n_train=int(d['rpn_post_nms_train']),
    rpn_pre_nms_top_n_test=int(d['rpn_pre_nms_test']),
    rpn_post_nms_top_n_test=int(d['rpn_post_nms_test']),
    box_batch_size_per_image=int(d['roi_batch_size']),
    box_positive_fraction=float(d['roi_positive_fraction']),
    box_detections_per_img=int(d['max_detections']),
  )


def torch_inputs(d: np.lib.npyio.NpzFile) -> tuple[list[torch.Tensor], list[dict]]:
  """Images as a list of [C, H, W] tensors; targets with (x1, y1, x2, y2) boxes, valid only."""
  images, targets = [], []
  for b in range(d['image'].shape[0]):
    valid = d['gt_valid'][b].astype(bool)
    images.append(torch.from_numpy(np.ascontiguousarray(d['image'][b].transpose(2, 0, 1))))
    boxes = d['gt_boxes'][b][valid][:, [1, 0, 3, 2]]
    targets.append(
      {
        'boxes': torch.from_numpy(np.ascontiguousarray(boxes)),
        'labels': torch.from_numpy(d['gt_classes'][b][valid].astype(np.int64)),
        'masks': torch.from_numpy(np.ascontiguousarray(d['gt_masks'][b][valid])),
      }
    )
  return images, targets


def count_positive_rois(model: torch.nn.Module) -> list[float]:
  """Wraps roi_heads.select_training_samples to record the positive ROIs per image per step.

  torchvision's mask head runs on exactly these (a data-dependent number per image).
  """
  counts: list[float] = []
  original = model.roi_heads.select_training_samples

  def wrapped(proposals, targets):
    out = original(proposals, targets)
    labels = out[2]
    counts.append(float(np.mean([int((lab > 0).sum()) for lab in labels])))
    return out

  model.roi_heads.select_training_samples = wrapped
  return counts


def main() -> None:
  path, mode, warmup, repeats, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
  if mode not in ('train', 'infer'):
    raise SystemExit(f"_torch_train_step.py: mode must be 'train' or 'infer', got {mode!r}")
  torch.set_num_threads(threads)
  torch.set_num_interop_threads(threads)
  torch.manual_seed(0)
  d = np.load(path)
  model = build_model(d)
  images, targets = torch_inputs(d)
  positives = count_positive_rois(model)

  if mode == 'train':
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=float(d['learning_rate']))

    def step() -> dict:
      losses = model(images, targets)
      loss = sum(losses.values())
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      return {'loss': float(loss.detach())}
  else:
    model.eval()

    def step() -> dict:
      with torch.no_grad():
        out = model(images)
      return {'detections': float(np.mean([len(o['boxes']) for o in out]))}

  start = time.perf_counter()
  first_info = step()
  first_s = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    step()
  wall, cpu, info = [], [], first_info
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    info = step()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  result = {
    'framework': 'torchvision',
    'versions': f'torch {torch.__version__} torchvision {torchvision.__version__}',
    'compile_s': None,
    'first_s': first_s,
    'step_s': wall,
    'cpu_s': cpu,
    'median_s': statistics.median(wall),
    'median_cpu_s': statistics.median(cpu),
    # ru_maxrss is in KiB on Linux.
    'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    'first': first_info,
    'last': info,
  }
  if mode == 'train':
    result['positive_rois_per_image'] = positives
  print(json.dumps(result))


if __name__ == '__main__':
  main()
