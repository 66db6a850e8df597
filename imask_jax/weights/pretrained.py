"""Starting a model from converted weights: `--config.model.init_from=PATH`.

PATH is a file written by `python -m imask_jax.convert_weights` (msgpack; read with
`flax.serialization.msgpack_restore`, never with pickle). After the trainer has initialised
every variable, `init_from` replaces those the file holds:

* every array of the file must exist in the model with the same shape (else a ValueError names
  the file and the first mismatching path, with both shapes);
* every model array under a subtree the file `covers` (e.g. `backbone/body` for an ImageNet
  classifier) must come from the file, so a ResNet-50 file cannot half-fill a ResNet-101;
* the rest (FPN, heads, class layers, whatever the file lacks) keeps its fresh initialisation.

Batch norm: the file holds each norm as `scale`, `bias` in params and `mean`, `var` in
batch_stats (the 'batch' layout). For `model.norm='frozen_batch'` the scale and bias move into
batch_stats (`norm.freeze_batch_norm_variables`); `model.norm='group'` has no running
statistics to take them, which is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from imask_jax import run_log
from imask_jax.models.norm import freeze_batch_norm_variables
from imask_jax.weights.convert import FORMAT, FORMAT_VERSION

COLLECTIONS = ('params', 'batch_stats')
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PretrainedFile:
  """A converted file: its metadata and its variables (nested dicts of float32 arrays)."""

  path: str
  meta: dict[str, Any]
  variables: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `merge` did: '<collection>/<path>' of the arrays taken from the file and of those
  left at their initial values."""

  path: str
  loaded: tuple[str, ...]
  reinitialised: tuple[str, ...]

  def summary(self) -> str:
    tops = sorted({'/'.join(p.split('/')[1:3]) for p in self.reinitialised})
    return (
      f'init_from {self.path}: loaded {len(self.loaded)} arrays, re-initialised '
      f'{len(self.reinitialised)}' + (f' (under {", ".join(tops)})' if tops else '')
    )


def read(path: str) -> PretrainedFile:
  """Reads a file written by convert_weights.save; ValueError naming `path` otherwise."""
  try:
    with open(path, 'rb') as f:
      record = flax.serialization.msgpack_restore(f.read())
  except FileNotFoundError:
    raise ValueError(f'model.init_from: {path} does not exist') from None
  except Exception as e:  # msgpack raises several types for a file that is not msgpack
    raise ValueError(
      f'model.init_from: {path} is not a converted weights file ({e}); write '
      'one with python -m imask_jax.convert_weights'
    ) from e
  if not isinstance(record, dict) or record.get('format') != FORMAT:
    raise ValueError(
      f'model.init_from: {path} is not a converted weights file (no '
      f'format={FORMAT!r}); write one with python -m imask_jax.convert_weights'
    )
  if record.get('version') != FORMAT_VERSION:
    raise ValueError(
      f'model.init_from: {path} has format version {record.get("version")}, '
      f'this code reads {FORMAT_VERSION}'
    )
  variables = {c: record.pop(c, {}) for c in COLLECTIONS}
  return PretrainedFile(path=path, meta=record, variables=variables)


def _flat(tree: Mapping[str, Any]) -> dict[Path, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)) if tree else {}


def _norm_layout(file: PretrainedFile, model: Mapping[Path, Any]) -> dict[str, Any]:
  """The file's variables in the model's norm layout ('batch' as stored, or 'frozen_batch')."""
  stats = _flat(file.variables['batch_stats'])
  layers = sorted({p[:-1] for p in stats if p[-1] == 'mean'})
  if not layers:
    return file.variables
  layer = layers[0]
  if ('batch_stats',) + layer + ('mean',) not in model:
    raise ValueError(
      f'model.init_from: {file.path} holds batch norms (first: {"/".join(layer)}) but the '
      "model has no running statistics there: use model.norm='frozen_batch' (as torchvision "
      "and detectron2 fine-tune) or 'batch', not 'group'"
    )
  if ('batch_stats',) + layer + ('scale',) in model:
    return freeze_batch_norm_variables(file.variables)
  return file.variables


