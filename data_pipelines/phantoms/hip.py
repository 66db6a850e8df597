"""Coronal STIR-like phantom of both hips with joint effusion (the only labelled class).

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

Two simulated readers outline the effusion the way the paper's readers did (region drawn,
Otsu threshold inside it, each with a habit of their own): `hip_readers.py`.
The generator's settings and ranges: docs/phantoms.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_pipelines import tissues
from data_pipelines.phantoms import hip_readers, mri, scene, sdf
from data_pipelines.phantoms import truth as truth_lib

Array = np.ndarray
# 1.1: each hip's joint fluid film is its own (1.0 drew the last side's film for both).
# 1.2: bone-marrow oedema and synovial thickening; readers draw a region and threshold it.
GENERATOR_VERSION = '1.2'
SEQUENCE = 'STIR'
PLANE = 'coronal'
LABELS = tissues.HIP_LABELS
# Findings (per hip): probability of bone-marrow oedema with and without effusion, and of
# synovial thickening; oedema peak signal as a fraction of fluid's; synovium thickness (mm).
OEDEMA_PROBABILITY = {'effusion': 0.4, 'dry': 0.1}
OEDEMA_PEAK = (0.55, 0.8)
SYNOVITIS_PROBABILITY = 0.3
SYNOVIUM_MM = (1.0, 2.5)

# Array axes: 0 superior->inferior, 1 right->left, 2 posterior->anterior (codes I, L, A).
PRESETS = {
  'cpu': dict(shape=(160, 160, 20), spacing=(2.2, 2.2, 3.0), noise=16.0, fwhm=(2.0, 2.0, 2.0)),
  'full': dict(shape=(384, 384, 24), spacing=(0.91, 0.91, 3.0), noise=30.0, fwhm=(1.0, 1.0, 2.0)),
}
AXIS_DIRECTIONS = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # I, L, A (RAS)
AXIS_CODES = ('I', 'L', 'A')
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


def _pocket_geometry(side: HipSide, p: dict[str, Any]) -> tuple[Array, Array, tuple]:
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
    centre, rot, radii = _pocket_geometry(s, p)
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


def oedema_weight(lesion: dict[str, Any], xyz: tuple[Array, Array, Array], texture: Array) -> Array:
  """How much of the oedema's signal a point takes, in [0, 1]: 1 in the lesion's core, fading
  to 0 at its ellipsoid's surface (oedema is ill-defined), patchy with the texture."""
  lx, ly, lz = sdf.to_local(*xyz, lesion['centre'], lesion['rot'])
  a, b, cc = (np.float32(r) for r in lesion['radii'])
  rho = np.sqrt((lx / a) ** 2 + (ly / b) ** 2 + (lz / cc) ** 2)
  core = 1 - sdf.smoothstep(0.35, 1.0, rho)
  return np.clip(core * (1 + 0.3 * texture), 0, 1)


def _box_around(points, margin: float) -> scene.Box:
  pts = np.asarray(points, float)
  return (tuple(pts.min(axis=0) - margin), tuple(pts.max(axis=0) + margin))


