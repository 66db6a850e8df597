"""Times convolution gradients: `lax.conv_general_dilated` against `imask_jax.ops.conv`.

Run (from the repository root):
  TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES= .venv/bin/python benchmarks/conv_grad.py

For the convolutions of a ResNet-50-FPN Mask R-CNN at batch 2 x 256 x 256 (one of each kind:
stem, bottleneck 1x1 and 3x3 convs of each stage, strided ones, the FPN output conv, a mask-head
conv on 2 x 32 ROIs of 14 x 14), each jitted on its own: the forward, and the forward with both
gradients (input and kernel) of sum(conv * cotangent). The two implementations alternate call
by call, pinned to the same 2 CPUs; medians of `--repeats`. The last columns give ours / lax
(below 1: ours is faster) and the largest relative difference of the kernel gradients.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from imask_jax.ops import conv as conv_ops

NHWC = ('NHWC', 'HWIO', 'NHWC')
# name, input [N, H, W, C], kernel size, stride, output channels.
CASES = (
  ('stem 7x7/2', (2, 256, 256, 3), 7, 2, 64),
  ('C2 1x1 64->64', (2, 64, 64, 64), 1, 1, 64),
  ('C2 3x3 64', (2, 64, 64, 64), 3, 1, 64),
  ('C2 1x1 64->256', (2, 64, 64, 64), 1, 1, 256),
  ('C3 3x3/2 128', (2, 64, 64, 128), 3, 2, 128),
  ('C3 1x1/2 shortcut 256->512', (2, 64, 64, 256), 1, 2, 512),
  ('C4 3x3 256', (2, 16, 16, 256), 3, 1, 256),
  ('C5 3x3 512', (2, 8, 8, 512), 3, 1, 512),
  ('FPN P2 3x3 256', (2, 64, 64, 256), 3, 1, 256),
  ('mask head 3x3 256 (64 ROIs)', (64, 14, 14, 256), 3, 1, 256),
)


def timed(fn, args, repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - start)
  return out


def measure_case(
  name: str, shape: tuple[int, ...], k: int, stride: int, out_channels: int, repeats: int
) -> float:
  """Prints one table row; returns ours / lax for forward + gradients."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, shape[-1], out_channels)) * 0.05
  kwargs = dict(window_strides=(stride, stride), padding='SAME', dimension_numbers=NHWC)
  convs = {
    'lax': functools.partial(lax.conv_general_dilated, **kwargs),
    'ours': functools.partial(conv_ops.conv_general_dilated, **kwargs),
  }
  cot = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(convs['lax'], x, w).shape)

  def with_grads(conv):
    return jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w) * cot), argnums=(0, 1))

  forward = {n: jax.jit(conv) for n, conv in convs.items()}
  both = {n: jax.jit(with_grads(conv)) for n, conv in convs.items()}
  grads = {n: jax.block_until_ready(fn(x, w))[1][1] for n, fn in both.items()}
  for fn in forward.values():
    jax.block_until_ready(fn(x, w))
  times = {key: [] for key in ('lax fwd', 'ours fwd', 'lax both', 'ours both')}
  for _ in range(repeats):  # alternate, so that load changes hit both alike
    for n in convs:
      times[f'{n} fwd'] += timed(forward[n], (x, w), 1)
      times[f'{n} both'] += timed(both[n], (x, w), 1)
  med = {key: 1e3 * statistics.median(v) for key, v in times.items()}
  ratio = med['ours both'] / med['lax both']
  diff = float(jnp.max(jnp.abs(grads['ours'] - grads['lax'])) / jnp.max(jnp.abs(grads['lax'])))
  print(
    f'| {name} | {med["lax fwd"]:.1f} | {med["ours fwd"]:.1f} | {med["lax both"]:.1f} | '
    f'{med["ours both"]:.1f} | {ratio:.2f} | {diff:.0e} |',
    flush=True,
  )
  return ratio


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))
  print(f'jax {jax.__version__}; medians of {args.repeats}; ms')
  header = (
    '| conv | lax fwd | ours fwd | lax fwd+grads | ours fwd+grads | ours / lax | kernel grad diff |'
  )
  print(header + '\n' + '|' + ' --- |' * 7)
  ratios = []
  for case in CASES:
    ratios.append(measure_case(*case, args.repeats))
  print(f'median ours / lax over the cases: {statistics.median(ratios):.2f}')


if __name__ == '__main__':
  main()
