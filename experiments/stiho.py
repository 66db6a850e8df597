"""Hip effusion on a NIfTI folder with one label folder per reader, like the paper's STIHO
data (coronal STIR of both hips, 0.91 x 0.91 x 3 mm, two radiologists' effusion labels).

  python -m imask_jax.main --config experiments/stiho.py \
      --config.data.manual_dir=/data/stiho --workdir runs/stiho
  python -m imask_jax.main --config experiments/stiho.py:reader=reader2 ...
  python -m imask_jax.main --config experiments/stiho.py:smoke --workdir /tmp/stiho_smoke

Data (config data.manual_dir, else <data_dir>/downloads/manual), an nnU-Net-style folder:
  dataset.json            "labels": {"background": 0, "effusion": 1}, "plane": "coronal",
                          "readers": ["reader1", "reader2"]
  imagesTr/<id>_0000.nii.gz
  labelsTr_reader1/<id>.nii.gz, labelsTr_reader2/<id>.nii.gz   (and/or labelsTr/ as reference)
Training uses one reader's labels: data.reader (variant reader=NAME; '' = labelsTr, or the only
reader). Splits are drawn per case (image file), so two scans of one subject (the cohort's two
time points) can land in different splits. Without the data the job stops at once and says
where to put it (docs/data.md).

Settings as in the paper (section 2.3): ResNet-101-FPN, 1024 x 1024, Adam at 1e-3, 300
epochs (resolved into steps from the training-set size, see experiments/oai.py), iMaskRCNN
head; 125 training and 50 test scans, so splits of 67 / 5 / 28 %.

Variants (comma-separated in the config argument):
  reader=NAME     the label folder to train on (labelsTr_NAME)
  smoke           the whole job in about a minute on generated hip phantoms (no STIHO data
                  needed): tiny ResNet-18 model at 64 x 64, 6 steps
  head=standard|imask, backbone=..., steps=N (replaces epochs), epochs=N, seed=N, decoder=,
  skip=, skip_size=
"""

from __future__ import annotations

import math

from imask_jax import configs

PAPER_EPOCHS = 300
# The documented default behind train.steps: 125 training scans x 24 coronal slices (the
# slice count is a guess, that of the full hip phantom preset; the run resolves the real one).
ESTIMATED_TRAIN_SLICES = 125 * 24
BATCH_SIZE = 8


def get_config(arg: str | None = None):
  args = configs.parse_arg(arg)
  c = configs.default_config()
  d = c.data
  d.dataset = 'nifti_folder'
  d.manual_dir = ''
  d.plane = 'coronal'
  d.class_names = configs.HIP_CLASSES
  d.class_label_values = (1,)
  d.reader = ''
  d.instance_mode = 'components'    # every effusion pocket is an instance
  d.split_fractions = (0.67, 0.05, 0.28)
  d.image_size = (1024, 1024)
  d.max_instances = 8
  d.augment.flip_lr = True          # both hips in the field of view

  m = c.model
  m.num_classes = len(configs.HIP_CLASSES)
  m.backbone = 'resnet101'
  m.norm = 'group'
  m.width = 64
  m.fpn_dim = 256
  m.anchor_sizes = (32, 64, 128, 256, 512)
  m.roi_level_canonical = 224.0
  m.rpn_pre_nms_topk_train = 2000
  m.rpn_post_nms_topk_train = 1000
  m.rpn_pre_nms_topk_test = 1000
  m.rpn_post_nms_topk_test = 500
  m.roi_batch_size = 128
  m.mask_head = 'imask'
  m.max_detections = 16

  t = c.train
  t.optimizer = 'adam'
  t.learning_rate = 1e-3
  t.schedule = 'constant'
  t.warmup_steps = 1000
  t.batch_size = BATCH_SIZE
  t.epochs = float(PAPER_EPOCHS)
  t.steps = math.ceil(PAPER_EPOCHS * ESTIMATED_TRAIN_SLICES / BATCH_SIZE)
  t.log_every = 50
  t.checkpoint_every = 1000
  t.eval_every = 2000
  c.eval.batch_size = 8
  c.eval.max_val_slices = 1024

  if 'reader' in args:
    d.reader = str(args.pop('reader'))
  if args.pop('smoke', False):
    _smoke_on_hip_phantoms(c)
  configs.apply_common_args(c, args)
  return c


def _smoke_on_hip_phantoms(c) -> None:
  """The hip phantom (coronal, effusion label 1, simulated readers) and a tiny model."""
  d, m, t = c.data, c.model, c.train
  d.dataset = 'phantom_hip'
  d.phantom_preset = 'cpu'
  d.num_volumes = 5
  d.split_fractions = (0.6, 0.2, 0.2)
  d.image_size = (64, 64)
  m.backbone = 'resnet18'
  m.width = 8
  m.fpn_dim = 16
  m.box_head_dim = 32
  m.mask_head_dim = 16
  m.imask.fine_dim = 8
  m.anchor_sizes = (4, 8, 16, 32, 64)
  m.roi_level_canonical = 64.0
  m.rpn_pre_nms_topk_train = 200
  m.rpn_post_nms_topk_train = 64
  m.rpn_pre_nms_topk_test = 100
  m.rpn_post_nms_topk_test = 32
  m.roi_batch_size = 16
  t.epochs = 0.0
  t.steps = 6
  t.batch_size = 2
  t.warmup_steps = 2
  t.log_every = 2
  t.eval_every = 6
  t.checkpoint_every = 3
  c.eval.batch_size = 4
  c.eval.max_val_slices = 8
