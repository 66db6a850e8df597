"""The paper's settings strictly: what Felfeliyan et al. state, and nothing where they are silent.

`experiments/oai.py:paper` and `experiments/stiho.py:paper` start from the recommended
settings (`configs.use_paper_settings` and the experiment's own) and call `use_strict_settings`,
which turns off every setting the paper does not name and sets what it does name:

  stated (section)                                   here
  ResNet-101-FPN, DenseNet backbones (2.2, 2.3)      configs.use_paper_settings (unchanged)
  "input images were resized to 1024x1024" (2.3)     data.pixel_spacing_mm = 0: each slice
                                                     resized to fit 1024 x 1024 and padded
  Adam, learning rate 0.001, 300 epochs (2.3)        constant rate from step 0: no warm-up,
                                                     no gradient clipping, no weight decay
  L = L_cls + L_bbox + L_mask (2.2, eq. 1)           mask loss BCE alone (no soft-Dice, no
                                                     boundary or point terms)
  a transposed conv decoder and the 56x56 ROIAlign   iMask head without the layers the paper
  concatenated to it (2.2, Figure 2)                 does not name (`heads.IMaskHead`:
                                                     reduce, skip_projection, fuse_convs off,
                                                     the trunk's width throughout)
  470 / 30 OAI and 125 / 50 STIHO scans (2.3)        a split file (data.split_file) if you
                                                     have the ids; else those proportions,
                                                     with no validation split (none is named)

Silent, so off: augmentation (every transform), hard negatives, the anchors' 1:4 and 4:1
aspect ratios (Mask R-CNN's 1:2, 1:1, 2:1 stay), post-processing of the painted volume (largest
component, effusion clusters), and the painting extras (union rule, a painting score of its
own, painting slots): every kept detection paints where its own mask is >= 0.5, as a Mask
R-CNN mask is read. Slices without any structure are not trained on, as neither Mask R-CNN
implementation the paper could have started from trains on images without objects.

Silent, and a choice had to be made: what an epoch is and the batch. `train.steps_per_epoch =
1000` at batch 2 are Matterport Mask R-CNN's defaults (STEPS_PER_EPOCH, IMAGES_PER_GPU for
1024-pixel images on one GPU), the likeliest meaning of "300 epochs" on "one NVIDIA V100"
(docs/reproducing.md, docs/training_cost.md); the `full_passes` variant makes an epoch one
pass over the training slices instead. Group norm replaces the COCO pre-training the paper
names (no COCO ResNet-101 Mask R-CNN can be loaded; docs/pretrained.md).
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
  (module docstring). train_scans / test_scans: the paper's counts, for the split proportions
  when no split file is given."""
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
