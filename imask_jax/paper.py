"""The paper's settings strictly: what Felfeliyan et al. state, and nothing where they are silent.

`experiments/oai.py:paper` and `experiments/stiho.py:paper` start from the recommended
settings (`configs.use_paper_settings` and the experiment's own) and call `use_strict_settings`,
which turns off every setting the paper does not name and sets what it does name: slices
resized to fit 1024 x 1024, Adam at 0.001 from step 0, the mask loss BCE alone, the iMask head
without the layers the paper does not name, the paper's split proportions with no validation
split. Where the paper is silent and a value is unavoidable, an epoch is Matterport Mask R-CNN's
(1000 steps at batch 2); `use_full_passes` makes it one pass over the training slices instead.

What the paper states (with its sections) and every setting turned off, with the reasons:
docs/reproducing.md, 'What the paper states', 'The strict variants', 'The paper's 300 epochs'.
"""

from __future__ import annotations

import ml_collections

# Matterport Mask R-CNN's Config defaults: an epoch is STEPS_PER_EPOCH steps whatever the
# dataset's size, of IMAGES_PER_GPU x GPU_COUNT images (2 x 1 for 1024-pixel images).
MATTERPORT_STEPS_PER_EPOCH = 1000
MATTERPORT_BATCH = 2
# Mask R-CNN's anchor aspect ratios (height / width).
MASK_RCNN_ANCHOR_RATIOS = (0.5, 1.0, 2.0)


def paper_fractions(train_scans: int, test_scans: int) -> tuple[float, float, float]:
  """Split fractions (train, validation, test) of the paper's scan counts, no validation."""
  total = train_scans + test_scans
  return (train_scans / total, 0.0, test_scans / total)


def use_strict_settings(c: ml_collections.ConfigDict, *, train_scans: int, test_scans: int) -> None:
  """Turns `c` (an experiment's recommended paper config) into the strict reading of the paper
  (docs/reproducing.md, 'The strict variants'). train_scans / test_scans: the paper's counts,
  for the split proportions when no split file is given."""
  d, m, t = c.data, c.model, c.train
  # Section 2.3: "The input images were resized to 1024x1024".
  d.pixel_spacing_mm = 0.0
  d.image_size = (1024, 1024)
  d.split_fractions = paper_fractions(train_scans, test_scans)
  d.empty_slice_rate = 0.0
  a = d.augment
  a.flip_lr = a.flip_ud = False
  a.rotate_degrees = 0.0
  a.noise_std = 0.0
  for name in ('scale_range', 'gamma_range', 'intensity_scale_range'):
    a[name] = (1.0, 1.0)
  if 'contrast' in a:
    a.contrast.enabled = False
  m.anchor_ratios = MASK_RCNN_ANCHOR_RATIOS
  m.roi_hard_negative_fraction = 0.0
  m.mask_dice_weight = 0.0
  m.boundary_loss_weight = 0.0
  m.point_head.enabled = False
  m.imask.reduce = False
  m.imask.skip_projection = False
  m.imask.fuse_convs = 0
  m.imask.fine_dim = int(m.mask_head_dim)  # the trunk's width: no reduction anywhere
  m.keep_largest_component = ()
  m.keep_largest_cluster = ()
  m.keep_attached = ()
  m.paint_rule = 'each'
  m.label_score_threshold = float(m.test_score_threshold)
  m.paint_slots_per_class = 0
  t.optimizer = 'adam'
  t.learning_rate = 1e-3
  t.schedule = 'constant'
  t.warmup_steps = 0
  t.grad_clip_norm = 0.0
  t.weight_decay = 0.0
  t.batch_size = MATTERPORT_BATCH
  t.steps_per_epoch = MATTERPORT_STEPS_PER_EPOCH
  t.steps = int(t.epochs * t.steps_per_epoch)


def use_full_passes(c: ml_collections.ConfigDict, estimated_train_slices: int) -> None:
  """An epoch as one pass over the training slices (the `full_passes` variant): the trainer
  resolves ceil(epochs x training slices / batch) once the dataset is prepared; train.steps is
  the estimate for `estimated_train_slices`."""
  c.train.steps_per_epoch = 0
  c.train.steps = -(-int(c.train.epochs * estimated_train_slices) // int(c.train.batch_size))
