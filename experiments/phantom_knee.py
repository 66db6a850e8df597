"""Knee phantom (sagittal DESS-like): the quick start, sized for 2 CPU cores.

  python -m imask_jax.main --config experiments/phantom_knee.py --workdir runs/knee
  python -m imask_jax.main --config experiments/phantom_knee.py:smoke --workdir /tmp/smoke
  python -m imask_jax.main --config experiments/phantom_knee.py:full,head=standard --workdir ...

Variants (comma-separated in the config argument):
  smoke           shrinks images, widths, data and steps: the whole job in about a minute
  full            a longer run on more phantoms (figures: docs/results/knee_phantom.md)
  cartilage       the cartilage experiment of issue 11: a knee coil's 140 mm field of view at
                  0.5 mm per network pixel (random 192 x 192 crops), 9000 steps on the same 24
                  phantoms (docs/results/cartilage.md)
  unet            a semantic 2D U-Net (models/unet.py, model.kind='unet') on the same data,
                  pixel size, steps and post-processing instead of the iMaskRCNN: the baseline
                  of issue 35 (docs/results/baselines.md); with encoder=resnet18 (or another
                  backbone name) the U-Net's encoder is that body at model.width (the
                  iMaskRCNN's ResNet-18 at width 16), 6 levels
  head=standard|imask, backbone=resnet18|resnet50|resnet101|densenet121, steps=N, seed=N,
  mask_dice=W (0 trains with the paper's mask BCE alone), points=False (no point head),
  volumes=N (phantoms generated; a fifth are the test split)
"""

from __future__ import annotations

from data_pipelines import tissues
from imask_jax import configs


def get_config(arg: str | None = None):
  args = configs.parse_arg(arg)
  c = configs.default_config()
  c.data.dataset = 'phantom_knee'
  c.data.num_volumes = 24
  # Scale-true at the cpu preset's own 0.8 mm: its 128 x 128 slices (102 mm) go in whole, and
  # scans of any other resolution or field of view are resampled to 0.8 mm first (whole slices,
  # padded up to a multiple of 64). Training on a knee coil's 140 mm field of view instead
  # (data.phantom_fov_mm=140, random 128 x 128 crops of 175 x 175 slices) was tried and gave
  # worse bones on 140 mm test volumes at 3000 steps (docs/results/knee_phantom.md, "Scans
  # of other resolutions").
  c.data.pixel_spacing_mm = 0.8
  c.data.image_size = (128, 128)
  c.data.max_instances = 6

  # ResNet-18-FPN at width 16, narrow heads, batch 4: configs.use_small_network.
  configs.use_small_network(c)
  # A 2-3 pixel cartilage band fills a tenth of its box: the soft-Dice term keeps the mask BCE
  # from trading the band's edges for background (its effect: docs/results/knee_phantom.md).
  c.model.mask_dice_weight = 1.0
  # A femur and a tibia are one object each: blobs painted apart from them (outer slices of a
  # wide field of view) are dropped (imask_jax/inference/postprocess.py; measured in
  # docs/evaluation.md).
  c.model.keep_largest_component = (tissues.FEMUR, tissues.TIBIA)
  # Cartilage lies on its bone: specks painted far from it go (a U-Net's stray islands;
  # docs/results/baselines.md).
  c.model.keep_attached = (tissues.FEMORAL_CARTILAGE, tissues.TIBIAL_CARTILAGE)
  # The PointRend-style point head refines the 56 x 56 masks at their uncertain points from
  # the input and P2 (cartilage Dice +0.02-0.03 and a smoother thickness map on the test
  # knees, docs/results/cartilage.md); points=False is the paper's iMask head alone.
  c.model.point_head.enabled = True

  c.train.steps = 3000
  # predict runs the mask head on 2 slots per tissue (one structure per tissue and slice, and
  # room for a duplicate) instead of all 16 detections; evaluate still masks them all.
  c.model.paint_slots_per_class = 2

  if args.pop('full', False):
    # More steps on two thirds more phantoms, same network (timings: docs/results/knee_phantom.md).
    c.data.num_volumes = 40
    c.train.steps = 7500
    c.train.eval_every = 1500
    c.train.checkpoint_every = 500
  if args.pop('cartilage', False):
    # The levers that measured best on scanner-like test knees (docs/results/cartilage.md):
    # the scanner's field of view (bones seen whole), a 0.5 mm network pixel (a plate is 3-4
    # pixels thick instead of 2), the point head (on above), and a longer schedule.
    c.data.phantom_fov_mm = 140.0
    c.data.phantom_spacing_mm = 0.5
    c.data.pixel_spacing_mm = 0.5
    c.data.image_size = (192, 192)
    c.train.steps = 9000
    c.train.eval_every = 3000
    c.train.checkpoint_every = 500
  unet = args.pop('unet', False)
  encoder = args.pop('encoder', None)
  if encoder and not unet:
    raise ValueError(f'experiments/phantom_knee.py: encoder={encoder} applies to the unet variant')
  if unet:
    # nnU-Net's 2D layout at the quick start's size: 5 levels take a 128 px crop down to 8 x 8;
    # width 16 (nnU-Net: 32) keeps a step near the iMaskRCNN's on 2 CPU cores. Instance norm,
    # Dice + CE and deep supervision are the model.unet defaults.
    c.model.kind = 'unet'
    c.model.unet.depth = 5
    c.model.unet.width = 16
    if encoder:
      c.model.unet.encoder = str(encoder)
      c.model.unet.depth = 6  # full resolution, the stem and C2-C5
  if args.pop('smoke', False):
    configs.shrink_for_smoke(c)
    if unet:
      c.model.unet.depth = 6 if encoder else 4
      c.model.unet.width = 8
    # Six steps leave every score far below 0.5: paint all kept detections so that the rest of
    # the job (metrics, figures, predictions) has something to work on.
    c.model.label_score_threshold = c.model.test_score_threshold
    c.model.paint_slots_per_class = 0  # ... all of them
  configs.apply_common_args(c, args)
  return c
