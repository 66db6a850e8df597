"""Training and inference cost of the baselines study's models side by side: Mask R-CNN,
iMaskRCNN and the semantic U-Net of one dataset, on the same machine in one run.

Run (from the repository root):
  TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES= .venv/bin/python benchmarks/baselines_cost.py
  ... benchmarks/baselines_cost.py --dataset hip
  ... benchmarks/baselines_cost.py --dataset knee --smoke   # tiny, to check the script

Each model is the sweep's `study=baselines` variant (experiments/ablations.py) of the dataset's
experiment, measured by benchmarks/gpu.py's workers, each in its own process so that its peak
memory is its own: "train" compiles the trainer's step ahead of time and times it on a
synthetic batch of the experiment's crop and batch (median of --steps calls after --warmup);
"infer" times `whole_volume.predict_volume` on a synthetic volume of the dataset's test-scan
shape and spacing (median of --volume_repeats after one compiling volume). The models are
freshly initialised: every array shape is static, so the network's cost is a trained model's;
the host-side steps after the network (pasting, post-processing) grow with what a model
paints, which a fresh Mask R-CNN paints little of. Peak memory: the process's peak RSS on the
CPU (compile included), the device's peak on an accelerator. Rounds alternate the models
(--rounds), so a load that comes and goes touches every model alike; the table gives each
figure's median over rounds and its ratio to the iMaskRCNN's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import gpu  # benchmarks/gpu.py: the train and infer workers
import train_step  # benchmarks/train_step.py: the table printer

# The test scans of each phantom (the quick start's presets): rows, cols, slices and mm.
DATASETS = {
  'knee': dict(
    config='experiments/phantom_knee.py',
    volume=(128, 128, 64),
    volume_spacing=(0.8, 0.8, 1.5),
  ),
  'hip': dict(
    config='experiments/phantom_hip.py',
    volume=(160, 160, 20),
    volume_spacing=(2.2, 2.2, 3.0),
  ),
}
# The sweep's baselines variants (experiments/ablations.py, study=baselines).
MODELS = (
  ('Mask R-CNN', 'head=standard,points=False'),
  ('iMaskRCNN', 'head=imask,points=False'),
  ('U-Net', 'unet,points=False'),
)
REFERENCE = 'iMaskRCNN'


def model_run(dataset: dict, arg: str, args: argparse.Namespace) -> dict:
  """gpu.py's run settings for one model: the experiment's own crop and batch."""
  from imask_jax import configs

  config = f'{dataset["config"]}:{arg}' + (',smoke' if args.smoke else '')
  path, _, variant = config.partition(':')
  probe = configs.load_experiment(str(gpu.REPO / path), variant)
  return dict(
    config=config,
    size=int(probe.data.image_size[0]),
    backbone='',
    batch=int(probe.train.batch_size),
    steps=args.steps,
    warmup=args.warmup,
    volume=[int(n) for n in dataset['volume']],
    volume_spacing=[float(mm) for mm in dataset['volume_spacing']],
    volume_repeats=args.volume_repeats,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', choices=tuple(DATASETS), default='knee')
  parser.add_argument('--rounds', type=int, default=2, help='measurements of each model')
  parser.add_argument('--steps', type=int, default=20, help='timed training steps')
  parser.add_argument('--warmup', type=int, default=3, help='training calls before timing')
  parser.add_argument('--volume_repeats', type=int, default=3, help='timed volumes')
  parser.add_argument('--smoke', action='store_true', help="the experiments' smoke variants")
  parser.add_argument('--timeout', type=float, default=1800.0, help='s per worker process')
  args = parser.parse_args()
  if min(args.rounds, args.steps, args.warmup, args.volume_repeats) < 1:
    sys.exit('baselines_cost.py: --rounds, --steps, --warmup and --volume_repeats must be >= 1')
  if args.smoke:
    args.steps, args.warmup, args.volume_repeats = 2, 1, 1
  dataset = DATASETS[args.dataset]
  runs = {name: model_run(dataset, arg, args) for name, arg in MODELS}
  figures: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
  for round_index in range(args.rounds):
    for name, run in runs.items():
      for mode in ('train', 'infer'):
        result, reason = gpu.run_worker(mode, '1', run, args.timeout)
        if result is None:
          sys.exit(f'baselines_cost.py: {name} {mode} failed: {reason}')
        got = figures[name]
        got.setdefault(f'{mode} s', []).append(result['median_s'])
        got.setdefault(f'{mode} peak GiB', []).append(result['peak_bytes'] / 2**30)
        memory_source = result['memory_source']
      print(f'[round {round_index + 1}: {name} done]', flush=True)
  medians = {
    name: {key: statistics.median(values) for key, values in got.items()}
    for name, got in figures.items()
  }
  reference = medians[REFERENCE]
  volume, spacing = dataset['volume'], dataset['volume_spacing']
  print(
    f'\n# {args.dataset}: crops {runs[REFERENCE]["size"]} px, batch {runs[REFERENCE]["batch"]}; '
    f'volume {volume[0]} x {volume[1]} x {volume[2]} at {spacing[0]} x {spacing[1]} x '
    f'{spacing[2]} mm; medians of {args.rounds} rounds; peak memory: {memory_source}; load '
    f'average {os.getloadavg()[0]:.1f}'
  )
  header = ['model', 's/step', 'x', 'train peak GiB', 'x', 's/volume', 'x', 'infer peak GiB', 'x']
  lines = []
  for name, m in medians.items():
    line = [name]
    for key, digits in (
      ('train s', '.3f'),
      ('train peak GiB', '.2f'),
      ('infer s', '.2f'),
      ('infer peak GiB', '.2f'),
    ):
      line += [format(m[key], digits), f'{m[key] / reference[key]:.2f}']
    lines.append(line)
  train_step.print_table(header, lines, True)
  print(f'(x: ratio to the {REFERENCE})')


if __name__ == '__main__':
  main()
