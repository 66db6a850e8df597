"""Times imask_jax's multilevel ROIAlign against TensorFlow and torchvision on the same inputs.

Run (from the repository root):
  TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES= .venv/bin/python benchmarks/roi_align.py

Workload: a 256-channel P2-P5 pyramid of a 256 x 256 input (P2 64x64 ... P5 8x8) and random
boxes of realistic sizes (sqrt(area) log-uniform in 16-192 px, aspect ratio log-uniform in
1:4-4:1, clipped to the image). Cases: 512 ROIs at 7x7 and at 14x14, each ROI read from its
assigned level (k0=4, canonical 224), and 128 ROIs at 56x56 read from P2 (the iMaskRCNN skip
path). sampling_ratio is 2 everywhere, so the three implementations do the same sampling.

* "fwd": the ROIAlign output, materialised.
* "fwd+bwd": the output and the gradient with respect to every pyramid level of
  `sum(out * cot)`, `cot` a fixed random array of the output's shape, i.e. the backward pass
  fed the cotangent `cot` as a head would feed it (a plain `sum` would let XLA fold a constant
  cotangent into the backward pass). JAX: `jax.vjp`; TF: `tape.gradient(out, maps,
  output_gradients=cot)`; torch: `out.backward(cot)`.
* JAX: `imask_jax.ops.roi_align.multilevel_roi_align` under `jax.jit`.
* TF: per level, `tf.image.crop_and_resize` at `(2h, 2w)` on the level's ROIs (boxes shifted
  so that its samples fall where ROIAlign's do) followed by a 2x2 average pool, results put
  back in ROI order with `tf.dynamic_stitch`; `tf.function`, `tf.GradientTape` for backward.
  crop_and_resize zeroes samples outside `[0, H - 1]` where ROIAlign clamps them, so its
  values differ near borders (the same amount of work is done).
* torchvision: `torchvision.ops.roi_align(aligned=True)` per level on that level's ROIs,
  the way `MultiScaleRoIAlign` does it, run in a subprocess with `.benchvenv/bin/python`
  (the CPU torch in .venv cannot load torchvision's ops). Make that environment with
  `python3 -m venv .benchvenv && .benchvenv/bin/pip install torch==2.14.1
  torchvision==0.29.1 numpy`; without it the torchvision column is left out.

All three are pinned to the same 2 CPUs (sched_setaffinity, inherited by the subprocess),
with TF's intra/inter-op pools and torch's pool set to 2 threads. Each cell is the median of
`--repeats` calls after `--warmup` calls (torchvision: `--torch_repeats` after one, it is
10-30x slower); JAX and TF calls alternate so that both see the same machine load. The
machine is shared and noisy: compare ratios, quote medians. The last lines check that the
three agree (TF only on ROIs whose samples all fall inside the map).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

THREADS = 2
# Pin before any numerical library starts its thread pools.
if hasattr(os, 'sched_setaffinity'):
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imask_jax.ops import roi_align as roi_ops  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(THREADS)
tf.config.threading.set_inter_op_parallelism_threads(THREADS)

REPO = Path(__file__).resolve().parents[1]
TORCH_PYTHON = REPO / '.benchvenv' / 'bin' / 'python'
IMAGE_SIZE = 256
CHANNELS = 256
LEVELS = (2, 3, 4, 5)
SAMPLING_RATIO = 2
# (name, ROIs, output size, fixed level or None for the assigned level)
CASES = (
  ('512 ROIs 7x7', 512, 7, None),
  ('512 ROIs 14x14', 512, 14, None),
  ('128 ROIs 56x56 (P2)', 128, 56, 2),
)


def make_pyramid(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    f'P{k}': rng.standard_normal((IMAGE_SIZE >> k, IMAGE_SIZE >> k, CHANNELS)).astype(np.float32)
    for k in LEVELS
  }


def make_boxes(n: int, seed: int) -> np.ndarray:
  """`[n, 4]` float32 boxes (y1, x1, y2, x2) inside the image."""
  rng = np.random.default_rng(seed)
  size = np.exp(rng.uniform(np.log(16), np.log(192), n))
  aspect = np.exp(rng.uniform(np.log(0.25), np.log(4.0), n))
  height, width = size * np.sqrt(aspect), size / np.sqrt(aspect)
  cy, cx = rng.uniform(0, IMAGE_SIZE, n), rng.uniform(0, IMAGE_SIZE, n)
  boxes = np.stack([cy - height / 2, cx - width / 2, cy + height / 2, cx + width / 2], 1)
  boxes = np.clip(boxes, 0, IMAGE_SIZE)
  # Keep every box at least 2 px in each direction after clipping.
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 2)
  return boxes.astype(np.float32)


def median_seconds(
  fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, float]:
  """Median wall time of each zero-argument call; the calls alternate within each round."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------------- JAX
