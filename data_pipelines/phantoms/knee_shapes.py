"""Shape families of the knee phantom: the default, a varied one for training, a held-out one.

The default family is what `knee_anatomy.sample_anatomy` draws (docs/phantoms.md, "Knee"); its knees
are unchanged by this module. 'varied' widens the shape parameters towards published adult
ranges (for training a general model); 'held_out' draws every one of them outside the varied
ranges, on either side, for judging a model on anatomy it was never trained on (never for
training or tuning). The draws come from their own stream, the seed sequence
[seed, SHAPE_STREAM], so the rest of a knee (effusion, cartilage fields, OA, defects, pose,
texture, noise) is the default family's knee of the same seed.

Parameters (base-size mm are mm at scale 1; see the top of knee_anatomy.py for the model frame):

  scale                 subject size (isotropic; cartilage thickness is not scaled)
  tibial_slope_deg      posterior slope of the tibial plateau
  joint_gap_mm          fluid gap between the femoral and tibial cartilage surfaces
  notch_half_width_mm   half the width of the wedge that carves the intercondylar notch
                        (base mm; default 9.5). The condyles' inner walls lie about 20 base
                        mm apart, so the notch widens from about 10 on and cannot narrow:
                        the held-out family holds out wide notches only
  condyle_scale         per condyle, factors on its mediolateral width and its anteroposterior
                        and superoinferior radii (the cartilage's mediolateral cover follows)
  plateau_tilt_deg      coronal tilt of the tibial plateau, positive = varus (medial side
                        lower; a medial proximal tibial angle of 90 - tilt degrees); the
                        condyles are lowered onto it, so the joint line tilts with it
  flexion_deg           knee flexion (default 0, the extended knee): the tibia and what moves
                        with it turn about a mediolateral axis through the condyles' centre,
                        the shaft swinging posteriorly (knee_anatomy.KneeModel._fit_flexion).
                        Drawn last, so a family's other draws are those of the unflexed
                        knee; the held-out family holds out deeper flexion only (a knee in
                        a coil is not hyperextended)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

FAMILIES = ('default', 'varied', 'held_out')
SHAPE_STREAM = 36  # the shape draws' seed sequence is [seed, SHAPE_STREAM]
# Anatomy options (generate_knee keyword arguments) this module adds; with the default family
# they default to the default family's shape.
SHAPE_OPTIONS = (
  'tibial_slope_deg',
  'notch_half_width_mm',
  'plateau_tilt_deg',
  'condyle_scale',
  'flexion_deg',
)
DEFAULT_NOTCH_HALF_WIDTH_MM = 9.5

# (low, high) of the varied (training) family, uniform; the held-out family draws from one of
# HELD_OUT's bands (below and above, chosen with equal odds), all outside these.
VARIED = {
  'scale': (0.82, 1.18),
  'tibial_slope_deg': (0.0, 12.0),
  'joint_gap_mm': (0.15, 1.0),
  'notch_half_width_mm': (9.5, 11.5),
  'condyle_scale': (0.88, 1.12),
  'plateau_tilt_deg': (-3.0, 5.0),
  'flexion_deg': (0.0, 20.0),
}
HELD_OUT = {
  'scale': ((0.72, 0.79), (1.21, 1.28)),
  'tibial_slope_deg': ((-4.0, -1.5), (13.5, 16.0)),
  'joint_gap_mm': ((0.0, 0.1), (1.1, 1.5)),
  'notch_half_width_mm': ((12.0, 13.5),),  # wide only: see the module doc
  'condyle_scale': ((0.8, 0.86), (1.14, 1.2)),
  'plateau_tilt_deg': ((-6.0, -4.0), (6.0, 8.0)),
  'flexion_deg': ((25.0, 35.0),),  # deep only: see the module doc
}
# Limits for explicit options (what the model's joint fitting is known to survive).
LIMITS = {
  'tibial_slope_deg': (-8.0, 20.0),
  'notch_half_width_mm': (5.0, 14.0),
  'plateau_tilt_deg': (-10.0, 10.0),
  'condyle_scale': (0.7, 1.3),
  'flexion_deg': (0.0, 40.0),
}


@dataclasses.dataclass(frozen=True)
class ShapeDraw:
  """One knee's shape parameters (module doc). condyle_scale: {'lateral' | 'medial':
  (mediolateral, anteroposterior, superoinferior) factors}."""

  family: str
  scale: float
  tibial_slope_deg: float
  joint_gap_mm: float
  notch_half_width_mm: float
  condyle_scale: dict[str, tuple[float, float, float]]
  plateau_tilt_deg: float
  flexion_deg: float


def draw_shape(seed: int, family: str) -> ShapeDraw | None:
  """The shape of knee `seed` in `family` (None for 'default': sample_anatomy's draws stand)."""
  if family not in FAMILIES:
    raise ValueError(f'generate_knee: shape_family={family!r}; expected one of {list(FAMILIES)}')
  if family == 'default':
    return None
  rng = np.random.default_rng([int(seed), SHAPE_STREAM])

  def one(name: str) -> float:
    if family == 'varied':
      return float(rng.uniform(*VARIED[name]))
    bands = HELD_OUT[name]
    return float(rng.uniform(*bands[int(rng.integers(len(bands)))]))

  values = {name: one(name) for name in ('scale', 'tibial_slope_deg', 'joint_gap_mm')}
  values['notch_half_width_mm'] = one('notch_half_width_mm')
  condyles = {side: tuple(one('condyle_scale') for _ in range(3)) for side in ('lateral', 'medial')}
  values['plateau_tilt_deg'] = one('plateau_tilt_deg')
  # Last: the draws above stay those of the family before flexion was a parameter.
  values['flexion_deg'] = one('flexion_deg')
  return ShapeDraw(family=family, condyle_scale=condyles, **values)


def check_option(name: str, value: Any) -> Any:
  """An explicit shape option, checked against LIMITS (ValueError naming it); condyle_scale
  as {'lateral' | 'medial': 3 factors} or one factor for all six."""
  low, high = LIMITS[name]
  if name == 'condyle_scale':
    if isinstance(value, int | float):
      value = {side: (float(value),) * 3 for side in ('lateral', 'medial')}
    try:
      value = {side: tuple(float(f) for f in value[side]) for side in ('lateral', 'medial')}
    except (KeyError, TypeError, ValueError):
      raise ValueError(
        f'generate_knee: condyle_scale={value!r}; expected a factor or '
        "{'lateral': (ml, ap, si), 'medial': (ml, ap, si)}"
      ) from None
    factors = [f for triple in value.values() for f in triple]
    if len(factors) != 6 or not all(low <= f <= high for f in factors):
      raise ValueError(
        f'generate_knee: condyle_scale={value}; expected 3 factors per condyle in [{low}, {high}]'
      )
    return value
  if not low <= float(value) <= high:
    raise ValueError(f'generate_knee: {name}={value}; expected within [{low}, {high}]')
  return float(value)


def apply_shape(anatomy: Any, draw: ShapeDraw, keep: set[str]) -> None:
  """Sets the draw's parameters on a knee_anatomy.KneeAnatomy, except those named in `keep` (options
  the caller gave explicitly, which win)."""
  for field in dataclasses.fields(ShapeDraw):
    if field.name != 'family' and field.name not in keep:
      setattr(anatomy, field.name, getattr(draw, field.name))
  anatomy.shape_family = draw.family
  anatomy.shaped = True


def describe(anatomy: Any) -> dict[str, Any]:
  """The sidecar's 'anatomy' 'shape' block of a knee_anatomy.KneeAnatomy: its family and the shape
  parameters beyond the default sidecar's (scale and joint_gap_mm are recorded there)."""
  scale = anatomy.condyle_scale
  return {
    'family': anatomy.shape_family,
    'tibial_slope_deg': float(anatomy.tibial_slope_deg),
    'notch_half_width_mm': float(anatomy.notch_half_width_mm),
    'condyle_scale': None if scale is None else {k: list(v) for k, v in scale.items()},
    'plateau_tilt_deg': float(anatomy.plateau_tilt_deg),
    'flexion_deg': float(anatomy.flexion_deg),
  }
