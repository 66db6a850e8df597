"""Builds the torchvision reference fixtures of tests/weights/test_convert.py.

Needs torch and torchvision (not project dependencies; use a separate venv):

    python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch torchvision numpy
    /work/torchvenv/bin/python tools/make_torchvision_fixtures.py            # the stored fixtures
    /work/torchvenv/bin/python tools/make_torchvision_fixtures.py --full --out /tmp/tv_full

Each model is randomly initialised by torchvision, then its batch-norm layers get random
affines and running statistics measured on random inputs (so every norm does real work and
activations stay O(1) through the depth; see randomise_batch_norms); it runs in eval mode on
a fixed random input. Per model NAME it writes NAME.pth (the state dict, `torch.save`) and
NAME.npz (the input, the reference outputs in torchvision's NCHW layout, and 'meta': JSON
with the architecture's sizes and torchvision's own float32 error per output). The reference
outputs are computed in float64 (`model.double()`) and stored rounded to float32, so they
are the exact answer to float32 precision; 'float32_error' is how far torchvision's float32
run is from them (the tests hold ours to a bound derived from it). The tests convert
NAME.pth with imask_jax.convert_weights, run our modules and compare.

Stored fixtures (about 3 MB: torchvision's own classes at reduced widths, since the published
widths weigh 45-170 MB a model):
* resnet50_w4 / resnet18_w4: torchvision's ResNet with Bottleneck [3, 4, 6, 3] / BasicBlock
  [2, 2, 2, 2] blocks at base width 4 instead of 64 (torchvision's ResNet hard-codes 64, so
  `NarrowResNet` repeats its constructor with the width changed; blocks, `_make_layer` and
  `forward` are torchvision's). Outputs: layer1-4 (C2-C5) on a 72 x 88 RGB input (not a
  multiple of 32, to check the ceil(H / stride) sizes), and on an ImageNet-normalised grey
  image (for the folded-normalisation, 1-channel conversion).
* densenet121_g4: torchvision's DenseNet with DenseNet-121's blocks (6, 12, 24, 16), growth
  rate 4, 8 stem channels. Outputs: the transitions' ReLU outputs and relu(norm5) on 64 x 64.
* maskrcnn_r50w4: torchvision's MaskRCNN with a BackboneWithFPN over resnet50_w4 (with
  FrozenBatchNorm2d, as maskrcnn_resnet50_fpn builds it), 16 FPN channels, RPNHead (3 anchors),
  TwoMLPHead (32), FastRCNNPredictor, MaskRCNNHeads (4 x 16), MaskRCNNPredictor, 3 classes +
  background, on two 72 x 88 images. Outputs: body levels, FPN levels, the RPN head's
  objectness and deltas (flattened by torchvision's concat_box_prediction_layers), the ROI
  features of fixed boxes (MultiScaleRoIAlign) and the box and mask heads' outputs on them.
  maskrcnn_r50w4_legacy.pth holds the same weights under the key names of checkpoints saved
  before torchvision 0.13 (such as the COCO file), in the legacy (non-zip) torch.save format;
  the script checks that torchvision itself loads it back into the same model.
* storage_cases.pth / storage_cases_legacy.pth / .npz: views (offsets, strides, shared
  storage) and every dtype, in both torch.save formats, with their values.
* full_architectures.json: the state-dict key -> shape of the published architectures
  (resnet18/50/101, densenet121/169, maskrcnn_resnet50_fpn with FrozenBatchNorm2d), so the
  tests can check the converter maps every tensor of the real networks onto our trees.

With --full the same outputs are written for the published architectures (resnet50,
resnet101, densenet121, densenet169, maskrcnn_resnet50_fpn; about 500 MB), for
`IMASK_TORCHVISION_FIXTURES=<dir> pytest tests/weights/test_convert.py`.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import re

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import densenet as tv_densenet
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import misc as tv_misc
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), 'tests', 'fixtures', 'torchvision')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NarrowResNet(tv_resnet.ResNet):
  """torchvision's ResNet with base width `width` (torchvision fixes it at 64)."""

  def __init__(self, block, layers, width: int, num_classes: int = 10, norm_layer=None):
    nn.Module.__init__(self)
    norm_layer = norm_layer or nn.BatchNorm2d
    self._norm_layer = norm_layer
    self.inplanes = width
    self.dilation = 1
    self.groups = 1
    self.base_width = 64
    self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = norm_layer(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, width, layers[0])
    self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(8 * width * block.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')


def randomise_batch_norms(model: nn.Module, make_input, batches: int = 4) -> None:
  """Random BN affines, then running statistics measured on random inputs (cumulative mean),
  with 0.1 added to every variance: at width 4 some channels are nearly dead, and their
  1 / sqrt(var) would amplify float32 rounding (torchvision's own float32 result drifted 5e-5
  of the output scale from float64 at C5 without it, 5e-6 with it)."""
  generator = torch.Generator().manual_seed(1)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      with torch.no_grad():
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
      m.reset_running_stats()
      m.momentum = None  # cumulative average over the calibration batches
  model.train()
  with torch.no_grad():
    for _ in range(batches):
      model(make_input())
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_var.add_(0.1)
  model.eval()


def references(model: nn.Module, outputs) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """`outputs(model, dtype)` computed in float64 (the reference, stored rounded to float32),
  and the largest difference of torchvision's own float32 result from it per output."""
  with torch.no_grad():
    single = outputs(model, torch.float32)
    double = outputs(copy.deepcopy(model).double(), torch.float64)
  errors = {k: float(np.abs(single[k].astype(np.float64) - double[k]).max()) for k in double}
  return {k: v.astype(np.float32) for k, v in double.items()}, errors


def body_levels(body: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
  out, names = {}, ('C2', 'C3', 'C4', 'C5')
  y = body.maxpool(body.relu(body.bn1(body.conv1(x))))
  for name, layer in zip(names, (body.layer1, body.layer2, body.layer3, body.layer4)):
    y = layer(y)
    out[name] = y.numpy()
  return out


def grey_input(shape, generator) -> np.ndarray:
  """A smooth-ish grey image in [0, 1] (random blobs), [1, 1, H, W]."""
  noise = torch.rand((1, 1) + tuple(s // 4 for s in shape), generator=generator)
  up = torch.nn.functional.interpolate(noise, size=shape, mode='bilinear', align_corners=False)
  return up.clamp(0, 1).numpy().astype(np.float32)


def imagenet_normalised_rgb(grey: np.ndarray) -> torch.Tensor:
  mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
  return (torch.from_numpy(grey).expand(-1, 3, -1, -1) - mean) / std


def save(out: str, name: str, state: dict, arrays: dict, meta: dict, legacy: bool = False):
  os.makedirs(out, exist_ok=True)
  torch.save(state, os.path.join(out, f'{name}.pth'), _use_new_zipfile_serialization=not legacy)
  meta = dict(meta, torch=torch.__version__, torchvision=torchvision.__version__)
  np.savez(
    os.path.join(out, f'{name}.npz'),
    meta=np.array(json.dumps(meta)),
    **{k: np.asarray(v, np.float32) for k, v in arrays.items()},
  )


def make_resnet(
  out: str, name: str, block, layers, width: int | None, full_arch: str | None, size=(72, 88)
):
  torch.manual_seed(0)
  if width is None:
    model = getattr(tv_resnet, full_arch)(weights=None)
    width = 64
  else:
    model = NarrowResNet(block, layers, width)
  generator = torch.Generator().manual_seed(2)
  randomise_batch_norms(model, lambda: torch.randn((2, 3) + size, generator=generator))
  x = torch.randn((1, 3) + size, generator=generator)
  grey = grey_input(size, generator)

  def outputs(net, dtype):
    levels = body_levels(net, x.to(dtype))
    grey_levels = body_levels(net, imagenet_normalised_rgb(grey).to(dtype))
    return {**levels, **{f'grey_{k}': v for k, v in grey_levels.items()}}

  arrays, errors = references(model, outputs)
  arrays.update(x=x.numpy(), grey=grey)
  depth = {
    (tv_resnet.Bottleneck, (3, 4, 6, 3)): 50,
    (tv_resnet.Bottleneck, (3, 4, 23, 3)): 101,
    (tv_resnet.BasicBlock, (2, 2, 2, 2)): 18,
  }[(block, tuple(layers))]
  save(
    out,
    name,
    model.state_dict(),
    arrays,
    {
      'kind': 'resnet',
      'arch': f'resnet{depth}',
      'depth': depth,
      'width': width,
      'float32_error': errors,
    },
  )


def make_densenet(
  out: str, name: str, growth_rate: int, blocks, init_features: int, depth: int, size=(64, 64)
):
  torch.manual_seed(0)
  model = tv_densenet.DenseNet(
    growth_rate=growth_rate,
    block_config=tuple(blocks),
    num_init_features=init_features,
    bn_size=4,
    num_classes=10 if init_features < 64 else 1000,
  )
  generator = torch.Generator().manual_seed(2)
  randomise_batch_norms(model, lambda: torch.randn((2, 3) + size, generator=generator))
  x = torch.randn((1, 3) + size, generator=generator)

  def outputs(net, dtype):
    captured = {}
    hooks = [
      getattr(net.features, f'transition{k}').relu.register_forward_hook(
        lambda module, args, output, k=k: captured.__setitem__(f'C{k + 1}', output.clone())
      )
      for k in (1, 2, 3)
    ]
    features = net.features(x.to(dtype))
    for hook in hooks:
      hook.remove()
    return {**{k: v.numpy() for k, v in captured.items()}, 'C5': torch.relu(features).numpy()}

  arrays, errors = references(model, outputs)
  arrays['x'] = x.numpy()
  save(
    out,
    name,
    model.state_dict(),
    arrays,
    {
      'kind': 'densenet',
      'arch': f'densenet{depth}',
      'depth': depth,
      'growth_rate': growth_rate,
      'num_init_features': init_features,
      'bn_size': 4,
      'float32_error': errors,
    },
  )


# Key renames torchvision applies when loading files saved before its modules gained
# Conv2dNormActivation wrappers (FPN, RPNHead, MaskRCNNHeads): new -> old.
OLD_NAMES = (
  (re.compile(r'^backbone\.fpn\.(inner|layer)_blocks\.(\d)\.0\.'), r'backbone.fpn.\1_blocks.\2.'),
  (re.compile(r'^rpn\.head\.conv\.0\.0\.'), 'rpn.head.conv.'),
  (
    re.compile(r'^roi_heads\.mask_head\.(\d)\.0\.'),
    lambda m: f'roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.',
  ),
)


def old_names(state: dict) -> collections.OrderedDict:
  renamed = collections.OrderedDict()
  for key, value in state.items():
    for pattern, repl in OLD_NAMES:
      key = pattern.sub(repl, key)
    renamed[key] = value
  return renamed


def make_maskrcnn(
  out: str,
  name: str,
  width: int | None,
  fpn_dim: int,
  box_dim: int,
  mask_dim: int,
  num_classes: int,
  size=(72, 88),
):
  """torchvision's MaskRCNN (as maskrcnn_resnet50_fpn builds it) and its head outputs."""
  torch.manual_seed(0)
  make = (
    (lambda norm: NarrowResNet(tv_resnet.Bottleneck, [3, 4, 6, 3], width, norm_layer=norm))
    if width
    else (lambda norm: tv_resnet.resnet50(weights=None, norm_layer=norm))
  )
  # Measure BN statistics with BatchNorm2d, then load them into the FrozenBatchNorm2d body.
  trained = make(nn.BatchNorm2d)
  generator = torch.Generator().manual_seed(2)
  randomise_batch_norms(trained, lambda: torch.randn((2, 3) + size, generator=generator))
  body = make(tv_misc.FrozenBatchNorm2d)
  body.load_state_dict(trained.state_dict())
  width = width or 64
  channels = [4 * width * 2**k for k in range(4)]
  backbone = BackboneWithFPN(
    body,
    {f'layer{k + 1}': str(k) for k in range(4)},
    channels,
    fpn_dim,
    extra_blocks=LastLevelMaxPool(),
  )
  model = tv_mask_rcnn.MaskRCNN(
    backbone,
    num_classes=None,
    rpn_head=tv_rpn.RPNHead(fpn_dim, 3),
    box_head=TwoMLPHead(fpn_dim * 7 * 7, box_dim),
    box_predictor=FastRCNNPredictor(box_dim, num_classes + 1),
    mask_head=tv_mask_rcnn.MaskRCNNHeads(fpn_dim, [mask_dim] * 4, 1),
    mask_predictor=tv_mask_rcnn.MaskRCNNPredictor(mask_dim, mask_dim, num_classes + 1),
  )
  # Give every bias of the FPN and heads a random value (torchvision initialises them to 0).
  with torch.no_grad():
    for key, param in model.named_parameters():
      if key.endswith('.bias') and not key.startswith('backbone.body'):
        param.copy_(0.1 * torch.randn(param.shape, generator=generator))
      if key.startswith('rpn.') and key.endswith('.weight'):
        param.mul_(20.0)  # RPNHead's std 0.01 weights give outputs too small to compare
  model.eval()
  x = torch.randn((2, 3) + size, generator=generator)
  # Boxes (x1, y1, x2, y2) in input pixels over both images; with torchvision's canonical 224
  # the 140 x 130 one reads P3, the others P2. Some reach outside the image on purpose.
  rois = torch.tensor(
    [
      [4.0, 6.0, 40.0, 30.0],
      [10.5, 2.25, 80.0, 70.0],
      [-30.0, -30.0, 110.0, 100.0],
      [0.0, 0.0, 88.0, 72.0],
      [30.0, 20.0, 46.0, 28.0],
      [-20.0, 5.0, 110.0, 60.0],
    ]
  )
  roi_batch = torch.tensor([0, 0, 0, 1, 1, 1])

  def outputs(net, dtype):
    pyramid = net.backbone(x.to(dtype))
    feature_list = list(pyramid.values())
    objectness, deltas = net.rpn.head(feature_list)
    objectness, deltas = tv_rpn.concat_box_prediction_layers(objectness, deltas)
    boxes = [rois[roi_batch == b].to(dtype) for b in range(2)]
    shapes = [size] * 2
    box_features = net.roi_heads.box_roi_pool(pyramid, boxes, shapes)
    cls_logits, box_deltas = net.roi_heads.box_predictor(net.roi_heads.box_head(box_features))
    mask_features = net.roi_heads.mask_roi_pool(pyramid, boxes, shapes)
    mask_logits = net.roi_heads.mask_predictor(net.roi_heads.mask_head(mask_features))
    return {
      **body_levels(net.backbone.body, x.to(dtype)),
      **{f'P{k + 2}': v.numpy() for k, v in enumerate(feature_list)},
      'rpn_objectness': objectness.reshape(2, -1).numpy(),
      'rpn_deltas': deltas.reshape(2, -1, 4).numpy(),
      'box_features': box_features.numpy(),
      'cls_logits': cls_logits.numpy(),
      'box_deltas': box_deltas.numpy(),
      'mask_features': mask_features.numpy(),
      'mask_logits': mask_logits.numpy(),
    }

  arrays, errors = references(model, outputs)
  arrays.update(x=x.numpy(), rois_xyxy=rois.numpy(), roi_batch=roi_batch.numpy())
  meta = {
    'kind': 'maskrcnn',
    'arch': 'maskrcnn_resnet50_fpn',
    'depth': 50,
    'width': width,
    'fpn_dim': fpn_dim,
    'box_head_dim': box_dim,
    'mask_head_dim': mask_dim,
    'num_classes': num_classes,
    'anchor_ratios': [0.5, 1.0, 2.0],
    'float32_error': errors,
  }
  state = model.state_dict()
  save(out, name, state, arrays, meta)
  if width != 64:
    legacy = old_names(state)
    check = tv_mask_rcnn.MaskRCNN(
      BackboneWithFPN(
        make(tv_misc.FrozenBatchNorm2d),
        {f'layer{k + 1}': str(k) for k in range(4)},
        channels,
        fpn_dim,
        extra_blocks=LastLevelMaxPool(),
      ),
      num_classes=None,
      rpn_head=tv_rpn.RPNHead(fpn_dim, 3),
      box_head=TwoMLPHead(fpn_dim * 7 * 7, box_dim),
      box_predictor=FastRCNNPredictor(box_dim, num_classes + 1),
      mask_head=tv_mask_rcnn.MaskRCNNHeads(fpn_dim, [mask_dim] * 4, 1),
      mask_predictor=tv_mask_rcnn.MaskRCNNPredictor(mask_dim, mask_dim, num_classes + 1),
    )
    check.load_state_dict(legacy, strict=True)  # torchvision maps the old names back
    for key, value in check.state_dict().items():
      if not torch.equal(value, state[key]):
        raise AssertionError(f'legacy names: {key} did not load back')
    torch.save(
      legacy, os.path.join(out, f'{name}_legacy.pth'), _use_new_zipfile_serialization=False
    )


def storage_cases(out: str) -> None:
  """Tensors whose storage layout a state dict rarely shows: views with offsets and strides
  sharing one storage, and every dtype; saved in both formats beside their values."""
  generator = torch.Generator().manual_seed(3)
  base = torch.randn(6, 5, generator=generator)
  state = collections.OrderedDict(
    [
      ('transposed', base.t()),  # strides (1, 5) into base's storage
      ('row_slice', base[2:4]),  # storage offset 10
      ('column_step', base[:, 1::2]),  # strides (5, 2), offset 1
      ('scalar', torch.tensor(7, dtype=torch.int64)),
      ('half', torch.randn(3, 2, generator=generator).half()),
      ('bfloat16', torch.randn(4, generator=generator).bfloat16()),
      ('double', torch.randn(2, 2, generator=generator).double()),
      ('int32', torch.arange(-3, 3, dtype=torch.int32)),
      ('uint8', torch.arange(250, 256, dtype=torch.uint8)),
      ('bool', torch.tensor([True, False, True])),
      ('empty', torch.zeros(0, 3)),
    ]
  )
  expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}
  torch.save(state, os.path.join(out, 'storage_cases.pth'))
  torch.save(
    state, os.path.join(out, 'storage_cases_legacy.pth'), _use_new_zipfile_serialization=False
  )
  np.savez(os.path.join(out, 'storage_cases.npz'), **expected)


def full_architectures(out: str) -> None:
  shapes = {}
  for arch in ('resnet18', 'resnet50', 'resnet101', 'densenet121', 'densenet169'):
    model = getattr(torchvision.models, arch)(weights=None)
    shapes[arch] = {k: list(v.shape) for k, v in model.state_dict().items()}
  body = tv_resnet.resnet50(weights=None, norm_layer=tv_misc.FrozenBatchNorm2d)
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

  model = tv_mask_rcnn.MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91)
  shapes['maskrcnn_resnet50_fpn'] = {k: list(v.shape) for k, v in model.state_dict().items()}
  shapes['_versions'] = {'torch': torch.__version__, 'torchvision': torchvision.__version__}
  with open(os.path.join(out, 'full_architectures.json'), 'w') as f:
    json.dump(shapes, f, indent=0, sort_keys=True)
    f.write('\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=DEFAULT_OUT)
  parser.add_argument(
    '--full',
    action='store_true',
    help='published architectures at full width (not stored in the repo)',
  )
  args = parser.parse_args()
  torch.set_num_threads(2)
  os.makedirs(args.out, exist_ok=True)
  if args.full:
    make_resnet(args.out, 'resnet50', tv_resnet.Bottleneck, [3, 4, 6, 3], None, 'resnet50')
    make_resnet(args.out, 'resnet101', tv_resnet.Bottleneck, [3, 4, 23, 3], None, 'resnet101')
    make_densenet(args.out, 'densenet121', 32, (6, 12, 24, 16), 64, 121)
    make_densenet(args.out, 'densenet169', 32, (6, 12, 32, 32), 64, 169)
    make_maskrcnn(args.out, 'maskrcnn_resnet50_fpn', None, 256, 1024, 256, 90)
    return
  make_resnet(args.out, 'resnet50_w4', tv_resnet.Bottleneck, [3, 4, 6, 3], 4, None)
  make_resnet(args.out, 'resnet18_w4', tv_resnet.BasicBlock, [2, 2, 2, 2], 4, None)
  make_densenet(args.out, 'densenet121_g4', 4, (6, 12, 24, 16), 8, 121)
  make_maskrcnn(args.out, 'maskrcnn_r50w4', 4, 16, 32, 16, 3)
  storage_cases(args.out)
  full_architectures(args.out)


if __name__ == '__main__':
  main()