def build_layers(
  model: HipModel, sc: scene.Scene
) -> tuple[list[scene.Layer], list[str], list[int]]:
  """Layers in priority order, the effusion pocket names, and the indices of bone layers."""
  c = mri.STIR
  tex = sc.textures
  h = sc.ramp_mm
  layers: list[scene.Layer] = []

  def add(name, label, box, fn, intensity):
    sc.add_field(name, fn, box)

    def sample(scn, sl, xyz):
      d = scn.field(name, sl)
      inten = intensity(scn, sl, xyz, d) if callable(intensity) else intensity
      return scene.LayerSample(d, inten)

    layers.append(scene.Layer(name, label, box, sample))

  def marrow(base, cortex, lesions=()):
    def fn(scn, sl, xyz, d):
      m = np.float32(base) * (1 + 0.25 * tex['fine'][sl] + 0.15 * tex['coarse'][sl])
      for lesion in lesions:
        m = m + oedema_weight(lesion, xyz, tex['fine'][sl]) * (
          np.float32(lesion['peak'] * c['fluid']) - m
        )
      return mri.depth_mix(-d, cortex, c['cortex'], m, 0.6)

    return fn

  for s in model.sides:
    box = _box_around([s.head], s.cup_in + 4.0)
    add(f'head_cartilage_{s.name}', 0, box, model.head_cartilage(s), c['cartilage'])
    add(
      f'acetabular_cartilage_{s.name}', 0, box, model.acetabular_cartilage(s), c['cartilage'] * 1.05
    )
  for s in model.sides:
    film = model.joint_film(s)
    box = _box_around([s.head], s.cup_in + 4.0)

    # Both bound now: the layer is sampled after the loop (a free `film` would be the last side's).
    def film_sample(scn, sl, xyz, s=s, film=film):
      r = sdf.sphere(*xyz, s.head, 0.0)
      inner = s.head_r + s.cart_head
      cover = scene.shell_coverage(r - inner, np.float32(s.gap), h)
      cover = cover * (
        1 - scene.ramp(-sdf.half_space(*xyz, s.head + s.rim_offset * s.cup_axis, s.cup_axis), h)
      )
      return scene.LayerSample(film(*xyz), c['fluid'] * 0.8, cover)

    layers.append(scene.Layer(f'joint_fluid_{s.name}', 0, box, film_sample))
  bones = []
  for s in model.sides:
    for k, (centre, radius) in enumerate(s.cysts):
      add(
        f'cyst_{s.name}_{k}',
        0,
        _box_around([centre], radius + 2),
        (lambda x, y, z, cc=centre, rr=radius: sdf.sphere(x, y, z, cc, rr)),
        c['fluid'] * 0.85,
      )
  for s in model.sides:
    bones.append(len(layers))
    box = _box_around([s.head, s.junction + 400 * s.shaft_down, s.junction], 40.0)
    add(f'femur_{s.name}', 0, box, model.femur(s), marrow(c['marrow'], 1.0, s.oedema))
  bones.append(len(layers))
  add(
    'pelvis',
    0,
    ((-175.0, -95.0, -115.0), (175.0, 50.0, 160.0)),
    model.pelvis,
    marrow(c['red_marrow'], 1.5),
  )
  for s in model.sides:
    box = _box_around([s.head], s.cup_in + 8.0)
    add(f'labrum_{s.name}', 0, box, model.labrum(s), c['labrum'])
  for s in model.sides:
    if s.synovium_mm > 0:  # thickened synovium lines the capsule, displacing fluid
      inner = model.capsule_inner(s)
      add(
        f'synovium_{s.name}',
        0,
        _box_around([s.head, s.junction], s.head_r + 25.0),
        (lambda fn, t: lambda x, y, z: np.maximum(fn(x, y, z), -fn(x, y, z) - t))(
          inner, np.float32(s.synovium_mm)
        ),
        lambda scn, sl, xyz, d: np.float32(c['synovium']) * (1 + 0.15 * tex['fine'][sl]),
      )
  pockets = []
  for s in model.sides:
    for p in s.pockets:
      centre, _, radii = _pocket_geometry(s, p)
      add(
        p['name'],
        1,
        _box_around([centre], max(radii) * 1.5 + 3),
        model.pocket(s, p),
        lambda scn, sl, xyz, d: np.float32(c['fluid']) * (1 + 0.04 * tex['fine'][sl]),
      )
      pockets.append(p['name'])
  for s in model.sides:
    inner = model.capsule_inner(s)
    box = _box_around([s.head, s.junction], s.head_r + 25.0)
    add(f'capsule_space_{s.name}', 0, box, inner, c['muscle'] * 0.9)
    add(
      f'capsule_{s.name}',
      0,
      box,
      (lambda fn: lambda x, y, z: np.maximum(fn(x, y, z) - 1.8, -fn(x, y, z)))(inner),
      c['fibrous'] * 2,
    )

  # Vessels and inguinal lymph nodes.
  for k, (centre, radius) in enumerate(model.nodes):
    add(
      f'lymph_node_{k}',
      0,
      _box_around([centre], radius * 1.6 + 2),
      (lambda x, y, z, cc=centre, r=radius: sdf.ellipsoid(x, y, z, cc, (r, r * 0.8, r * 1.5))),
      c['node'],
    )
  for s in model.sides:
    g = s.sign
    for name, dx, r, inten in (
      ('artery', 74.0, 4.5, c['vessel'] * 0.8),
      ('vein', 60.0, 6.0, c['vessel']),
    ):
      pts = [
        (g * (dx - 12.0), 18.0, 150.0),
        (g * dx, 34.0, 40.0),
        (g * (dx + 4.0), 36.0, -60.0),
        (g * (dx + 2.0), 30.0, -300.0),
      ]
      add(
        f'femoral_{name}_{s.name}',
        0,
        _box_around(pts, r + 2),
        (lambda x, y, z, pts=pts, r=r: sdf.polyline_capsule(x, y, z, pts, (r,) * 4)),
        inten,
      )

  # Pelvic organs inside the pelvic cavity: bladder, rectum, bowel loops with their contents.
  f = model.bladder_fill
  add(
    'bladder',
    0,
    ((-50.0, -15.0, -60.0), (50.0, 60.0, 20.0)),
    lambda x, y, z: sdf.ellipsoid(x, y, z, (0.0, 22.0, -22.0), (38.0 * f, 26.0 * f, 26.0 * f)),
    lambda scn, sl, xyz, d: mri.depth_mix(-d, 1.2, c['muscle'], c['fluid'], 0.8),
  )

  def hollow(wall, content):
    def fn(scn, sl, xyz, d):
      inner = np.float32(content) * (1 + 0.2 * tex['coarse'][sl])
      return mri.depth_mix(-d, 2.5, wall, inner, 1.0)

    return fn

  add(
    'rectum',
    0,
    ((-30.0, -75.0, -60.0), (30.0, -15.0, 30.0)),
    lambda x, y, z: sdf.ellipsoid(x, y, z, (0.0, -45.0, -18.0), (18.0, 17.0, 32.0)),
    hollow(c['bowel'], 20.0),
  )
  for k, (centre, axis, length, radius, wet) in enumerate(model.loops):
    a, b = centre - axis * length / 2, centre + axis * length / 2
    content = c['fluid'] * 0.75 if wet > 0.7 else (25.0 if wet < 0.3 else c['bowel'] * 0.8)
    add(
      f'bowel_{k}',
      0,
      _box_around([a, b], radius + 3),
      (lambda x, y, z, a=a, b=b, r=radius: sdf.tapered_capsule(x, y, z, a, b, r, r)),
      hollow(c['bowel'], content),
    )

  # Muscles. Every muscle has its own tone and a darker rim (epimysium and fascial fat), so
  # the boundaries between neighbouring muscles show as thin dark lines.
  def muscle_i(tone):
    def fn(scn, sl, xyz, d):
      rim = 0.65 + 0.35 * sdf.smoothstep(0.0, 2.5, -d)
      return (
        np.float32(c['muscle'] * tone)
        * rim
        * (1 + 0.10 * tex['striated'][sl] + 0.06 * tex['fine'][sl])
      )

    return fn

  k_muscle = 0
  for s in model.sides:
    g, hc, j = s.sign, s.head, s.junction
    ell = [
      ('obturator_internus', hc + [-g * 31.0, -6.0, -22.0], (8.0, 28.0, 24.0), 0.0),
      ('obturator_externus', hc + [-g * 2.0, -2.0, -49.0], (22.0, 12.0, 10.0), 0.0),
      ('pectineus', hc + [-g * 34.0, 20.0, -46.0], (12.0, 10.0, 22.0), g * 20.0),
      ('iliacus', hc + [-g * 9.0, -8.0, 72.0], (12.0, 45.0, 52.0), g * 24.0),
      ('gluteus_minimus', hc + [g * 22.0, -8.0, 46.0], (10.0, 40.0, 32.0), g * 30.0),
      ('gluteus_medius', hc + [g * 36.0, -18.0, 68.0], (16.0, 52.0, 48.0), g * 25.0),
      ('gluteus_maximus', hc + [g * 45.0, -65.0, -5.0], (40.0, 28.0, 80.0), g * 10.0),
    ]
    for name, centre, radii, roty in ell:
      add(
        f'{name}_{s.name}',
        0,
        _box_around([centre], max(radii) + 3),
        (
          lambda x, y, z, cc=centre, rr=radii, ry=roty: sdf.ellipsoid(
            x, y, z, cc, rr, sdf.rotation(ry_deg=ry)
          )
        ),
        muscle_i(1 + 0.08 * np.sin(1.7 * k_muscle)),
      )
      k_muscle += 1
    lesser = j + np.array([-g * 13.0, -11.0, -27.0])
    caps = [
      (
        'psoas',
        [(g * 30.0, -35.0, 200.0), (g * 45.0, -12.0, 80.0), hc + [-g * 14.0, 20.0, 5.0], lesser],
        (16.0, 19.0, 15.0, 9.0),
      ),
      ('sartorius', [(g * 122.0, 40.0, 30.0), (g * 55.0, 30.0, -300.0)], (8.0, 9.0)),
      ('rectus_femoris', [(g * 108.0, 38.0, -5.0), (g * 103.0, 38.0, -300.0)], (11.0, 14.0)),
      ('tensor_fasciae_latae', [(g * 146.0, 18.0, 5.0), (g * 142.0, 14.0, -110.0)], (9.0, 11.0)),
      ('adductors', [hc + [-g * 22.0, 6.0, -60.0], (g * 50.0, 5.0, -350.0)], (28.0, 38.0)),
      ('vasti', [j + [g * 8.0, 6.0, -18.0], (g * 95.0, 8.0, -350.0)], (30.0, 40.0)),
    ]
    for name, pts, radii in caps:
      add(
        f'{name}_{s.name}',
        0,
        _box_around(pts, max(radii) + 3),
        (lambda x, y, z, pts=pts, radii=radii: sdf.polyline_capsule(x, y, z, pts, radii)),
        muscle_i(1 + 0.08 * np.sin(1.7 * k_muscle)),
      )
      k_muscle += 1
  add(
    'pelvic_floor',
    0,
    ((-45.0, -50.0, -70.0), (45.0, 30.0, -40.0)),
    lambda x, y, z: sdf.ellipsoid(x, y, z, (0.0, -10.0, -55.0), (36.0, 34.0, 7.0)),
    muscle_i(0.95),
  )

  # The pelvic cavity and abdomen hold fat around the organs; below them the limb girdle is
  # muscle wherever no named muscle is; subcutaneous fat and skin wrap everything.
  add(
    'pelvic_cavity',
    0,
    ((-62.0, -65.0, -50.0), (62.0, 60.0, 200.0)),
    lambda x, y, z: sdf.smooth_intersect(
      sdf.ellipsoid(x, y, z, (0.0, -2.0, 60.0), (58.0, 58.0, 118.0)),
      sdf.ellipse_2d(x, y + 2.0, 58.0 * np.clip(0.55 + z / 120.0, 0.45, 1.0), 58.0),
      6.0,
    ),
    lambda scn, sl, xyz, d: np.float32(c['fat']) * (1 + 0.2 * tex['coarse'][sl]),
  )
  sc_fat = model.subcutaneous_mm
  body_scale = model.scale

  def body(x, y, z):
    trunk = sdf.elliptic_rod(
      x, y, z, (0.0, -5.0, -75.0), (0.0, -5.0, 400.0), 152.0 * body_scale, 112.0 * body_scale
    )
    d = trunk
    for g in (1.0, -1.0):
      d = sdf.smooth_union(
        d,
        sdf.tapered_capsule(
          x,
          y,
          z,
          (g * 92.0, 0.0, -30.0),
          (g * 82.0, 0.0, -420.0),
          80.0 * body_scale,
          70.0 * body_scale,
        ),
        30.0,
      )
    # The perineum joins the thighs for a few cm below the pubic symphysis.
    return sdf.smooth_union(d, sdf.ellipsoid(x, y, z, (0.0, 0.0, -75.0), (40.0, 55.0, 45.0)), 15.0)

  body_box = ((-200.0, -140.0, -430.0), (200.0, 130.0, 410.0))
  sc.add_field('body', body, body_box)

  def filler(scn, sl, xyz):
    inner = scn.field('body', sl) + np.float32(sc_fat)
    # Below the iliac crests everything inside is muscle; above, only the abdominal wall.
    d = np.maximum(inner, np.minimum(xyz[2] - 85.0, -(inner + 12.0)))
    return scene.LayerSample(d, muscle_i(0.97)(scn, sl, xyz, d))

  layers.append(scene.Layer('muscle_filler', 0, body_box, filler))

  def skin(scn, sl, xyz):
    d = scn.field('body', sl)
    return scene.LayerSample(np.maximum(d, -d - 1.5), c['skin'])

  def fat(scn, sl, xyz):
    d = scn.field('body', sl)
    septa = np.exp(-((tex['septa'][sl] / 0.1) ** 2))
    return scene.LayerSample(d, np.float32(c['fat']) * (1 + 0.15 * tex['coarse'][sl] + 0.8 * septa))

  layers += [scene.Layer('skin', 0, body_box, skin), scene.Layer('fat', 0, body_box, fat)]
  return layers, pockets, bones


