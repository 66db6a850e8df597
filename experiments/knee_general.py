"""A general knee model (issue 36): varied anatomy, randomised contrast, held-out judging.

Trained on knee phantoms of the varied shape family (data_pipelines/phantoms/knee_shapes.py) in
a knee coil's field of view, with contrast randomisation on (imask_jax/contrast_augment.py:
each tissue's intensity, bias field, blur, resolution, noise and gamma drawn per example), so
that the model learns shapes rather than one anatomy family and one DESS contrast. The data
are written once by the phantom CLI and read as an nnU-Net folder:

  python -m data_pipelines.phantoms knee --shape-family varied --num 40 --seed 1000 \\
      --fov 140 --spacing 0.5 --out data/knee_general/varied
  python -m imask_jax.main --config experiments/knee_general.py --workdir runs/knee_general

`make knee-model` runs both (into workdirs/knee_general) and copies the trained model to
models/knee_general, the shipped model (its MODEL_CARD.md).

Judged on folders it never sees in training or tuning (other seeds; the held-out shape family
draws every shape parameter outside the varied ranges; iw_fs and t1 are held-out contrasts):

  ... knee --seed 2000 --num 8 --fov 140 --spacing 0.5 --out data/knee_general/in_distribution
      (add --shape-family varied)
  ... --shape-family held_out                 --out data/knee_general/held_out_shapes
  ... --shape-family varied --contrast iw_fs  --out data/knee_general/held_out_contrast
  ... --shape-family varied --contrast t1     --out data/knee_general/held_out_contrast_t1
  ... --shape-family held_out --contrast t1   --out data/knee_general/held_out_both

Variants (comma-separated in the config argument):
  data=DIR        the training folder (default data/knee_general/varied)
  contrast=False  the same run without contrast randomisation (the ablation)
  smoke           a tiny run on generated default-family phantoms, contrast randomisation on
  steps=N, seed=N, head=..., backbone=... (configs.apply_common_args)
"""

from __future__ import annotations

from data_pipelines import tissues
from imask_jax import configs

TRAINING_FOLDER = 'data/knee_general/varied'


def get_config(arg: str | None = None):
  args = configs.parse_arg(arg)
  c = configs.default_config()
  d = c.data
  d.dataset = 'nifti_folder'
  d.manual_dir = str(args.pop('data', TRAINING_FOLDER))
  d.class_label_values = (1, 2, 3, 4)  # the phantom's femur, cartilages, tibia; not effusion
  d.split_fractions = (0.85, 0.15, 0.0)  # judging uses the held-out folders, not a test split
  # The quick start's cartilage levers (experiments/phantom_knee.py:cartilage,
  # docs/results/cartilage.md): 0.5 mm network pixels, random 192 x 192 crops.
  d.pixel_spacing_mm = 0.5
  d.image_size = (192, 192)
  d.max_instances = 6
  # Contrast randomisation on 80 % of the examples: the rest keep the phantom's own DESS, so
  # that the contrast of in-distribution scans is still seen as it is.
  d.augment.contrast.enabled = bool(args.pop('contrast', True))
  d.augment.contrast.rate = 0.8
  # Another field of view moves the percentile normalisation (configs.py).
  d.augment.intensity_scale_range = (0.8, 1.25)

  configs.use_small_network(c)
  c.model.mask_dice_weight = 1.0
  c.model.keep_largest_component = (tissues.FEMUR, tissues.TIBIA)
  c.model.keep_attached = (tissues.FEMORAL_CARTILAGE, tissues.TIBIAL_CARTILAGE)
  c.model.point_head.enabled = True
  c.model.paint_slots_per_class = 2
  c.train.steps = 9000
  c.train.eval_every = 3000
  c.train.checkpoint_every = 500

  if args.pop('smoke', False):
    d.dataset = 'phantom_knee'
    d.manual_dir = ''
    configs.shrink_for_smoke(c)
    c.model.label_score_threshold = c.model.test_score_threshold
    c.model.paint_slots_per_class = 0
  configs.apply_common_args(c, args)
  return c