def jax_calls(
  pyramid: dict[str, np.ndarray], boxes: np.ndarray, cot: np.ndarray, out: int, level: int | None
) -> tuple[Callable, Callable, np.ndarray]:
  feats = {k: jnp.asarray(v) for k, v in pyramid.items()}
  rois, cot_j = jnp.asarray(boxes), jnp.asarray(cot)

  def forward(f, r):
    return roi_ops.multilevel_roi_align(f, r, out, sampling_ratio=SAMPLING_RATIO, level=level)

  fwd = jax.jit(forward)

  @jax.jit
  def fwd_bwd(f, r, c):
    out, pullback = jax.vjp(lambda f: forward(f, r), f)
    return out, pullback(c)[0]

  result = np.asarray(fwd(feats, rois))
  return (
    lambda: jax.block_until_ready(fwd(feats, rois)),
    lambda: jax.block_until_ready(fwd_bwd(feats, rois, cot_j)),
    result,
  )


# ------------------------------------------------------------------------------------ TF
def tf_crop_and_resize_roi_align(
  maps: list[tf.Tensor], strides: list[int], boxes: tf.Tensor, level_index: tf.Tensor, out: int
) -> tf.Tensor:
  """ROIAlign with sampling ratio 2 built from crop_and_resize + average pooling."""
  samples = out * SAMPLING_RATIO
  pieces, positions = [], []
  for i, (fmap, stride) in enumerate(zip(maps, strides)):
    picked = tf.where(level_index == i)[:, 0]
    b = tf.gather(boxes, picked) / stride - 0.5  # map pixel-centre coordinates
    height = tf.cast(tf.shape(fmap)[0] - 1, tf.float32)
    width = tf.cast(tf.shape(fmap)[1] - 1, tf.float32)
    # crop_and_resize puts sample i at y1 + i (y2 - y1) / (samples - 1) (normalised by
    # size - 1); ROIAlign's samples are at start + (i + 0.5) * extent / samples.
    half_y = (b[:, 2] - b[:, 0]) / (2 * samples)
    half_x = (b[:, 3] - b[:, 1]) / (2 * samples)
    norm = tf.stack(
      [
        (b[:, 0] + half_y) / height,
        (b[:, 1] + half_x) / width,
        (b[:, 2] - half_y) / height,
        (b[:, 3] - half_x) / width,
      ],
      axis=1,
    )
    crops = tf.image.crop_and_resize(
      fmap[None], norm, tf.zeros_like(picked, tf.int32), (samples, samples)
    )
    pieces.append(tf.nn.avg_pool2d(crops, SAMPLING_RATIO, SAMPLING_RATIO, 'VALID'))
    positions.append(tf.cast(picked, tf.int32))
  return tf.dynamic_stitch(positions, pieces)


