"""MRI acquisition effects shared by the phantoms: grids, textures, blur, bias field, noise.

All functions are deterministic given the `numpy.random.Generator` they are handed, and work on
float32 arrays [X, Y, Z] with spacing in mm in the array's axis order.
"""

from __future__ import annotations

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
}


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
) -> Array:
  """Smooth multiplicative coil sensitivity, float32 [X, Y, Z], mean about 1.

  exp of a random polynomial of total degree <= 2 over coordinates normalised to [-1, 1]
  (coefficients ~ N(0, strength)), times an optional falloff 1 - f * u^2 along `coil_axis`
  (the signal drop towards the ends of a cylindrical extremity coil).
  """
  axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
  u = [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]
  log_b = np.zeros(shape, np.float32)
  for i in range(3):
    log_b = log_b + np.float32(rng.normal(0, strength)) * u[i]
    for j in range(i, 3):
      log_b = log_b + np.float32(rng.normal(0, strength / 2)) * u[i] * u[j]
  field = np.exp(log_b)
  if coil_axis is not None and coil_falloff > 0:
    field *= 1 - np.float32(coil_falloff) * u[coil_axis] ** 2
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


def depth_mix(
  depth: Array, thickness: Array | float, outer: float, inner: Array | float, width: float
) -> Array:
  """Signal that is `outer` in the first `thickness` mm below a surface and `inner` deeper
  (e.g. cortex over marrow), blended over `width` mm."""
  w = sdf.smoothstep(0.0, 1.0, (depth - thickness) / np.float32(width) + np.float32(0.5))
  return np.float32(outer) + (inner - np.float32(outer)) * w