def _hint(meta: Mapping[str, Any], path: Path) -> str:
  if path[-2:] == ('stem_conv', 'kernel'):
    return (
      f'; the file was converted for {meta.get("input_channels")} input channels: rerun '
      'convert_weights with --input-channels 2 * data.context_slices + 1'
    )
  if path[0] == 'rpn_head':
    return (
      f"; the file's RPN has {len(meta.get('anchor_ratios') or ()) or 'other'} anchors "
      f'per location: set model.anchor_ratios={tuple(meta.get("anchor_ratios") or ())}'
    )
  return f'; the file holds {meta.get("arch")} ({"; ".join(meta.get("notes") or ())})'


def merge(
  variables: Mapping[str, Any], path: str, *, anchor_ratios: tuple[float, ...] | None = None
) -> tuple[dict[str, Any], LoadReport]:
  """Initialised `variables` ({'params', 'batch_stats', ...}) with the file's arrays put in.

  Args:
    variables: the model's freshly initialised variables.
    path: a convert_weights file.
    anchor_ratios: the model's `anchor_ratios`; checked against a file with an RPN head (the
      head's outputs are per ratio, so another order or set would load without a shape error).
  Returns:
    (new variables with the same structure, LoadReport). Raises ValueError on any mismatch.
  """
  file = read(path)
  meta = file.meta
  model = {(c,) + p: v for c in COLLECTIONS for p, v in _flat(variables.get(c, {})).items()}
  source = _norm_layout(file, model)
  incoming = {(c,) + p: v for c in COLLECTIONS for p, v in _flat(source.get(c, {})).items()}
  if anchor_ratios is not None and any(p[1] == 'rpn_head' for p in incoming):
    wanted = tuple(float(r) for r in meta.get('anchor_ratios') or ())
    if tuple(float(r) for r in anchor_ratios) != wanted:
      raise ValueError(
        f'model.init_from: {path} has an RPN head trained for anchor ratios '
        f'{wanted} (in this order); the model has {tuple(anchor_ratios)}: set '
        f'model.anchor_ratios={wanted}'
      )
  for key in sorted(incoming):
    name = '/'.join(key)
    if key not in model:
      raise ValueError(f'model.init_from: {path}: {name} is not in the model{_hint(meta, key[1:])}')
    want, got = tuple(model[key].shape), tuple(np.shape(incoming[key]))
    if want != got:
      raise ValueError(
        f'model.init_from: {path}: {name} has shape {got} in the file but '
        f'{want} in the model{_hint(meta, key[1:])}'
      )
  for key in sorted(model):
    inside = '/'.join(key[1:])
    covered = [c for c in meta.get('covers', ()) if inside == c or inside.startswith(c + '/')]
    if covered and key not in incoming:
      raise ValueError(
        f"model.init_from: {path} provides {covered[0]} but lacks the model's "
        f'{"/".join(key)}{_hint(meta, key[1:])}'
      )
  merged = dict(variables)
  for collection in COLLECTIONS:
    flat = _flat(variables.get(collection, {}))
    if not flat:
      continue
    for p in flat:
      if (collection,) + p in incoming:
        flat[p] = jnp.asarray(incoming[(collection,) + p], dtype=flat[p].dtype)
    merged[collection] = flax.traverse_util.unflatten_dict(flat)
  loaded = tuple('/'.join(k) for k in sorted(incoming))
  reinitialised = tuple('/'.join(k) for k in sorted(model) if k not in incoming)
  return merged, LoadReport(path=path, loaded=loaded, reinitialised=reinitialised)


def init_from(
  variables: Mapping[str, Any], path: str, *, anchor_ratios: tuple[float, ...] | None = None
) -> dict[str, Any]:
  """`merge` for the trainer: '' returns `variables` unchanged; otherwise says the summary
  (on the screen and in the log)."""
  if not path:
    return dict(variables)
  merged, report = merge(variables, path, anchor_ratios=anchor_ratios)
  run_log.say(report.summary())
  return merged
