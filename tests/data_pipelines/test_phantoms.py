"""Tests of the procedural knee and hip phantoms (cpu preset, a handful of volumes)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_pipelines.phantoms import __main__ as cli
from data_pipelines.phantoms import (
  generate_hip,
  generate_knee,
  knee,
  knee_anatomy,
  save_preview,
  scene,
  sdf,
  write_dataset,
)


def voxel_ml(affine: np.ndarray) -> float:
  return abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


@pytest.fixture(scope='module')
def knee0():
  return generate_knee(0)


@pytest.fixture(scope='module')
def hip0():
  return generate_hip(0)


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
  """Knee (2 volumes) and hip (1 volume) datasets, each written twice: once by the CLI."""
  root = tmp_path_factory.mktemp('phantoms')
  paths = {}
  for kind, num in (('knee', 2), ('hip', 1)):
    a, b = root / f'{kind}_a', root / f'{kind}_b'
    preview = root / f'{kind}_a' / 'preview.png'
    assert (
      cli.main([kind, '--num', str(num), '--seed', '3', '--out', str(a), '--preview', str(preview)])
      == 0
    )
    write_dataset(kind, num, 3, str(b))
    paths[kind] = (a, b)
  return paths


def _files(folder) -> dict[str, bytes]:
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, folder)] = open(path, 'rb').read()
  return out


# ---- determinism and the on-disk layout --------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_bytes_different_seeds_differ(datasets):
  for kind, (a, b) in datasets.items():
    fa, fb = _files(a), _files(b)
    fa.pop('preview.png')
    assert sorted(fa) == sorted(fb)
    for name in fa:
      assert fa[name] == fb[name], f'{kind}: {name} differs between two writes'
      if name.endswith('.gz'):
        assert fa[name][4:8] == b'\0\0\0\0', f'{name}: gzip header carries a time stamp'
  knee_a = _files(datasets['knee'][0])
  assert knee_a['imagesTr/knee_0000_0000.nii.gz'] != knee_a['imagesTr/knee_0001_0000.nii.gz']
  assert knee_a['labelsTr/knee_0000.nii.gz'] != knee_a['labelsTr/knee_0001.nii.gz']


@pytest.mark.slow
def test_preview_is_deterministic(knee0, hip0, tmp_path):
  a, b = tmp_path / 'a.png', tmp_path / 'b.png'
  save_preview([knee0, hip0], str(a))
  save_preview([knee0, hip0], str(b))
  assert a.read_bytes() == b.read_bytes()
  assert a.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and a.stat().st_size < 300_000


@pytest.mark.slow
def test_cli_layout_and_dataset_json(datasets):
  for kind, (a, _) in datasets.items():
    meta = json.loads((a / 'dataset.json').read_text())
    n = 2 if kind == 'knee' else 1
    assert meta['numTraining'] == n == len(meta['training'])
    assert meta['file_ending'] == '.nii.gz'
    assert meta['channel_names'] == {'0': 'DESS' if kind == 'knee' else 'STIR'}
    assert meta['plane'] == ('sagittal' if kind == 'knee' else 'coronal')
    expected_labels = (
      {
        'background': 0,
        'femur': 1,
        'femoral_cartilage': 2,
        'tibia': 3,
        'tibial_cartilage': 4,
        'effusion': 5,
      }
      if kind == 'knee'
      else {'background': 0, 'effusion': 1}
    )
    assert meta['labels'] == expected_labels
    assert meta['readers'] == ([] if kind == 'knee' else ['reader1', 'reader2'])
    for i, case in enumerate(meta['training']):
      cid = f'{kind}_{i:04d}'
      assert case['id'] == cid
      assert case['image'] == f'./imagesTr/{cid}_0000.nii.gz'
      assert case['label'] == f'./labelsTr/{cid}.nii.gz'
      assert (a / 'truth' / f'{cid}.json').is_file()
      for reader in meta['readers']:
        assert case[reader] == f'./labelsTr_{reader}/{cid}.nii.gz'
      for key, rel in case.items():
        if key != 'id':
          assert (a / rel).is_file(), rel
    png = (a / 'preview.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) < 300_000


@pytest.mark.slow
def test_written_files_agree_with_truth(datasets):
  """Reads the NIfTI files back: grid, dtypes, and the sidecar's volumes from voxel counts."""
  for a, _ in datasets.values():
    meta = json.loads((a / 'dataset.json').read_text())
    for case in meta['training']:
      truth = json.loads((a / case['truth']).read_text())
      img = nib.load(a / case['image'])
      lab = nib.load(a / case['label'])
      assert np.allclose(img.affine, lab.affine) and np.allclose(img.affine, truth['affine'])
      assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
      labels = np.asarray(lab.dataobj)
      assert list(labels.shape) == truth['shape']
      vml = voxel_ml(lab.affine)
      for name, entry in truth['tissues'].items():
        count = int((labels == meta['labels'][name]).sum())
        assert entry['voxels'] == count, name
        assert entry['volume_ml'] == pytest.approx(count * vml, abs=1e-3), name
      eff = int((labels == meta['labels']['effusion']).sum())
      assert truth['effusion']['total_voxels'] == eff
      assert truth['effusion']['total_ml'] == pytest.approx(eff * vml, abs=1e-3)
      for reader in meta['readers']:
        r = np.asarray(nib.load(a / case[reader]).dataobj)
        assert truth['readers'][reader]['voxels'] == int((r == 1).sum())


