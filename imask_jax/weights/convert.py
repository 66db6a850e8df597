"""Torchvision state dicts -> imask_jax parameter trees, written as msgpack (no torch needed).

`convert_state_dict` maps a ResNet / DenseNet classifier body or torchvision's COCO
`maskrcnn_resnet50_fpn` into our tree (layouts transposed, the box head's flatten order and the
box deltas permuted, the ImageNet input normalisation folded into the stem); `save` writes the
file that `model.init_from` reads (`weights.pretrained`). The command is
`python -m imask_jax.convert_weights`; docs/pretrained.md holds what maps exactly and what not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping

import numpy as np

from data_pipelines.atomic import atomic_path
from imask_jax.models.depths import DENSENET_BLOCKS, RESNET_LAYOUTS

# flax (and with it JAX) is imported where a file is written: `--help` answers without it.

FORMAT = 'imask_jax.pretrained'
FORMAT_VERSION = 1

CLASSIFIER_ARCHS = tuple(f'resnet{d}' for d in sorted(RESNET_LAYOUTS)) + tuple(
  f'densenet{d}' for d in sorted(DENSENET_BLOCKS)
)
DETECTOR_ARCHS = {'maskrcnn_resnet50_fpn': 'resnet50'}
ARCHS = CLASSIFIER_ARCHS + tuple(DETECTOR_ARCHS)

# torchvision's input normalisation (ImageNet classifiers and GeneralizedRCNNTransform alike).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ('imagenet', 'none')

# torchvision's COCO Mask R-CNN anchors: one size per level P2-P6, ratios height / width in
# this order at every location (AnchorGenerator's default), and its ROI level mapping.
TORCHVISION_ANCHOR_SIZES = (32.0, 64.0, 128.0, 256.0, 512.0)
TORCHVISION_ANCHOR_RATIOS = (0.5, 1.0, 2.0)
TORCHVISION_ROI_CANONICAL = 224.0

BODY = ('backbone', 'body')
DELTA_ORDER = np.array([1, 0, 3, 2])  # torchvision (dx, dy, dw, dh) -> ours (dy, dx, dh, dw)

Path = tuple[str, ...]


@dataclasses.dataclass
class Converted:
  """A converted checkpoint: flat {path: array} trees in the 'batch' norm layout.

  params / batch_stats: keys are paths in the MaskRCNN variable tree (e.g.
  ('backbone', 'body', 'stem_conv', 'kernel')); float32 arrays.
  covers: '/'-joined subtrees the file provides completely (every array of the model under
  them must come from the file). dropped: torchvision keys deliberately not converted.
  """

  arch: str
  backbone: str
  params: dict[Path, np.ndarray]
  batch_stats: dict[Path, np.ndarray]
  covers: tuple[str, ...]
  dropped: tuple[str, ...]
  input_channels: int
  input_normalization: str
  anchor_ratios: tuple[float, ...] | None = None
  notes: tuple[str, ...] = ()


class _Source:
  """A torch state dict that records which keys were read, so leftovers can be reported."""

  def __init__(self, state: Mapping[str, np.ndarray], name: str):
    self.state = dict(state)
    self.name = name
    self.used: set[str] = set()

  def has(self, key: str) -> bool:
    return key in self.state

  def take(self, key: str, ndim: int | None = None) -> np.ndarray:
    if key not in self.state:
      raise ValueError(f'{self.name}: tensor {key!r} is missing; is this the right --arch?')
    value = np.asarray(self.state[key])
    if ndim is not None and value.ndim != ndim:
      raise ValueError(f'{self.name}: {key!r} has shape {value.shape}, expected {ndim} dims')
    self.used.add(key)
    return value.astype(np.float32, copy=False)

  def first(self, *keys: str) -> str:
    """The first of `keys` present (checkpoints from different torchvision versions)."""
    for key in keys:
      if key in self.state:
        return key
    raise ValueError(f'{self.name}: none of {list(keys)} is present; is this the right --arch?')

  def skip(self, key: str) -> None:
    self.used.add(key)

  def leftovers(self) -> list[str]:
    return [k for k in self.state if k not in self.used]


class _Tree:
  """Flat params / batch_stats being filled."""

  def __init__(self):
    self.params: dict[Path, np.ndarray] = {}
    self.stats: dict[Path, np.ndarray] = {}

  def conv(self, src: _Source, key: str, path: Path, bias: bool = False) -> None:
    """Conv2d [O, I, kh, kw] -> kernel [kh, kw, I, O] (+ bias [O])."""
    self.params[path + ('kernel',)] = src.take(key + '.weight', 4).transpose(2, 3, 1, 0)
    if bias:
      self.params[path + ('bias',)] = src.take(key + '.bias', 1)

  def conv_transpose(self, src: _Source, key: str, path: Path) -> None:
    """ConvTranspose2d [I, O, kh, kw] -> flax ConvTranspose kernel [kh, kw, I, O], flipped."""
    weight = src.take(key + '.weight', 4)
    self.params[path + ('kernel',)] = weight.transpose(2, 3, 0, 1)[::-1, ::-1]
    self.params[path + ('bias',)] = src.take(key + '.bias', 1)

  def linear(self, src: _Source, key: str, path: Path) -> None:
    self.params[path + ('kernel',)] = src.take(key + '.weight', 2).T
    self.params[path + ('bias',)] = src.take(key + '.bias', 1)

  def batch_norm(self, src: _Source, key: str, path: Path) -> None:
    """BatchNorm2d / FrozenBatchNorm2d -> scale, bias (params), mean, var (batch_stats)."""
    self.params[path + ('scale',)] = src.take(key + '.weight', 1)
    self.params[path + ('bias',)] = src.take(key + '.bias', 1)
    self.stats[path + ('mean',)] = src.take(key + '.running_mean', 1)
    self.stats[path + ('var',)] = src.take(key + '.running_var', 1)
    if src.has(key + '.num_batches_tracked'):
      src.skip(key + '.num_batches_tracked')


def _resnet_body(src: _Source, prefix: str, depth: int, tree: _Tree) -> None:
  """torchvision ResNet (conv1, bn1, layer1-4) -> ResNet (stem, stage{s}_block{i})."""
  kind, stages = RESNET_LAYOUTS[depth]
  convs = 3 if kind == 'bottleneck' else 2
  tree.conv(src, prefix + 'conv1', BODY + ('stem_conv',))
  tree.batch_norm(src, prefix + 'bn1', BODY + ('stem_norm',))
  for s, num_blocks in enumerate(stages):
    for i in range(num_blocks):
      key = f'{prefix}layer{s + 1}.{i}.'
      path = BODY + (f'stage{s + 1}_block{i}',)
      for c in range(1, convs + 1):
        tree.conv(src, f'{key}conv{c}', path + (f'conv{c}',))
        tree.batch_norm(src, f'{key}bn{c}', path + (f'norm{c}',))
      if src.has(key + 'downsample.0.weight'):
        tree.conv(src, key + 'downsample.0', path + ('downsample_conv',))
        tree.batch_norm(src, key + 'downsample.1', path + ('downsample_norm',))


# Checkpoints saved before torchvision 0.4 name dense-layer modules 'norm.1', 'conv.2', ...;
# torchvision renames them on load with this pattern, and so do we.
_OLD_DENSE_LAYER = re.compile(
  r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|'
  r'running_var|num_batches_tracked))$'
)


def _densenet_body(src: _Source, depth: int, tree: _Tree) -> None:
  """torchvision DenseNet `features` -> DenseNet (stem, block{k}_layer{i}, transitions)."""
  tree.conv(src, 'features.conv0', BODY + ('stem_conv',))
  tree.batch_norm(src, 'features.norm0', BODY + ('stem_norm',))
  blocks = DENSENET_BLOCKS[depth]
  for k, num_layers in enumerate(blocks):
    for i in range(num_layers):
      key = f'features.denseblock{k + 1}.denselayer{i + 1}.'
      path = BODY + (f'block{k + 1}_layer{i}',)
      tree.batch_norm(src, key + 'norm1', path + ('norm1',))
      tree.conv(src, key + 'conv1', path + ('conv1',))
      tree.batch_norm(src, key + 'norm2', path + ('norm2',))
      tree.conv(src, key + 'conv2', path + ('conv2',))
    if k < len(blocks) - 1:
      key = f'features.transition{k + 1}.'
      tree.batch_norm(src, key + 'norm', BODY + (f'transition{k + 1}_norm',))
      tree.conv(src, key + 'conv', BODY + (f'transition{k + 1}_conv',))
  tree.batch_norm(src, 'features.norm5', BODY + ('final_norm',))


def _fpn(src: _Source, tree: _Tree) -> None:
  """torchvision FeaturePyramidNetwork (inner_blocks, layer_blocks) -> FPN (lateral, output).

  inner_blocks[i] / layer_blocks[i] act on C(i+2); the LastLevelMaxPool P6 has no weights.
  Newer torchvision wraps each conv in Conv2dNormActivation ('.0.'); older files do not.
  """
  for i, level in enumerate(range(2, 6)):
    for torch_name, ours in (('inner_blocks', 'lateral'), ('layer_blocks', 'output')):
      base = f'backbone.fpn.{torch_name}.{i}'
      key = src.first(base + '.0.weight', base + '.weight')[: -len('.weight')]
      tree.conv(src, key, ('backbone', 'fpn', f'{ours}{level}'), bias=True)


def _rpn_head(src: _Source, tree: _Tree) -> int:
  """torchvision RPNHead -> RPNHead; returns the anchors per location."""
  key = src.first('rpn.head.conv.0.0.weight', 'rpn.head.conv.weight')[: -len('.weight')]
  tree.conv(src, key, ('rpn_head', 'conv'), bias=True)
  tree.conv(src, 'rpn.head.cls_logits', ('rpn_head', 'objectness'), bias=True)
  weight = src.take('rpn.head.bbox_pred.weight', 4)
  bias = src.take('rpn.head.bbox_pred.bias', 1)
  anchors = weight.shape[0] // 4
  if weight.shape[0] != 4 * anchors or anchors != src.state['rpn.head.cls_logits.bias'].shape[0]:
    raise ValueError(
      f'{src.name}: rpn.head.bbox_pred has {weight.shape[0]} outputs, expected 4 '
      'per anchor of cls_logits'
    )
  weight = weight.reshape((anchors, 4) + weight.shape[1:])[:, DELTA_ORDER].reshape(weight.shape)
  bias = bias.reshape(anchors, 4)[:, DELTA_ORDER].reshape(-1)
  tree.params[('rpn_head', 'deltas', 'kernel')] = weight.transpose(2, 3, 1, 0)
  tree.params[('rpn_head', 'deltas', 'bias')] = bias
  return anchors


def _box_head(src: _Source, tree: _Tree, keep_class_layers: bool, pool: int = 7) -> list[str]:
  """TwoMLPHead (fc6, fc7) -> BoxHead fc1, fc2; FastRCNNPredictor -> cls, deltas (if kept).

  fc6 reads the 7x7 ROI map flattened as (C, H, W); ours flattens (H, W, C).
  """
  weight = src.take('roi_heads.box_head.fc6.weight', 2)
  out, flat = weight.shape
  channels = flat // (pool * pool)
  if channels * pool * pool != flat:
    raise ValueError(
      f'{src.name}: roi_heads.box_head.fc6 takes {flat} inputs, not a multiple of {pool}x{pool}'
    )
  kernel = weight.reshape(out, channels, pool, pool).transpose(2, 3, 1, 0).reshape(flat, out)
  tree.params[('box_head', 'fc1', 'kernel')] = kernel
  tree.params[('box_head', 'fc1', 'bias')] = src.take('roi_heads.box_head.fc6.bias', 1)
  tree.linear(src, 'roi_heads.box_head.fc7', ('box_head', 'fc2'))
  class_keys = [
    f'roi_heads.box_predictor.{n}.{p}'
    for n in ('cls_score', 'bbox_pred')
    for p in ('weight', 'bias')
  ]
  if not keep_class_layers:
    for key in class_keys:
      src.take(key)  # present (checked), deliberately not converted
    return class_keys
  tree.linear(src, 'roi_heads.box_predictor.cls_score', ('box_head', 'cls'))
  weight = src.take('roi_heads.box_predictor.bbox_pred.weight', 2)
  bias = src.take('roi_heads.box_predictor.bbox_pred.bias', 1)
  classes = weight.shape[0] // 4  # with background, whose deltas we do not predict
  weight = weight.reshape(classes, 4, -1)[1:, DELTA_ORDER].reshape(4 * (classes - 1), -1)
  tree.params[('box_head', 'deltas', 'kernel')] = weight.T
  tree.params[('box_head', 'deltas', 'bias')] = bias.reshape(classes, 4)[1:, DELTA_ORDER].ravel()
  return []


def _mask_head(src: _Source, tree: _Tree, keep_class_layers: bool) -> list[str]:
  """MaskRCNNHeads (4 convs) + MaskRCNNPredictor (conv5_mask, mask_fcn_logits) -> the trunk
  (conv1-4, upsample) shared by both mask heads, and the standard head's logits (if kept)."""
  for i in range(4):
    key = src.first(
      f'roi_heads.mask_head.{i}.0.weight', f'roi_heads.mask_head.mask_fcn{i + 1}.weight'
    )[: -len('.weight')]
    tree.conv(src, key, ('mask_head', 'trunk', f'conv{i + 1}'), bias=True)
  tree.conv_transpose(
    src, 'roi_heads.mask_predictor.conv5_mask', ('mask_head', 'trunk', 'upsample')
  )
  class_keys = [f'roi_heads.mask_predictor.mask_fcn_logits.{p}' for p in ('weight', 'bias')]
  if not keep_class_layers:
    for key in class_keys:
      src.take(key)
    return class_keys
  weight = src.take('roi_heads.mask_predictor.mask_fcn_logits.weight', 4)[1:]  # no background
  tree.params[('mask_head', 'logits', 'kernel')] = weight.transpose(2, 3, 1, 0)
  tree.params[('mask_head', 'logits', 'bias')] = src.take(
    'roi_heads.mask_predictor.mask_fcn_logits.bias', 1
  )[1:]
  return []


