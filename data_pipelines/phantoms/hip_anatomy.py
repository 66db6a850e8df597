"""The hip phantom's anatomy: each hip's parameters (`HipSide`, drawn by `sample_side`, with its
findings: effusion pockets, bone-marrow oedema, synovial thickening) and both hips' geometry in
the pelvis (`HipModel`, signed distance functions).

Model frame (mm): RAS-aligned, x towards the patient's right, y anterior, z superior; origin
midway between the femoral head centres. Each hip has a femoral head, neck, trochanters and
shaft, an acetabular cup in the pelvis with cartilage on both sides of a thin joint space, a
labrum, a fibrous capsule around the neck and, inside the capsule, 0 to 3 effusion pockets
(superior, inferior and anterior recesses). Around them: the rest of the pelvis (ilium,
ischium, pubic rami, sacrum), bladder, rectum and bowel loops, vessels and lymph nodes,
muscles, fat and skin. STIR contrast: fat and fatty marrow dark, fluid very bright.

Findings beside the effusion, where the paper's readers disagreed most: bone-marrow oedema
(an ill-defined bright region in the femoral marrow, under an effusion pocket or under the
weight-bearing dome) in some hips, and synovial thickening (an intermediate-signal lining
inside the capsule that takes the place of fluid) in others. Neither is labelled effusion.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_pipelines.phantoms import sdf

Array = np.ndarray
# Findings (per hip): probability of bone-marrow oedema with and without effusion, and of
# synovial thickening; oedema peak signal as a fraction of fluid's; synovium thickness (mm).
OEDEMA_PROBABILITY = {'effusion': 0.4, 'dry': 0.1}
OEDEMA_PEAK = (0.55, 0.8)
SYNOVITIS_PROBABILITY = 0.3
SYNOVIUM_MM = (1.0, 2.5)
SIDES = {'right': 1.0, 'left': -1.0}  # sign of x on that side


@dataclasses.dataclass
class HipSide:
  """Geometry of one hip (model mm)."""

  name: str
  sign: float
  head: Array  # head centre
  head_r: float
  neck: Array  # unit vector from the neck base (junction) towards the head
  junction: Array  # neck axis meets the shaft axis
  shaft_down: Array  # unit vector down the shaft
  neck_r: float
  cart_head: float
  cart_acet: float
  gap: float
  cup_axis: Array  # unit vector out of the acetabular opening
  cup_in: float
  cup_out: float
  rim_offset: float
  e_sup: Array  # unit vectors across the neck: superior and anterior
  e_ant: Array
  pockets: list[dict[str, Any]]
  cysts: list[tuple[Array, float]]
  oedema: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  synovium_mm: float = 0.0  # thickened synovial lining inside the capsule (0: none)


def _unit(v) -> Array:
  """v / |v| as float64."""
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def sample_side(
  rng: np.random.Generator,
  name: str,
  dh: float,
  effusion_ml: float,
  oedema: bool | None = None,
  synovitis: bool | None = None,
) -> HipSide:
  """Draws one hip: head `dh` mm from the midline, about `effusion_ml` of fluid in 1-3
  pockets (before the bone carves them), 0-2 subchondral cysts, and the findings: bone-marrow
  oedema and synovial thickening, each at its `*_PROBABILITY` unless `oedema` / `synovitis`
  say (the random draws are made either way, so the rest of the anatomy does not change)."""
  sign = SIDES[name]
  head = np.array([sign * dh, rng.normal(0, 1.5), rng.normal(0, 1.5)])
  head_r = float(rng.uniform(22, 26))
  alpha = np.radians(rng.uniform(122, 138))  # neck-shaft angle
  ante = np.radians(rng.uniform(5, 22))  # anteversion
  shaft_tilt = np.radians(8.0)
  shaft_down = np.array([-sign * np.sin(shaft_tilt), 0.0, -np.cos(shaft_tilt)])
  tilt = np.pi - alpha - shaft_tilt  # neck axis angle from vertical, medially
  neck = _unit([-sign * np.sin(tilt) * np.cos(ante), np.sin(tilt) * np.sin(ante), np.cos(tilt)])
  junction = head - rng.uniform(47, 55) * neck
  cart_head, cart_acet = (float(v) for v in rng.uniform(1.1, 2.0, 2))
  gap = float(rng.uniform(0.2, 0.6))
  incl, cup_ante = np.radians(rng.uniform(38, 50)), np.radians(rng.uniform(10, 22))
  cup_axis = _unit(
    [sign * np.sin(incl) * np.cos(cup_ante), np.sin(incl) * np.sin(cup_ante), -np.cos(incl)]
  )
  cup_in = head_r + cart_head + gap + cart_acet
  e_sup = _unit(np.array([0.0, 0.0, 1.0]) - neck[2] * neck)
  e_ant = np.cross(neck, e_sup)
  e_ant = e_ant if e_ant[1] > 0 else -e_ant
  side = HipSide(
    name=name,
    sign=sign,
    head=head,
    head_r=head_r,
    neck=neck,
    junction=junction,
    shaft_down=shaft_down,
    neck_r=float(rng.uniform(14, 16.5)),
    cart_head=cart_head,
    cart_acet=cart_acet,
    gap=gap,
    cup_axis=cup_axis,
    cup_in=cup_in,
    cup_out=cup_in + float(rng.uniform(7, 10)),
    rim_offset=float(-0.12 * cup_in),
    e_sup=e_sup,
    e_ant=e_ant,
    pockets=[],
    cysts=[],
  )
  if effusion_ml > 0:
    kinds = ['anterior', 'superior', 'inferior']
    chosen = [k for k in kinds if rng.random() < 0.6] or [kinds[int(rng.integers(3))]]
    split = rng.dirichlet(np.full(len(chosen), 2.0))
    for kind, frac in zip(chosen, split):
      side.pockets.append(
        dict(
          name=f'effusion_{name}_{kind}',
          kind=kind,
          target_ml=float(frac * effusion_ml),
          along=float(rng.uniform(20, 32)),
          length=float(rng.uniform(12, 19)),
          width=float(rng.uniform(10, 15)),
          wobble=rng.uniform(0, 2 * np.pi, 4),
        )
      )
  for _ in range(int(rng.choice([0, 0, 1, 2]))):
    direction = _unit(-cup_axis + rng.normal(0, 0.35, 3))
    side.cysts.append(
      (head + direction * (head_r - rng.uniform(3, 6)), float(rng.uniform(1.5, 3.5)))
    )
  p_oedema = OEDEMA_PROBABILITY['effusion' if side.pockets else 'dry']
  has_oedema = rng.random() < p_oedema if oedema is None else bool(oedema)
  lesion = _oedema_lesion(side, rng)
  if has_oedema:
    side.oedema.append(lesion)
  has_synovitis = rng.random() < SYNOVITIS_PROBABILITY if synovitis is None else bool(synovitis)
  thickness = float(rng.uniform(*SYNOVIUM_MM))
  if has_synovitis:
    side.synovium_mm = thickness
  return side


def _oedema_lesion(side: HipSide, rng: np.random.Generator) -> dict[str, Any]:
  """An ill-defined ellipsoid of oedema in the femoral marrow: under an effusion pocket when
  the hip has one (touching the cortex that the fluid touches), else under the head's
  weight-bearing dome. Centre (model mm), semi-axes (mm), rotation, peak (fraction of fluid)."""
  radii = tuple(float(r) for r in rng.uniform([7.0, 6.0, 4.0], [13.0, 10.0, 7.0]))
  peak = float(rng.uniform(*OEDEMA_PEAK))
  if side.pockets:
    p = side.pockets[int(rng.integers(len(side.pockets)))]
    normal = {'superior': side.e_sup, 'inferior': -side.e_sup, 'anterior': side.e_ant}[p['kind']]
    r_bone = _bone_radius(side, p['along'])
    # The lesion's short axis along the normal; its outer pole just under the cortex.
    centre = side.head - p['along'] * side.neck + (r_bone - 1.0 - radii[2]) * normal
    rot = np.stack([side.neck, np.cross(normal, side.neck), normal], axis=1)
    where = p['kind']
  else:
    dome = -side.cup_axis
    centre = side.head + (side.head_r - 1.0 - radii[2]) * dome
    helper = side.neck if abs(float(side.neck @ dome)) < 0.9 else np.array([0.0, 1.0, 0.0])
    first = _unit(np.cross(dome, helper))
    rot = np.stack([first, np.cross(dome, first), dome], axis=1)
    where = 'dome'
  return dict(centre=centre, radii=radii, rot=rot, peak=peak, where=where)


def _bone_radius(side: HipSide, along: float) -> float:
  """Radius of the femur (mm) `along` mm from the head centre down the neck axis: the
  tapered neck, or the head where it still bulges."""
  start = 0.3 * side.head_r
  neck_len = float(np.linalg.norm(side.head - side.junction)) - start
  r_neck = side.neck_r + 4.0 * float(np.clip((along - start) / neck_len, 0, 1))
  r_head = float(np.sqrt(max(side.head_r**2 - along**2, 0.0)))
  return max(r_neck, r_head)


def pocket_geometry(side: HipSide, p: dict[str, Any]) -> tuple[Array, Array, tuple]:
  """Centre, rotation (columns: along neck, across, thickness direction) and semi-axes."""
  vol = p['target_ml'] * 1000.0
  a, c = p['length'], p['width']
  b = float(np.clip(3 * vol / (4 * np.pi * a * c), 0.8, 10.0))
  normal = {'superior': side.e_sup, 'inferior': -side.e_sup, 'anterior': side.e_ant}[p['kind']]
  across = np.cross(normal, side.neck)
  along = p['along']
  centre = side.head - along * side.neck + (_bone_radius(side, along) + 0.6 * b) * normal
  rot = np.stack([side.neck, across, normal], axis=1)
  return centre, rot, (a, c, b)


class HipModel:
  """Continuous anatomy of both hips and the pelvis (model frame, mm)."""

  def __init__(
    self,
    rng: np.random.Generator,
    effusion_ml: tuple[float, float] | None = None,
    oedema: tuple[bool, bool] | None = None,
    synovitis: tuple[bool, bool] | None = None,
  ):
    """Draws both hips and the pelvic contents; effusion_ml (right, left) overrides the
    random per-hip effusion (mL before carving; 25 % of hips have none), oedema and
    synovitis (right, left) the random findings."""
    self.scale = float(rng.uniform(0.92, 1.08))
    dh = 90.0 * self.scale
    if effusion_ml is None:
      effusion_ml = tuple(
        0.0 if rng.random() < 0.25 else float(np.clip(rng.lognormal(np.log(5.0), 0.7), 0.3, 15.0))
        for _ in SIDES
      )
    oedema = oedema or (None, None)
    synovitis = synovitis or (None, None)
    self.sides = [
      sample_side(rng, name, dh + rng.normal(0, 1.5), ml, oe, sy)
      for name, ml, oe, sy in zip(SIDES, effusion_ml, oedema, synovitis)
    ]
    self.bladder_fill = float(rng.uniform(0.6, 1.15))
    self.subcutaneous_mm = float(rng.uniform(12, 35))
    self.loops = [
      (
        rng.uniform([-50, -35, 10], [50, 40, 165]),
        _unit(rng.normal(0, 1, 3)),
        float(rng.uniform(25, 60)),
        float(rng.uniform(9, 14)),
        float(rng.random()),
      )
      for _ in range(40)
    ]
    self.nodes = [
      (
        np.array([sign * rng.uniform(60, 85), rng.uniform(30, 45), rng.uniform(-55, -20)]),
        float(rng.uniform(3, 6)),
      )
      for sign in (1.0, -1.0)
      for _ in range(int(rng.integers(1, 4)))
    ]

  # ---- bones -----------------------------------------------------------------------------------

  def femur(self, side: HipSide):
    """SDF (x, y, z) -> mm of one proximal femur: head, neck, trochanters, shaft."""
    s = side

    def fn(x, y, z):
      head = sdf.sphere(x, y, z, s.head, s.head_r)
      neck = sdf.tapered_capsule(
        x, y, z, s.head - 0.3 * s.head_r * s.neck, s.junction, s.neck_r, s.neck_r + 4.0
      )
      d = sdf.smooth_union(head, neck, 4.0)
      rot = np.stack(
        [_unit(np.cross(s.shaft_down, [0.0, 1.0, 0.0])), [0.0, 1.0, 0.0], -s.shaft_down], axis=1
      )
      inter = sdf.ellipsoid(
        x, y, z, s.junction + np.array([s.sign * 4.0, -2.0, -10.0]), (20.0, 17.0, 30.0), rot
      )
      d = sdf.smooth_union(d, inter, 6.0)
      greater = sdf.ellipsoid(
        x, y, z, s.junction + np.array([s.sign * 15.0, -6.0, 22.0]), (11.0, 15.0, 17.0)
      )
      lesser = sdf.ellipsoid(
        x, y, z, s.junction + np.array([-s.sign * 13.0, -11.0, -27.0]), (7.0, 8.0, 9.0)
      )
      d = sdf.smooth_union(d, np.minimum(greater, lesser), 5.0)
      bottom = s.junction + 400.0 * s.shaft_down
      shaft = sdf.elliptic_rod(x, y, z, bottom, s.junction - 5.0 * s.shaft_down, 14.5, 14.0)
      return sdf.smooth_union(d, shaft, 10.0)

    return fn

  def pelvis(self, x: Array, y: Array, z: Array) -> Array:
    """SDF of the pelvis: acetabular cups, supra-acetabular columns, iliac wings, medial
    walls, ischia, pubic rami and symphysis, plus the sacrum; joint spaces kept clear."""
    d = sdf.ellipsoid(x, y, z, (0.0, -62.0, 55.0), (46.0, 28.0, 55.0))  # sacrum and L5
    for s in self.sides:
      g, h = s.sign, s.head
      cup = np.maximum(
        sdf.sphere(x, y, z, h, s.cup_out),
        sdf.half_space(x, y, z, h + s.rim_offset * s.cup_axis, s.cup_axis),
      )
      parts = [
        cup,
        sdf.ellipsoid(x, y, z, h + np.array([g * 8.0, -6.0, 31.0]), (22.0, 25.0, 22.0)),
        sdf.ellipsoid(
          x,
          y,
          z,
          h + np.array([g * 4.0, -28.0, 78.0]),
          (6.5, 55.0, 62.0),
          sdf.rotation(ry_deg=g * 24.0),
        ),
        sdf.ellipsoid(x, y, z, h + np.array([-g * 19.0, -5.0, -4.0]), (7.0, 24.0, 30.0)),
        sdf.tapered_capsule(
          x,
          y,
          z,
          h + np.array([-g * 6.0, -16.0, -22.0]),
          h + np.array([-g * 24.0, -24.0, -68.0]),
          13.0,
          15.0,
        ),
        sdf.tapered_capsule(
          x,
          y,
          z,
          h + np.array([-g * 14.0, 14.0, -12.0]),
          np.array([g * 5.0, 30.0, -38.0]),
          9.0,
          8.0,
        ),
        sdf.tapered_capsule(
          x,
          y,
          z,
          np.array([g * 5.0, 29.0, -46.0]),
          h + np.array([-g * 28.0, -16.0, -70.0]),
          6.0,
          7.0,
        ),
        sdf.ellipsoid(x, y, z, (g * 7.0, 30.0, -42.0), (6.0, 12.0, 17.0)),
      ]
      for part in parts:
        d = sdf.smooth_union(d, part, 6.0)
    for s in self.sides:  # keep the joint space and the cup's opening clear of bone
      d = sdf.smooth_subtract(d, sdf.sphere(x, y, z, s.head, s.cup_in), 1.0)
    return d

  # ---- joint ---------------------------------------------------------------------------------

  def head_cartilage(self, s: HipSide):
    """Spherical shell on the femoral head, away from the neck."""

    def fn(x, y, z):
      r = sdf.sphere(x, y, z, s.head, 0.0)
      shell = np.maximum(r - (s.head_r + s.cart_head), s.head_r - r)
      # Not on the neck side of the head.
      away = sdf.half_space(x, y, z, s.head - 0.45 * s.head_r * s.neck, -s.neck)
      return np.maximum(shell, away)

    return fn

  def acetabular_cartilage(self, s: HipSide):
    """Spherical shell lining the cup, up to just inside its rim."""

    def fn(x, y, z):
      r = sdf.sphere(x, y, z, s.head, 0.0)
      shell = np.maximum(r - s.cup_in, (s.cup_in - s.cart_acet) - r)
      return np.maximum(
        shell, sdf.half_space(x, y, z, s.head + (s.rim_offset - 1.0) * s.cup_axis, s.cup_axis)
      )

    return fn

  def joint_film(self, s: HipSide):
    """The thin fluid-filled joint space between the two cartilage shells."""

    def fn(x, y, z):
      r = sdf.sphere(x, y, z, s.head, 0.0)
      shell = np.maximum(r - (s.cup_in - s.cart_acet), (s.head_r + s.cart_head) - r)
      return np.maximum(
        shell, sdf.half_space(x, y, z, s.head + s.rim_offset * s.cup_axis, s.cup_axis)
      )

    return fn

  def labrum(self, s: HipSide):
    """Fibrocartilage ring (a torus) on the acetabular rim."""
    centre = s.head + s.rim_offset * s.cup_axis
    major = float(np.sqrt(s.cup_in**2 - s.rim_offset**2))
    return lambda x, y, z: sdf.torus(x, y, z, centre, s.cup_axis, major + 0.5, 3.0)

  def pocket(self, s: HipSide, p: dict[str, Any]):
    """One effusion pocket: an ellipsoid along the neck with a wobbly boundary."""
    centre, rot, radii = pocket_geometry(s, p)
    ph = p['wobble']

    def fn(x, y, z):
      d = sdf.ellipsoid(x, y, z, centre, radii, rot)
      wob = (
        np.sin(x / 6.0 + ph[0]) * np.cos(z / 5.0 + ph[1])
        + 0.5 * np.sin(y / 4.0 + ph[2])
        + 0.4 * np.cos((x + z) / 3.5 + ph[3])
      )
      return d + np.float32(0.3 * min(radii)) * wob.astype(np.float32)

    return fn

  def capsule_inner(self, s: HipSide):
    """Inner surface of the joint capsule: close around head and neck, distended by the
    effusion pockets."""
    pockets = [self.pocket(s, p) for p in s.pockets]

    def fn(x, y, z):
      d = sdf.tapered_capsule(x, y, z, s.head, s.junction, s.head_r + 1.5, s.neck_r + 2.5)
      for pk in pockets:
        d = sdf.smooth_union(d, pk(x, y, z), 3.0)
      return d

    return fn