# ---- truth sidecar against the in-memory label map ----------------------------------------------


@pytest.mark.parametrize('kind', ['knee', 'hip'])
def test_truth_volumes_and_pockets(kind, knee0, hip0):
  ph = knee0 if kind == 'knee' else hip0
  t = ph.truth
  vml = voxel_ml(ph.affine)
  eff_value = t['labels']['effusion']
  pockets = t['effusion']['pockets']
  assert sum(p['voxels'] for p in pockets) == int((ph.labels == eff_value).sum())
  assert t['effusion']['total_ml'] == pytest.approx(sum(p['volume_ml'] for p in pockets), abs=1e-3)
  for p in pockets:
    assert p['volume_ml'] == pytest.approx(p['voxels'] * vml, abs=1e-3)
  for entry in t['tissues'].values():
    assert entry['voxels'] == int((ph.labels == entry['value']).sum())
  if kind == 'knee':
    for name in ('femur', 'tibia', 'femoral_cartilage', 'tibial_cartilage'):
      e = t['tissues'][name]  # continuous (partial-volume) and voxel volumes agree closely
      assert e['volume_ml_continuous'] == pytest.approx(e['volume_ml'], rel=0.04), name
  else:
    sides = t['effusion']['per_side']
    assert sum(v['voxels'] for v in sides.values()) == t['effusion']['total_voxels']
    assert 0 <= t['effusion']['total_ml'] <= 25.0


def test_renderer_partial_volume_of_a_sphere():
  """Voxel count and partial-volume sum of an analytic sphere against 4/3 pi r^3."""
  affine = np.diag([0.8, 0.8, 1.6, 1.0])
  affine[:3, 3] = -np.array([39.5 * 0.8, 39.5 * 0.8, 19.5 * 1.6])
  grid = scene.Grid((80, 80, 40), affine, np.eye(4))
  sc = scene.Scene(grid, ramp_mm=0.8)
  r = 17.3
  layer = scene.Layer(
    'ball',
    1,
    ((-r, -r, -r), (r, r, r)),
    lambda scn, sl, xyz: scene.LayerSample(sdf.sphere(*xyz, (0.5, -1.1, 2.3), r), 100.0),
  )
  out = scene.render(sc, [layer])
  exact = 4 / 3 * np.pi * r**3 / 1000.0
  assert out.fraction_sum[0] * grid.voxel_ml == pytest.approx(exact, rel=0.01)
  assert out.voxels[0] * grid.voxel_ml == pytest.approx(exact, rel=0.03)
  assert out.voxels[0] == int((out.labels == 1).sum())
  assert out.image.max() == pytest.approx(100.0) and out.image.min() == 0.0


def test_sdf_primitives_against_closed_forms():
  x = np.array([0.0, 10.0, 0.0, 0.0, 13.0, 0.0])
  y = np.array([0.0, 0.0, 5.0, 0.0, 0.0, 7.0])
  z = np.array([0.0, 0.0, 0.0, 3.0, 0.0, 0.0])
  d = sdf.ellipsoid(x, y, z, (0, 0, 0), (10.0, 5.0, 3.0))
  assert d[1:4] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
  assert d[4] == pytest.approx(3.0, abs=1e-5) and d[5] == pytest.approx(2.0, abs=1e-5)
  origins = np.zeros((3, 3))
  dirs = np.eye(3)
  fn = lambda a, b, c: sdf.sphere(a, b, c, (0.0, 0.0, 0.0), 7.0)
  assert sdf.ray_exit(fn, origins, dirs, 20.0, step=0.3) == pytest.approx([7.0] * 3, abs=1e-3)
  start = np.array([[0.0, 0.0, -20.0]])
  assert sdf.ray_entry(fn, start, np.array([[0.0, 0.0, 1.0]]), 40.0)[0] == pytest.approx(13.0, 1e-3)
  cover = scene.shell_coverage(np.array([-1.0, 0.0, 0.5, 1.0, 3.0]), np.float32(1.0), 1.0)
  assert cover == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])