def _adapt_input(tree: _Tree, input_channels: int, normalization: str) -> None:
  """Folds the input normalisation into the stem and gives it `input_channels` channels."""
  path = BODY + ('stem_conv', 'kernel')
  kernel = tree.params[path].astype(np.float64)  # [kh, kw, 3, O]
  if kernel.shape[2] != 3:
    raise ValueError(f'the stem conv takes {kernel.shape[2]} channels, expected RGB (3)')
  if input_channels < 1:
    raise ValueError(f'input_channels must be >= 1, got {input_channels}')
  # float64 throughout, one rounding to float32 at the end.
  if normalization == 'imagenet':
    mean = np.asarray(IMAGENET_MEAN, np.float64)
    std = np.asarray(IMAGENET_STD, np.float64)
    # conv(W, (x - m) / s) = conv(W / s, x) - sum W m / s away from the border; the constant
    # moves into the following norm's mean: (y - c) - mean = y - (mean + c).
    constant = np.einsum('hwio,i->o', kernel, mean / std)
    stats_path = BODY + ('stem_norm', 'mean')
    tree.stats[stats_path] = (tree.stats[stats_path] + constant).astype(np.float32)
    kernel = kernel / std[:, None]
  elif normalization != 'none':
    raise ValueError(f'input normalization {normalization!r} is not one of {NORMALIZATIONS}')
  if input_channels != 3:
    adapted = np.zeros(kernel.shape[:2] + (input_channels, kernel.shape[3]), np.float64)
    adapted[:, :, input_channels // 2] = kernel.sum(axis=2)
    kernel = adapted
  tree.params[path] = np.ascontiguousarray(kernel, np.float32)


def convert_state_dict(
  state: Mapping[str, np.ndarray],
  arch: str,
  *,
  input_channels: int = 1,
  input_normalization: str = 'imagenet',
  keep_class_layers: bool = False,
  source: str = 'state dict',
) -> Converted:
  """Maps a torchvision state dict of `arch` onto our variable tree (see the module docstring).

  Raises ValueError naming `source` for a missing tensor or for any tensor left unconverted
  that is not a deliberately dropped one (so a wrong --arch cannot pass silently).
  """
  if arch not in ARCHS:
    raise ValueError(f'--arch {arch!r} is not one of {ARCHS}')
  if arch.startswith('densenet'):
    state = {_OLD_DENSE_LAYER.sub(r'\1\2', k): v for k, v in state.items()}
  src = _Source(state, source)
  tree = _Tree()
  dropped: list[str] = []
  covers: tuple[str, ...]
  anchor_ratios = None
  notes: list[str] = []
  if arch in CLASSIFIER_ARCHS:
    if keep_class_layers:
      raise ValueError('--keep-class-layers applies to maskrcnn_resnet50_fpn only')
    backbone = arch
    top = (
      ('fc.weight', 'fc.bias')
      if arch.startswith('resnet')
      else ('classifier.weight', 'classifier.bias')
    )
    if arch.startswith('resnet'):
      _resnet_body(src, '', int(arch[len('resnet') :]), tree)
    else:
      _densenet_body(src, int(arch[len('densenet') :]), tree)
    for key in top:
      if src.has(key):
        src.skip(key)
        dropped.append(key)
    covers = ('backbone/body',)
    notes.append(
      f'ImageNet {arch} body; the FPN and heads start from their initialisers. '
      "Needs model.norm='frozen_batch' (or 'batch')."
    )
  else:
    backbone = DETECTOR_ARCHS[arch]
    _resnet_body(src, 'backbone.body.', int(backbone[len('resnet') :]), tree)
    _fpn(src, tree)
    anchors = _rpn_head(src, tree)
    if anchors == len(TORCHVISION_ANCHOR_RATIOS):
      anchor_ratios = TORCHVISION_ANCHOR_RATIOS
    dropped += _box_head(src, tree, keep_class_layers)
    dropped += _mask_head(src, tree, keep_class_layers)
    covers = ('backbone', 'rpn_head', 'box_head/fc1', 'box_head/fc2', 'mask_head/trunk')
    if keep_class_layers:
      covers += ('box_head/cls', 'box_head/deltas', 'mask_head/logits')
    notes.append(
      "torchvision's COCO Mask R-CNN: set model.norm='frozen_batch', "
      f'model.anchor_sizes={TORCHVISION_ANCHOR_SIZES}, '
      f'model.anchor_ratios={TORCHVISION_ANCHOR_RATIOS}, '
      f'model.roi_level_canonical={TORCHVISION_ROI_CANONICAL}, '
      "model.box_head='fc', model.box_head_dim=1024, model.mask_head_dim=256, "
      'model.fpn_dim=256, model.width=64.'
    )
  leftovers = src.leftovers()
  if leftovers:
    raise ValueError(
      f'{source}: {len(leftovers)} tensors have no place in {arch} '
      f'(first: {leftovers[:5]}); is this the right --arch?'
    )
  _adapt_input(tree, input_channels, input_normalization)
  return Converted(
    arch=arch,
    backbone=backbone,
    params=tree.params,
    batch_stats=tree.stats,
    covers=covers,
    dropped=tuple(dropped),
    input_channels=input_channels,
    input_normalization=input_normalization,
    anchor_ratios=anchor_ratios,
    notes=tuple(notes),
  )


def to_variables(converted: Converted) -> dict[str, dict]:
  """{'params': nested, 'batch_stats': nested} with contiguous float32 arrays."""
  import flax

  def nest(flat):
    return flax.traverse_util.unflatten_dict(
      {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
    )

  return {'params': nest(converted.params), 'batch_stats': nest(converted.batch_stats)}


def save(
  converted: Converted, path: str | os.PathLike, *, source: str = '', source_sha256: str = ''
) -> None:
  """Writes the converted file (msgpack, see the module docstring) atomically."""
  import flax

  record = {
    'format': FORMAT,
    'version': FORMAT_VERSION,
    'arch': converted.arch,
    'backbone': converted.backbone,
    'source': source,
    'source_sha256': source_sha256,
    'input_channels': converted.input_channels,
    'input_normalization': converted.input_normalization,
    'covers': list(converted.covers),
    'dropped': list(converted.dropped),
    'notes': list(converted.notes),
    'anchor_ratios': list(converted.anchor_ratios or ()),
    **to_variables(converted),
  }
  data = flax.serialization.msgpack_serialize(record)
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data)


def sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()