def make_grid(
  rng: np.random.Generator,
  preset: str,
  spacing_mm: float | None = None,
  fov_mm: float | None = None,
) -> scene.Grid:
  """Scanner grid for the preset (optionally another in-plane spacing and field of view, see
  `mri.acquisition`); the pelvis gets a small random rotation and shift.

  The grid's central voxel position is the world origin whatever its shape, so a larger field
  of view grows symmetrically about the same point of the pelvis.
  """
  p = mri.acquisition(PRESETS, preset, spacing_mm, fov_mm, 'generate_hip')
  affine = mri.grid_affine(p['shape'], p['spacing'], AXIS_DIRECTIONS, np.zeros(3))
  rot = sdf.rotation(*rng.uniform(-4, 4, 3))
  focus = np.array([0.0, 0.0, -15.0])
  translation = -rot @ focus + rng.uniform(-5, 5, 3)
  return scene.Grid(tuple(p['shape']), affine, mri.pose_matrix(rot, translation))


def make_textures(shape, spacing, rng: np.random.Generator) -> dict[str, Array]:
  """Shared random texture fields (unit std), sized in mm."""
  sp = np.asarray(spacing)
  return {
    'fine': mri.texture(shape, rng, tuple(np.maximum(0.8 / sp, 0.5))),
    'coarse': mri.texture(shape, rng, tuple(4.0 / sp)),
    'striated': mri.texture(shape, rng, tuple(np.array([8.0, 1.0, 2.0]) / sp)),
    'septa': mri.texture(shape, rng, tuple(np.array([12.0, 4.0, 4.0]) / sp)),
  }


