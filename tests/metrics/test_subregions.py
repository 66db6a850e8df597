"""Femorotibial subregions (metrics/subregions.py) on analytic maps and a flat label-map plateau:
which cell belongs where is written out from the definitions (Wirth & Eckstein 2008) by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_pipelines.tissues import KneeLabelValues
from imask_jax.metrics import subregions, thickness_maps
from imask_jax.metrics.thickness import InterfaceThickness
from imask_jax.metrics.thickness_maps import Cylinder, ThicknessMap

NO_POINTS = InterfaceThickness(np.zeros((0, 3)), np.zeros(0))


def _map(values, row_edges, col_edges, cylinder=None) -> ThicknessMap:
  filled = values[np.isfinite(values)]
  return ThicknessMap(
    values, row_edges, col_edges, 'rows', 'cols', float(filled.mean()), NO_POINTS, cylinder
  )


def _tibial_map():
  """1 mm cells, anterior 0..40 mm (rows), right 0..70 mm (cols): plates at right 5..25 and
  45..65 mm, anterior 5..35 mm; a 4 x 4 mm denuded hole in the plate at larger R. Thickness
  1 + anterior / 10 mm (so it differs between the anterior and posterior sectors)."""
  edges_a, edges_r = np.arange(41.0), np.arange(71.0)
  a, r = np.meshgrid(edges_a[:-1] + 0.5, edges_r[:-1] + 0.5, indexing='ij')
  plate = (a > 5) & (a < 35) & (((r > 5) & (r < 25)) | ((r > 45) & (r < 65)))
  hole = (a > 18) & (a < 22) & (r > 53) & (r < 57)
  values = np.where(plate & ~hole, 1 + a / 10, np.nan)
  return _map(values, edges_a, edges_r), a, r, plate, hole


@pytest.mark.parametrize('side', ['left', 'right'])
def test_tibial_plates_subregions_and_measures(side):
  m, a, r, plate, hole = _tibial_map()
  regions = subregions.tibial_regions(m, side)
  larger_r = plate & (r > 35)
  # A right knee's lateral plate is at larger R; a left knee's is its mirror image.
  lateral = larger_r if side == 'right' else plate & (r < 35)
  medial = plate & ~lateral
  np.testing.assert_array_equal(regions['LT'], lateral)  # the hole is inside the footprint
  np.testing.assert_array_equal(regions['MT'], medial)
  for name in ('MT', 'LT'):
    parts = [regions[f'{p}{name}'] for p in subregions.TIBIAL_PARTS]
    np.testing.assert_array_equal(sum(p.astype(int) for p in parts), regions[name].astype(int))
    # The central ellipse holds 20 % of the plate (to within the cells along its edge).
    assert abs(parts[0].sum() / regions[name].sum() - 0.20) < 0.03
    centre_a = a[regions[name]].mean()
    centre_r = r[regions[name]].mean()
    assert parts[0][np.argmin(np.abs(a[:, 0] - centre_a)), np.argmin(np.abs(r[0] - centre_r))]
    # Far corners along A are anterior / posterior; along R, internal faces the other plate.
    inner_r = 44.5 if r[regions[name]].mean() > 35 else 25.5
    outer_r = 65.5 if r[regions[name]].mean() > 35 else 5.5
    row_mid = 20
    col = lambda x: int(np.argmin(np.abs(r[0] - x)))  # noqa: E731
    assert (
      regions[f'i{name}'][row_mid, col(inner_r - 1 if inner_r > 35 else inner_r)]
      or regions[f'i{name}'][row_mid, col(inner_r + 1 if inner_r > 35 else inner_r - 1)]
    )
    assert regions[f'e{name}'][row_mid, col(outer_r + (1 if outer_r < 35 else -1))]
    column = col(r[regions[name]].mean())
    assert regions[f'a{name}'][33, column] and regions[f'p{name}'][6, column]
  # Measures: the lateral plate of a right knee holds the hole.
  plate_name = 'LT' if side == 'right' else 'MT'
  measures = subregions.region_measures(m, regions[plate_name])
  cells = regions[plate_name] & ~hole
  assert measures.tab_mm2 == regions[plate_name].sum() == 20 * 30
  assert measures.cab_mm2 == cells.sum() == 20 * 30 - 16
  assert measures.denuded_percent == pytest.approx(100 * 16 / 600)
  assert measures.thickness_cab_mm == pytest.approx((1 + a[cells] / 10).mean())
  assert measures.volume_mm3 == pytest.approx((1 + a[cells] / 10).sum())
  assert measures.thickness_tab_mm == pytest.approx((1 + a[cells] / 10).sum() / 600)


def _femoral_map(radius=20.0):
  """1-degree rows (-180..180), 1 mm columns (-25..25 mm): the trochlea across all columns at
  angles 40..100 deg; two condyles (columns -20..-4 and 4..20 mm, a notch of 8 mm) from -130
  to 40 deg. Thickness 2 mm on the condyle at negative columns, 3 mm on the other, 1 mm on
  the trochlea."""
  rows, cols = np.arange(-180.0, 181.0), np.arange(-25.0, 26.0)
  angle, axial = np.meshgrid(rows[:-1] + 0.5, cols[:-1] + 0.5, indexing='ij')
  condyles = (angle > -130) & (angle < 40) & (np.abs(axial) > 4) & (np.abs(axial) < 20)
  trochlea = (angle > 40) & (angle < 100) & (np.abs(axial) < 20)
  values = np.full(angle.shape, np.nan)
  values[condyles] = np.where(axial[condyles] < 0, 2.0, 3.0)
  values[trochlea] = 1.0
  cylinder = Cylinder(np.zeros(3), np.array([1.0, 0.0, 0.0]), radius, 0.0)
  return _map(values, rows, cols, cylinder), angle, axial, condyles, trochlea


@pytest.mark.parametrize('side', ['left', 'right'])
def test_femoral_weight_bearing_condyles_and_thirds(side):
  m, angle, axial, condyles, trochlea = _femoral_map()
  regions = subregions.femoral_regions(m, side)
  np.testing.assert_array_equal(regions['TrF'], trochlea)
  # The notch's anterior end is the last condylar row (39.5 deg), the posterior end -129.5 deg:
  # the weight-bearing part is the 60 % of that arc next to the notch's end.
  cut = 39.5 - 0.6 * (39.5 + 129.5)
  weight_bearing = condyles & (angle >= cut)
  lateral_positive = side == 'right'  # lateral at larger R (columns along +R) for a right knee
  lateral = weight_bearing & ((axial > 0) == lateral_positive)
  np.testing.assert_array_equal(regions['cLF'], lateral)
  np.testing.assert_array_equal(regions['cMF'], weight_bearing & ~lateral)
  np.testing.assert_array_equal(regions['pLF'] | regions['pMF'], condyles & (angle < cut))
  # Thirds of the condyle's 16 mm: internal (next to the notch) 4..9.33, central, external.
  for condyle, mask in (('LF', lateral), ('MF', weight_bearing & ~lateral)):
    distance = np.abs(axial) - 4.5  # from the first covered column's centre by the notch
    width = 19.5 - 4.5
    np.testing.assert_array_equal(regions[f'ic{condyle}'], mask & (distance < width / 3))
    np.testing.assert_array_equal(regions[f'ec{condyle}'], mask & (distance >= 2 * width / 3))
  # Measures: thickness 3 mm on the positive condyle; cells of 1 deg x 20 mm radius x 1 mm.
  measures = subregions.knee_subregions(m, None, side)
  positive = 'cLF' if lateral_positive else 'cMF'
  assert measures[positive].thickness_cab_mm == 3.0
  area = math.radians(1.0) * 20.0
  assert measures[positive].tab_mm2 == pytest.approx(lateral.sum() * area)
  assert measures['TrF'].volume_mm3 == pytest.approx(trochlea.sum() * area * 1.0)
  assert 'MFTC' not in measures  # no tibia given


def test_totals_add_areas_and_weight_thickness_by_area():
  m, *_ = _tibial_map()
  f, *_ = _femoral_map()
  regions = subregions.knee_subregions(f, m, 'right')
  mftc = regions['MFTC']
  parts = [regions['MT'], regions['cMF']]
  assert mftc.tab_mm2 == pytest.approx(sum(p.tab_mm2 for p in parts))
  assert mftc.thickness_cab_mm == pytest.approx(
    sum(p.thickness_cab_mm * p.cab_mm2 for p in parts) / sum(p.cab_mm2 for p in parts)
  )
  ftj = regions['FTJ']
  assert ftj.volume_mm3 == pytest.approx(regions['MFTC'].volume_mm3 + regions['LFTC'].volume_mm3)
  row = subregions.as_row(regions)
  assert row['cMT_thickness_cab_mm'] == regions['cMT'].thickness_cab_mm
  assert len(row) == len(regions) * len(subregions.MEASURES)


def test_a_flat_plateau_label_map_measures_its_drawn_thickness():
  """Two tibial plateaus drawn as voxel slabs of 4 and 6 voxels (0.5 mm) on a flat tibia,
  through the real thickness map: each central subregion, more than a plate's thickness from
  its edges, reads exactly 2.0 and 3.0 mm (nearest-surface measure: the top faces); each plate
  the mean of its own map cells."""
  shape, spacing = (110, 60, 40), (0.5, 0.5, 0.5)
  labels = np.zeros(shape, np.uint8)
  labels[:, :, :20] = 3  # tibia, its surface at z = 20 voxels
  labels[5:45, 5:55, 20:24] = 4  # the plate at smaller R: 4 voxels
  labels[65:105, 5:55, 20:26] = 4  # the plate at larger R: 6 voxels
  m = thickness_maps.tibial_thickness_map(
    labels, spacing, labels=KneeLabelValues(), method='nearest'
  )
  regions = subregions.knee_subregions(None, m, 'left')  # left knee: lateral at smaller R
  assert regions['cLT'].thickness_cab_mm == 2.0
  assert regions['cMT'].thickness_cab_mm == 3.0
  smaller_r = m.col_centers < 27.5
  for name, half in (('LT', smaller_r), ('MT', ~smaller_r)):
    cells = m.thickness_mm[:, half]
    assert regions[name].thickness_cab_mm == pytest.approx(np.nanmean(cells))
    assert regions[name].cab_mm2 == np.isfinite(cells).sum() * 1.0  # 1 mm cells
    assert regions[name].denuded_percent == 0.0
