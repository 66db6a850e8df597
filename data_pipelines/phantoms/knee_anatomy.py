"""The knee phantom's anatomy: the parameters of one knee (`KneeAnatomy`, drawn by
`sample_anatomy`, or set by a shape family of knee_shapes.py) and its geometry (`KneeModel`: the
bones, their cartilage shells and the thickness fields, as signed distance functions). Over 500
lines because `KneeModel` is one class of about 400: every bone's and cartilage's distance
function reads the same derived parameters, which a split would scatter. The flexed tibia's
frame is apart, in knee_flexion.py.

Model frame (mm): x lateral (towards the fibula), y anterior, z superior; origin at the centre
of the tibiofemoral joint line. A left knee is the mirror image, done by the model -> world
transform. Anatomy is built from signed distance functions at a base size and scaled by
`scale`; cartilage thickness is not scaled (it is given in mm by its thickness fields).

Cartilage is the shell 0 < d_bone(p) <= t(params(foot(p))), where foot(p) = p - d n is the
closest point on the bone surface and t a smooth thickness field over surface parameters:
femur (theta, x) with theta the angle about a mediolateral axis through the condyles (0 distal,
positive anterior, in degrees) and x the model mediolateral coordinate; tibia (x, y).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from data_pipelines.phantoms import knee_flexion, knee_regions, knee_shapes, sdf

Array = np.ndarray

ANATOMY_OPTIONS = (
  'side',
  'scale',
  'effusion_ml',
  'oa_thinning',
  'num_defects',
  'joint_gap_mm',
  'pose',
) + knee_shapes.SHAPE_OPTIONS


@dataclasses.dataclass
class KneeAnatomy:
  """Per-seed anatomy parameters (base-size units are mm at scale 1)."""

  side: str
  scale: float
  pose_deg: tuple[float, float, float]
  pose_shift_mm: tuple[float, float, float]
  joint_gap_mm: float
  oa_thinning: float
  lateral_oa: float
  defects: list[dict[str, float]]
  effusion_ml: float
  femur_jitter: Array  # [8] relative size jitters
  tibial_slope_deg: float
  femoral_modes: Array  # [K, 4]: amplitude, f_theta, f_x, phase
  tibial_modes: Array  # [K, 4]
  patellar_modes: Array  # [K, 4]
  pocket_wobble: Array  # [3, 6] wobble phases per pocket
  effusion_split: Array  # [3] fraction per pocket
  # Shape beyond the default family's draws (knee_shapes.py); these defaults are its shape.
  notch_half_width_mm: float = knee_shapes.DEFAULT_NOTCH_HALF_WIDTH_MM
  condyle_scale: dict[str, tuple[float, float, float]] | None = None
  plateau_tilt_deg: float = 0.0
  flexion_deg: float = 0.0  # knee flexion (deg); 0 = the extended knee
  shape_family: str = 'default'
  shaped: bool = False  # True when a family or a shape option set any of the above


def sample_anatomy(rng: np.random.Generator, **options: Any) -> KneeAnatomy:
  """Draws the anatomy for one knee; `options` override single fields (see ANATOMY_OPTIONS)."""
  unknown = sorted(set(options) - set(ANATOMY_OPTIONS))
  if unknown:
    raise ValueError(
      f'generate_knee: unknown anatomy option(s) {unknown}; '
      f'expected some of {list(ANATOMY_OPTIONS)}'
    )
  side = 'right' if rng.random() < 0.8 else 'left'
  scale = float(rng.uniform(0.9, 1.1))
  pose = tuple(float(v) for v in rng.uniform(-6, 6, 3) * np.array([1.0, 0.6, 1.0]))
  shift = tuple(float(v) for v in rng.uniform(-4, 4, 3))
  gap = float(rng.uniform(0.25, 0.7))
  oa = float(rng.choice([0.0, 0.0, rng.uniform(0.1, 0.5), rng.uniform(0.4, 0.85)]))
  lateral_oa = float(rng.uniform(0, 0.5))
  n_def = int(rng.choice([0, 0, 1, 1, 2]))
  ml = float(0.3 + rng.exponential(1.0) if rng.random() < 0.3 else rng.lognormal(np.log(7.0), 0.6))
  anatomy = KneeAnatomy(
    side=side,
    scale=scale,
    pose_deg=pose,
    pose_shift_mm=shift,
    joint_gap_mm=gap,
    oa_thinning=oa,
    lateral_oa=lateral_oa,
    defects=[],
    effusion_ml=min(ml, 30.0),
    femur_jitter=rng.normal(0, 0.04, 8),
    tibial_slope_deg=float(rng.uniform(3, 10)),
    femoral_modes=_modes(rng, 7, 0.16),
    tibial_modes=_modes(rng, 5, 0.14),
    patellar_modes=_modes(rng, 4, 0.12),
    pocket_wobble=rng.uniform(0, 2 * np.pi, (3, 6)),
    effusion_split=rng.dirichlet([7.0, 1.5, 1.5]),
  )
  for key, value in options.items():
    if key == 'num_defects':
      n_def = int(value)
      if n_def < 0:
        raise ValueError(f'generate_knee: num_defects={value}; expected >= 0')
    elif key == 'pose':
      if not value:
        anatomy.pose_deg, anatomy.pose_shift_mm = (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)
    elif key in knee_shapes.SHAPE_OPTIONS:
      setattr(anatomy, key, knee_shapes.check_option(key, value))
      anatomy.shaped = True
    else:
      setattr(anatomy, key, value)
  if anatomy.side not in ('right', 'left'):
    raise ValueError(f"generate_knee: side={anatomy.side!r}; expected 'right' or 'left'")
  if not 0.7 <= float(anatomy.scale) <= 1.3:
    raise ValueError(f'generate_knee: scale={anatomy.scale}; expected within [0.7, 1.3]')
  if not 0 <= float(anatomy.oa_thinning) <= 1:
    raise ValueError(f'generate_knee: oa_thinning={anatomy.oa_thinning}; expected in [0, 1]')
  if float(anatomy.effusion_ml) < 0:
    raise ValueError(f'generate_knee: effusion_ml={anatomy.effusion_ml}; expected >= 0')
  if float(anatomy.joint_gap_mm) < 0:
    raise ValueError(f'generate_knee: joint_gap_mm={anatomy.joint_gap_mm}; expected >= 0')
  for _ in range(n_def):
    plate = 'femur' if rng.random() < 0.65 else 'tibia'
    medial = rng.random() < 0.7
    anatomy.defects.append(
      dict(
        plate=plate,
        medial=medial,
        radius_mm=float(rng.uniform(2.5, 6.0)),
        depth=float(rng.uniform(0.5, 1.0)),
        u=float(rng.uniform(-1, 1)),
        v=float(rng.uniform(-1, 1)),
      )
    )
  return anatomy


def _modes(rng: np.random.Generator, k: int, amplitude: float) -> Array:
  """Random low-frequency cosine modes [k, 4]: amplitude, two frequencies, phase."""
  return np.stack(
    [
      rng.normal(0, amplitude, k),
      rng.integers(0, 4, k).astype(float),
      rng.integers(0, 3, k).astype(float),
      rng.uniform(0, 2 * np.pi, k),
    ],
    axis=1,
  )


def _mode_sum(modes: Array, u: Array, v: Array) -> Array:
  """Sum of a_k cos(2 pi (fu_k u + fv_k v) + phase_k) for u, v in [0, 1]."""
  out = np.zeros(np.broadcast(u, v).shape, np.float32)
  for a, fu, fv, ph in modes:
    out += np.float32(a) * np.cos(
      np.float32(2 * np.pi) * (np.float32(fu) * u + np.float32(fv) * v) + np.float32(ph)
    )
  return out


class KneeModel(knee_flexion.TibiaFlexion):
  """Continuous anatomy of one knee: SDFs and cartilage fields in the model frame (mm)."""

  def __init__(self, anatomy: KneeAnatomy):
    self.a = anatomy
    self.s = float(anatomy.scale)
    # A follow-up's thinning: plate -> knee_regions.ThinningZone (None: none). Set after the
    # joint is fitted, so thinned cartilage leaves the bones where they were.
    self.thinning: dict[str, knee_regions.ThinningZone] | None = None
    j = anatomy.femur_jitter
    # Base-size femur pieces: condyle centres and semi-axes; the condyle heights are set by
    # `_fit_joint` so that the cartilage surfaces clear each other by the joint gap.
    self.cond = {
      'lateral': dict(c=np.array([20.0, -6.0, 22.0]), r=np.array([13.0, 27.0, 20.0]) * (1 + j[:3])),
      'medial': dict(
        c=np.array([-21.0, -7.0, 21.0]), r=np.array([14.0, 29.5, 21.0]) * (1 + j[3:6])
      ),
    }
    # Half-widths (base mm about each condyle's centre) where its cartilage cover ends.
    self.cover = {'lateral': (11.5, 8.5), 'medial': (12.5, 9.5)}
    if anatomy.condyle_scale is not None:
      for name, factors in anatomy.condyle_scale.items():
        self.cond[name]['r'] = self.cond[name]['r'] * np.asarray(factors, np.float64)
        self.cover[name] = tuple(w * float(factors[0]) for w in self.cover[name])
    self.notch_half = float(anatomy.notch_half_width_mm)
    # Base mm added to the boxes the joint's layers are rendered in: a shaped knee's tilted
    # plateau and larger condyles reach past the default family's boxes.
    self.box_margin = 4.0 if anatomy.shaped else 0.0
    self.axis_yz = np.array([-6.0, 22.0])  # femoral theta axis (y, z), base units
    self.tib_top = -2.4
    self.patella_c = np.array([3.0, 36.0, 30.0])
    self.patella_r = np.array([22.0, 12.0, 20.0]) * (1 + j[6])
    # The flexed tibia's pose: (R [3, 3], o [3] mm) with p_model = R q + o for a point q of
    # the tibia's own (extended) frame; None for the extended knee, so that its arithmetic is
    # untouched. The joint is fitted in extension, then flexed (`_fit_flexion`).
    self.flex: tuple[Array, Array] | None = None
    self._fit_joint()
    if float(anatomy.flexion_deg):
      self._fit_flexion()

  # ---- bones (all return SDF in model mm) ---------------------------------------------------

  def femur(self, x: Array, y: Array, z: Array) -> Array:
    s = np.float32(self.s)
    return s * self._femur_base(x / s, y / s, z / s)

  def _femur_base(self, x: Array, y: Array, z: Array) -> Array:
    lat, med = self.cond['lateral'], self.cond['medial']
    d = sdf.smooth_union(
      sdf.ellipsoid(x, y, z, lat['c'], lat['r']), sdf.ellipsoid(x, y, z, med['c'], med['r']), 3.0
    )
    # Anterior block carrying the trochlea, then the metaphysis and the shaft, which sit
    # anterior to the condyles: the posterior condyles bulge behind the shaft.
    front = sdf.ellipsoid(x, y, z, (2.0, 7.0, 28.0), (31.0, 17.0, 21.0))
    d = sdf.smooth_union(d, front, 4.0)
    meta = sdf.ellipsoid(x, y, z, (0.0, 2.0, 46.0), (33.0, 18.0, 26.0))
    d = sdf.smooth_union(d, meta, 6.0)
    shaft = sdf.elliptic_rod(x, y, z, (0.0, 4.0, 50.0), (0.0, 7.0, 260.0), 16.0, 13.5)
    d = sdf.smooth_union(d, shaft, 12.0)
    epi = np.minimum(
      sdf.ellipsoid(x, y, z, (33.0, -6.0, 27.0), (7.0, 12.0, 11.0)),
      sdf.ellipsoid(x, y, z, (-35.0, -6.0, 29.0), (8.0, 13.0, 12.0)),
    )
    d = sdf.smooth_union(d, epi, 5.0)
    # Intercondylar notch: a wedge under Blumensaat's line, open posteriorly and distally.
    roof = (z - (8.0 + 0.5 * (8.0 - y))) / np.float32(math.sqrt(1.25))
    notch = np.maximum(np.abs(x + 1.0) - self.notch_half, roof)
    d = sdf.smooth_subtract(d, notch, 2.5)
    # Trochlear groove: a cylinder along the anterior femur, slightly lateral.
    axis = np.array([0.0, 0.22, 1.0])
    axis /= np.linalg.norm(axis)
    centre = np.array([2.5, 30.0, 28.0])
    _, dist = sdf.segment_param(x, y, z, centre - 60 * axis, centre + 60 * axis)
    return sdf.smooth_subtract(d, dist - 10.0, 4.0)

  def tibia(self, x: Array, y: Array, z: Array) -> Array:
    """The tibia's SDF (mm) at model-frame points, flexed with the knee."""
    return self._tibia_rest(*self.to_tibia(x, y, z))

  def _tibia_rest(self, x: Array, y: Array, z: Array) -> Array:
    """The tibia's SDF (mm) in its own frame (the extended knee's)."""
    s = np.float32(self.s)
    return s * self._tibia_base(x / s, y / s, z / s)

  def tibial_top(self, x: Array, y: Array) -> tuple[Array, Array, Array]:
    """Base-size plateau height z(x, y) and its partial derivatives."""
    slope = np.float32(math.tan(math.radians(self.a.tibial_slope_deg)))
    z = np.float32(self.tib_top) + slope * y
    dzx = np.zeros_like(x + y)
    dzy = slope + dzx
    if self.a.plateau_tilt_deg:  # varus > 0: the medial (x < 0) side lower
      tilt = np.float32(math.tan(math.radians(self.a.plateau_tilt_deg)))
      z = z + tilt * x
      dzx = dzx + tilt
    # Medial plateau concave (a shallow bowl), lateral convex front to back.
    terms = [
      (-1.6, -20.0, -3.0, 13.0, 17.0),
      (0.9, 20.0, -4.0, 40.0, 15.0),
      (5.5, -4.0, -1.0, 4.5, 8.0),
      (4.5, 4.5, -2.0, 4.5, 7.0),
    ]  # eminence spines last
    for amp, x0, y0, sx, sy in terms:
      ux, uy = (x - np.float32(x0)) / np.float32(sx), (y - np.float32(y0)) / np.float32(sy)
      g = np.float32(amp) * np.exp(-ux * ux - uy * uy)
      z = z + g
      dzx = dzx - 2 * ux / np.float32(sx) * g
      dzy = dzy - 2 * uy / np.float32(sy) * g
    return z, dzx, dzy

  def _tibia_base(self, x: Array, y: Array, z: Array) -> Array:
    top, dzx, dzy = self.tibial_top(x, y)
    above = (z - top) / np.sqrt(1 + dzx * dzx + dzy * dzy)
    # The epiphysis narrows into the shaft along a concave (waisted) profile.
    depth = np.maximum(-z - 3.0, 0) / 22.0
    flare = 0.6 + 0.4 * np.exp(-depth * np.sqrt(depth + 0.01))
    outline = sdf.ellipse_2d(x, y + 2.0, 38.0 * flare, 24.0 * flare) * np.float32(0.85)
    outline = sdf.smooth_subtract(outline, np.sqrt(x * x + (y + 27.0) ** 2) - 8.0, 3.0)
    body = sdf.smooth_intersect(above, outline, 2.5)
    shaft = sdf.elliptic_rod(x, y, z, (0.0, 3.0, -260.0), (0.0, 0.0, -25.0), 18.0, 14.0)
    d = sdf.smooth_union(body, shaft, 8.0)
    tub = sdf.ellipsoid(x, y, z, (4.0, 18.0, -29.0), (11.0, 8.0, 14.0))
    return sdf.smooth_union(d, tub, 6.0)

  def patella(self, x: Array, y: Array, z: Array) -> Array:
    s = np.float32(self.s)
    xb, yb, zb = x / s, y / s, z / s
    c = self.patella_c
    d = sdf.ellipsoid(xb, yb, zb, c, self.patella_r, sdf.rotation(rx_deg=-8.0))
    # Posterior surface: a ridge with medial and lateral facets.
    ridge = (c[1] - 9.0 + 0.38 * np.abs(xb - c[0] + 2.0) - yb) / np.float32(math.sqrt(1.1444))
    return s * sdf.smooth_intersect(d, ridge, 3.0)

  def fibula(self, x: Array, y: Array, z: Array) -> Array:
    x, y, z = self.to_tibia(x, y, z)  # the fibula moves with the tibia
    s = np.float32(self.s)
    xb, yb, zb = x / s, y / s, z / s
    head = sdf.ellipsoid(xb, yb, zb, (37.0, -17.0, -20.0), (10.0, 10.0, 11.0))
    shaft = sdf.tapered_capsule(xb, yb, zb, (38.0, -17.0, -25.0), (41.0, -15.0, -260.0), 7.0, 6.0)
    return s * sdf.smooth_union(head, shaft, 5.0)

  # ---- cartilage ------------------------------------------------------------------------------

  def femoral_params(self, fx: Array, fy: Array, fz: Array) -> tuple[Array, Array]:
    """(theta in degrees, x in mm) of femoral surface points."""
    y0, z0 = self.axis_yz * self.s
    theta = np.degrees(np.arctan2(fy - np.float32(y0), -(fz - np.float32(z0))))
    return theta.astype(np.float32), fx

  def femoral_thickness(self, theta: Array, x: Array) -> Array:
    """Cartilage thickness (mm) at femoral surface parameters (theta deg, x mm); 0 outside."""
    xb = x / np.float32(self.s)
    lat_c, med_c = self.cond['lateral']['c'][0], self.cond['medial']['c'][0]
    w_lat = (
      sdf.smoothstep(*self.cover['lateral'], np.abs(xb - lat_c))
      * sdf.smoothstep(-127.0, -113.0, theta)
      * sdf.smoothstep(80.0, 62.0, theta)
    )
    w_med = (
      sdf.smoothstep(*self.cover['medial'], np.abs(xb - med_c))
      * sdf.smoothstep(-129.0, -115.0, theta)
      * sdf.smoothstep(80.0, 62.0, theta)
    )
    top = 140.0 + 9.0 * np.clip(xb / 25.0, -1, 1)
    w_tro = (
      sdf.smoothstep(-25.0, -21.0, xb)
      * sdf.smoothstep(29.0, 25.0, xb)
      * sdf.smoothstep(38.0, 52.0, theta)
      * sdf.smoothstep(top + 7.0, top - 7.0, theta)
    )
    weight = np.maximum(np.maximum(w_lat, w_med), w_tro)
    base = (
      1.95
      + 0.55 * np.exp(-(((theta - 5.0) / 35.0) ** 2))
      + 0.75 * np.exp(-(((theta - 100.0) / 28.0) ** 2))
      - 0.3 * sdf.smoothstep(-60.0, -115.0, theta)
    )
    u = (theta + 130.0) / 280.0
    v = (xb + 36.0) / 72.0
    t = np.clip(base * (1 + _mode_sum(self.a.femoral_modes, u, v)), 1.0, 3.5)
    t = t * self._oa_factor('femur', theta, xb)
    return (t * weight).astype(np.float32)

  def tibial_thickness(self, x: Array, y: Array) -> Array:
    """Tibial cartilage thickness (mm) at plateau positions (x, y mm of the surface point)."""
    xb, yb = x / np.float32(self.s), y / np.float32(self.s)
    r_med = np.sqrt(((xb + 20.0) / 13.5) ** 2 + ((yb + 3.0) / 19.0) ** 2)
    r_lat = np.sqrt(((xb - 20.0) / 12.5) ** 2 + ((yb + 4.0) / 16.5) ** 2)
    w_med = sdf.smoothstep(1.1, 0.9, r_med)
    w_lat = sdf.smoothstep(1.1, 0.9, r_lat)
    # Thickest in the centre of each plateau, thinner under the menisci at the rim.
    r = np.minimum(r_med, r_lat)
    base = np.where(xb < 0, 2.1, 2.7) * (1 - 0.45 * sdf.smoothstep(0.45, 0.9, r))
    u = (xb + 36.0) / 72.0
    v = (yb + 25.0) / 50.0
    t = np.clip(base * (1 + _mode_sum(self.a.tibial_modes, u, v)), 1.0, 3.5)
    t = t * self._oa_factor('tibia', xb, yb)
    return (t * np.maximum(w_med, w_lat)).astype(np.float32)

  def _oa_factor(self, plate: str, u: Array, v: Array) -> Array:
    """Multiplicative OA thinning (weight-bearing zones) and focal defects, in [0, 1].

    Femur: u = theta (deg), v = x (base mm); tibia: u = x, v = y (base mm).
    """
    a = self.a
    lat_x, med_x = self.cond['lateral']['c'][0], self.cond['medial']['c'][0]
    if plate == 'femur':
      arc = 25.0  # mm of surface per radian of theta near the weight-bearing zone

      def zone(cx):
        return np.exp(-(((u - 8.0) / 30.0) ** 2) - ((v - cx) / 8.0) ** 2)
    else:
      arc = 1.0

      def zone(cx):
        return np.exp(-(((u - cx) / 8.0) ** 2) - ((v + 3.0) / 11.0) ** 2)

    f = 1 - np.float32(a.oa_thinning) * (zone(med_x) + np.float32(a.lateral_oa) * zone(lat_x))
    f = np.clip(f, 0, 1)
    for dfc in a.defects:
      if dfc['plate'] != plate:
        continue
      cx = med_x if dfc['medial'] else lat_x
      if plate == 'femur':
        du = np.radians(u - (8.0 + 28.0 * dfc['u'])) * arc
        dv = v - (cx + 5.0 * dfc['v'])
      else:
        du = u - (cx + 5.0 * dfc['u'])
        dv = v - (-3.0 + 7.0 * dfc['v'])
      dist = np.sqrt(du * du + dv * dv) * np.float32(self.s)
      r = dfc['radius_mm']
      f = f * (1 - np.float32(dfc['depth']) * sdf.smoothstep(r + 0.5, r - 0.5, dist))
    return f.astype(np.float32)

  def patellar_thickness(self, x: Array, z: Array) -> Array:
    """Patellar cartilage thickness (mm, 2 to 4.5) at surface positions (x, z mm)."""
    xb, zb = x / np.float32(self.s), z / np.float32(self.s)
    u = (xb - self.patella_c[0] + 22.0) / 44.0
    v = (zb - self.patella_c[2] + 20.0) / 40.0
    return np.clip(3.2 * (1 + _mode_sum(self.a.patellar_modes, u, v)), 2.0, 4.5).astype(np.float32)

  def shell(
    self, plate: str, x: Array, y: Array, z: Array, d: Array | None = None, band: float = 4.2
  ) -> tuple[Array, Array]:
    """Distance to the bone d and cartilage thickness t at the foot point, for points p.

    Returns (d, t) with t = 0 where p is farther than `band` mm from the bone or off the
    articular surface. p belongs to the cartilage where 0 < d <= t. Within the band, d is the
    Euclidean distance to the foot point, found by projecting along the gradient until the
    bone's (approximate) SDF vanishes there; so thickness is exact along the surface normal.
    """
    bone = {'femur': self.femur, 'tibia': self._tibia_rest, 'patella': self.patella}[plate]
    if plate == 'tibia':
      # In the tibia's own frame, where its thickness field and 'upward' plateau are defined;
      # d (a distance) is the same in either frame.
      x, y, z = self.to_tibia(x, y, z)
    if d is None:
      d = bone(x, y, z)
    x, y, z = (np.broadcast_to(c, d.shape) for c in (x, y, z))
    t = np.zeros(d.shape, np.float32)
    near = (d > -band) & (d < band)
    if not near.any():
      return d, t
    px, py, pz, pd = x[near], y[near], z[near], d[near]
    nx, ny, nz = sdf.gradient(bone, px, py, pz)
    fx, fy, fz = px - pd * nx, py - pd * ny, pz - pd * nz
    for _ in range(2):
      r = bone(fx, fy, fz)
      fx, fy, fz = fx - r * nx, fy - r * ny, fz - r * nz
    d = d.copy()
    d[near] = np.sign(pd) * np.sqrt((px - fx) ** 2 + (py - fy) ** 2 + (pz - fz) ** 2)
    if plate == 'femur':
      theta, fx = self.femoral_params(fx, fy, fz)
      t[near] = self.thinned('femur', self.femoral_thickness(theta, fx), theta, fx)
    elif plate == 'tibia':
      # Only the upward-facing plateau is articular.
      t[near] = self.thinned(
        'tibia', self.tibial_thickness(fx, fy) * sdf.smoothstep(0.55, 0.75, nz), fx, fy
      )
    else:
      t[near] = self.patellar_thickness(fx, fz) * sdf.smoothstep(-0.35, -0.6, ny)
    return d, t

  def thinned(self, plate: str, t: Array, u: Array, v: Array) -> Array:
    """Thickness t at surface parameters (u, v) (femur theta deg, x mm; tibia x, y mm) less a
    follow-up's thinning there (knee_regions.thin); t itself when there is none."""
    if not self.thinning or plate not in self.thinning:
      return t
    return knee_regions.thin(t, self.thinning[plate].amount_at(u, v))

  def cartilage_inside(self, plate: str, x: Array, y: Array, z: Array) -> Array:
    """Boolean: is each point inside that plate's cartilage shell (continuous definition)."""
    d, t = self.shell(plate, x, y, z)
    return (d > 0) & (d <= t)

  # ---- fitting the joint ----------------------------------------------------------------------

  def _fit_joint(self) -> None:
    """Sets each condyle's height so the femoral and tibial cartilage surfaces clear each other
    by the joint gap, then the patella's depth likewise against the trochlea."""
    gap = float(self.a.joint_gap_mm)
    for name, (xc, yc) in (('lateral', (20.0, -4.0)), ('medial', (-20.0, -3.0))):
      for _ in range(2):
        xs, ys = np.meshgrid(np.linspace(xc - 11, xc + 11, 16), np.linspace(yc - 16, yc + 14, 21))
        xs, ys = xs.ravel() * self.s, ys.ravel() * self.s
        up = np.stack([np.zeros_like(xs), np.zeros_like(xs), np.ones_like(xs)], 1)
        lo_f, lo_t = -8.0 * self.s, 12.0 * self.s
        start_f = np.stack([xs, ys, np.full_like(xs, lo_f)], 1)
        zf = lo_f + sdf.ray_entry(self.femur, start_f, up, 40.0 * self.s, step=0.4)
        start_t = np.stack([xs, ys, np.full_like(xs, lo_t)], 1)
        zt = lo_t - sdf.ray_entry(self.tibia, start_t, -up, 25.0 * self.s, step=0.4)
        ok = np.isfinite(zf) & np.isfinite(zt)
        tf = self.femoral_thickness(*self.femoral_params(xs, ys, zf))
        tt = self.tibial_thickness(xs, ys)
        need = (tf + tt + gap) - (zf - zt)
        shift = float(np.max(np.where(ok & (tf + tt > 0), need, -np.inf)))
        if not np.isfinite(shift):
          raise RuntimeError(f'knee phantom: no {name} tibiofemoral contact found')
        self.cond[name]['c'][2] += shift / self.s
        if abs(shift) < 0.02:
          break
    for _ in range(2):
      xs, zs = np.meshgrid(np.linspace(-15, 20, 18), np.linspace(18, 42, 18))
      xs, zs = xs.ravel() * self.s, zs.ravel() * self.s
      back = np.stack([np.zeros_like(xs), -np.ones_like(xs), np.zeros_like(xs)], 1)
      front_p = (self.patella_c[1] + self.patella_r[1] + 3.0) * self.s
      start = np.stack([xs, np.full_like(xs, front_p), zs], 1)
      yp = front_p - sdf.ray_entry(
        self.patella, start, back, 2.5 * self.patella_r[1] * self.s, step=0.4
      )
      yp_back = yp - sdf.ray_exit(
        self.patella,
        np.stack([xs, yp - 0.01, zs], 1),
        back,
        2.5 * self.patella_r[1] * self.s,
        step=0.4,
      )
      front_f = 40.0 * self.s
      start = np.stack([xs, np.full_like(xs, front_f), zs], 1)
      yf = front_f - sdf.ray_entry(self.femur, start, back, 40.0 * self.s, step=0.4)
      ok = np.isfinite(yp_back) & np.isfinite(yf)
      tf = self.femoral_thickness(*self.femoral_params(xs, yf, zs))
      tp = self.patellar_thickness(xs, zs)
      need = (tf + tp + gap) - (yp_back - yf)
      shift = float(np.max(np.where(ok, need, -np.inf)))
      if not np.isfinite(shift):
        raise RuntimeError('knee phantom: no patellofemoral contact found')
      self.patella_c[1] += shift / self.s
      if abs(shift) < 0.02:
        break

  def femur_wall(self, xb: float, zb: float, anterior: bool) -> float:
    """Base-size y of the anterior (or posterior) femoral surface at base (x, z)."""
    sign = 1.0 if anterior else -1.0
    start = np.array([[xb * self.s, sign * 80.0 * self.s, zb * self.s]])
    hit = sdf.ray_entry(self.femur, start, np.array([[0.0, -sign, 0.0]]), 80.0 * self.s)
    if not np.isfinite(hit[0]):
      raise RuntimeError(f'knee phantom: no femoral surface at x={xb}, z={zb}')
    return float(sign * (80.0 * self.s - hit[0]) / self.s)

  # ---- thickness truth on parameter grids ------------------------------------------------------

  def femoral_grid(
    self, step_deg: float = 5.0, step_mm: float = 2.0, ray_step: float = 0.5
  ) -> dict[str, Array]:
    """Surface points, normals and thickness on the (theta, x) grid (model frame); ray_step
    (mm): the ray march's step before bisection."""
    thetas = np.arange(-130.0, 150.0 + 1e-6, step_deg)
    xs = np.arange(-38.0, 38.0 + 1e-6, step_mm) * self.s
    th, xx = np.meshgrid(thetas, xs, indexing='ij')
    y0, z0 = self.axis_yz * self.s
    rad = np.radians(th.ravel())
    dirs = np.stack([np.zeros_like(rad), np.sin(rad), -np.cos(rad)], 1)
    origin = np.stack([xx.ravel(), np.full(rad.shape, y0), np.full(rad.shape, z0)], 1)
    r = sdf.ray_exit(self.femur, origin, dirs, 70.0 * self.s, step=ray_step)
    pts = origin + r[:, None] * dirs
    theta = th.ravel().astype(np.float32)
    thick = np.where(
      np.isfinite(r),
      self.thinned('femur', self.femoral_thickness(theta, xx.ravel()), theta, xx.ravel()),
      0.0,
    )
    return self._grid_out(pts, thick, self.femur, th.shape, theta_deg=thetas, x_mm=xs)

  def tibial_grid(self, step_mm: float = 2.0) -> dict[str, Array]:
    """Surface points, normals and thickness on the plateau's (x, y) grid (model frame)."""
    xs = np.arange(-38.0, 38.0 + 1e-6, step_mm) * self.s
    ys = np.arange(-28.0, 24.0 + 1e-6, step_mm) * self.s
    xx, yy = np.meshgrid(xs, ys, indexing='ij')
    origin = np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, 12.0 * self.s)], 1)
    down = np.tile([0.0, 0.0, -1.0], (xx.size, 1))
    r = sdf.ray_entry(self._tibia_rest, origin, down, 40.0 * self.s, step=0.4)
    pts = origin + r[:, None] * down
    nz = sdf.gradient(self._tibia_rest, *np.nan_to_num(pts).T)[2]
    thick = np.where(
      np.isfinite(r),
      self.thinned(
        'tibia',
        self.tibial_thickness(xx.ravel(), yy.ravel()) * sdf.smoothstep(0.55, 0.75, nz),
        xx.ravel(),
        yy.ravel(),
      ),
      0.0,
    )
    # Found in the tibia's own frame (vertical rays onto its plateau), reported in the model's.
    pts = np.stack(self.from_tibia(*pts.T), 1)
    return self._grid_out(pts, thick, self.tibia, xx.shape, x_mm=xs, y_mm=ys)

  @staticmethod
  def _grid_out(pts: Array, thick: Array, bone, shape, **axes) -> dict[str, Array]:
    """Packs [N, 3] surface points (NaN: no surface), their unit normals and thickness."""
    ok = np.all(np.isfinite(pts), axis=1)
    normals = np.full_like(pts, np.nan)
    if ok.any():
      normals[ok] = np.stack(sdf.gradient(bone, *pts[ok].T, eps=0.02), 1)
    thick = np.where(ok, thick, 0.0)
    out = dict(axes)
    out.update(
      points=pts.reshape(*shape, 3),
      normals=normals.reshape(*shape, 3),
      thickness=thick.reshape(shape),
    )
    return out