# ---- cartilage thickness ------------------------------------------------------------------------


def _grid(entry: dict, key: str) -> np.ndarray:
  rows = entry[key]
  return np.array([[v if v is not None else [np.nan] * 3 for v in row] for row in rows], float)


@pytest.mark.parametrize('plate,value', [('femoral_cartilage', 2), ('tibial_cartilage', 4)])
def test_thickness_from_label_map_matches_field(knee0, plate, value):
  """Thickness sampled along the truth normals in the label map is the generator's field.

  Nearest-voxel sampling finds each of the cartilage's two boundaries to within half the
  voxel's extent along the normal, e = 0.5 * sum_i |n_i| spacing_i, so a node may be off by up
  to 2e (+0.1 mm for the 0.05 mm ray step); we allow 5 % exceptions (concave spots and the walls
  of focal defects, where the thickness changes under a voxel). Both boundary errors are
  unbiased, so the median error stays under half an in-plane voxel and the mean bias under
  0.15 mm.
  """
  ph = knee0
  entry = ph.truth['cartilage_thickness'][plate]
  t = np.array(entry['thickness_mm'], float)
  pts, nrm = _grid(entry, 'surface_points_ras_mm'), _grid(entry, 'surface_normals_ras')
  use = t > 1.0  # away from the tapered rim
  assert use.sum() > 200
  t, pts, nrm = t[use], pts[use], nrm[use]
  spacing = np.linalg.norm(ph.affine[:3, :3], axis=0)
  inv = np.linalg.inv(ph.affine)
  step = 0.05
  taus = np.arange(-2.0, 8.0, step)
  samples = pts[:, None, :] + taus[None, :, None] * nrm[:, None, :]
  idx = np.rint(samples @ inv[:3, :3].T + inv[:3, 3]).astype(int)
  inside_grid = np.all((idx >= 0) & (idx < ph.labels.shape), axis=-1)
  idx = np.clip(idx, 0, np.array(ph.labels.shape) - 1)
  is_cart = (ph.labels[idx[..., 0], idx[..., 1], idx[..., 2]] == value) & inside_grid
  measured = np.zeros(len(t))
  for k, row in enumerate(is_cart):
    start = np.nonzero(row & (taus > -1.0) & (taus < 1.5))[0]
    if start.size:
      end = start[0]
      while end < len(row) and row[end]:
        end += 1
      measured[k] = (end - start[0]) * step
  err = measured - t
  bound = np.abs(nrm) @ spacing + 0.1
  assert np.mean(np.abs(err) <= bound) >= 0.95
  assert np.median(np.abs(err)) <= 0.5 * spacing[:2].mean()
  assert abs(err.mean()) <= 0.15
  assert entry['mean_thickness_mm'] == pytest.approx(
    np.average(t), abs=0.4
  )  # area-weighted vs plain mean over the same nodes
  assert 1.0 <= np.array(entry['thickness_mm']).max() <= 3.5 + 1e-6


def test_oa_options_thin_the_cartilage():
  model = lambda **kw: knee_anatomy.KneeModel(
    knee_anatomy.sample_anatomy(np.random.default_rng(7), **kw)
  )
  healthy = model(oa_thinning=0.0, num_defects=0).femoral_grid()['thickness']
  worn = model(oa_thinning=0.8, num_defects=0).femoral_grid()['thickness']
  holed = model(oa_thinning=0.0, num_defects=2).femoral_grid()['thickness']
  assert worn.sum() < 0.95 * healthy.sum()
  assert np.all(worn <= healthy + 1e-5) and np.all(holed <= healthy + 1e-5)
  assert (holed < healthy - 0.5).any()
  # Healthy cartilage is 1 to 3.5 mm thick except in the narrow rim where it tapers to 0.
  covered = healthy[healthy > 0]
  assert healthy.max() <= 3.5 + 1e-6 and np.mean(covered >= 1.0) > 0.75


# ---- anatomy sanity -----------------------------------------------------------------------------