def tf_calls(
  pyramid: dict[str, np.ndarray],
  boxes: np.ndarray,
  cot: np.ndarray,
  level_index: np.ndarray,
  level_keys: list[str],
  out: int,
) -> tuple[Callable, Callable, np.ndarray]:
  maps = [tf.constant(pyramid[k]) for k in level_keys]
  strides = [2 ** int(k[1:]) for k in level_keys]
  tb, tl, tc = tf.constant(boxes), tf.constant(level_index), tf.constant(cot)

  @tf.function
  def fwd(maps, b, lv):
    return tf_crop_and_resize_roi_align(maps, strides, b, lv, out)

  @tf.function
  def fwd_bwd(maps, b, lv, c):
    with tf.GradientTape() as tape:
      tape.watch(maps)
      pooled = tf_crop_and_resize_roi_align(maps, strides, b, lv, out)
    return pooled, tape.gradient(pooled, maps, output_gradients=c)

  result = fwd(maps, tb, tl).numpy()
  # Eager TF on CPU returns once the function has run. No .numpy() in the timed calls: it
  # copies (about 70 ms for the 411 MB 56x56 output).
  return (lambda: fwd(maps, tb, tl), lambda: fwd_bwd(maps, tb, tl, tc), result)


# --------------------------------------------------------------------------- torchvision
TORCH_SCRIPT = r"""
import statistics, sys, time
import numpy as np
import torch
from torchvision.ops import roi_align
torch.set_num_threads(int(sys.argv[2]))
torch.set_num_interop_threads(int(sys.argv[2]))
d = np.load(sys.argv[1])
warmup, repeats, ratio = int(d["warmup"]), int(d["repeats"]), int(d["ratio"])
for case in range(int(d["cases"])):
  keys = [str(k) for k in d[f"keys{case}"]]
  maps = [torch.tensor(d[k]).permute(2, 0, 1)[None].contiguous().requires_grad_(True)
          for k in keys]
  boxes = torch.tensor(d[f"boxes{case}"])
  level = torch.tensor(d[f"level{case}"])
  cot = torch.tensor(d[f"cot{case}"]).permute(0, 3, 1, 2)
  out = int(d[f"out{case}"])
  rois = torch.cat([torch.zeros(len(boxes), 1), boxes[:, [1, 0, 3, 2]]], 1)

  def forward():
    result = torch.zeros(len(boxes), maps[0].shape[1], out, out)
    for i, (m, k) in enumerate(zip(maps, keys)):
      idx = torch.nonzero(level == i)[:, 0]
      pooled = roi_align(m, rois[idx], (out, out), 2.0 ** -int(k[1:]), ratio, True)
      result = result.index_put((idx,), pooled)
    return result

  def fwd():
    with torch.no_grad():
      return forward()

  def fwd_bwd():
    for m in maps:
      m.grad = None
    pooled = forward()
    pooled.backward(cot)
    return pooled

  result = fwd().permute(0, 2, 3, 1).numpy()
  np.save(sys.argv[1] + f".out{case}.npy", result)
  for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
    for _ in range(warmup):
      fn()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    print(case, name, statistics.median(times), flush=True)
"""


