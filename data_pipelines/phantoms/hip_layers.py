"""The hip phantom's render layers: every tissue of a `HipModel` (the labelled effusion
pockets; unlabelled bones, cartilage, labrum, capsule, synovium, oedema, pelvis, organs,
vessels, muscles, fat and skin) placed in the scanner scene with its STIR signal
(`build_layers`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.phantoms import mri, scene, sdf
from data_pipelines.phantoms.hip_anatomy import HipModel, pocket_geometry

Array = np.ndarray


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
      centre, _, radii = pocket_geometry(s, p)
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
