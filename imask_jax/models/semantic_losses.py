"""Loss of a semantic segmentation network: soft Dice + cross-entropy (nnU-Net's), in float32.

Every term is computed per image and then averaged over the images, as losses.py does for
Mask R-CNN: the loss of a batch is the mean of its images' losses, so splitting a batch over
devices and averaging with `pmean` gives exactly the single-device value. (nnU-Net's 2D default
pools the Dice over the batch, "batch Dice"; that would tie the loss to how a batch is split.)

Dice follows nnU-Net's `MemoryEfficientSoftDiceLoss` with `do_bg=False`: per foreground class
c, (2 sum(p_c t_c) + s) / (sum(p_c) + sum(t_c) + s) with softmax probabilities p, one-hot truth
t and s = 1e-5; the term is 1 - the mean over classes (nnU-Net writes -mean, the same
gradient). A class absent from an image scores 1 only where it is also absent from the
prediction, so its false positives are still pushed down.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

DICE_SMOOTH = 1e-5


def label_map_from_instances(gt_classes: Array, gt_masks: Array, gt_valid: Array) -> Array:
  """Padded instances -> class-id label maps, as `train.gt_label_map` builds them on the host.

  gt_classes int [B, M] (1..K, 0 = padding), gt_masks [B, M, H, W] (nonzero = inside),
  gt_valid bool [B, M] -> int32 [B, H, W] (0 = background). Where instances overlap, the later
  slot wins.
  """
  inside = (gt_masks != 0) & gt_valid.astype(bool)[..., None, None]
  label = jnp.zeros(gt_masks.shape[:1] + gt_masks.shape[2:], jnp.int32)
  for m in range(gt_masks.shape[1]):
    label = jnp.where(inside[:, m], gt_classes[:, m, None, None].astype(jnp.int32), label)
  return label


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Softmax cross-entropy, the pixel mean per image, then the mean over images.

  logits [B, H, W, K + 1] (class 0 = background); labels int [B, H, W] in 0..K.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.mean(jnp.mean(ce, axis=(1, 2)))


def soft_dice(logits: Array, labels: Array, smooth: float = DICE_SMOOTH) -> Array:
  """1 - the soft Dice of the softmax probabilities, averaged over the foreground classes of
  each image, then over images. logits [B, H, W, K + 1]; labels int [B, H, W] in 0..K."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]
  classes = logits.shape[-1]
  truth = jax.nn.one_hot(labels, classes, dtype=jnp.float32)[..., 1:]
  overlap = jnp.sum(probs * truth, axis=(1, 2))  # [B, K]
  total = jnp.sum(probs, axis=(1, 2)) + jnp.sum(truth, axis=(1, 2))
  dice = (2.0 * overlap + smooth) / jnp.maximum(total + smooth, 1e-8)
  return 1.0 - jnp.mean(dice)


def downsample_labels(labels: Array, factor: int) -> Array:
  """Nearest-neighbour label maps at 1/factor resolution: [B, H, W] -> [B, ceil(H / f),
  ceil(W / f)], the pixel at the top-left of each f x f block (the grid a stride-f
  encoder level sees; nnU-Net's deep-supervision targets are also nearest-neighbour)."""
  return labels[:, ::factor, ::factor]


def dice_ce_loss(
  logits: Array, labels: Array, *, dice_weight: float = 1.0, ce_weight: float = 1.0
) -> tuple[Array, dict[str, Array]]:
  """(dice_weight x soft Dice + ce_weight x cross-entropy, {'dice': ..., 'ce': ...})."""
  dice = soft_dice(logits, labels)
  ce = cross_entropy(logits, labels)
  return dice_weight * dice + ce_weight * ce, {'dice': dice, 'ce': ce}


def deep_supervision_weights(levels: int) -> tuple[float, ...]:
  """nnU-Net's weights of the outputs at full, 1/2, 1/4 ... resolution: 1 / 2^i, the coarsest
  set to 0 when there are more than one, normalised to sum 1."""
  weights = [1.0 / 2**i for i in range(levels)]
  if levels > 1:
    weights[-1] = 0.0
  total = sum(weights)
  return tuple(w / total for w in weights)
