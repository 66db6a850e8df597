"""One trained phantom model on its test volumes generated again at other in-plane spacings.

  python tools/resolution_table.py --workdir runs/knee [--spacings 0.365 0.5 0.8] [--fov 140]

The test split of the workdir's phantom dataset (the same volumes: same seeds, so the same
anatomy) is written again at each in-plane spacing with the given field of view
(`phantoms.write_dataset(..., indices=...)`), and the checkpoint is evaluated on each, twice:
scale-true (every slice resampled to the model's data.pixel_spacing_mm, or to
--pixel_spacing_mm for a workdir trained with 0) and resize to fit (every slice resized to
data.image_size, the behaviour before scale-true slices). Each evaluation is written like
`evaluate`'s into WORKDIR/resolution/<spacing>mm_fov<fov>/<mode>/; a markdown table of
per-tissue Dice, HD95 and mean cartilage thickness (prediction and truth) is printed and
written to WORKDIR/resolution/table.md. --thickness_method normal measures the thickness along
surface normals instead of the workdir's eval.thickness_method; those evaluations and their
table get the suffix _normal.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np

from data_pipelines import dataset_folders
from data_pipelines.datasets import params as params_lib
from data_pipelines.datasets import sources
from data_pipelines.phantoms import writer
from imask_jax import workdir as workdir_lib
from imask_jax.evaluation import held_out
from imask_jax.inference import loading, whole_volume


def regenerate_test_split(config, data_dir: str, folder: str, spacing: float, fov: float):
  """The test split of the workdir's phantom dataset, written into `folder` at `spacing` and
  `fov` (once; reused when its dataset.json is there). Returns a VolumeSource of it."""
  params = params_lib.params_from_config(config, data_dir)
  if not params.is_phantom:
    raise SystemExit(f'{config.data.dataset}: only phantom datasets can be generated again')
  test = sources.volume_source(params, data_dir, 'test')
  indices = [int(case.case_id.rsplit('_', 1)[1]) for case in test.cases]
  if not os.path.isfile(os.path.join(folder, 'dataset.json')):
    writer.write_dataset(
      params_lib.PHANTOM_DATASETS[params.dataset],
      params.num_volumes,
      params.seed,
      folder,
      preset=params.phantom_preset,
      spacing_mm=spacing,
      fov_mm=fov,
      indices=indices,
    )
  raw = dataset_folders.NnunetFolder(folder)
  return dataclasses.replace(test, cases=tuple(raw.cases('train')), label_values=dict(raw.labels))


def summarize(report, scheme) -> dict[str, float]:
  out = {}
  # Means over the volumes that have the tissue in truth or prediction: a volume where both
  # are empty (a dry hip scan) has no Dice or distance (NaN, docs/metrics.md).
  for value, name in scheme.names_by_value.items():
    out[f'dice {name}'] = float(np.nanmean([r.overlap[value].dice for r in report.results]))
    out[f'hd95 {name}'] = float(np.nanmean([r.surface[value].hd95_mm for r in report.results]))
  for plate in ('femoral', 'tibial'):
    comparisons = [r.thickness[plate] for r in report.results if r.thickness]
    if comparisons:
      out[f'{plate} thickness'] = float(np.mean([c.pred.mean_thickness_mm for c in comparisons]))
      out[f'{plate} truth'] = float(np.mean([c.truth.mean_thickness_mm for c in comparisons]))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--checkpoint', type=int, default=None)
  parser.add_argument('--spacings', type=float, nargs='+', default=[0.365, 0.5, 0.8])
  parser.add_argument('--fov', type=float, default=140.0, help='in-plane field of view, mm')
  parser.add_argument(
    '--modes',
    nargs='+',
    choices=['scale-true', 'resize-to-fit'],
    default=['scale-true', 'resize-to-fit'],
  )
  parser.add_argument(
    '--pixel_spacing_mm',
    type=float,
    default=None,
    help='scale-true spacing for a workdir trained without data.pixel_spacing_mm',
  )
  parser.add_argument(
    '--thickness_method',
    choices=['nearest', 'normal'],
    default=None,
    help="cartilage thickness measure (default: the workdir's eval.thickness_method)",
  )
  args = parser.parse_args(argv)
  model = loading.load_model(args.workdir, args.checkpoint)
  config = model.config
  target = args.pixel_spacing_mm or config.data.get('pixel_spacing_mm')
  if not target:
    parser.error('the workdir resizes to fit: give --pixel_spacing_mm for the scale-true rows')
  modes = {}
  for name, spacing in (('scale-true', float(target)), ('resize-to-fit', 0.0)):
    if name not in args.modes:
      continue
    mode_config = config.copy_and_resolve_references()
    mode_config.data.pixel_spacing_mm = spacing
    if args.thickness_method:
      mode_config.eval.thickness_method = args.thickness_method
    modes[name] = dataclasses.replace(model, config=mode_config)
  data_dir = workdir_lib.data_dir_for(config, args.workdir)
  method = args.thickness_method or str(config.eval.thickness_method)
  # Evaluations with another measure than the default go beside, not over, the default's.
  suffix = '' if method == 'nearest' else f'_{method}'
  root = os.path.join(os.path.abspath(args.workdir), 'resolution')
  rows = []
  for spacing in args.spacings:
    tag = f'{spacing:g}mm_fov{args.fov:g}'
    started = time.time()
    source = regenerate_test_split(
      config, data_dir, os.path.join(root, tag, 'data'), spacing, args.fov
    )
    print(f'{tag}: {len(source.cases)} test volumes ready ({time.time() - started:.0f} s)')
    for name, mode_model in modes.items():
      started = time.time()
      report = held_out.evaluate_source(
        mode_model.config,
        source,
        lambda volume, m=mode_model: whole_volume.predict_volume(m, volume, keep_instances=True),
        os.path.join(root, tag, name + suffix),
        {
          'workdir': os.path.abspath(args.workdir),
          'checkpoint_step': model.step,
          'split': f'test, generated again at {tag} ({name})',
          'dataset': str(config.data.dataset),
          'mask_head': str(config.model.mask_head),
          'backbone': str(config.model.backbone),
        },
      )
      row = summarize(report, model.scheme)
      rows.append((spacing, name, row))
      print(f'  {name}: {time.time() - started:.0f} s', {k: round(v, 3) for k, v in row.items()})
  table = markdown(rows, args.fov, target, model, method)
  with open(os.path.join(root, f'table{suffix}.md'), 'w') as f:
    f.write(table)
  print(table)
  return 0


def markdown(rows, fov, target, model, method) -> str:
  keys = list(rows[0][2])
  dice = [k for k in keys if k.startswith('dice ')]
  rest = [k for k in keys if not k.startswith('dice ')]
  head = ['in-plane spacing', 'slices', *dice, *rest]
  lines = [
    f'Checkpoint {model.step} of {model.workdir}; test volumes at a {fov:g} mm field of view; '
    f'scale-true at {float(target):g} mm per network pixel; thickness measure {method!r}.',
    '',
    '| ' + ' | '.join(head) + ' |',
    '|' + '---|' * len(head),
  ]
  for spacing, name, row in rows:
    cells = [f'{spacing:g} mm', name] + [
      'nan' if math.isnan(row[k]) else f'{row[k]:.3f}' if k.startswith('dice') else f'{row[k]:.2f}'
      for k in dice + rest
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  sys.exit(main())