def torch_times(
  inputs: list[dict], warmup: int, repeats: int, workdir: Path
) -> tuple[dict[tuple[int, str], float], list[np.ndarray]] | None:
  if not TORCH_PYTHON.exists():
    print(f'[torchvision skipped: {TORCH_PYTHON} not found]')
    return None
  path = workdir / 'inputs.npz'
  arrays: dict[str, np.ndarray] = {
    'warmup': np.array(warmup),
    'repeats': np.array(repeats),
    'ratio': np.array(SAMPLING_RATIO),
    'cases': np.array(len(inputs)),
  }
  for i, case in enumerate(inputs):
    arrays.update(
      {
        f'boxes{i}': case['boxes'],
        f'level{i}': case['level_index'],
        f'cot{i}': case['cot'],
        f'out{i}': np.array(case['out']),
        f'keys{i}': np.array(case['keys']),
      }
    )
  arrays.update(inputs[0]['pyramid'])
  np.savez(path, **arrays)
  script = workdir / 'torch_roi_align.py'
  script.write_text(TORCH_SCRIPT)
  proc = subprocess.run(
    [str(TORCH_PYTHON), str(script), str(path), str(THREADS)],
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode != 0:
    print(f'[torchvision failed, column left out]\n{proc.stderr[-2000:]}')
    return None
  times = {}
  for line in proc.stdout.splitlines():
    case, name, seconds = line.split()
    times[(int(case), name)] = float(seconds)
  outputs = [np.load(f'{path}.out{i}.npy') for i in range(len(inputs))]
  return times, outputs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument(
    '--torch_repeats',
    type=int,
    default=5,
    help='torchvision is 10-30x slower; fewer repeats keep the run short',
  )
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no_torch', action='store_true', help='leave torchvision out')
  args = parser.parse_args()

  pyramid = make_pyramid(args.seed)
  inputs = []
  for case_id, (name, n, out, level) in enumerate(CASES):
    boxes = make_boxes(n, args.seed + 1 + case_id)
    if level is None:
      keys = [f'P{k}' for k in LEVELS]
      level_index = np.asarray(roi_ops.assign_levels(jnp.asarray(boxes))) - LEVELS[0]
    else:
      keys = [f'P{level}']
      level_index = np.zeros(n, np.int32)
    cot = (
      np.random.default_rng(args.seed + 100 + case_id)
      .standard_normal((n, out, out, CHANNELS))
      .astype(np.float32)
    )
    inputs.append(
      dict(
        name=name,
        out=out,
        level=level,
        boxes=boxes,
        cot=cot,
        keys=keys,
        level_index=level_index.astype(np.int32),
        pyramid=pyramid,
      )
    )

  torch_result = None
  if not args.no_torch:
    with tempfile.TemporaryDirectory() as tmp:
      torch_result = torch_times(inputs, 1, args.torch_repeats, Path(tmp))

  print(
    f'# {datetime.date.today()}  jax {jax.__version__}  tf {tf.__version__}  '
    f'{THREADS} threads  sampling_ratio {SAMPLING_RATIO}  median of {args.repeats} '
    f'(torchvision: {args.torch_repeats})'
  )
  header = (
    f'{"case":<22}{"pass":<9}{"JAX ms":>9}{"TF ms":>9}{"torch ms":>10}'
    f'{"JAX/TF":>8}{"JAX/torch":>11}'
  )
  print(header)
  print('-' * len(header))
  checks = []
  for i, case in enumerate(inputs):
    j_fwd, j_fb, j_out = jax_calls(
      case['pyramid'], case['boxes'], case['cot'], case['out'], case['level']
    )
    t_fwd, t_fb, t_out = tf_calls(
      case['pyramid'], case['boxes'], case['cot'], case['level_index'], case['keys'], case['out']
    )
    for pass_name, jf, tfn in (('fwd', j_fwd, t_fwd), ('fwd+bwd', j_fb, t_fb)):
      med = median_seconds({'jax': jf, 'tf': tfn}, args.warmup, args.repeats)
      torch_s = torch_result[0].get((i, pass_name)) if torch_result else None
      torch_ms = f'{torch_s * 1e3:10.1f}' if torch_s else f'{"-":>10}'
      vs_torch = f'{med["jax"] / torch_s:11.2f}' if torch_s else f'{"-":>11}'
      print(
        f'{case["name"]:<22}{pass_name:<9}{med["jax"] * 1e3:9.1f}{med["tf"] * 1e3:9.1f}'
        f'{torch_ms}{med["jax"] / med["tf"]:8.2f}{vs_torch}'
      )
    # crop_and_resize zeroes out-of-map samples where ROIAlign clamps: compare ROIs at least
    # one stride of their level away from the border, whose samples all lie inside the map.
    stride = np.array([2 ** int(k[1:]) for k in case['keys']])[case['level_index']][:, None]
    interior = np.all(
      (case['boxes'][:, :2] >= stride) & (case['boxes'][:, 2:] <= IMAGE_SIZE - stride), axis=1
    )
    line = (
      f'{case["name"]}: max |JAX - TF| on {int(interior.sum())} interior ROIs '
      f'{np.abs(j_out - t_out)[interior].max():.1e}'
    )
    if torch_result:
      line += f', max |JAX - torchvision| {np.abs(j_out - torch_result[1][i]).max():.1e}'
    checks.append(line)
  print('\n'.join(checks))


if __name__ == '__main__':
  main()
