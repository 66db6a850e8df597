"""The model a config describes (`model.kind`: Mask R-CNN or the U-Net) and its initial
variables: one place that training, inference and the benchmarks build models through."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from imask_jax.models import mask_rcnn, spec, unet
from imask_jax.models.mask_rcnn import MaskRCNN, ModelSpec
from imask_jax.models.unet import UNet, UNetSpec


def build_model(
  config: ml_collections.ConfigDict, *, batch_stats_axis: str | None = None
) -> MaskRCNN | UNet:
  """The model of `config` (model.kind). With model.norm = 'batch', batch statistics are
  averaged over the mesh axis `batch_stats_axis` (training passes its data axis; inference,
  which uses the stored statistics, passes none). ValueError naming model.kind when it is
  none of `spec.MODEL_KINDS`."""
  axis = batch_stats_axis if config.model.norm == 'batch' else None
  if spec.model_kind(config) == 'unet':
    return UNet(UNetSpec.from_config(config, axis_name=axis))
  return MaskRCNN(ModelSpec.from_config(config, axis_name=axis))


def init_variables(model: MaskRCNN | UNet, key: jax.Array) -> dict[str, Any]:
  """The model's initial variables (`mask_rcnn.init_variables` or `unet.init_variables`)."""
  if isinstance(model, UNet):
    return unet.init_variables(model, key)
  return mask_rcnn.init_variables(model, key)
