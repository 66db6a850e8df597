"""Greedy non-maximum suppression with static shapes.

Both entry points return exactly what the textbook greedy algorithm returns: visit the
candidates from the highest score down (ties: lower input index first), keep a box unless a
box kept before it overlaps it with IoU > `iou_threshold`, stop after `max_outputs` keeps.
Output is padded to `max_outputs` so it jits once per shape and vmaps over a batch.

Two exact formulations, chosen with `method=` (timings in benchmarks/nms.py):

* `"tiled"` (default): candidates are sorted once and visited a tile of `tile_size` boxes at a
  time inside a `lax.while_loop`. Each tile is first suppressed by the boxes already kept
  (one `[tile, max_outputs]` IoU block), then suppresses itself: the keep mask of the tile is
  the unique fixed point of `keep_j = alive_j and not any_{i<j}(keep_i and iou_ij > t)`,
  reached by iterating that vectorised update (each step fixes at least one more box, so it
  ends after at most the length of the longest suppression chain). The loop stops early once
  `max_outputs` boxes are kept or the candidates run out.
* `"sequential"`: one `lax.while_loop` step per kept box: take the first alive box, keep it,
  drop everything it overlaps. `max_outputs` steps of O(N) vector work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imask_jax.ops import boxes as box_ops

# Index written into unused output slots. Gather with `jnp.take(x, idx, axis=0, mode="fill")`
# or mask with `idx >= 0`: plain `x[idx]` would wrap -1 around to the last element.
PAD_INDEX = -1
DEFAULT_TILE_SIZE = 64
METHODS = ('tiled', 'sequential')


def nms(
  boxes: jax.Array,
  scores: jax.Array,
  *,
  iou_threshold: float,
  max_outputs: int,
  score_threshold: float = -jnp.inf,
  valid: jax.Array | None = None,
  method: str = 'tiled',
  tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jax.Array, jax.Array]:
  """Greedy NMS over one set of boxes.

  Args:
    boxes: `[N, 4]` float boxes `(y1, x1, y2, x2)`.
    scores: `[N]` float scores; higher is better.
    iou_threshold: a kept box removes every later box with IoU strictly above this.
    max_outputs: static number of output slots (M).
    score_threshold: only boxes with `score > score_threshold` are candidates (NaN never is).
    valid: optional `[N]` bool; False rows (padding) are never candidates.
    method: `"tiled"` or `"sequential"`; both give identical results.
    tile_size: boxes per tile for `"tiled"`.

  Returns:
    indices: int32 `[M]`, indices into `boxes` of the kept boxes in descending score order,
      then `PAD_INDEX` (-1).
    count: int32 scalar, number of kept boxes (<= M).
  """
  return _nms(
    boxes,
    scores,
    None,
    iou_threshold=iou_threshold,
    max_outputs=max_outputs,
    score_threshold=score_threshold,
    valid=valid,
    method=method,
    tile_size=tile_size,
    caller='nms',
  )


def batched_nms(
  boxes: jax.Array,
  scores: jax.Array,
  classes: jax.Array,
  *,
  iou_threshold: float,
  max_outputs: int,
  score_threshold: float = -jnp.inf,
  valid: jax.Array | None = None,
  method: str = 'tiled',
  tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jax.Array, jax.Array]:
  """Greedy NMS in which only boxes of the same class suppress each other.

  Same as running `nms` once per class and merging the survivors by score (ties: lower
  index), then keeping the first `max_outputs`. Classes are compared exactly (a mask on the
  IoU matrix), not by offsetting boxes, so coordinates lose no float precision.

  Args:
    boxes, scores, valid, iou_threshold, max_outputs, score_threshold, method, tile_size:
      see `nms`.
    classes: `[N]` integer class of each box.

  Returns:
    `(indices [M] int32 padded with -1, count int32)`, as `nms`.
  """
  classes = jnp.asarray(classes)
  if not jnp.issubdtype(classes.dtype, jnp.integer):
    raise ValueError(f'nms.batched_nms: classes must be integers, got dtype {classes.dtype}')
  return _nms(
    boxes,
    scores,
    classes,
    iou_threshold=iou_threshold,
    max_outputs=max_outputs,
    score_threshold=score_threshold,
    valid=valid,
    method=method,
    tile_size=tile_size,
    caller='batched_nms',
  )


def _nms(
  boxes,
  scores,
  groups,
  *,
  iou_threshold,
  max_outputs,
  score_threshold,
  valid,
  method,
  tile_size,
  caller,
):
  boxes = jnp.asarray(boxes, dtype=jnp.float32)
  scores = jnp.asarray(scores, dtype=jnp.float32)
  n = boxes.shape[0]
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f'nms.{caller}: boxes must be [N, 4], got {tuple(boxes.shape)}')
  if scores.shape != (n,):
    raise ValueError(f'nms.{caller}: scores must be [N] = [{n}], got {tuple(scores.shape)}')
  if groups is not None and groups.shape != (n,):
    raise ValueError(f'nms.{caller}: classes must be [N] = [{n}], got {tuple(groups.shape)}')
  if valid is not None and jnp.shape(valid) != (n,):
    raise ValueError(f'nms.{caller}: valid must be [N] = [{n}], got {tuple(jnp.shape(valid))}')
  if int(max_outputs) != max_outputs or max_outputs < 1:
    raise ValueError(f'nms.{caller}: max_outputs must be a positive int, got {max_outputs!r}')
  if method not in METHODS:
    raise ValueError(f'nms.{caller}: method must be one of {METHODS}, got {method!r}')
  if int(tile_size) != tile_size or tile_size < 1:
    raise ValueError(f'nms.{caller}: tile_size must be a positive int, got {tile_size!r}')
  max_outputs = int(max_outputs)
  if n == 0:
    return jnp.full((max_outputs,), PAD_INDEX, jnp.int32), jnp.zeros((), jnp.int32)

  scores = scores + 0.0  # turns -0.0 into +0.0 so equal scores tie in the sort
  candidate = scores > score_threshold
  if valid is not None:
    candidate = candidate & jnp.asarray(valid, dtype=bool)
  groups = jnp.zeros((n,), jnp.int32) if groups is None else groups.astype(jnp.int32)

  # Stable sort: candidates by descending score, ties by index; non-candidates last.
  order = jnp.argsort(jnp.where(candidate, -scores, jnp.inf), stable=True)
  sorted_boxes, sorted_groups = boxes[order], groups[order]
  num_candidates = jnp.sum(candidate, dtype=jnp.int32)
  threshold = jnp.float32(iou_threshold)

  if method == 'tiled':
    positions, count = _tiled(
      sorted_boxes, sorted_groups, num_candidates, threshold, max_outputs, min(int(tile_size), n)
    )
  else:
    positions, count = _sequential(
      sorted_boxes, sorted_groups, num_candidates, threshold, max_outputs
    )
  indices = jnp.where(positions >= 0, order[jnp.maximum(positions, 0)], PAD_INDEX)
  return indices.astype(jnp.int32), count


def _overlaps(a, a_groups, b, b_groups, threshold):
  """`[A, B]` bool: same group and IoU strictly above the threshold."""
  same = a_groups[:, None] == b_groups[None, :]
  return (box_ops.iou_matrix(a, b) > threshold) & same


def _tiled(boxes, groups, num_candidates, threshold, max_outputs, tile):
  """Positions (into the sorted arrays) of the kept boxes, padded with -1, and their count."""
  n = boxes.shape[0]
  num_tiles = -(-n // tile)
  padded = num_tiles * tile
  boxes = jnp.pad(boxes, ((0, padded - n), (0, 0)))
  groups = jnp.pad(groups, (0, padded - n))
  in_tile = jnp.arange(tile)
  later = in_tile[:, None] < in_tile[None, :]  # [i, j]: i comes before j
  slots = jnp.arange(max_outputs)

  def self_suppress(alive, suppresses):
    # Iterate keep_j = alive_j & ~any_i(keep_i & suppresses_ij) to its fixed point.
    def step(state):
      keep, _ = state
      new_keep = alive & ~jnp.any(suppresses & keep[:, None], axis=0)
      return new_keep, jnp.any(new_keep != keep)

    keep, _ = jax.lax.while_loop(lambda s: s[1], step, (alive, jnp.array(True)))
    return keep

  def body(state):
    t, count, kept_boxes, kept_groups, kept_pos = state
    start = t * tile
    tile_boxes = jax.lax.dynamic_slice_in_dim(boxes, start, tile)
    tile_groups = jax.lax.dynamic_slice_in_dim(groups, start, tile)
    alive = start + in_tile < num_candidates
    # Boxes kept in earlier tiles all outrank this tile.
    by_kept = _overlaps(tile_boxes, tile_groups, kept_boxes, kept_groups, threshold)
    alive = alive & ~jnp.any(by_kept & (slots < count)[None, :], axis=1)
    suppresses = _overlaps(tile_boxes, tile_groups, tile_boxes, tile_groups, threshold) & later
    keep = self_suppress(alive, suppresses)
    # Append the tile's survivors in order; slots past max_outputs are dropped.
    slot = jnp.where(keep, count + jnp.cumsum(keep) - 1, max_outputs)
    kept_boxes = kept_boxes.at[slot].set(tile_boxes, mode='drop')
    kept_groups = kept_groups.at[slot].set(tile_groups, mode='drop')
    kept_pos = kept_pos.at[slot].set(start + in_tile, mode='drop')
    count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), max_outputs)
    return t + 1, count, kept_boxes, kept_groups, kept_pos

  def cond(state):
    t, count = state[0], state[1]
    return (t < num_tiles) & (t * tile < num_candidates) & (count < max_outputs)

  init = (
    jnp.int32(0),
    jnp.int32(0),
    jnp.zeros((max_outputs, 4), boxes.dtype),
    jnp.zeros((max_outputs,), jnp.int32),
    jnp.full((max_outputs,), PAD_INDEX, jnp.int32),
  )
  _, count, _, _, kept_pos = jax.lax.while_loop(cond, body, init)
  return kept_pos, count


def _sequential(boxes, groups, num_candidates, threshold, max_outputs):
  """Same contract as `_tiled`, one loop step per kept box."""
  n = boxes.shape[0]
  alive = jnp.arange(n) < num_candidates

  def body(state):
    count, alive, kept_pos = state
    best = jnp.argmax(alive)  # first alive box in sorted order: the next one greedy keeps
    hit = _overlaps(boxes[best][None], groups[best][None], boxes, groups, threshold)[0]
    alive = alive & ~hit
    alive = alive.at[best].set(False)
    kept_pos = kept_pos.at[count].set(best.astype(jnp.int32))
    return count + 1, alive, kept_pos

  def cond(state):
    count, alive, _ = state
    return (count < max_outputs) & jnp.any(alive)

  init = (jnp.int32(0), alive, jnp.full((max_outputs,), PAD_INDEX, jnp.int32))
  count, _, kept_pos = jax.lax.while_loop(cond, body, init)
  return kept_pos, count
