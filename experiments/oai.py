"""OAI-ZIB knees (femur, tibia and their cartilage) with the paper's settings.

  python -m data_pipelines.prepare oaizib-cm /data/OAIZIB-CM /data/oaizib_cm   # once
  python -m imask_jax.main --config experiments/oai.py:oaizib_cm,small \
      --config.data.manual_dir=/data/oaizib_cm --workdir runs/oai_small
  python -m imask_jax.main --config experiments/oai.py:oaizib_cm \
      --config.data.manual_dir=/data/oaizib_cm --workdir runs/oai_cm
  python -m imask_jax.main --config experiments/oai.py \
      --config.data.manual_dir=/data/OAI-ZIB --workdir runs/oai
  python -m imask_jax.main --config experiments/oai.py:head=standard,backbone=densenet121 ...
  python -m imask_jax.main --config experiments/oai.py:smoke --workdir /tmp/oai_smoke

The recommended settings: the paper's model and optimiser (section 2.3;
`configs.use_paper_settings`): ResNet-101-FPN, inputs of 1024 x 1024 (an OAI slice resampled to
0.1367 mm, which is the paper's resize; see data.pixel_spacing_mm below), Adam at a learning
rate of 1e-3, 300 epochs, the iMaskRCNN mask head; plus what the paper does not state, each
line of docs/reproducing.md ("What the recommended settings add to the paper"):
  * group norm (no COCO pre-training by default) and a 1000-step linear warm-up, gradient
    clipping at norm 10, augmentation. To start from converted torchvision weights, add
    --config.model.init_from=FILE --config.model.norm=frozen_batch (docs/pretrained.md);
  * an epoch is one pass over the stored training slices (train.steps_per_epoch = 0; slices
    without any structure are mostly dropped, see data.empty_slice_rate) at batch 8 (the paper
    gives no batch). The trainer turns train.epochs into train.steps = ceil(300 x training
    slices / batch) once the dataset is prepared and writes that into the workdir's
    config.json; the train.steps below is only the estimate for 470 scans x 160 slices.
    Matterport's fixed 1000 steps per epoch, the likelier meaning of the paper's epochs:
    --config.train.steps_per_epoch=1000 (the `paper` variant's);
  * subject splits 90 / 4 / 6 % for train / validation / test (456 / 20 / 31 of OAI-ZIB's
    507 knees; the paper has 470 / 30 and no validation set; the best checkpoint needs one);
    --config.data.split_file=FILE for your own lists of case ids;
  * anchors and the FPN level rule scaled to 1024-pixel inputs as in Mask R-CNN, plus the
    extreme aspect ratios that thin cartilage bands need; the iMask head's fine path at 32
    channels.

Not in the paper, learnt on the knee phantoms: the soft-Dice mask term
(model.mask_dice_weight), each bone's largest 3D component (inference/postprocess.py), the
painting score 0.5 with the union rule and 2 painting slots per tissue. The `paper` variant
has none of them.

Data: the original OAI-ZIB release (images as NIfTI + ZIB MetaImage masks, `oai_zib`), or with
the `nifti` / `oaizib_cm` variants an nnU-Net-style NIfTI folder (`nifti_folder`), such as the
one `python -m data_pipelines.prepare` makes of OAIZIB-CM or OAI-ZIB as downloaded; either in
config data.manual_dir (else <data_dir>/downloads/manual). Without the data the job stops at
once and says where to put it (docs/data.md).

Variants (comma-separated in the config argument):
  nifti           data.dataset = nifti_folder (an nnU-Net folder with OAI-ZIB's labels 1-4)
  oaizib_cm       OAIZIB-CM as released (after `prepare oaizib-cm`): nifti_folder, tibial
                  cartilage read from its medial 4 and lateral 5 (class_label_values
                  (1, 2, 3, (4, 5))); its imagesTs/ + labelsTs/ are the test split
  tibial_parts    with oaizib_cm: medial and lateral tibial cartilage trained as two classes;
                  tibial thickness reported for the plate and for each part
  small           a first run on your own data (the quick start's network and rhythm at 0.5 mm
                  per network pixel, 192 x 192 crops, point head, 6000 steps; its cost on 2
                  CPU cores: docs/training_cost.md; a first look, not a converged model)
  practical       a model trained on one A100/H100-class GPU within a day: ResNet-50-FPN, the
                  iMask head with the point head, 512 x 512 inputs at 0.2734 mm per network pixel
                  (a whole OAI slice), the paper's anchors and FPN level rule halved, batch 8,
                  150,000 steps (about 24 epochs of OAIZIB-CM; 1-9 GPU hours estimated,
                  docs/training_cost.md). Start it from torchvision weights: add
                  --config.model.init_from=FILE --config.model.norm=frozen_batch (a variant
                  cannot name your file; docs/pretrained.md: an ImageNet ResNet-50 as is, the
                  COCO Mask R-CNN file also with its model.anchor_ratios=(0.5, 1.0, 2.0))
  paper           the paper strictly (imask_jax/paper.py): what section 2 states and nothing
                  where it is silent: slices resized to fit 1024 x 1024, Adam 1e-3 from step
                  0 without clipping, no augmentation, BCE mask loss, the iMask head without
                  the layers the paper does not name, no post-processing, every detection
                  painting; 300 epochs of 1000 steps at batch 2 (Matterport's convention,
                  300,000 steps); 470 / 30 train / test by subject hash, or your split file:
                  --config.data.split_file=FILE (the paper's case ids are not public)
  full_passes     with paper: an epoch is one pass over the training slices (ceil(300 x
                  slices / 2) steps: 11.3 M for 470 x 160 slices) instead of 1000 steps
  smoke           the whole job in about a minute on generated knee phantoms (no OAI data
                  needed): same labels and plane, tiny ResNet-18 model at 64 x 64, 6 steps;
                  add backbone=resnet101 to compile the paper's backbone (slow on CPU). Cannot
                  be combined with nifti, oaizib_cm, small, practical or data.manual_dir: it
                  reads no data.
  head=standard|imask, backbone=resnet18|resnet50|resnet101|densenet121|densenet169,
  steps=N (replaces epochs), epochs=N, seed=N, decoder=, skip=, skip_size=, points=
"""

