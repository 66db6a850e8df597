"""Slices per second of the training input pipeline (imask_jax.input_pipeline) on this machine.

Run: TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES= .venv/bin/python benchmarks/input_pipeline.py

Quick-start settings by default: phantom_knee at the 'cpu' preset (128 x 128 x 64 volumes,
`data.num_volumes` of them), network input 128 x 128, batch 8, augmentation on. The dataset is
built first if `--data_dir` does not hold it (timed separately, not part of the rate). The rate
is measured over `--batches` batches after `--warmup` batches (tf.data start-up, autotuning),
as wall-clock slices/s and as CPU time per slice (which a busy machine does not change).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from data_pipelines.datasets import builders
from imask_jax import configs, input_pipeline


def cpu_seconds() -> float:
  """User + system CPU time of this process (all its threads) so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(
  config, data_dir: str, *, augment: bool, batches: int, warmup: int
) -> tuple[float, float]:
  """(slices per second, CPU milliseconds per slice) drawn from `create_train_dataset` as numpy
  batches, as training sees them. The CPU cost does not depend on how busy the machine is."""
  iterator = input_pipeline.create_train_dataset(config, data_dir, seed=0, augment=augment)
  for _ in range(warmup):
    next(iterator)
  start, start_cpu = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    batch = next(iterator)
  elapsed, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
  slices = batches * batch['image'].shape[0] * batch['image'].shape[1]
  return slices / elapsed, 1e3 * cpu / slices


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--data_dir',
    default=os.environ.get('IMASK_DATA_DIR')
    or os.path.join(os.path.expanduser('~'), '.cache', 'imask_jax', 'tfds'),
    help='TFDS data_dir (default: $IMASK_DATA_DIR or ~/.cache/imask_jax/tfds)',
  )
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--context_slices', type=int, default=0)
  parser.add_argument('--batches', type=int, default=200)
  parser.add_argument('--warmup', type=int, default=20)
  args = parser.parse_args()

  config = configs.default_config()
  config.data.image_size = (args.image_size, args.image_size)
  config.data.context_slices = args.context_slices
  config.train.batch_size = args.batch
  start = time.perf_counter()
  builder = builders.prepare(config, args.data_dir)
  print(
    f'dataset {builder.name}/{builder.builder_config.name}: '
    f'{builder.info.splits["train"].num_examples} train slices, ready in '
    f'{time.perf_counter() - start:.1f} s ({builder.data_dir})'
  )
  print(
    f'cpu cores: {os.cpu_count()}, image {args.image_size} x {args.image_size}, '
    f'batch {args.batch}, context slices {args.context_slices}'
  )
  print(f'load average before: {os.getloadavg()[0]:.1f}')
  for augment in (True, False):
    rate, cpu_ms = measure(
      config, args.data_dir, augment=augment, batches=args.batches, warmup=args.warmup
    )
    print(
      f'augmentation {"on " if augment else "off"}: {rate:7.1f} slices/s, '
      f'{cpu_ms:.2f} CPU ms per slice (= {1e3 * os.cpu_count() / cpu_ms:.0f} slices/s on '
      f'{os.cpu_count()} idle cores)'
    )


if __name__ == '__main__':
  main()
