"""Figures read back pixel by pixel: overlay colours at known truth / prediction pixels, and the
sign colours of the thickness difference map.

The paper's colour code (Figures 9-10): green = reader (truth) only, red = model only, blue =
both, the grey slice elsewhere; difference maps red where the model measures thicker, blue
where thinner, light grey where a cell has no cartilage. The figures are written to PNG by the
code under test and decoded again with PIL; where each pixel of a panel lands in the PNG comes
from matplotlib's own transforms of the captured figure (data -> display), not from the code.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imask_jax.evaluation import viz
from imask_jax.metrics import CaseStatus
from imask_jax.metrics.thickness_maps import PlateComparison, ThicknessDifference, ThicknessMap

GREY = 0.4
N = 24  # slice size


def dominant(rgb) -> str:
  """'red', 'green' or 'blue': the channel that stands out of a pixel (by at least 60 / 255)."""
  rgb = np.asarray(rgb, float)
  order = np.argsort(rgb)
  assert rgb[order[2]] - rgb[order[1]] >= 60, f'no dominant channel in {rgb}'
  return ('red', 'green', 'blue')[order[2]]


# --- overlay_rgb ----------------------------------------------------------------------------------


def test_overlay_rgb_blends_the_paper_colours_at_each_pixel():
  image = np.full((2, 3), GREY, np.float32)
  image[1, 2] = 0.9
  truth = np.array([[1, 0, 1], [0, 0, 1]], bool)
  pred = np.array([[0, 1, 1], [0, 0, 0]], bool)
  rgb = viz.overlay_rgb(image, truth, pred, opacity=0.6)
  assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
  assert dominant(rgb[0, 0]) == 'green'  # truth only
  assert dominant(rgb[0, 1]) == 'red'  # model only
  assert dominant(rgb[0, 2]) == 'blue'  # both
  assert dominant(rgb[1, 2]) == 'green'  # truth only on a bright pixel
  np.testing.assert_array_equal(rgb[1, 0], [102, 102, 102])  # round(0.4 * 255): untouched grey
  # The blend: 40% of the grey plus 60% of the colour, per channel.
  for (r, c), colour in (
    ((0, 0), viz.TRUTH_ONLY),
    ((0, 1), viz.MODEL_ONLY),
    ((0, 2), viz.BOTH),
    ((1, 2), viz.TRUTH_ONLY),
  ):
    want = np.round((0.4 * image[r, c] + 0.6 * np.asarray(colour)) * 255)
    np.testing.assert_array_equal(rgb[r, c], want)


# --- the overlay figure ---------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch):
  """The figures viz writes, kept so that their axes can be located in the PNG."""
  figures = []
  real_save = viz.save

  def save(figure, path):
    figures.append(figure)
    return real_save(figure, path)

  monkeypatch.setattr(viz, 'save', save)
  return figures


def png_pixels(path) -> np.ndarray:
  with Image.open(path) as png:
    return np.asarray(png.convert('RGB'))


def pixel_of(ax, figure, x, y) -> tuple[int, int]:
  """PNG (row, column) of data point (x, y) of an axes (display origin is bottom-left)."""
  figure.canvas.draw()
  dx, dy = ax.transData.transform((x, y))
  height = figure.bbox.height
  return int(height - dy), int(dx)


def test_overlay_figure_shows_truth_only_green_model_only_red_both_blue(tmp_path, captured):
  """Two tissues with their own regions; the colour at the centre of every region's pixels, read
  back from the PNG, is the paper's colour for that region, and grey outside them."""
  image = np.full((N, N), GREY, np.float32)
  truth = np.zeros((N, N), np.int32)
  pred = np.zeros((N, N), np.int32)
  # tissue 1: truth only top-left, both top-right, model only bottom-right
  truth[2:8, 2:8] = 1
  truth[2:8, 14:20] = 1
  pred[2:8, 14:20] = 1
  pred[14:20, 14:20] = 1
  # tissue 2: the other way round, bottom-left
  pred[14:20, 2:6] = 2
  truth[14:20, 8:12] = 2
  expected = {
    1: {(4, 4): 'green', (4, 16): 'blue', (16, 16): 'red', (16, 4): 'grey', (16, 9): 'grey'},
    2: {(16, 3): 'red', (16, 9): 'green', (4, 4): 'grey', (16, 16): 'grey'},
  }
  path = viz.save_overlay_figure(
    tmp_path / 'overlay.png', image, truth, pred, {1: 'femur', 2: 'tibia'}, 'case 0'
  )
  pixels = png_pixels(path)
  (figure,) = captured
  axes = figure.axes
  assert len(axes) == 3  # image, femur, tibia
  for ax, value in ((axes[1], 1), (axes[2], 2)):
    for (r, c), colour in expected[value].items():
      rgb = pixels[pixel_of(ax, figure, c, r)]
      if colour == 'grey':
        np.testing.assert_allclose(rgb, round(GREY * 255), atol=1)
      else:
        assert dominant(rgb) == colour, (value, (r, c), rgb)
  # The image panel shows the plain grey slice at the same pixels.
  np.testing.assert_allclose(pixels[pixel_of(axes[0], figure, 4, 4)], round(GREY * 255), atol=1)


