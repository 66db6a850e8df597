"""Configuration defaults shared by every experiment, and the `key=value,...` argument parser.

Experiments in `experiments/` start from `default_config()` and change what differs; the
resolved config is written into the workdir as JSON, and evaluation reads it back from there.
Fields are grouped by the part of the system that reads them: `data` (data_pipelines and
input_pipeline), `model` (models/), `train` (train.py) and `eval` (evaluation/).

Nearly 500 lines on purpose: `default_config` is the one place a user reads every setting with
its comment (about 170 lines), beside the pieces experiments share and `check_train_config`,
the one check of a whole resolved config. A check of a single field lives with the code that
reads the field (`models.spec.model_kind`, `metrics.thickness.check_method`, ...); the check
here calls it.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os

import ml_collections

from data_pipelines import tissues
from imask_jax.inference import postprocess
from imask_jax.metrics.thickness import DEFAULT_THICKNESS_METHOD, check_method
from imask_jax.models import spec


def load_experiment(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of an experiment file such as experiments/oai.py (experiments/ is not a
  package, so the file is loaded by its path); '' or None: the file's default config."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'_experiment_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def default_config() -> ml_collections.ConfigDict:
  """The defaults every experiment starts from (a small knee phantom model)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- data -------------------------------------------------------------------------------
  d = c.data = ml_collections.ConfigDict()
  # TFDS builder name: phantom_knee, phantom_hip, oai_zib, nifti_folder.
  d.dataset = 'phantom_knee'
  d.data_dir = ''  # TFDS data_dir ('' = <workdir>/../tfds or $IMASK_DATA_DIR)
  d.manual_dir = ''  # raw files for oai_zib / nifti_folder
  d.phantom_preset = 'cpu'  # phantom resolution preset: cpu or full
  d.phantom_spacing_mm = 0.0  # phantoms' in-plane spacing, mm (0: the preset's)
  d.phantom_fov_mm = 0.0  # phantoms' in-plane field of view, mm (0: the preset's)
  # Knee phantoms only: the anatomy's shape family (knee_shapes.FAMILIES; '': the default
  # family) and the tissue signal table (contrast.CONTRASTS; '': DESS). docs/phantoms.md.
  d.phantom_shape_family = ''
  d.phantom_contrast = ''
  d.num_volumes = 24  # phantom volumes to generate (train+val+test)
  d.split_fractions = (0.7, 0.1, 0.2)  # train, validation, test by subject
  d.seed = 0  # dataset seed (phantoms, empty-slice draw), apart from c.seed
  d.plane = 'sagittal'
  # Label value in the label maps for each class, in class order (class id = position + 1);
  # a tuple merges several values into one class, the first canonical: (1, 2, 3, (4, 5)) reads
  # OAIZIB-CM's medial 4 and lateral 5 tibial cartilage as tibial cartilage.
  d.class_names = tissues.KNEE_CLASSES
  d.class_label_values = (1, 2, 3, 4)
  # An nnU-Net folder's labelled imagesTs/ + labelsTs/ (an official test set) is the test
  # split, imagesTr/ giving train and validation; False cuts all three from imagesTr/.
  d.official_test = True
  # Images whose header lost the scanner pose (identity or no affine) are refused: their
  # slices could be cut along the wrong axis and their masks aligned transposed. True reads
  # their array axes as R, A, S.
  d.allow_missing_pose = False
  # oai_zib: the direction each axis of the pose-less MetaImage masks points to (docs/data.md)
  d.mask_axcodes = 'LPS'
  d.reader = ''  # label folder suffix for multi-reader data ('' = labelsTr)
  # How a case id names its subject, so that splits never separate one person's scans: a
  # regex with a named group 'subject' (data_pipelines/datasets/params.py); '' = one per case.
  d.subject_pattern = ''
  # A JSON file naming the case ids of each split (data_pipelines/datasets/split_file.py,
  # docs/data.md); it replaces the computed split. '' = split by subject hash.
  d.split_file = ''
  d.instance_mode = 'per_class'  # per_class or components
  d.min_instance_pixels = 4
  d.empty_slice_rate = 0.1  # fraction of slices without any instance that are kept
  d.context_slices = 0  # 2.5D: this many neighbours on each side as extra channels
  # Network input (H, W). With data.pixel_spacing_mm > 0: the training crop; with 0: every
  # slice is resized to fit it and padded (the resize-to-fit behaviour of older workdirs).
  d.image_size = (128, 128)
  # In-plane mm per network-input pixel (scale-true slices, input_pipeline.py): every slice is
  # resampled to it in training, evaluation and prediction; training takes random image_size
  # crops, inference whole slices padded up to a multiple of inference_size_multiple. 0: resize
  # every slice to fit image_size whatever its spacing (the paper's way: experiments' `paper`).
  d.pixel_spacing_mm = 0.0
  d.inference_size_multiple = 64  # bucket of whole-slice input sizes: one compile per bucket
  d.crop_foreground_rate = 0.5  # share of training crops placed over a labelled pixel
  d.max_instances = 8
  d.normalize_percentiles = (0.5, 99.5)
  d.shuffle_buffer = 2048
  d.augment = ml_collections.ConfigDict(
    dict(
      flip_lr=False,  # a sagittal knee slice has no left-right symmetry
      flip_ud=False,
      rotate_degrees=10.0,
      scale_range=(0.9, 1.1),
      gamma_range=(0.8, 1.25),
      noise_std=0.03,
      # x factor drawn log-uniformly, clipped to [0, 1] (1, 1: off): what another field of
      # view does to the percentile normalisation (the 99.5th percentile moves with the fluid)
      intensity_scale_range=(1.0, 1.0),
      # Contrast randomisation (imask_jax/contrast_augment.py): each tissue's intensity, the
      # unlabelled rest, bias field, blur, resolution, noise and gamma drawn per example, so
      # that a model learns shapes, not one contrast. Ranges in normalised intensity, pixels.
      contrast=ml_collections.ConfigDict(
        dict(
          enabled=False,
          rate=1.0,  # share of training examples randomised
          tissues=True,
          tissue_mean_range=(0.0, 1.0),
          tissue_texture_range=(0.5, 2.0),
          background_knots=4,
          air_level=0.05,
          bias_max=0.4,
          blur_sigma_max=1.0,
          downsample_max=3.0,
          noise_std_max=0.04,
          gamma_range=(0.7, 1.4),
        )
      ),
    )
  )

  # --- model ------------------------------------------------------------------------------
  m = c.model = ml_collections.ConfigDict()
  # 'maskrcnn' (instances: Mask R-CNN / iMaskRCNN, the fields below) or 'unet' (a semantic
  # U-Net, models/unet.py: model.unet, model.norm, model.dtype and the painting rules after it).
  m.kind = 'maskrcnn'
  m.unet = ml_collections.ConfigDict(
    dict(
      depth=5,  # resolution levels, the bottleneck included (inputs padded to 2^(depth - 1))
      width=32,  # channels of the first level, doubled per level (nnU-Net's 32)
      max_width=512,  # cap on a level's channels (nnU-Net's 2D cap)
      norm_groups=0,  # with model.norm 'group': 0 = instance norm (nnU-Net's), else groups
      deep_supervision=True,  # 1x1 heads at the coarser decoder levels in the loss
      dice_weight=1.0,  # soft Dice (foreground classes) + ...
      ce_weight=1.0,  # ... cross-entropy, nnU-Net's 1 : 1
      # 'plain' (nnU-Net's encoder) or a backbone name (resnet18 ... densenet169: its stem and
      # C2-C5 as levels 1-5, base width model.width; depth must be 6), models/unet.py
      encoder='plain',
      # Slices larger than data.image_size run in windows of that size (nnU-Net's inference:
      # overlap 0.5, Gaussian importance weights; inference/sliding_window.py), else whole.
      # Off: a net trained on whole slices missed bone far from the joint in windows
      # (docs/results/baselines.md); for nets trained on crops of larger slices, as nnU-Net's.
      sliding_window=False,
      window_overlap=0.5,  # share of a window its neighbour overlaps (nnU-Net's 0.5)
      window_gaussian=True,  # Gaussian importance map (nnU-Net's), else uniform weights
    )
  )
  # The network's fields at their defaults, each described where it is defined:
  # models/spec.py (ModelSpec, with the model.imask and model.point_head groups).
  m.update(spec.config_defaults())
  m.init_from = ''  # convert_weights file to start from ('' = random init)
  # Tissue names whose painted volume keeps only its largest 3D connected component (one
  # object in every scan, like a bone; imask_jax/inference/postprocess.py). () keeps every
  # component.
  m.keep_largest_component = ()
  # Tissue names that keep only their largest cluster of 3D components (components linked by
  # gaps of at most cluster_radius_mm; the linked group of largest volume), on each side of
  # the mid-sagittal plane with cluster_per_side, and nothing of a cluster under
  # cluster_min_ml (the effusion pockets of one joint; imask_jax/inference/postprocess.py). () keeps
  # every component.
  m.keep_largest_cluster = ()
  m.cluster_radius_mm = 40.0
  m.cluster_per_side = False
  m.cluster_min_ml = 0.0
  # Cartilage names whose 3D components are dropped when none of their voxels lies within
  # attach_radius_mm of the bone the cartilage covers (specks far from the joint;
  # imask_jax/inference/postprocess.py). () keeps every component. 5 mm: a touching component
  # lies one voxel (0.3-1.5 mm) from its bone; the rest bridges a slice or two of missed bone.
  m.keep_attached = ()
  m.attach_radius_mm = 5.0

  # --- training ---------------------------------------------------------------------------
  t = c.train = ml_collections.ConfigDict()
  t.steps = 2000  # optimiser steps (ignored when epochs > 0)
  # > 0: train this many passes over the training slices; the trainer turns it into
  # steps = ceil(epochs * train slices / batch_size) once the dataset is prepared and writes
  # that number into the workdir's config.json.
  t.epochs = 0.0
  # With train.epochs > 0, what an epoch is: 0 = one full pass over the training slices (the
  # step count above); N > 0 = N steps, whatever the dataset's size (Matterport Mask R-CNN's
  # convention, STEPS_PER_EPOCH = 1000): steps = ceil(epochs * steps_per_epoch).
  t.steps_per_epoch = 0
  t.batch_size = 8  # global, split over all devices of all hosts
  t.optimizer = 'adam'  # adam or sgd
  t.learning_rate = 1e-3
  t.momentum = 0.9
  t.weight_decay = 0.0
  t.schedule = 'cosine'  # cosine, step or constant
  t.warmup_steps = 100
  t.grad_clip_norm = 10.0
  t.log_every = 20
  t.checkpoint_every = 500
  t.eval_every = 500
  t.keep_checkpoints = 2
  t.best_metric = 'val/dice_mean'
  t.max_nonfinite_in_a_row = 10

  # --- evaluation -------------------------------------------------------------------------
  e = c.eval = ml_collections.ConfigDict()
  e.split = 'test'
  e.batch_size = 8
  e.max_val_slices = 256
  # Cartilage thickness measure of evaluate and predict (metrics.thickness, docs/metrics.md):
  # 'normal' (along the normals of the smoothed surfaces; the same on any grid) or 'nearest'
  # (distance to the nearest articular face; reads voxel staircases thin).
  e.thickness_method = DEFAULT_THICKNESS_METHOD
  return c


