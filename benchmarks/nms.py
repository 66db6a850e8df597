"""Times the NMS formulations of imask_jax.ops.nms on RPN-like candidate sets.

Run: TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES= .venv/bin/python benchmarks/nms.py

Each cell is the median wall time of `--repeats` calls of a jitted NMS (compile excluded) on
the same boxes: first one image, then `--batch` images under `jax.vmap` (as in training).
The candidates look like a level of RPN proposals on a 512 x 512 slice:
most boxes cluster around a few dozen objects (heavy overlap, long suppression chains), the
rest are scattered, and scores are random.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from imask_jax.ops import nms as nms_ops


def rpn_like_candidates(
  n: int, seed: int = 0, image_size: float = 512.0, num_objects: int = 40
) -> tuple[np.ndarray, np.ndarray]:
  """`[n, 4]` float32 boxes and `[n]` float32 scores."""
  rng = np.random.default_rng(seed)
  objects_c = rng.uniform(0.1 * image_size, 0.9 * image_size, (num_objects, 2))
  objects_hw = rng.uniform(16, 160, (num_objects, 2)) * rng.choice([1.0, 0.25], (num_objects, 2))
  clustered = int(0.75 * n)
  pick = rng.integers(0, num_objects, clustered)
  centres = objects_c[pick] + rng.normal(0, 0.15, (clustered, 2)) * objects_hw[pick]
  sizes = objects_hw[pick] * rng.lognormal(0, 0.2, (clustered, 2))
  loose_c = rng.uniform(0, image_size, (n - clustered, 2))
  loose_hw = rng.uniform(8, 256, (n - clustered, 2))
  centres = np.concatenate([centres, loose_c])
  sizes = np.concatenate([sizes, loose_hw])
  boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)
  return boxes, rng.uniform(size=n).astype(np.float32)


def time_call(fn, args, repeats: int) -> float:
  """Median seconds of `fn(*args)` after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 2000, 4000, 8000])
  parser.add_argument('--max_outputs', type=int, default=1000)
  parser.add_argument('--iou_threshold', type=float, default=0.7)
  parser.add_argument('--tile_sizes', type=int, nargs='+', default=[32, 64, 128, 256])
  parser.add_argument('--batch', type=int, default=4, help='images per vmapped call')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()

  variants = [('sequential', 'sequential', 0)]
  variants += [(f'tiled/{t}', 'tiled', t) for t in args.tile_sizes]
  print(
    f'backend={jax.default_backend()} devices={jax.device_count()} '
    f'iou={args.iou_threshold} max_outputs={args.max_outputs} repeats={args.repeats}'
  )
  print("median ms per call; 'kept' = boxes kept (first image)")
  for batch in (1, args.batch):
    print(f'\nbatch={batch}' + (' (jax.vmap)' if batch > 1 else ''))
    print(f'{"N":>6} {"kept":>5} ' + ' '.join(f'{name:>13}' for name, _, _ in variants))
    for n in args.sizes:
      sets = [rpn_like_candidates(n, seed=k) for k in range(batch)]
      boxes = jnp.asarray(np.stack([b for b, _ in sets]))
      scores = jnp.asarray(np.stack([s for _, s in sets]))
      cells, counts = [], set()
      for _, method, tile in variants:
        one = lambda b, s, method=method, tile=tile: nms_ops.nms(
          b,
          s,
          iou_threshold=args.iou_threshold,
          max_outputs=args.max_outputs,
          method=method,
          tile_size=max(tile, 1),
        )
        if batch == 1:
          fn, inputs = jax.jit(one), (boxes[0], scores[0])
        else:
          fn, inputs = jax.jit(jax.vmap(one)), (boxes, scores)
        counts.add(int(jnp.ravel(fn(*inputs)[1])[0]))
        cells.append(1e3 * time_call(fn, inputs, args.repeats))
      if len(counts) != 1:
        raise RuntimeError(f'benchmarks/nms.py: methods disagree on the kept count: {counts}')
      print(f'{n:>6} {counts.pop():>5} ' + ' '.join(f'{c:>13.2f}' for c in cells))


if __name__ == '__main__':
  main()
