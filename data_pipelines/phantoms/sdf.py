"""Signed distance functions (SDFs) in mm for building anatomy in a continuous model space.

Every function takes coordinate arrays `x, y, z` (any broadcastable shapes, float32 or float64,
in mm) and returns the signed distance in mm: negative inside, positive outside. Several are the
usual first-order approximations (ellipsoids, tapered shapes, smooth unions): they are exact on
the surface and accurate to a few percent within a few mm of it, which is all that partial
volume and cartilage shells need. Anything that must be exact far from a surface (cartilage
thickness) is measured along the surface normal instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Array = np.ndarray
Vec3 = Sequence[float]


def rotation(rx_deg: float = 0.0, ry_deg: float = 0.0, rz_deg: float = 0.0) -> Array:
  """Rotation matrix R = Rz @ Ry @ Rx (angles in degrees, right-handed), float64 [3, 3]."""
  ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def to_local(
  x: Array, y: Array, z: Array, center: Vec3, rot: Array | None = None
) -> tuple[Array, Array, Array]:
  """Coordinates relative to `center` in a frame whose axes are the columns of `rot`."""
  dx, dy, dz = x - np.float32(center[0]), y - np.float32(center[1]), z - np.float32(center[2])
  if rot is None:
    return dx, dy, dz
  r = np.asarray(rot, np.float32)
  return (
    r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
    r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
    r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz,
  )


def ellipsoid(
  x: Array, y: Array, z: Array, center: Vec3, radii: Vec3, rot: Array | None = None
) -> Array:
  """Ellipsoid with semi-axes `radii` (mm) along the columns of `rot`.

  Uses d = k0 (k0 - 1) / k1 with k0 = |q / r|, k1 = |q / r^2|: exact on the surface, with the
  right gradient there, and a lower bound on the distance elsewhere.
  """
  lx, ly, lz = to_local(x, y, z, center, rot)
  a, b, c = (np.float32(v) for v in radii)
  k0 = np.sqrt((lx / a) ** 2 + (ly / b) ** 2 + (lz / c) ** 2)
  k1 = np.sqrt((lx / (a * a)) ** 2 + (ly / (b * b)) ** 2 + (lz / (c * c)) ** 2)
  return (k0 - 1) * _bound_ratio(k0, k1, min(a, b, c))


def _bound_ratio(k0: Array, k1: Array, min_radius: float) -> Array:
  """k0 / k1 of the ellipse/ellipsoid bound, which lies between the smallest and largest
  semi-axis; at the very centre (0 / 0) the smallest semi-axis, so d = -min radius there."""
  tiny = np.float32(1e-6)
  return np.where(k1 > tiny, k0 / np.maximum(k1, tiny), np.float32(min_radius))


def sphere(x: Array, y: Array, z: Array, center: Vec3, radius: float) -> Array:
  """Exact sphere."""
  lx, ly, lz = to_local(x, y, z, center)
  return np.sqrt(lx * lx + ly * ly + lz * lz) - np.float32(radius)


def segment_param(x: Array, y: Array, z: Array, a: Vec3, b: Vec3) -> tuple[Array, Array]:
  """For segment a->b: (h in [0, 1] of the closest point, distance to it in mm)."""
  a = np.asarray(a, np.float32)
  ab = np.asarray(b, np.float32) - a
  px, py, pz = x - a[0], y - a[1], z - a[2]
  h = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / np.float32(ab @ ab), 0, 1)
  dx, dy, dz = px - h * ab[0], py - h * ab[1], pz - h * ab[2]
  return h, np.sqrt(dx * dx + dy * dy + dz * dz)


def tapered_capsule(x: Array, y: Array, z: Array, a: Vec3, b: Vec3, ra: float, rb: float) -> Array:
  """Capsule around segment a->b whose radius goes linearly from ra to rb (approximate SDF)."""
  h, dist = segment_param(x, y, z, a, b)
  return dist - (np.float32(ra) + h * np.float32(rb - ra))


def polyline_capsule(
  x: Array, y: Array, z: Array, points: Sequence[Vec3], radii: Sequence[float]
) -> Array:
  """Union of tapered capsules along a polyline (e.g. a curved ligament or vessel)."""
  d = None
  for i in range(len(points) - 1):
    di = tapered_capsule(x, y, z, points[i], points[i + 1], radii[i], radii[i + 1])
    d = di if d is None else np.minimum(d, di)
  return d


def flat_capsule(
  x: Array,
  y: Array,
  z: Array,
  a: Vec3,
  b: Vec3,
  half_width: float,
  half_thickness: float,
  width_axis: Vec3,
) -> Array:
  """A flat band (tendon-like) from a to b: elliptical cross-section, wide along `width_axis`.

  Approximate SDF: the cross-section ellipse is handled like `ellipsoid`'s bound.
  """
  a = np.asarray(a, np.float32)
  ab = np.asarray(b, np.float32) - a
  length = float(np.linalg.norm(ab))
  u = ab / length
  w = np.asarray(width_axis, np.float64)
  w = w - (w @ u) * u
  w = (w / np.linalg.norm(w)).astype(np.float32)
  v = np.cross(u, w).astype(np.float32)
  px, py, pz = x - a[0], y - a[1], z - a[2]
  s = np.clip(px * u[0] + py * u[1] + pz * u[2], 0, length)
  qx, qy, qz = px - s * u[0], py - s * u[1], pz - s * u[2]
  cw = qx * w[0] + qy * w[1] + qz * w[2]
  cv = qx * v[0] + qy * v[1] + qz * v[2]
  along = px * u[0] + py * u[1] + pz * u[2]
  cap = np.maximum(-along, along - np.float32(length))  # signed distance to the end planes
  hw, ht = np.float32(half_width), np.float32(half_thickness)
  k0 = np.sqrt((cw / hw) ** 2 + (cv / ht) ** 2)
  k1 = np.sqrt((cw / (hw * hw)) ** 2 + (cv / (ht * ht)) ** 2)
  cross = (k0 - 1) * _bound_ratio(k0, k1, min(hw, ht))
  corner = np.sqrt(np.maximum(cross, 0) ** 2 + np.maximum(cap, 0) ** 2)
  return np.where((cross > 0) & (cap > 0), corner, np.maximum(cross, cap))


def ellipse_2d(x: Array, y: Array, ax: Array | float, ay: Array | float) -> Array:
  """Approximate SDF of the ellipse (x/ax)^2 + (y/ay)^2 = 1 in a plane (same bound as above)."""
  ax = np.asarray(ax, np.float32)
  ay = np.asarray(ay, np.float32)
  k0 = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
  k1 = np.sqrt((x / (ax * ax)) ** 2 + (y / (ay * ay)) ** 2)
  return (k0 - 1) * _bound_ratio(k0, k1, np.minimum(ax, ay))


def elliptic_rod(
  x: Array, y: Array, z: Array, bottom: Vec3, top: Vec3, half_x: float, half_y: float
) -> Array:
  """A near-vertical rod with elliptical cross-section (half widths along x and y), its axis
  running from `bottom` to `top` (z increasing); flat ends. Cheaper than a flat capsule, for
  long bone shafts whose ends are buried in other shapes."""
  b = np.asarray(bottom, np.float32)
  t = np.asarray(top, np.float32)
  f = (z - b[2]) / (t[2] - b[2])
  cx = b[0] + f * (t[0] - b[0])
  cy = b[1] + f * (t[1] - b[1])
  side = ellipse_2d(x - cx, y - cy, half_x, half_y)
  return np.maximum(side, np.maximum(b[2] - z, z - t[2]))


def torus(
  x: Array, y: Array, z: Array, center: Vec3, axis: Vec3, major: float, minor: float
) -> Array:
  """Exact torus: circle of radius `major` about `axis` through `center`, tube radius `minor`."""
  a = np.asarray(axis, np.float64)
  a = (a / np.linalg.norm(a)).astype(np.float32)
  lx, ly, lz = to_local(x, y, z, center)
  h = lx * a[0] + ly * a[1] + lz * a[2]
  rho = np.sqrt(np.maximum(lx * lx + ly * ly + lz * lz - h * h, 0))
  return np.sqrt((rho - np.float32(major)) ** 2 + h * h) - np.float32(minor)


def half_space(x: Array, y: Array, z: Array, point: Vec3, normal: Vec3) -> Array:
  """Exact SDF of the half-space behind the plane through `point` with outward `normal`."""
  n = np.asarray(normal, np.float64)
  n = (n / np.linalg.norm(n)).astype(np.float32)
  lx, ly, lz = to_local(x, y, z, point)
  return lx * n[0] + ly * n[1] + lz * n[2]


def smooth_union(a: Array, b: Array, k: float) -> Array:
  """Polynomial smooth minimum with blend radius k mm (k = 0 is the plain union)."""
  if k <= 0:
    return np.minimum(a, b)
  k = np.float32(k)
  h = np.clip(0.5 + 0.5 * (b - a) / k, 0, 1)
  return b + (a - b) * h - k * h * (1 - h)


def smooth_subtract(a: Array, b: Array, k: float) -> Array:
  """a minus b with a blended rim of radius k mm."""
  return -smooth_union(-a, b, k)


def smooth_intersect(a: Array, b: Array, k: float) -> Array:
  """a intersected with b with a rounded edge of radius k mm."""
  return -smooth_union(-a, -b, k)


def smoothstep(e0: float, e1: float, t: Array) -> Array:
  """0 below e0, 1 above e1, C1 cubic in between (e1 < e0 gives the mirrored step)."""
  s = np.clip((t - np.float32(e0)) / np.float32(e1 - e0), 0, 1)
  return s * s * (3 - 2 * s)


def gradient(fn, x: Array, y: Array, z: Array, eps: float = 0.05) -> tuple[Array, Array, Array]:
  """Unit gradient of the scalar field `fn(x, y, z)` by central differences (step eps mm)."""
  e = np.float32(eps)
  gx = fn(x + e, y, z) - fn(x - e, y, z)
  gy = fn(x, y + e, z) - fn(x, y - e, z)
  gz = fn(x, y, z + e) - fn(x, y, z - e)
  n = np.maximum(np.sqrt(gx * gx + gy * gy + gz * gz), np.float32(1e-9))
  return gx / n, gy / n, gz / n


def ray_exit(
  fn, origins: Array, directions: Array, t_max: float, step: float = 0.25, iters: int = 16
) -> Array:
  """Distance along each ray to its outermost inside->outside crossing of fn = 0.

  origins, directions: [N, 3] (directions unit length). Samples every `step` mm up to t_max,
  takes the last sample that is inside and bisects to the crossing after it. Returns [N]
  distances, NaN where the ray never is inside.
  """
  origins = np.asarray(origins, np.float64)
  directions = np.asarray(directions, np.float64)
  ts = np.arange(0.0, t_max + step, step)
  pts = origins[:, None, :] + ts[None, :, None] * directions[:, None, :]
  vals = fn(pts[..., 0], pts[..., 1], pts[..., 2])
  inside = vals < 0
  any_inside = inside.any(axis=1)
  last = np.where(any_inside, inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1), 0)
  lo = ts[last]
  hi = np.minimum(lo + step, ts[-1])
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    p = origins + mid[:, None] * directions
    val = fn(p[:, 0], p[:, 1], p[:, 2])
    inside_mid = val < 0
    lo = np.where(inside_mid, mid, lo)
    hi = np.where(inside_mid, hi, mid)
  out = 0.5 * (lo + hi)
  return np.where(any_inside & (last < len(ts) - 1), out, np.nan)


def ray_entry(
  fn, origins: Array, directions: Array, t_max: float, step: float = 0.25, iters: int = 16
) -> Array:
  """Distance along each ray to its first outside->inside crossing of fn = 0 (NaN if none)."""
  origins = np.asarray(origins, np.float64)
  directions = np.asarray(directions, np.float64)
  ts = np.arange(0.0, t_max + step, step)
  pts = origins[:, None, :] + ts[None, :, None] * directions[:, None, :]
  vals = fn(pts[..., 0], pts[..., 1], pts[..., 2])
  inside = vals < 0
  hit = inside.any(axis=1)
  first = np.argmax(inside, axis=1)
  hi = ts[first]
  lo = np.maximum(hi - step, 0.0)
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    p = origins + mid[:, None] * directions
    inside_mid = fn(p[:, 0], p[:, 1], p[:, 2]) < 0
    hi = np.where(inside_mid, mid, hi)
    lo = np.where(inside_mid, lo, mid)
  return np.where(hit & (first > 0), 0.5 * (lo + hi), np.nan)