# --- pieces experiments share --------------------------------------------------------------------

PAPER_EPOCHS = 300


def use_paper_settings(c: ml_collections.ConfigDict, *, estimated_train_slices: int) -> None:
  """The paper's model and training (section 2.3) on 1024 x 1024 inputs, for OAI and STIHO.

  ResNet-101-FPN with the iMask head; Adam at 1e-3 for 300 epochs. Where the paper is silent:
  group norm (no COCO pre-training offline), a 1000-step linear warm-up before the constant
  rate, anchors and the FPN level rule scaled to 1024-pixel inputs as in Mask R-CNN, and the
  backbone's activations recomputed in the backward pass (`model.remat`) to fit the memory.
  `train.epochs` wins at run time (the trainer turns it into steps once the dataset is
  prepared); `train.steps` is set to the estimate for `estimated_train_slices` at this batch,
  which is what the experiment documents.
  """
  d, m, t = c.data, c.model, c.train
  d.image_size = (1024, 1024)
  m.backbone = 'resnet101'
  m.norm = 'group'
  m.width = 64
  m.fpn_dim = 256
  # At 1024 x 1024 the ResNet-101's kept activations were most of the step's memory.
  m.remat = True
  m.anchor_sizes = (32, 64, 128, 256, 512)
  m.roi_level_canonical = 224.0
  m.rpn_pre_nms_topk_train = 2000
  m.rpn_post_nms_topk_train = 1000
  m.rpn_pre_nms_topk_test = 1000
  m.rpn_post_nms_topk_test = 500
  m.roi_batch_size = 128
  m.mask_head = 'imask'
  t.optimizer = 'adam'
  t.learning_rate = 1e-3
  t.schedule = 'constant'
  t.warmup_steps = 1000
  t.batch_size = 8
  t.epochs = float(PAPER_EPOCHS)
  t.steps = math.ceil(PAPER_EPOCHS * estimated_train_slices / t.batch_size)
  c.eval.batch_size = 8
  c.eval.max_val_slices = 1024


