"""MRI acquisition effects shared by the phantoms: grids, textures, blur, bias field, noise.

All functions are deterministic given the `numpy.random.Generator` they are handed, and work on
float32 arrays [X, Y, Z] with spacing in mm in the array's axis order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from data_pipelines.phantoms import sdf

Array = np.ndarray

# Signal of each tissue in scanner-like units, per sequence. DESS (water excitation, as in
# OAI): fluid brightest, cartilage bright, muscle intermediate, fat and fatty marrow darker
# (partly suppressed), cortex, menisci, tendons and ligaments black. STIR: fat and fatty
# marrow nulled, red marrow a little brighter, muscle intermediate, fluid very bright.
DESS = {
  'fluid': 900.0,
  'cartilage': 560.0,
  'muscle': 270.0,
  'fat': 190.0,
  'marrow': 165.0,
  'cortex': 18.0,
  'fibrous': 28.0,
  'ligament': 70.0,
  'vessel': 420.0,
  'skin': 240.0,
}
STIR = {
  'fluid': 950.0,
  'cartilage': 380.0,
  'muscle': 290.0,
  'fat': 50.0,
  'marrow': 75.0,
  'cortex': 15.0,
  'fibrous': 25.0,
  'ligament': 40.0,
  'vessel': 480.0,
  'skin': 200.0,
  'bowel': 380.0,
  'node': 620.0,
  'red_marrow': 115.0,
  'labrum': 30.0,
  'synovium': 480.0,  # thickened, inflamed synovium: between muscle and fluid
}


# Bounds on the in-plane matrix (pixels per in-plane axis) an acquisition override may give.
IN_PLANE_PIXELS = (16, 2048)


def acquisition(
  presets: dict[str, dict[str, Any]],
  preset: str,
  spacing_mm: float | None = None,
  fov_mm: float | None = None,
  who: str = 'phantoms',
) -> dict[str, Any]:
  """The acquisition of `preset`, with optional in-plane overrides; ValueError on bad values.

  In-plane means array axes 0 and 1 (the slice plane); axis 2 (slice count and thickness) is
  always the preset's. spacing_mm replaces the in-plane pixel spacing of both axes; fov_mm sets
  the in-plane extent of both axes (default: the preset's shape x spacing, so a spacing alone
  keeps the preset's field of view). The in-plane shape is round(fov / spacing), so the actual
  extent (shape x spacing, `fov_mm` of the result) is within half a pixel of the request. The
  in-plane PSF FWHM keeps the preset's FWHM / spacing ratio; the noise sigma is the preset's.
  Without overrides the preset's own values come back unchanged.

  Returns dict(shape, spacing, fwhm, noise, fov_mm) with 3-tuples along the array axes.
  """
  if preset not in presets:
    raise ValueError(f'{who}: preset={preset!r}; expected one of {sorted(presets)}')
  p = presets[preset]
  shape, spacing, fwhm = tuple(p['shape']), tuple(p['spacing']), tuple(p['fwhm'])
  for name, value in (('spacing_mm', spacing_mm), ('fov_mm', fov_mm)):
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
      raise ValueError(f'{who}: {name}={value!r}; expected a number of mm > 0')
    if not (math.isfinite(float(value)) and float(value) > 0):
      raise ValueError(f'{who}: {name}={value!r}; expected a finite number of mm > 0')
  if spacing_mm is not None:
    new = float(spacing_mm)
    # Same FWHM / spacing ratio as the preset (an unchanged spacing keeps the preset's FWHM).
    fwhm = tuple(f if new == s else f / s * new for f, s in zip(fwhm[:2], spacing[:2])) + fwhm[2:]
    spacing = (new, new, spacing[2])
  if spacing_mm is not None or fov_mm is not None:
    extent = (
      (float(fov_mm),) * 2
      if fov_mm is not None
      else tuple(p['shape'][i] * p['spacing'][i] for i in (0, 1))
    )
    pixels = tuple(int(round(e / s)) for e, s in zip(extent, spacing[:2]))
    lo, hi = IN_PLANE_PIXELS
    if not all(lo <= n <= hi for n in pixels):
      raise ValueError(
        f'{who}: fov_mm={fov_mm}, spacing_mm={spacing_mm} (preset {preset!r}): '
        f'{round(extent[0], 4)} mm / {spacing[0]} mm = {pixels[0]} x {pixels[1]} pixels '
        f'in-plane; expected {lo} to {hi} per axis'
      )
    shape = pixels + shape[2:]
  fov = tuple(round(n * s, 4) for n, s in zip(shape, spacing))
  return dict(shape=shape, spacing=spacing, fwhm=fwhm, noise=p['noise'], fov_mm=fov)


def grid_affine(
  shape: tuple[int, int, int],
  spacing: tuple[float, float, float],
  axis_directions: Array,
  center_world: Array,
) -> Array:
  """Affine (voxel index -> world RAS mm) of a grid whose axis i points along unit vector
  axis_directions[i] (a signed permutation for scanner-aligned acquisitions) and whose central
  voxel position lies at center_world."""
  rot = np.asarray(axis_directions, np.float64).T * np.asarray(spacing, np.float64)[None, :]
  centre_index = (np.asarray(shape, np.float64) - 1) / 2
  affine = np.eye(4)
  affine[:3, :3] = rot
  affine[:3, 3] = np.asarray(center_world, np.float64) - rot @ centre_index
  return affine


def pose_matrix(rot: Array, translation: Array, mirror_x: bool = False) -> Array:
  """4x4 model -> world: optional mirror of model x (a left instead of a right limb), then
  rotation, then translation (mm)."""
  m = np.eye(4)
  lin = np.asarray(rot, np.float64)
  if mirror_x:
    lin = lin @ np.diag([-1.0, 1.0, 1.0])
  m[:3, :3] = lin
  m[:3, 3] = translation
  return m


def texture(
  shape: tuple[int, int, int], rng: np.random.Generator, sigma_vox: tuple[float, float, float]
) -> Array:
  """Smooth Gaussian random field, zero mean and unit std, clipped to +-2.5, float32.

  Axes with a wide kernel are generated on a coarser grid and linearly upsampled (the field
  is smooth there anyway), which keeps big volumes cheap.
  """
  factor = [max(1, int(sg // 1.5)) for sg in sigma_vox]
  small = tuple(-(-n // f) + 1 for n, f in zip(shape, factor))
  noise = rng.standard_normal(small, dtype=np.float32)
  field = ndimage.gaussian_filter(noise, [sg / f for sg, f in zip(sigma_vox, factor)], mode='wrap')
  if any(f > 1 for f in factor):
    field = _linear_upsample(field, factor, shape)
  field -= field.mean(dtype=np.float64)
  field /= max(float(field.std(dtype=np.float64)), 1e-12)
  # Clip the rare far tails so multiplicative textures never reach zero or double a tissue.
  return np.clip(field, -2.5, 2.5)


def _linear_upsample(field: Array, factor: list[int], shape: tuple[int, int, int]) -> Array:
  """Separable linear interpolation of `field` by integer factors, cropped to `shape`."""
  for axis, f in enumerate(factor):
    if f == 1:
      continue
    n = shape[axis]
    pos = np.arange(n, dtype=np.float32) / f
    i0 = np.floor(pos).astype(int)
    w = (pos - i0).reshape([-1 if a == axis else 1 for a in range(3)])
    field = np.take(field, i0, axis=axis) * (1 - w) + np.take(field, i0 + 1, axis=axis) * w
  return field


def bias_field(
  shape: tuple[int, int, int],
  rng: np.random.Generator,
  strength: float,
  coil_axis: int | None = None,
  coil_falloff: float = 0.0,
  reach: tuple[float, float, float] | None = None,
) -> Array:
  """Smooth multiplicative coil sensitivity, float32 [X, Y, Z], mean about 1.

  exp of a random polynomial of total degree <= 2 over coordinates u normalised to [-1, 1]
  across the grid (coefficients ~ N(0, strength)), times an optional falloff
  max(1 - f * u^2, 0.1) along `coil_axis` (the signal drop towards the ends of a cylindrical
  extremity coil). `reach` (per axis, default 1) stretches u to [-reach, reach]: the grid's
  half-extent in units of a reference half-extent, so that the coil stays put in space when
  the grid's field of view changes.
  """
  axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
  if reach is not None:
    axes = [a * np.float32(r) for a, r in zip(axes, reach)]
  u = [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]
  log_b = np.zeros(shape, np.float32)
  for i in range(3):
    log_b = log_b + np.float32(rng.normal(0, strength)) * u[i]
    for j in range(i, 3):
      log_b = log_b + np.float32(rng.normal(0, strength / 2)) * u[i] * u[j]
  field = np.exp(log_b)
  if coil_axis is not None and coil_falloff > 0:
    field *= np.maximum(1 - np.float32(coil_falloff) * u[coil_axis] ** 2, np.float32(0.1))
  return field.astype(np.float32)


def psf_blur(
  image: Array, spacing: tuple[float, float, float], fwhm_mm: tuple[float, float, float]
) -> Array:
  """Gaussian point-spread function with the given full widths at half maximum (mm)."""
  sigma = [f / 2.3548 / s for f, s in zip(fwhm_mm, spacing)]
  return ndimage.gaussian_filter(image, sigma, mode='nearest')


def rician(signal: Array, sigma: float, rng: np.random.Generator) -> Array:
  """Magnitude of the signal plus complex Gaussian noise of std sigma per channel."""
  real = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
  imag = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
  return np.sqrt(real * real + imag * imag)


def quantise(image: Array, max_value: float = 4095.0) -> Array:
  """Rounds to whole scanner units in [0, max_value] (the image is stored as int16)."""
  return np.clip(np.rint(image), 0, max_value).astype(np.float32)


def coil_reach(acquired: dict[str, Any], reference: dict[str, Any]) -> tuple[float, ...]:
  """The grid's half-extent per axis in units of the reference preset's (`bias_field`'s
  `reach`): the coil is fixed in space, so its profile spans the preset's field of view
  whatever field of view an acquisition override gives."""
  return tuple(
    (n - 1) * s / ((n0 - 1) * s0)
    for n, s, n0, s0 in zip(
      acquired['shape'], acquired['spacing'], reference['shape'], reference['spacing']
    )
  )


def scanner_image(
  rendered: Array,
  spacing: tuple[float, float, float],
  acquired: dict[str, Any],
  reference: dict[str, Any],
  rng: np.random.Generator,
  *,
  bias_strength: float,
  coil_falloff: float,
) -> Array:
  """What the scanner records of a rendered signal volume, float32 [X, Y, Z] in whole units:
  the PSF blur (`acquired['fwhm']`), the coil's bias field (along array axis 0, the limb's
  long axis in both phantoms; `coil_reach` of the preset `reference`), Rician noise of
  `acquired['noise']` and 12-bit quantisation. Draws from `rng` in that order (bias, noise)."""
  image = psf_blur(rendered, spacing, acquired['fwhm'])
  image *= bias_field(
    rendered.shape,
    rng,
    bias_strength,
    coil_axis=0,
    coil_falloff=coil_falloff,
    reach=coil_reach(acquired, reference),
  )
  return quantise(rician(image, acquired['noise'], rng))


def depth_mix(
  depth: Array, thickness: Array | float, outer: float, inner: Array | float, width: float
) -> Array:
  """Signal that is `outer` in the first `thickness` mm below a surface and `inner` deeper
  (e.g. cortex over marrow), blended over `width` mm."""
  w = sdf.smoothstep(0.0, 1.0, (depth - thickness) / np.float32(width) + np.float32(0.5))
  return np.float32(outer) + (inner - np.float32(outer)) * w