def generate_hip(
  seed: int,
  preset: str = 'cpu',
  *,
  spacing_mm: float | None = None,
  fov_mm: float | None = None,
  oedema: tuple[bool, bool] | None = None,
  synovitis: tuple[bool, bool] | None = None,
) -> scene.Phantom:
  """One coronal STIR-like volume of both hips; identical output for identical arguments.

  oedema, synovitis (right, left): force the findings on or off instead of drawing them (the
  rest of the scan is the same either way).

  spacing_mm, fov_mm (optional, mm): in-plane pixel spacing and field of view (array axes 0
  and 1, the coronal plane) instead of the preset's; the in-plane shape becomes
  round(fov_mm / spacing_mm), the field of view stays centred on the same point of the pelvis,
  the in-plane PSF FWHM keeps the preset's FWHM / spacing ratio, and the slices (count,
  thickness) and the noise sigma stay the preset's. The anatomy and its pose do not depend on
  them; the texture, bias, noise and reader realisations do. Without them the output is the
  preset's.
  """
  p = mri.acquisition(PRESETS, preset, spacing_mm, fov_mm, 'generate_hip')
  ref = PRESETS[preset]
  rng = np.random.default_rng(seed)
  model = HipModel(rng, oedema=oedema, synovitis=synovitis)
  grid = make_grid(rng, preset, spacing_mm, fov_mm)
  sc = scene.Scene(grid, ramp_mm=float(np.mean(p['spacing'][:2])))
  sc.textures = make_textures(grid.shape, grid.spacing, rng)
  layers, pockets, bones = build_layers(model, sc)
  rendered = scene.render(sc, layers, background=0.0)
  image = mri.scanner_image(
    rendered.image, grid.spacing, p, ref, rng, bias_strength=0.12, coil_falloff=0.25
  )
  names = [layer.name for layer in layers]
  blocked = np.isin(rendered.owner, bones)
  readers, reader_info = hip_readers.reader_labels(
    image,
    rendered.labels,
    rendered.owner,
    {names.index(n): n for n in pockets},
    blocked,
    grid.spacing,
    rng,
  )
  truth = hip_truth(model, grid, layers, rendered, pockets, readers, reader_info, seed, preset, p)
  return scene.Phantom(
    image=image, labels=rendered.labels, affine=grid.affine, reader_labels=readers, truth=truth
  )