def use_small_network(c: ml_collections.ConfigDict) -> None:
  """The quick start's network (experiments/phantom_knee.py, phantom_hip.py): ResNet-18-FPN
  at width 16 with group norm and narrow heads, anchors 16-256 pixels, and its training
  rhythm (batch 4, Adam 1e-3 with 100 warm-up steps): a fraction of a second per step on two
  CPU cores, where the paper's ResNet-101 at 1024 x 1024 takes minutes (docs/training_cost.md,
  benchmarks/README.md)."""
  m, t = c.model, c.train
  m.backbone = 'resnet18'
  m.norm = 'group'
  m.width = 16
  m.fpn_dim = 32
  m.box_head_dim = 128
  m.mask_head_dim = 32
  m.imask.fine_dim = 16
  m.anchor_sizes = (16, 32, 64, 128, 256)
  m.roi_level_canonical = 64.0
  m.remat = False
  m.rpn_pre_nms_topk_train = 500
  m.rpn_post_nms_topk_train = 256
  m.rpn_pre_nms_topk_test = 300
  m.rpn_post_nms_topk_test = 128
  m.roi_batch_size = 32
  t.batch_size = 4
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.log_every = 25
  t.eval_every = 500
  t.checkpoint_every = 250
  c.eval.batch_size = 8
  c.eval.max_val_slices = 128