def test_knee_anatomy_sanity(knee0):
  ph = knee0
  assert ph.image.dtype == np.float32 and ph.labels.dtype == np.uint8
  assert ph.image.shape == ph.labels.shape == (128, 128, 64)
  assert nib.aff2axcodes(ph.affine) == ('I', 'P', 'L')
  assert np.allclose(np.linalg.norm(ph.affine[:3, :3], axis=0), (0.8, 0.8, 1.5))
  rot = ph.affine[:3, :3] / np.linalg.norm(ph.affine[:3, :3], axis=0)
  assert np.allclose(np.abs(rot).sum(axis=0), 1) and set(np.unique(np.abs(rot))) <= {0.0, 1.0}
  spacing = np.linalg.norm(ph.affine[:3, :3], axis=0)
  vml = voxel_ml(ph.affine)
  volumes = {v: (ph.labels == v).sum() * vml for v in range(1, 6)}
  assert volumes[1] > 40 and volumes[3] > 30  # femur, tibia (mL inside the cropped FOV)
  assert 3 < volumes[2] < 25 and 1 < volumes[4] < 10  # cartilage plates
  assert volumes[5] > 0  # effusion
  for cart, bone in ((2, 1), (4, 3)):
    # Every cartilage voxel lies within the thickest cartilage (3.5 mm) plus one voxel
    # diagonal of its own bone, and every sizeable cartilage piece touches that bone.
    dist = ndimage.distance_transform_edt(ph.labels != bone, sampling=spacing)
    assert dist[ph.labels == cart].max() <= 3.5 + np.linalg.norm(spacing)
    pieces, n = ndimage.label(ph.labels == cart)
    touching = ndimage.binary_dilation(ph.labels == bone)
    for k in range(1, n + 1):
      piece = pieces == k
      if piece.sum() >= 5:
        assert (piece & touching).any()
  # Superior is up: the femur lies above the tibia (array axis 0 points inferiorly).
  rows = np.arange(ph.labels.shape[0])[:, None, None]
  assert (rows * (ph.labels == 1)).sum() / (ph.labels == 1).sum() < (
    rows * (ph.labels == 3)
  ).sum() / (ph.labels == 3).sum()
  assert ph.truth['spacing_mm'] == pytest.approx(list(spacing))
  assert ph.truth['seed'] == 0 and ph.truth['preset'] == 'cpu'


def test_knee_cartilage_shells_do_not_overlap():
  """Continuous check on a dense random sample around the joint, plus the label map."""
  rng = np.random.default_rng(0)
  for seed in (0, 1):
    model = knee_anatomy.KneeModel(knee_anatomy.sample_anatomy(np.random.default_rng(seed)))
    p = rng.uniform((-40.0, -35.0, -8.0), (40.0, 30.0, 10.0), (150_000, 3)).astype(np.float32)
    fem = model.cartilage_inside('femur', *p.T)
    tib = model.cartilage_inside('tibia', *p.T)
    assert fem.sum() > 1000 and tib.sum() > 1000
    assert not (fem & tib).any()


def test_left_knee_is_mirrored():
  right = knee.make_grid(
    knee_anatomy.sample_anatomy(np.random.default_rng(1), side='right', pose=False), 'cpu'
  )
  left = knee.make_grid(
    knee_anatomy.sample_anatomy(np.random.default_rng(1), side='left', pose=False), 'cpu'
  )
  # Model +x (lateral, the fibula side) points to the patient's right for a right knee, to the
  # left for a left knee (RAS x: +right).
  assert right.model_to_world[0, 0] == pytest.approx(1.0) and left.model_to_world[
    0, 0
  ] == pytest.approx(-1.0)


def test_hip_anatomy_and_readers(hip0):
  ph = hip0
  assert ph.image.shape == ph.labels.shape == (160, 160, 20)
  assert nib.aff2axcodes(ph.affine) == ('I', 'L', 'A')
  assert np.allclose(np.linalg.norm(ph.affine[:3, :3], axis=0), (2.2, 2.2, 3.0))
  assert set(np.unique(ph.labels)) <= {0, 1}
  truth = ph.labels == 1
  assert truth.sum() > 0
  for name in ('reader1', 'reader2'):
    r = ph.reader_labels[name]
    assert r.dtype == np.uint8 and r.shape == ph.labels.shape and set(np.unique(r)) <= {0, 1}
    r = r == 1
    dice = 2 * (r & truth).sum() / (r.sum() + truth.sum())
    assert 0.5 < dice < 1.0  # close to the truth, never identical
  # Effusion sits inside the capsules, not in bone: bright in the image.
  assert np.median(ph.image[truth]) > 3 * np.median(ph.image[ph.image > 0])


def test_bad_inputs_are_refused(tmp_path):
  with pytest.raises(ValueError, match='preset'):
    generate_knee(0, preset='huge')
  with pytest.raises(ValueError, match='wobble'):
    generate_knee(0, wobble=3)
  with pytest.raises(ValueError, match='side'):
    generate_knee(0, side='middle')
  (tmp_path / 'keep.txt').write_text('user data')
  with pytest.raises(ValueError, match='refusing'):
    write_dataset('hip', 1, 0, str(tmp_path))
  assert (tmp_path / 'keep.txt').read_text() == 'user data'
  with pytest.raises(ValueError, match='kind'):
    write_dataset('elbow', 1, 0, str(tmp_path / 'new'))
  assert not (tmp_path / 'new').exists()