def hip_truth(
  model: HipModel,
  grid: scene.Grid,
  layers,
  rendered: scene.Rendered,
  pockets: list[str],
  readers: dict[str, Array],
  reader_info: dict[str, Any],
  seed: int,
  preset: str,
  acquisition: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The sidecar: effusion per pocket, per side and in total, reader volumes, geometry.

  acquisition: `mri.acquisition`'s result for the grid (default: the preset's).
  """
  acq = acquisition or mri.acquisition(PRESETS, preset)
  names = [layer.name for layer in layers]
  effusion = truth_lib.effusion_pockets(rendered, names, pockets, grid)
  per_side = {}
  for s in model.sides:
    mine = [p for p in effusion['pockets'] if p['name'].startswith(f'effusion_{s.name}_')]
    per_side[s.name] = {
      'voxels': sum(p['voxels'] for p in mine),
      'volume_ml': round(sum(p['voxels'] for p in mine) * grid.voxel_ml, 4),
    }
  effusion['per_side'] = per_side
  reader_out = {}
  for r, lab in readers.items():
    n = int((lab == 1).sum())
    reader_out[r] = dict(reader_info[r], voxels=n, volume_ml=round(n * grid.voxel_ml, 4))
  return {
    'generator': 'data_pipelines.phantoms.hip',
    'generator_version': GENERATOR_VERSION,
    'kind': 'hip',
    'seed': int(seed),
    'preset': preset,
    'sequence': 'STIR-like',
    'plane': PLANE,
    **truth_lib.grid_entries(grid, acq, AXIS_CODES),
    'labels': LABELS,
    'tissues': truth_lib.tissue_volumes(rendered, layers, grid, LABELS),
    'effusion': effusion,
    'readers': reader_out,
    'anatomy': {
      s.name: {
        'head_centre_model_mm': np.round(s.head, 3).tolist(),
        'head_radius_mm': round(s.head_r, 3),
        'pocket_targets_ml': {p['name']: round(p['target_ml'], 4) for p in s.pockets},
        'cysts': len(s.cysts),
        'oedema': [
          {
            'where': lesion['where'],
            'centre_model_mm': np.round(lesion['centre'], 3).tolist(),
            'radii_mm': [round(r, 3) for r in lesion['radii']],
            'peak_fraction_of_fluid': round(lesion['peak'], 4),
          }
          for lesion in s.oedema
        ],
        'synovium_mm': round(s.synovium_mm, 3),
      }
      for s in model.sides
    },
  }