def refuse_together(args: dict[str, object], *names: str, why: str) -> None:
  """A ValueError naming the variants when all of `names` are given (variants that cannot
  combine, e.g. a real-data variant with `smoke`, which trains on phantoms)."""
  if all(args.get(n) for n in names):
    raise ValueError(f'config variants {" and ".join(names)} cannot be combined: {why}')


SMOKE_SIZE = 64


def _cpu_phantom_fov_mm(dataset: str) -> float:
  """In-plane field of view (mm) of the cpu preset's slices of a phantom dataset."""
  # Imported here: only the smoke variants need the phantom generator.
  from data_pipelines.datasets.params import PHANTOM_DATASETS
  from data_pipelines.phantoms import mri, writer

  kind = PHANTOM_DATASETS[dataset]
  return float(mri.acquisition(writer.KINDS[kind].PRESETS, 'cpu')['fov_mm'][0])


def shrink_for_smoke(c: ml_collections.ConfigDict) -> None:
  """The `smoke` variant of every experiment: 5 phantoms, 64 x 64 inputs, a tiny network and
  six steps, so the whole job (data, training, validation, checkpoints) runs in about a minute.
  The experiment picks the phantom (set data.dataset first) and anything specific to it.
  Scale-true runs resample the cpu phantom's whole slice to exactly 64 x 64."""
  d, m, t = c.data, c.model, c.train
  d.num_volumes = 5
  d.split_fractions = (0.6, 0.2, 0.2)
  d.image_size = (SMOKE_SIZE, SMOKE_SIZE)
  d.phantom_spacing_mm = d.phantom_fov_mm = 0.0  # the preset's grid: the smallest volumes
  if d.pixel_spacing_mm:
    d.pixel_spacing_mm = _cpu_phantom_fov_mm(d.dataset) / SMOKE_SIZE
  m.width = 8
  m.fpn_dim = 16
  m.box_head_dim = 32
  m.mask_head_dim = 16
  m.imask.fine_dim = 8
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


# --- config arguments ---------------------------------------------------------------------------


def parse_arg(arg: str | None) -> dict[str, object]:
  """Parses a config argument like 'head=standard,backbone=densenet121,smoke'.

  A bare word is a flag set to True. Values are Python literals where they parse as one
  (numbers, tuples, booleans) and strings otherwise.
  """
  out: dict[str, object] = {}
  if not arg:
    return out
  for part in arg.split(','):
    part = part.strip()
    if not part:
      continue
    key, sep, value = part.partition('=')
    if not sep:
      out[key] = True
      continue
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def apply_common_args(c: ml_collections.ConfigDict, args: dict[str, object]) -> None:
  """Applies the variant keys every experiment understands; unknown keys are an error."""
  args = dict(args)
  if 'head' in args:
    c.model.mask_head = str(args.pop('head'))
  if 'backbone' in args:
    c.model.backbone = str(args.pop('backbone'))
  if 'steps' in args:  # a step count replaces an epoch count
    c.train.steps = int(args.pop('steps'))
    c.train.epochs = 0.0
  if 'epochs' in args:
    c.train.epochs = float(args.pop('epochs'))
  if 'seed' in args:
    c.seed = int(args.pop('seed'))
  if 'decoder' in args:
    c.model.imask.decoder = bool(args.pop('decoder'))
  if 'skip' in args:
    c.model.imask.skip = bool(args.pop('skip'))
  if 'skip_size' in args:
    c.model.imask.skip_size = int(args.pop('skip_size'))
  if 'spacing' in args:  # network pixel size in mm (0: resize every slice to fit image_size)
    c.data.pixel_spacing_mm = float(args.pop('spacing'))
  if 'mask_dice' in args:  # weight of the soft-Dice mask loss term (0: the paper's BCE alone)
    c.model.mask_dice_weight = float(args.pop('mask_dice'))
  if 'points' in args:  # the PointRend-style point head on top of the mask head
    c.model.point_head.enabled = bool(args.pop('points'))
  if 'volumes' in args:  # phantom volumes generated (train + validation + test)
    c.data.num_volumes = int(args.pop('volumes'))
  if args:
    raise ValueError(
      f'unknown config arguments {sorted(args)}; known: smoke, full, head, '
      'backbone, steps, epochs, seed, decoder, skip, skip_size, spacing, mask_dice, points, volumes'
    )