from __future__ import annotations

from data_pipelines import tissues
from imask_jax import configs, paper

# The documented estimate behind train.steps: 470 training scans x 160 sagittal slices.
ESTIMATED_TRAIN_SLICES = 470 * 160
# Section 2.3: "470 and 30 images from the OAI dataset" for training and testing.
PAPER_TRAIN_SCANS, PAPER_TEST_SCANS = 470, 30
# tibial_parts: OAIZIB-CM's five classes, medial and lateral tibial cartilage apart.
KNEE_PARTS_CLASSES = (
  tissues.FEMUR,
  tissues.FEMORAL_CARTILAGE,
  tissues.TIBIA,
  tissues.MEDIAL_TIBIAL_CARTILAGE,
  tissues.LATERAL_TIBIAL_CARTILAGE,
)
# practical: 150,000 steps of 8 slices, about 24 passes over OAIZIB-CM's training slices (about
# 387 training scans x 160 slices, about 50,000 of them kept). XLA counts 3.25 TFLOP per step:
# 1-9 hours on one A100/H100-class GPU at 10-30 % of its TF32 peak, still within a day at 4 %
# of an A100's (docs/training_cost.md). Without remat XLA plans 10.7 GiB for the step.
PRACTICAL_STEPS = 150_000


def get_config(arg: str | None = None):
  args = configs.parse_arg(arg)
  c = configs.default_config()
  configs.use_paper_settings(c, estimated_train_slices=ESTIMATED_TRAIN_SLICES)
  d = c.data
  d.dataset = 'oai_zib'
  d.manual_dir = ''
  d.plane = 'sagittal'
  d.class_names = tissues.KNEE_CLASSES
  d.class_label_values = (1, 2, 3, 4)
  d.instance_mode = 'per_class'
  d.split_fractions = (0.90, 0.04, 0.06)
  d.max_instances = 4  # per_class: at most one instance per class and slice
  # The paper resized OAI's 384-pixel sagittal DESS slices (0.3646 mm, a 140 mm field of view)
  # to 1024: 0.1367 mm per network pixel. Scale-true at that spacing, an OAI slice becomes
  # exactly the paper's 1024 x 1024 input; other protocols keep the anatomy at the same scale.
  d.pixel_spacing_mm = round(0.3646 * 384 / 1024, 4)
  # Not in the paper: each bone keeps its largest 3D component (imask_jax/inference/postprocess.py),
  # and the soft-Dice term keeps the mask BCE from trading a thin band's edges for background
  # (both measured on the knee phantoms: docs/results/knee_phantom.md).
  c.model.keep_largest_component = (tissues.FEMUR, tissues.TIBIA)
  c.model.mask_dice_weight = 1.0
  # predict runs the mask head on 2 slots per tissue (one structure per tissue and slice, and
  # room for a duplicate) instead of all 16 detections; evaluate still masks them all.
  c.model.paint_slots_per_class = 2
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.train.eval_every = 10000

  for real in ('nifti', 'oaizib_cm', 'tibial_parts', 'small', 'practical'):
    configs.refuse_together(
      args, real, 'smoke', why='smoke trains on generated phantoms and would ignore your data'
    )
  for own in ('small', 'practical'):
    configs.refuse_together(
      args, own, 'paper', why='each sets its own network, input size and step count'
    )
  configs.refuse_together(
    args, 'small', 'practical', why='each sets its own network, input size and step count'
  )
  if args.get('full_passes') and not args.get('paper'):
    raise ValueError('config variant full_passes needs paper (the other variants count steps)')
  if args.get('tibial_parts') and not args.get('oaizib_cm'):
    raise ValueError('config variant tibial_parts needs oaizib_cm (labels 4 and 5 medial/lateral)')
  if args.pop('nifti', False):
    d.dataset = 'nifti_folder'
  if args.pop('oaizib_cm', False):
    d.dataset = 'nifti_folder'
    d.class_label_values = (1, 2, 3, (4, 5))  # tibial cartilage: medial 4 + lateral 5
  if args.pop('tibial_parts', False):
    d.class_names = KNEE_PARTS_CLASSES
    d.class_label_values = (1, 2, 3, 4, 5)
    d.max_instances = 5
  if args.pop('small', False):
    configs.use_small_network(c)
    # The cartilage experiment's field of view and network pixel (docs/results/cartilage.md):
    # a plate is 3-4 network pixels thick at 0.5 mm, and a 192-pixel crop holds 96 mm.
    d.pixel_spacing_mm = 0.5
    d.image_size = (192, 192)
    c.model.point_head.enabled = True
    c.train.epochs = 0.0
    c.train.steps = 6000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 500
  if args.pop('practical', False):
    # One GPU within a day (docs/training_cost.md): the paper's head at half its input.
    # An OAI slice (384 pixels of 0.3646 mm) becomes exactly 512 x 512 network pixels.
    d.pixel_spacing_mm = round(0.3646 * 384 / 512, 4)  # 0.2734 mm
    d.image_size = (512, 512)
    c.model.backbone = 'resnet50'
    # The paper's 1024-pixel anchors and FPN level rule, halved with the input.
    c.model.anchor_sizes = (16, 32, 64, 128, 256)
    c.model.roi_level_canonical = 112.0
    c.model.remat = False  # the step fits a 40 GB GPU without the recompute
    c.model.point_head.enabled = True
    c.train.epochs = 0.0
    c.train.steps = PRACTICAL_STEPS
  # Cartilage lies on its bone: specks painted far from it go (docs/results/baselines.md).
  c.model.keep_attached = tuple(n for n in d.class_names if n not in (tissues.FEMUR, tissues.TIBIA))
  strict = bool(args.pop('paper', False))
  if strict:
    # Not in the paper: the recommended settings' extras, all turned off (imask_jax/paper.py).
    paper.use_strict_settings(c, train_scans=PAPER_TRAIN_SCANS, test_scans=PAPER_TEST_SCANS)
    if args.pop('full_passes', False):
      paper.use_full_passes(c, ESTIMATED_TRAIN_SLICES)
  if args.pop('smoke', False):
    # The knee phantom has OAI-ZIB's labels and plane.
    d.dataset = 'phantom_knee'
    d.phantom_preset = 'cpu'
    d.max_instances = 6
    configs.shrink_for_smoke(c)
    c.model.backbone = 'resnet18'
    c.model.anchor_sizes = (16, 32, 64, 128, 256)
    c.model.roi_level_canonical = 64.0
    if strict:  # the smoke's narrow head, still without a reduction; no warm-up
      c.model.imask.fine_dim = c.model.mask_head_dim
      c.train.warmup_steps = 0
  configs.apply_common_args(c, args)
  return c
