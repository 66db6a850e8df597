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
reader). Splits are by subject: case ids are <subject>_<visit> when the last token is a visit
code (v2, V00, visit1, tp0, m12, 12m, bl, baseline, fu1, ...: stiho_017_v2 is subject
stiho_017 at v2), and any other id is a single-visit scan, its own subject (HIP_001);
data.subject_pattern = SUBJECT_VISIT_PATTERN, see data_pipelines/datasets/params.py. So all
time points of one person land in the same split, and Table 7 uses each subject's first time
point as baseline. Other naming: --config.data.subject_pattern='<regex with a named group
subject>'; '' treats every scan as its own subject. Without the data the job stops at
once and says where to put it (docs/data.md).

The paper's model and optimiser (section 2.3): ResNet-101-FPN, 1024 x 1024, Adam at 1e-3, 300
epochs (here full passes, resolved into steps from the training-set size, see
experiments/oai.py), iMaskRCNN head. The paper trains on 125 and tests on 50 scans; here splits
of 67 / 5 / 28 % by subject (a validation split for the best checkpoint), or
--config.data.split_file=FILE. What else differs from the paper: docs/reproducing.md; the
`paper` variant has none of it.

Variants (comma-separated in the config argument):
  reader=NAME     the label folder to train on (labelsTr_NAME)
  small           a first run on your own data: the hip phantom experiment's network (the
                  quick start's ResNet-18 at width 16) at 1.1 mm per network pixel, 256 x 256
                  crops, the hip phantoms' false-positive settings above, 6000 steps: CPU
                  friendly (the phantom run's timings: docs/results/hip.md)
  paper           the paper strictly (imask_jax/paper.py; as experiments/oai.py:paper): no
                  augmentation (no flips either), clipping, warm-up, hard negatives or effusion
                  clusters, every detection painting; 300 epochs of 1000 steps at batch 2;
                  125 / 50 train / test by subject, or --config.data.split_file=FILE (the
                  paper's case ids are not public)
  full_passes     with paper: an epoch is one pass over the training slices
  smoke           the whole job in about a minute on generated hip phantoms (no STIHO data
                  needed): tiny ResNet-18 model at 64 x 64, 6 steps
  head=standard|imask, backbone=..., steps=N (replaces epochs), epochs=N, seed=N, decoder=,
  skip=, skip_size=
"""

from __future__ import annotations

from data_pipelines import tissues
from data_pipelines.datasets import params as params_lib
from imask_jax import configs, paper

# The documented estimate behind train.steps: 125 training scans x 24 coronal slices (the
# slice count is a guess, that of the full hip phantom preset; the run resolves the real one).
ESTIMATED_TRAIN_SLICES = 125 * 24
# Section 2.3: "training and testing were performed on 125 and 50 scans from the STIHO dataset".
PAPER_TRAIN_SCANS, PAPER_TEST_SCANS = 125, 50


def get_config(arg: str | None = None):
  args = configs.parse_arg(arg)
  c = configs.default_config()
  configs.use_paper_settings(c, estimated_train_slices=ESTIMATED_TRAIN_SLICES)
  d = c.data
  d.dataset = 'nifti_folder'
  d.manual_dir = ''
  d.plane = 'coronal'
  d.class_names = tissues.HIP_CLASSES
  d.class_label_values = (1,)
  d.reader = ''
  d.instance_mode = 'components'  # every effusion pocket is an instance
  d.split_fractions = (0.67, 0.05, 0.28)
  d.subject_pattern = params_lib.SUBJECT_VISIT_PATTERN  # visits of a person; single-visit ids
  d.max_instances = 8
  d.augment.flip_lr = True  # both hips in the field of view
  # The paper resized STIHO's coronal slices (0.91 mm pixels; it gives no matrix size) to 1024.
  # Assuming 384 pixels across (a 350 mm field of view): 0.3412 mm per network pixel, at which
  # such a slice becomes exactly a 1024 x 1024 input.
  d.pixel_spacing_mm = round(0.91 * 384 / 1024, 4)
  # Not in the paper, learnt on the hip phantoms (docs/results/hip.md; docs/reproducing.md):
  # half the effusion-free slices kept as negatives, half the box head's negatives taken from
  # the proposals the RPN rates highest (bright look-alikes: bladder, bowel, oedema), painting
  # from detections scoring >= 0.5 (the validation split's choice), and one cluster of
  # effusion per hip (pockets linked by gaps <= 40 mm, the largest cluster on each side of
  # the midline, none under 0.3 mL; physical sizes, so they carry over to real scans).
  d.empty_slice_rate = 0.5
  c.model.roi_hard_negative_fraction = 0.5
  c.model.label_score_threshold = 0.5
  c.model.keep_largest_cluster = (tissues.EFFUSION,)
  c.model.cluster_radius_mm = 40.0
  c.model.cluster_per_side = True
  c.model.cluster_min_ml = 0.3
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.eval_every = 2000

  if 'reader' in args:
    d.reader = str(args.pop('reader'))
  configs.refuse_together(
    args, 'small', 'smoke', why='smoke trains on generated phantoms and would ignore your data'
  )
  configs.refuse_together(
    args, 'small', 'paper', why='each sets its own network, input size and step count'
  )
  if args.get('full_passes') and not args.get('paper'):
    raise ValueError('config variant full_passes needs paper (the other variants count steps)')
  strict = bool(args.pop('paper', False))
  if strict:
    # Not in the paper: the recommended settings' extras, all turned off (imask_jax/paper.py).
    paper.use_strict_settings(c, train_scans=PAPER_TRAIN_SCANS, test_scans=PAPER_TEST_SCANS)
    if args.pop('full_passes', False):
      paper.use_full_passes(c, ESTIMATED_TRAIN_SLICES)
  if args.pop('small', False):
    # The hip phantom experiment's network and pixel (experiments/phantom_hip.py): 1.1 mm per
    # network pixel, 256 x 256 crops, 6000 steps.
    configs.use_small_network(c)
    d.pixel_spacing_mm = 1.1
    d.image_size = (256, 256)
    c.model.max_detections = 16
    c.train.epochs = 0.0
    c.train.steps = 6000
  if args.pop('smoke', False):
    # The hip phantom: coronal, effusion label 1, simulated readers.
    d.dataset = 'phantom_hip'
    d.phantom_preset = 'cpu'
    d.subject_pattern = ''  # one scan per phantom ('hip_0003' names no visit)
    configs.shrink_for_smoke(c)
    c.model.backbone = 'resnet18'
    c.model.anchor_sizes = (4, 8, 16, 32, 64)
    c.model.roi_level_canonical = 64.0
    if strict:  # the smoke's narrow head, still without a reduction; no warm-up
      c.model.imask.fine_dim = c.model.mask_head_dim
      c.train.warmup_steps = 0
  configs.apply_common_args(c, args)
  return c