# --- checks of a resolved config ---------------------------------------------------------------


def validation_metric_names(config: ml_collections.ConfigDict) -> list[str]:
  """The keys `validate` reports: 'val/dice_<class name>' per class and 'val/dice_mean'."""
  return [f'val/dice_{name}' for name in config.data.class_names] + ['val/dice_mean']


def check_train_config(config: ml_collections.ConfigDict) -> None:
  """Rejects training settings the loop cannot honour, naming the field and what is expected."""
  t = config.train
  for name in (
    'batch_size',
    'log_every',
    'checkpoint_every',
    'eval_every',
    'keep_checkpoints',
    'max_nonfinite_in_a_row',
  ):
    if int(t[name]) < 1:
      raise ValueError(f'config train.{name}={t[name]}; expected an integer >= 1')
  steps_per_epoch(config)
  if float(t.epochs) < 0 or (float(t.epochs) == 0 and int(t.steps) < 1):
    raise ValueError(
      f'config train.steps={t.steps}, train.epochs={t.epochs}; expected '
      'steps >= 1, or epochs > 0 (steps then follow from the dataset size)'
    )
  names = list(config.data.class_names)
  if len(names) != len(config.data.class_label_values):
    raise ValueError(
      f'config data.class_names={tuple(names)}, data.class_label_values='
      f'{tuple(config.data.class_label_values)}; expected one label value (or tuple of values) '
      'per class'
    )
  tissues.LabelScheme.from_config(config)  # values well formed, no stale model.num_classes
  check_method(config.eval.thickness_method, 'config eval.thickness_method')
  postprocess.check_rules(tissues.LabelScheme.from_config(config), config.model)
  spec.paint_slots_per_class(config)
  spec.mask_threshold(config)
  spec.model_kind(config)
  for name in ('rpn_positive_fraction', 'roi_positive_fraction', 'roi_hard_negative_fraction'):
    value = config.model[name]
    if isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
      raise ValueError(f'config model.{name}={value!r}; expected a fraction in [0, 1]')
  d = config.data
  if str(d.dataset) in ('phantom_knee', 'phantom_hip') and str(d.get('manual_dir') or ''):
    raise ValueError(
      f'config data.manual_dir={d.manual_dir!r} is set but data.dataset={d.dataset!r} '
      'generates its phantoms and never reads it (a smoke variant?); drop one of them'
    )
  if t.best_metric not in validation_metric_names(config):
    raise ValueError(
      f'config train.best_metric={t.best_metric!r}; expected one of '
      f'{validation_metric_names(config)}'
    )


def resolve_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """train.steps, or with train.epochs > 0: ceil(epochs * train.steps_per_epoch) when that is
  set (fixed-length epochs, Matterport's convention), else ceil(epochs * train slices / global
  batch) (full passes over the training slices)."""
  epochs = float(config.train.epochs)
  if epochs <= 0:
    return int(config.train.steps)
  per_epoch = steps_per_epoch(config)
  if per_epoch:
    return max(1, math.ceil(epochs * per_epoch))
  return max(1, math.ceil(epochs * num_train_examples / int(config.train.batch_size)))


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """config train.steps_per_epoch (0: an epoch is a full pass), refused unless an integer >= 0."""
  value = config.train.get('steps_per_epoch', 0)
  if isinstance(value, bool) or int(value) != value or int(value) < 0:
    raise ValueError(
      f'config train.steps_per_epoch={value!r}; expected an integer >= 0 (0: an epoch is one '
      'pass over the training slices; N: an epoch is N steps, as in Matterport Mask R-CNN)'
    )
  return int(value)
