"""The knee phantom's render layers: every tissue of a `KneeModel` (labelled bones, cartilage
and effusion; unlabelled patella, menisci, ligaments, tendons, muscles, vessels, fat and skin)
placed in the scanner scene with its signal from the contrast table (`build_layers`)."""

from __future__ import annotations

import math

import numpy as np

from data_pipelines.phantoms import mri, scene, sdf
from data_pipelines.phantoms.knee_anatomy import KneeModel

Array = np.ndarray


def _box(c, r, s: float, margin: float = 2.0) -> scene.Box:
  c, r = np.asarray(c, float) * s, np.asarray(r, float) * s + margin
  return (tuple(c - r), tuple(c + r))


def _capsule_box(a, b, r: float, s: float) -> scene.Box:
  a, b = np.asarray(a, float) * s, np.asarray(b, float) * s
  lo, hi = np.minimum(a, b) - r * s - 2, np.maximum(a, b) + r * s + 2
  return (tuple(lo), tuple(hi))


def _capsule_fn(a, b, ra: float, rb: float):
  """SDF of a tapered capsule a -> b (radii ra -> rb) as a function of (x, y, z)."""
  return lambda x, y, z: sdf.tapered_capsule(x, y, z, a, b, ra, rb)


def _scaled(fn, s: float):
  """Wraps a base-size SDF of (x, y, z) into model mm."""
  s32 = np.float32(s)
  return lambda x, y, z: s32 * fn(x / s32, y / s32, z / s32)


