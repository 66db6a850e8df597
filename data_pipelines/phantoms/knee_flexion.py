"""The knee phantom's flexion: the tibia's pose in the model frame and what moves with it.

`TibiaFlexion` is a part of `knee_anatomy.KneeModel` kept apart because it has one job of its
own: the rigid map between the tibia's own (extended) frame and the model frame, set by
`_fit_flexion` (a turn about the condyles' centre, then a slide along the tibia that restores
the joint gap), and the helpers that carry the tibia's shapes, boxes and points with it.
`self.flex` is None for the extended knee, so its arithmetic is untouched. The methods read the
model's own fields (`s`, `a`, `cond`, the bone and thickness functions).
"""

from __future__ import annotations

import numpy as np

from data_pipelines.phantoms import sdf

Array = np.ndarray


class TibiaFlexion:
  """The flexed tibia's frame, mixed into `knee_anatomy.KneeModel`."""

  flex: tuple[Array, Array] | None = None

  def to_tibia(self, x: Array, y: Array, z: Array) -> tuple[Array, Array, Array]:
    """Model-frame points (mm, any broadcastable shapes) in the tibia's own frame, q = R^T
    (p - o): a rigid map, so an SDF evaluated there stays an exact distance. The inputs
    themselves when the knee is extended."""
    if self.flex is None:
      return x, y, z
    rot, origin = self.flex
    return sdf.to_local(x, y, z, origin, rot)

  def from_tibia(self, x: Array, y: Array, z: Array) -> tuple[Array, Array, Array]:
    """Points of the tibia's own frame (mm) in the model frame, p = R q + o (the inputs when
    the knee is extended)."""
    if self.flex is None:
      return x, y, z
    r, o = self.flex
    return tuple(r[i, 0] * x + r[i, 1] * y + r[i, 2] * z + o[i] for i in range(3))

  def with_tibia(self, fn):
    """A model-frame SDF fn(x, y, z) of the extended knee, moved with the flexed tibia (fn
    itself when the knee is extended)."""
    if self.flex is None:
      return fn
    return lambda x, y, z: fn(*self.to_tibia(x, y, z))

  def tibia_box(self, box):
    """The axis-aligned model-frame box ((lo xyz), (hi xyz), mm) holding `box`, a box of the
    extended knee, moved with the tibia (`box` itself when the knee is extended)."""
    if self.flex is None:
      return box
    lo, hi = np.asarray(box[0], np.float64), np.asarray(box[1], np.float64)
    corners = np.array([[(lo, hi)[k >> i & 1][i] for i in range(3)] for k in range(8)])
    moved = np.stack(self.from_tibia(*corners.T), 1)
    return (tuple(moved.min(0)), tuple(moved.max(0)))

  def tibia_point(self, point_base):
    """A base-size point of the extended tibia (a tendon's insertion), moved with the tibia,
    in base units (the point itself when the knee is extended)."""
    if self.flex is None:
      return point_base
    p = np.asarray(point_base, np.float64) * self.s
    return tuple(float(v) / self.s for v in self.from_tibia(*p))

  def _fit_flexion(self) -> None:
    """Flexes the knee: turns the tibia by flexion_deg about the mediolateral axis through the
    condyles' centre (the mean of the two condyle ellipsoids' centres, fitted in extension),
    its shaft swinging posteriorly, then slides it along its own long axis until the cartilage
    surfaces clear each other by the joint gap again. The condyles are ellipsoids, longer
    front to back than high, not circles about that axis, so the turn alone would overlap the
    cartilages (by 0.1-3.5 mm at 20-35 degrees on seeds 0, 2 and 7)."""
    s = self.s
    lat, med = self.cond['lateral']['c'], self.cond['medial']['c']
    pivot = np.array([0.0, 0.5 * (lat[1] + med[1]), 0.5 * (lat[2] + med[2])]) * s
    # rotation(rx) turns +z towards +y: a negative angle swings the shaft (-z) posteriorly.
    rot = sdf.rotation(rx_deg=-float(self.a.flexion_deg))
    slide = 0.0  # mm along the tibia's own +z
    for _ in range(4):
      self.flex = (rot, pivot + rot @ (np.array([0.0, 0.0, slide]) - pivot))
      need = self._flexed_overlap(float(self.a.joint_gap_mm))
      if abs(need) < 0.02:
        break
      slide -= need

  def _flexed_overlap(self, gap: float) -> float:
    """How far (mm, along the tibia's long axis) the flexed tibia's cartilage comes closer to
    the femur's than the joint gap over both plateaus (negative: farther). Measured like
    `_fit_joint`, with rays along the tibia's own vertical."""
    up = np.array([0.0, 0.0, 1.0])

    def femur_seen(x, y, z):  # the femur's SDF at points of the tibia's frame
      return self.femur(*self.from_tibia(x, y, z))

    need = -np.inf
    for xc, yc in ((20.0, -4.0), (-20.0, -3.0)):
      xs, ys = np.meshgrid(np.linspace(xc - 11, xc + 11, 16), np.linspace(yc - 16, yc + 14, 21))
      xs, ys = xs.ravel() * self.s, ys.ravel() * self.s
      ups = np.tile(up, (xs.size, 1))
      lo_f, lo_t = -8.0 * self.s, 12.0 * self.s
      start_f = np.stack([xs, ys, np.full_like(xs, lo_f)], 1)
      zf = lo_f + sdf.ray_entry(femur_seen, start_f, ups, 40.0 * self.s, step=0.4)
      start_t = np.stack([xs, ys, np.full_like(xs, lo_t)], 1)
      zt = lo_t - sdf.ray_entry(self._tibia_rest, start_t, -ups, 25.0 * self.s, step=0.4)
      ok = np.isfinite(zf) & np.isfinite(zt)
      tf = self.femoral_thickness(*self.femoral_params(*self.from_tibia(xs, ys, zf)))
      tt = self.tibial_thickness(xs, ys)
      lack = (tf + tt + gap) - (zf - zt)
      need = max(need, float(np.max(np.where(ok & (tf + tt > 0), lack, -np.inf))))
    if not np.isfinite(need):
      raise RuntimeError('knee phantom: no tibiofemoral contact found in flexion')
    return need
