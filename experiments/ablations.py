"""Ablation sweeps of the paper's comparison (iMaskRCNN's mask head against Mask R-CNN's).

  python -m imask_jax.sweep --config experiments/ablations.py:dataset=phantom_knee --workdir DIR
  python -m imask_jax.sweep --config experiments/ablations.py:dataset=oai,study=heads,seeds=3 \
      --workdir DIR --dry_run          # one command per run, for a cluster scheduler

Arguments (comma-separated; lists joined with '+'):
  dataset=NAME    the base experiment experiments/NAME.py (phantom_knee, phantom_hip, oai, stiho)
  study=NAME      which variants (default paper):
                    paper      mask head {standard, imask} x backbones (the paper's Table 3)
                    heads      mask head {standard, imask, decoder only, skip only}, one backbone
                    skip_size  the imask head with a skip of 28, 56 and 112, and standard
                    cartilage  the boundary levers of thin structures on the imask head: a
                               112 x 112 mask grid, the PointRend-style point head, both
                    all        heads x backbones, plus the skip sizes on the first backbone
                    baselines  the semantic U-Net of the base experiment's `unet` variant
                               beside Mask R-CNN and iMaskRCNN on one backbone (the
                               comparison the field asks for; docs/results/baselines.md)
  backbones=A+B   backbones of the study (paper, all: resnet50+resnet101+densenet121 for all,
                  resnet101+densenet121 for paper; heads, skip_size: the base experiment's)
  seeds=N         seeds 0..N-1 (default 1); or seeds=0+3+7 for those seeds
  base=ARGS       variant arguments for every run of the base experiment, joined with '+'
                  (base=smoke, base=full+steps=3000)

Every run of the sweep is the base experiment with `base`, the variant's own arguments and
`seed=k`, in DIR/<variant>/seed<k>/. Each variant but the baselines names the variant it is
compared with (paired Wilcoxon tests over the same test volumes and seeds): a head against
the standard head on the same backbone, a skip size against the imask head's default 56.
The paper's studies (paper, heads, skip_size, all) compare the paper's heads, so their runs
have the point head off (`points=False`) even where the base experiment turns it on (the knee
quick start); the cartilage study switches it itself.
Fields can also be changed with --config.base_arg='smoke,steps=20' and the like.
"""

from __future__ import annotations

import os

import ml_collections

from imask_jax import configs

STUDIES = ('paper', 'heads', 'skip_size', 'cartilage', 'baselines', 'all')
# (variant name prefix, config arguments) of each mask head in the `heads` study.
HEADS = (
  ('standard', 'head=standard'),
  ('imask', 'head=imask'),
  ('decoder_only', 'head=imask,skip=False'),
  ('skip_only', 'head=imask,decoder=False'),
)
PAPER_BACKBONES = ('resnet101', 'densenet121')
ALL_BACKBONES = ('resnet50', 'resnet101', 'densenet121')
SKIP_SIZES = (28, 56, 112)
# (variant name prefix, config arguments) of the `cartilage` study, each against the imask head.
CARTILAGE_LEVERS = (
  ('imask_skip112', 'head=imask,skip_size=112,points=False'),
  ('imask_points', 'head=imask,points=True'),
  ('imask_skip112_points', 'head=imask,skip_size=112,points=True'),
)


def _names(value) -> tuple[str, ...]:
  """'a+b' (or a single value) -> ('a', 'b')."""
  return tuple(str(v) for v in str(value).split('+') if v)


def _seeds(value) -> tuple[int, ...]:
  """seeds=3 -> (0, 1, 2); seeds=0+3+7 -> (0, 3, 7)."""
  if isinstance(value, int):
    if value < 1:
      raise ValueError(f'ablations: seeds={value}; expected a count >= 1 or a list like 0+3')
    return tuple(range(value))
  return tuple(int(v) for v in _names(value))


def variants(study: str, backbones: tuple[str, ...] | None) -> list[tuple[str, str, str]]:
  """The variants of `study` as (name, config arguments, baseline name or '').

  backbones=None keeps the base experiment's backbone (names carry no backbone then).
  """
  if study not in STUDIES:
    raise ValueError(f'ablations: study={study!r}; expected one of {STUDIES}')

  def named(prefix: str, backbone: str | None) -> str:
    return prefix if backbone is None else f'{prefix}-{backbone}'

  def with_backbone(arg: str, backbone: str | None) -> str:
    return arg if backbone is None else f'{arg},backbone={backbone}'

  out: list[tuple[str, str, str]] = []

  def head_rows(heads, backbone):
    for prefix, arg in heads:
      baseline = '' if prefix == 'standard' else named('standard', backbone)
      out.append((named(prefix, backbone), with_backbone(arg, backbone), baseline))

  def skip_rows(backbone):
    if not any(name == named('standard', backbone) for name, _, _ in out):
      head_rows(HEADS[:2], backbone)
    for size in SKIP_SIZES:
      if size != 56:
        out.append(
          (
            named(f'imask_skip{size}', backbone),
            with_backbone(f'head=imask,skip_size={size}', backbone),
            named('imask', backbone),
          )
        )

  if study == 'paper':
    for backbone in backbones or PAPER_BACKBONES:
      head_rows(HEADS[:2], backbone)
  elif study == 'heads':
    head_rows(HEADS, backbones[0] if backbones else None)
  elif study == 'skip_size':
    skip_rows(backbones[0] if backbones else None)
  elif study == 'baselines':
    backbone = backbones[0] if backbones else None
    head_rows(HEADS[:2], backbone)
    # The U-Net has no backbone or mask head: the base experiment's `unet` variant as it is.
    out.append(('unet', 'unet', named('imask', backbone)))
  elif study == 'cartilage':
    backbone = backbones[0] if backbones else None
    out.append((named('imask', backbone), with_backbone('head=imask,points=False', backbone), ''))
    for prefix, arg in CARTILAGE_LEVERS:
      out.append((named(prefix, backbone), with_backbone(arg, backbone), named('imask', backbone)))
    return out
  else:
    chosen = backbones or ALL_BACKBONES
    for backbone in chosen:
      head_rows(HEADS, backbone)
    skip_rows(chosen[0])
  return [(name, f'{arg},points=False', baseline) for name, arg, baseline in out]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configs.parse_arg(arg)
  dataset = str(args.pop('dataset', 'phantom_knee'))
  experiment = os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{dataset}.py')
  if not os.path.isfile(experiment):
    raise ValueError(f'ablations: dataset={dataset!r} has no experiment file {experiment}')
  study = str(args.pop('study', 'paper'))
  backbones = _names(args.pop('backbones')) if 'backbones' in args else None
  seeds = _seeds(args.pop('seeds', 1))
  base_arg = ','.join(_names(args.pop('base', '')))
  if args:
    raise ValueError(
      f'ablations: unknown arguments {sorted(args)}; known: dataset, study, backbones, seeds, base'
    )

  c = ml_collections.ConfigDict()
  c.dataset = dataset
  c.experiment = experiment  # the base experiment file
  c.base_arg = base_arg  # its config argument for every run
  c.study = study
  c.seeds = seeds
  # (name, config arguments, baseline variant name or '') per variant, in run order.
  c.variants = tuple(variants(study, backbones))
  c.split = 'test'  # the split every run is evaluated on
  return c