def build_layers(
  model: KneeModel, sc: scene.Scene, signal: dict[str, float] | None = None
) -> tuple[list[scene.Layer], list[str]]:
  """Tissue layers in priority order, and the names of the effusion pockets among them.
  signal: tissue -> scanner units (`contrast.signal_table`; default `mri.DESS`)."""
  s = model.s
  tex = sc.textures
  c = mri.DESS if signal is None else signal
  h = sc.ramp_mm

  def field_layer(name, label, box, fn, intensity):
    sc.add_field(name, fn, box)

    def sample(scn, sl, xyz):
      d = scn.field(name, sl)
      return scene.LayerSample(d, intensity(scn, sl, xyz, d) if callable(intensity) else intensity)

    return scene.Layer(name, label, box, sample)

  def bone_intensity(cortex_of_z, scar_z):
    def fn(scn, sl, xyz, d):
      z = xyz[2] / np.float32(s)
      marrow = np.float32(c['marrow']) * (1 + 0.22 * tex['fine'][sl] + 0.12 * tex['coarse'][sl])
      scar = np.exp(-(((z - scar_z - 2.5 * np.cos(xyz[0] / np.float32(9.0 * s))) / 0.9) ** 2))
      marrow = marrow * (1 - 0.35 * scar)
      return mri.depth_mix(-d, cortex_of_z(z), c['cortex'], marrow, 0.5)

    return fn

  def cartilage_layer(name, label, plate, box, max_thickness):
    def sample(scn, sl, xyz):
      d = scn.field(plate, sl)
      d, t = model.shell(plate, *xyz, d=d, band=max_thickness + h)
      cover = scene.shell_coverage(d, t, h)
      shell = np.where(t > 0, np.maximum(-d, d - t), np.abs(d) + h)
      depth = np.clip(d / np.maximum(t, 1e-3), 0, 1)
      inten = np.float32(c['cartilage']) * (0.86 + 0.2 * depth) * (1 + 0.05 * tex['fine'][sl])
      return scene.LayerSample(shell, inten, cover)

    return scene.Layer(name, label, box, sample)

  m = model.box_margin
  femur_box = ((-48 * s, (-45 - m) * s, (-8 - m) * s), (48 * s, 35 * s, 120 * s))
  # What moves with a flexed tibia (KneeModel.to_tibia) gets its box moved with it: the tibia,
  # its cartilage, the fibula, the menisci, the leg's muscles and the patellar tendon's insertion.
  tibia_box = model.tibia_box(((-46 * s, -36 * s, -130 * s), (46 * s, 30 * s, (12 + m) * s)))
  pc, pr = model.patella_c, model.patella_r
  patella_box = _box(pc, pr + 2, s)
  fibula_box = model.tibia_box(((26 * s, -30 * s, -130 * s), (50 * s, -4 * s, -6 * s)))
  sc.add_field('femur', model.femur, femur_box)
  sc.add_field('tibia', model.tibia, tibia_box)
  sc.add_field('patella', model.patella, patella_box)

  layers = [
    cartilage_layer(
      'femoral_cartilage',
      2,
      'femur',
      ((-42 * s, (-42 - m) * s, (-6 - m) * s), (42 * s, 34 * s, 62 * s)),
      3.5,
    ),
    cartilage_layer(
      'tibial_cartilage',
      4,
      'tibia',
      model.tibia_box(((-40 * s, -30 * s, (-12 - m) * s), (40 * s, 24 * s, (12 + m) * s))),
      3.5,
    ),
    cartilage_layer('patellar_cartilage', 0, 'patella', patella_box, 4.5),
  ]

  def bone_layer(name, label, box, cortex_of_z, scar_z, frame=None):
    """frame: model-frame points -> the bone's own frame, where its cortex profile and
    physeal scar are given (KneeModel.to_tibia for the tibia and fibula; None: the model's)."""
    intensity = bone_intensity(cortex_of_z, scar_z)

    def sample(scn, sl, xyz):
      d = scn.field(name, sl)
      own = xyz if frame is None else frame(*xyz)
      return scene.LayerSample(d, intensity(scn, sl, own, d))

    return scene.Layer(name, label, box, sample)

  # Cortex thickness (mm) by base-size height: a thin subchondral plate near the joint, a
  # thick diaphyseal cortex along the shafts. Physeal scars sit ~3 cm from the joint line.
  no_scar = 1e3
  sc.add_field('fibula', model.fibula, fibula_box)
  layers += [
    bone_layer('femur', 1, femur_box, lambda z: 0.8 + 2.6 * sdf.smoothstep(38.0, 80.0, z), 31.0),
    bone_layer(
      'tibia',
      3,
      tibia_box,
      lambda z: 0.8 + 2.4 * sdf.smoothstep(-30.0, -70.0, z),
      -19.0,
      model.to_tibia,
    ),
    bone_layer('patella', 0, patella_box, lambda z: 1.0, no_scar),
    bone_layer(
      'fibula',
      0,
      fibula_box,
      lambda z: 1.2 + 1.5 * sdf.smoothstep(-30.0, -60.0, z),
      no_scar,
      model.to_tibia,
    ),
  ]

  # Menisci: wedges on the rim of each plateau, C-shaped medially, almost ring-shaped laterally.
  def meniscus(xc, yc, ax, ay, height, open_dir, open_deg):
    def fn(x, y, z):
      top, _, _ = model.tibial_top(x, y)
      ux, uy = (x - np.float32(xc)) / np.float32(ax), (y - np.float32(yc)) / np.float32(ay)
      re = np.sqrt(ux * ux + uy * uy)
      phi = np.degrees(np.arctan2(uy, ux))
      hgt = np.float32(height) * (1 + 0.2 * np.clip(-uy, -1, 1) / np.maximum(re, 0.3))
      rel = z - top
      ri = np.float32(0.56)
      radial = (re - 1) * np.float32(0.5 * (ax + ay))
      # Wedge: 1.2 mm over the bone at the inner edge (on the thin cartilage there), rising
      # by `height` to the outer rim.
      upper = (rel - 1.2 - hgt * (re - ri) / (1 - ri)) / np.float32(1.5)
      ang = np.abs((phi - open_dir + 180.0) % 360.0 - 180.0)
      sector = (np.float32(open_deg) - ang) * np.float32(np.pi / 180.0) * re * np.float32(ax)
      return np.maximum(np.maximum(radial, upper), np.maximum(-rel - 1.0, sector))

    return fn

  men_med = meniscus(-20.0, -3.0, 15.5, 21.0, 7.5, 0.0, 38.0)
  men_lat = meniscus(20.0, -4.0, 14.5, 18.0, 7.0, 180.0, 14.0)
  layers += [
    field_layer(
      'medial_meniscus',
      0,
      model.tibia_box(_box((-20, -3, 3), (17, 23, 9), s, 2.0 + m * s)),
      model.with_tibia(_scaled(men_med, s)),
      c['fibrous'],
    ),
    field_layer(
      'lateral_meniscus',
      0,
      model.tibia_box(_box((20, -4, 3), (16, 20, 9), s, 2.0 + m * s)),
      model.with_tibia(_scaled(men_lat, s)),
      c['fibrous'],
    ),
  ]

  # Ligaments and tendons.
  acl_a, acl_b = (8.0, -16.0, 19.0), (1.0, 10.0, -1.0)
  pcl = [(-7.0, 7.0, 17.0), (-5.0, -7.0, 14.0), (-3.0, -19.0, 5.0), (-1.0, -27.0, -11.0)]
  mcl_a, mcl_b = (-41.0, -4.0, 30.0), (-37.0, 2.0, -42.0)
  lcl_a, lcl_b = (39.0, -8.0, 27.0), (42.0, -16.0, -14.0)
  inferior_pole = (pc[0], pc[1] + 1.0, pc[2] - pr[2] + 2.0)
  superior_pole = (pc[0], pc[1] + 1.0, pc[2] + pr[2] - 3.0)
  # The patella stays with the femur (its fit is against the trochlea, which does not move);
  # the patellar tendon's insertion on the tibial tuberosity follows the tibia.
  tuberosity = model.tibia_point((4.0, 24.0, -31.0))
  lig = c['ligament']
  layers += [
    field_layer(
      'acl',
      0,
      _capsule_box(acl_a, acl_b, 5.0, s),
      _scaled(lambda x, y, z: sdf.tapered_capsule(x, y, z, acl_a, acl_b, 4.5, 4.0), s),
      lambda scn, sl, xyz, d: lig * (1 + 0.3 * tex['striated'][sl]),
    ),
    field_layer(
      'pcl',
      0,
      ((-12 * s, -33 * s, -17 * s), (4 * s, 10 * s, 24 * s)),
      _scaled(lambda x, y, z: sdf.polyline_capsule(x, y, z, pcl, (4.0, 4.0, 4.2, 4.0)), s),
      c['fibrous'],
    ),
    field_layer(
      'mcl',
      0,
      _capsule_box(mcl_a, mcl_b, 4.0, s),
      _scaled(
        lambda x, y, z: sdf.flat_capsule(x, y, z, mcl_a, mcl_b, 6.0, 1.6, (0.0, 1.0, 0.0)), s
      ),
      c['fibrous'],
    ),
    field_layer(
      'lcl',
      0,
      _capsule_box(lcl_a, lcl_b, 4.0, s),
      _scaled(lambda x, y, z: sdf.tapered_capsule(x, y, z, lcl_a, lcl_b, 2.5, 2.5), s),
      c['fibrous'],
    ),
    field_layer(
      'patellar_tendon',
      0,
      _capsule_box(inferior_pole, tuberosity, 15.0, s),
      _scaled(
        lambda x, y, z: sdf.flat_capsule(
          x, y, z, inferior_pole, tuberosity, 13.0, 3.2, (1.0, 0.0, 0.0)
        ),
        s,
      ),
      c['fibrous'],
    ),
    field_layer(
      'quadriceps_tendon',
      0,
      _capsule_box(superior_pole, (2.0, 30.0, 140.0), 16.0, s),
      _scaled(
        lambda x, y, z: sdf.flat_capsule(
          x, y, z, superior_pole, (2.0, 30.0, 140.0), 15.0, 3.6, (1.0, 0.0, 0.0)
        ),
        s,
      ),
      c['fibrous'],
    ),
  ]

  # Effusion pockets: suprapatellar pouch and the two posterior condylar recesses. Each is an
  # ellipsoid with a wobbly boundary; the bones, cartilage and tendons above carve them.
  pockets = []
  split = model.a.effusion_split * float(model.a.effusion_ml) * 1000.0 / s**3  # base mm^3
  lat_c, med_c = model.cond['lateral']['c'], model.cond['medial']['c']
  # (name, x, z, semi-axes along x and z, +1 in front of the femur / -1 behind it)
  shapes = [
    ('effusion_suprapatellar', 1.0, 44.0, 25.0, 15.0, 1.0),
    ('effusion_posterior_medial', med_c[0], med_c[2] + 6.0, 9.0, 12.0, -1.0),
    ('effusion_posterior_lateral', lat_c[0], lat_c[2] + 6.0, 8.0, 11.0, -1.0),
  ]
  for k, (name, px, pz, ax, az, side) in enumerate(shapes):
    vol = split[k]
    if vol < 50:  # under 0.05 mL at base size: no pocket
      continue
    # Thickness from the target volume; the pocket sits on the femoral surface, 40 % of it
    # overlapping bone and cartilage (which carve it).
    half = float(np.clip(3 * vol / (4 * np.pi * ax * az), 0.8, 11.0))
    y_wall = model.femur_wall(px, pz, anterior=side > 0)
    cen, rad = (px, y_wall + side * 0.6 * half, pz), (ax, half, az)
    phases = model.a.pocket_wobble[k]

    def pocket(x, y, z, cen=cen, rad=rad, ph=phases):
      d = sdf.ellipsoid(x, y, z, cen, rad)
      wob = (
        np.sin(x / 7.0 + ph[0]) * np.cos(z / 6.0 + ph[1])
        + 0.6 * np.sin(z / 4.0 + y / 5.0 + ph[2])
        + 0.4 * np.cos(x / 3.5 + ph[3])
      )
      return d + np.float32(0.35 * min(rad)) * wob.astype(np.float32)

    fluid = lambda scn, sl, xyz, d: np.float32(c['fluid']) * (1 + 0.03 * tex['fine'][sl])
    layers.append(
      field_layer(name, 5, _box(cen, np.array(rad) * 1.4 + 2, s), _scaled(pocket, s), fluid)
    )
    pockets.append(name)

  # Vessels, muscles, skin and subcutaneous fat.
  artery = [(2.0, -30.0, 200.0), (1.0, -33.0, 20.0), (0.0, -30.0, -20.0), (-2.0, -27.0, -200.0)]
  vein = [(p[0] + 5.0, p[1] - 4.0, p[2]) for p in artery]
  layers += [
    field_layer(
      'popliteal_artery',
      0,
      ((-8 * s, -42 * s, -140 * s), (8 * s, -20 * s, 140 * s)),
      _scaled(lambda x, y, z: sdf.polyline_capsule(x, y, z, artery, (2.8,) * 4), s),
      c['vessel'] * 0.8,
    ),
    field_layer(
      'popliteal_vein',
      0,
      ((-4 * s, -46 * s, -140 * s), (14 * s, -22 * s, 140 * s)),
      _scaled(lambda x, y, z: sdf.polyline_capsule(x, y, z, vein, (3.5,) * 4), s),
      c['vessel'],
    ),
  ]
  # Muscles fill most of the limb around the joint: quadriceps in front of the femoral shaft,
  # hamstrings behind it, gastrocnemius and soleus behind the tibia. Each gets its own tone and
  # a darker rim (epimysium and fascial fat), so neighbouring muscles stay distinguishable.
  muscles = [
    ('gastrocnemius_medial', (-21.0, -39.0, 32.0), (-17.0, -57.0, -150.0), 11.0, 27.0),
    ('gastrocnemius_lateral', (20.0, -37.0, 30.0), (15.0, -54.0, -150.0), 10.0, 23.0),
    ('soleus', (0.0, -34.0, -48.0), (0.0, -38.0, -220.0), 17.0, 28.0),
    ('tibialis_anterior', (24.0, 15.0, -32.0), (20.0, 17.0, -220.0), 11.0, 15.0),
    ('semimembranosus', (-28.0, -31.0, 12.0), (-25.0, -29.0, 250.0), 11.0, 20.0),
    ('biceps_femoris', (34.0, -27.0, 2.0), (26.0, -30.0, 250.0), 8.0, 19.0),
    ('vastus_medialis', (-31.0, 6.0, 30.0), (-30.0, 4.0, 140.0), 13.0, 23.0),
    ('vastus_lateralis', (38.0, 0.0, 48.0), (35.0, 0.0, 220.0), 9.0, 21.0),
    ('sartorius', (-46.0, -18.0, 8.0), (-40.0, -22.0, 220.0), 7.0, 8.0),
  ]

  def muscle_intensity(tone):
    def fn(scn, sl, xyz, d):
      rim = 0.7 + 0.3 * sdf.smoothstep(0.0, 1.6, -d)
      return (
        np.float32(c['muscle'] * tone)
        * rim
        * (1 + 0.10 * tex['striated'][sl] + 0.05 * tex['fine'][sl])
      )

    return fn

  leg = ('soleus', 'tibialis_anterior')  # arise from the tibia and fibula: move with them
  for k, (name, a_, b_, ra, rb) in enumerate(muscles):
    box, fn = _capsule_box(a_, b_, max(ra, rb), s), _scaled(_capsule_fn(a_, b_, ra, rb), s)
    if name in leg:
      box, fn = model.tibia_box(box), model.with_tibia(fn)
    layers.append(
      field_layer(
        name,
        0,
        box,
        fn,
        muscle_intensity(1 + 0.07 * math.sin(2.3 * k + 1.0)),
      )
    )
  layers.append(
    field_layer(
      'popliteus',
      0,
      model.tibia_box(_box((0, -26, -24), (30, 14, 30), s)),
      model.with_tibia(
        _scaled(
          lambda x, y, z: sdf.ellipsoid(
            x, y, z, (0.0, -27.0, -24.0), (26.0, 7.0, 12.0), sdf.rotation(ry_deg=-25.0)
          ),
          s,
        )
      ),
      muscle_intensity(0.95),
    )
  )

  def quadriceps(x, y, z):
    rod = sdf.elliptic_rod(x, y, z, (0.0, 8.0, 60.0), (0.0, 6.0, 260.0), 44.0, 34.0)
    return sdf.smooth_intersect(rod, -(y + 2.0), 4.0)

  layers.append(
    field_layer(
      'quadriceps',
      0,
      ((-50 * s, -10 * s, 50 * s), (50 * s, 48 * s, 265 * s)),
      _scaled(quadriceps, s),
      muscle_intensity(1.04),
    )
  )

  def body(x, y, z):
    grow = np.clip(z, -150.0, 150.0)
    return sdf.ellipse_2d(x + 1.0, y + 1.0, 62.0 + 0.06 * grow, 58.0 + 0.05 * grow)

  body_box = ((-75 * s, -69 * s, -160 * s), (75 * s, 67 * s, 160 * s))
  sc.add_field('body', _scaled(body, s), body_box)
  skin_t = 1.6

  def skin(scn, sl, xyz):
    d = scn.field('body', sl)
    return scene.LayerSample(np.maximum(d, -d - skin_t), c['skin'])

  def fat(scn, sl, xyz):
    d = scn.field('body', sl)
    septa = np.exp(-((tex['septa'][sl] / 0.1) ** 2))
    inten = np.float32(c['fat']) * (1 + 0.08 * tex['coarse'][sl] + 0.4 * septa)
    return scene.LayerSample(d, inten)

  layers += [scene.Layer('skin', 0, body_box, skin), scene.Layer('fat', 0, body_box, fat)]
  return layers, pockets