# --- the thickness figure -------------------------------------------------------------------------


def _map(values, mean):
  rows, cols = values.shape
  return ThicknessMap(
    thickness_mm=values,
    row_edges=np.linspace(0, 40, rows + 1),
    col_edges=np.linspace(-30, 30, cols + 1),
    row_name='angle_deg',
    col_name='axial_mm',
    mean_thickness_mm=mean,
    points=None,
  )


@pytest.mark.slow
def test_difference_map_is_red_where_the_model_is_thicker_blue_where_thinner(tmp_path, captured):
  truth = np.full((4, 6), 2.0)
  pred = truth.copy()
  pred[:, :3] += 0.8  # left half: the model measures thicker
  pred[:, 3:] -= 0.8  # right half: thinner
  truth[0, 0] = pred[0, 0] = np.nan  # no cartilage in one cell
  diff = pred - truth
  finite = diff[np.isfinite(diff)]
  comparison = PlateComparison(
    truth=_map(truth, float(np.nanmean(truth))),
    pred=_map(pred, float(np.nanmean(pred))),
    difference=ThicknessDifference(
      diff,
      np.linspace(0, 40, 5),
      np.linspace(-30, 30, 7),
      float(finite.mean()),
      float(finite.std(ddof=1)),
      int(finite.size),
    ),
    status=CaseStatus.OK,
  )
  path = viz.save_thickness_figure(tmp_path / 'thickness.png', comparison, 'femoral', 'case 0')
  pixels = png_pixels(path)
  (figure,) = captured
  panels = [ax for ax in figure.axes if ax.get_images()]  # the three maps, not the colorbars
  assert len(panels) == 3
  truth_ax, pred_ax, diff_ax = panels

  def cell(ax, row, col):
    """Colour at the centre of a map cell (rows from the bottom edge, origin='lower')."""
    x = -30 + (col + 0.5) * 10
    y = (row + 0.5) * 10
    return pixels[pixel_of(ax, figure, x, y)]

  for row in range(4):
    for col in range(6):
      if row == 0 and col == 0:
        for ax in (truth_ax, pred_ax, diff_ax):
          np.testing.assert_array_equal(cell(ax, row, col), [0xD9, 0xD9, 0xD9])
        continue
      red, _, blue = cell(diff_ax, row, col).astype(int)
      # RdBu_r: red for +, blue (dark navy at the end of the scale) for -
      assert (red - blue if col < 3 else blue - red) >= 60, (row, col, red, blue)
  # On the one viridis scale of truth and prediction, a thicker cell is brighter.
  thick, thin = cell(pred_ax, 1, 0), cell(pred_ax, 1, 5)
  assert thick.astype(int).sum() > thin.astype(int).sum() + 100
