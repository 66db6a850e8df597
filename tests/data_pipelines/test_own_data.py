"""The public knee releases as downloaded, rebuilt from phantoms: OAIZIB-CM (no dataset.json,
tibial cartilage medial 4 / lateral 5, an official imagesTs/ + labelsTs/ test set) and the
original OAI-ZIB archive (pose-less MetaImage masks beside converted images), and the ways a
user's data used to train or evaluate wrongly without a word."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from support import write_metaimage

from conftest import experiment_config
from data_pipelines import dataset_folders, nifti_io, phantoms, prepare, readers, tissues
from data_pipelines.datasets import builders, sources
from data_pipelines.datasets import params as params_lib
from data_pipelines.errors import EXIT_REFUSED, DataError

NUM = 4  # phantoms: 3 in imagesTr/, 1 in imagesTs/


@pytest.fixture(scope='module')
def knees(tmp_path_factory):
  """Case id -> (image path, canonical-free label map as stored, affine) of NUM knee phantoms
  (labels 1-4 as OAI-ZIB; the phantoms' effusion, 5, made background as the releases have it)."""
  root = tmp_path_factory.mktemp('phantoms')
  phantoms.write_dataset('knee', NUM, 7, str(root / 'knee'))
  out = {}
  for i in range(NUM):
    case = f'knee_{i:04d}'
    image = str(root / 'knee' / 'imagesTr' / f'{case}_0000.nii.gz')
    labels = nifti_io.load_nifti_labels(root / 'knee' / 'labelsTr' / f'{case}.nii.gz')
    data = np.where(labels.data == 5, 0, labels.data).astype(np.uint8)
    out[case] = (image, data, labels.affine)
  return out


def _split_tibial(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """OAIZIB-CM's labelling of a map: tibial cartilage (4) on the patient's left (lower R
  coordinate) becomes 5, the rest stays 4 (which half is 'medial' does not matter here)."""
  i, j, k = np.indices(labels.shape)
  right = nib.affines.apply_affine(affine, np.stack([i, j, k], -1))[..., 0]
  cartilage = labels == 4
  cut = np.median(right[cartilage])
  out = labels.copy()
  out[cartilage & (right < cut)] = 5
  return out


@pytest.fixture(scope='module')
def oaizib_cm(knees, tmp_path_factory):
  """OAIZIB-CM as released: imagesTr/ labelsTr/ imagesTs/ labelsTs/, no dataset.json."""
  root = tmp_path_factory.mktemp('OAIZIB-CM')
  for n, (case, (image, labels, affine)) in enumerate(knees.items()):
    images, label_dir = ('imagesTs', 'labelsTs') if n == NUM - 1 else ('imagesTr', 'labelsTr')
    os.makedirs(root / images, exist_ok=True)
    os.makedirs(root / label_dir, exist_ok=True)
    data = nib.load(image)
    nib.save(
      nib.Nifti1Image(np.asarray(data.dataobj), affine), root / images / f'{case}_0000.nii.gz'
    )
    nib.save(
      nib.Nifti1Image(_split_tibial(labels, affine), affine), root / label_dir / f'{case}.nii.gz'
    )
  return root


def _listing(root) -> dict[str, tuple[int, int]]:
  """Every file under `root` with its size and modification time: what 'unchanged' means."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      stat = os.stat(os.path.join(folder, name))
      out[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def prepared_cm(oaizib_cm, tmp_path_factory):
  before = _listing(oaizib_cm)
  dst = tmp_path_factory.mktemp('prepared') / 'oaizib_cm'
  assert prepare.main(['oaizib-cm', str(oaizib_cm), str(dst), '--workers', '2']) == 0
  assert _listing(oaizib_cm) == before  # no source file changed, none added
  return dst


def test_prepare_oaizib_cm_writes_a_checked_nnunet_folder(oaizib_cm, prepared_cm, knees):
  meta = json.loads((prepared_cm / 'dataset.json').read_text())
  assert meta['labels'] == tissues.OAIZIB_CM_LABELS and meta['plane'] == 'sagittal'
  assert sorted(os.listdir(prepared_cm / 'imagesTr')) == [
    f'knee_{i:04d}_0000.nii.gz' for i in range(NUM - 1)
  ]
  assert os.path.realpath(prepared_cm / 'labelsTs' / 'knee_0003.nii.gz') == str(
    oaizib_cm / 'labelsTs' / 'knee_0003.nii.gz'
  )
  report = json.loads((prepared_cm / prepare.REPORT_FILE).read_text())
  assert report['cases'] == {
    'train': {'images': 3, 'labelled': 3},
    'test': {'images': 1, 'labelled': 1},
  }
  # Voxel counts against the label maps as written.
  want = {}
  for _, labels, affine in knees.values():
    values, counts = np.unique(_split_tibial(labels, affine), return_counts=True)
    for v, c in zip(values, counts):
      want[int(v)] = want.get(int(v), 0) + int(c)
  assert {r['value']: r['voxels'] for r in report['label_values']} == want
  assert {r['value']: r['cases'] for r in report['label_values']} == dict.fromkeys(want, NUM)
  assert report['errors'] == {} and report['orientation']


def test_oaizib_cm_trains_the_four_tissues_and_tests_on_its_official_test_set(
  prepared_cm, knees, tmp_path
):
  config = experiment_config('oai', 'oaizib_cm,small')
  config.data.manual_dir = str(prepared_cm)
  params = params_lib.params_from_config(config, tmp_path)
  assert params.class_label_values == (1, 2, 3, (4, 5))
  split = sources.volume_sources(params, tmp_path)
  assert [c.case_id for c in split['test'].cases] == ['knee_0003']
  assert 'official test set' in split['test'].origin
  assert sorted(c.case_id for s in ('train', 'validation') for c in split[s].cases) == [
    'knee_0000',
    'knee_0001',
    'knee_0002',
  ]
  # Truth maps come with medial and lateral tibial cartilage merged into the canonical 4.
  volume = split['test'].load(split['test'].cases[0])
  _, labels, affine = knees['knee_0003']
  grid = orientation_grid(labels.shape, affine)
  np.testing.assert_array_equal(volume.labels, grid.to_canonical(labels))


def orientation_grid(shape, affine):
  from data_pipelines import orientation

  return orientation.SourceGrid.from_affine(shape, affine)


def test_five_class_scheme_measures_the_plate_and_each_part():
  scheme = tissues.LabelScheme.from_values(
    experiment_config('oai', 'oaizib_cm,tibial_parts').data.class_names, (1, 2, 3, 4, 5)
  )
  assert scheme.knee == tissues.KneeLabelValues(1, 2, 3, 4)
  labels = np.array([0, 1, 2, 3, 4, 5], np.uint8)
  np.testing.assert_array_equal(scheme.with_parts_joined(labels), [0, 1, 2, 3, 4, 4])
  np.testing.assert_array_equal(
    scheme.part_alone(labels, tissues.LATERAL_TIBIAL_CARTILAGE), [0, 1, 2, 3, 0, 4]
  )
  np.testing.assert_array_equal(
    scheme.part_alone(labels, tissues.MEDIAL_TIBIAL_CARTILAGE), [0, 1, 2, 3, 4, 0]
  )


def test_a_class_never_in_the_training_labels_stops_the_build_naming_the_scheme(knees, tmp_path):
  # The OAI-ZIB archive's classification masks (1 femur, 2 tibia) pass every value check.
  root = tmp_path / 'classification'
  for folder in ('imagesTr', 'labelsTr'):
    os.makedirs(root / folder)
  for case, (image, labels, affine) in knees.items():
    os.symlink(image, root / 'imagesTr' / f'{case}_0000.nii.gz')
    bones = np.select([labels == 1, labels == 3], [1, 2], 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(bones, affine), root / 'labelsTr' / f'{case}.nii.gz')
  (root / 'dataset.json').write_text(json.dumps({'labels': tissues.OAI_ZIB_LABELS}))
  config = experiment_config('oai', 'nifti,small')
  config.data.manual_dir = str(root)
  with pytest.raises(DataError) as error:
    builders.prepare(config, tmp_path / 'tfds')
  message = str(error.value)
  assert 'entries [3, 4] never occur in the training labels' in message
  assert 'ZIB classification masks (1 femur, 2 tibia)' in message
  assert not builders.builder_for(config, tmp_path / 'tfds').is_prepared()  # nothing stored


@pytest.fixture(scope='module')
def oai_zib(knees, tmp_path_factory):
  """The original OAI-ZIB layout: images/<id>.nii.gz and ZIB masks, axes (L, P, S) per
  docs/data.md: mask[x, y, z] holds the voxel at patient-left x, posterior y, superior z."""
  root = tmp_path_factory.mktemp('OAI-ZIB')
  os.makedirs(root / 'images')
  os.makedirs(root / 'segmentation_masks')
  for case, (image, labels, affine) in knees.items():
    os.symlink(image, root / 'images' / f'{case}.nii.gz')
    lps = nib.orientations.apply_orientation(
      labels,
      nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(('L', 'P', 'S'))
      ),
    )
    write_metaimage(str(root / 'segmentation_masks' / f'{case}.segmentation_masks.mhd'), lps)
  return root


def test_prepare_oai_zib_puts_each_mask_on_its_image_grid(oai_zib, knees, tmp_path):
  dst = tmp_path / 'prepared'
  assert prepare.main(['oai-zib', str(oai_zib), str(dst), '--workers', '2']) == 0
  for case, (_, labels, affine) in knees.items():
    written = nifti_io.load_nifti_labels(dst / 'labelsTr' / f'{case}.nii.gz')
    np.testing.assert_array_equal(written.data, labels)
    np.testing.assert_allclose(written.affine, affine)
  folder = dataset_folders.NnunetFolder(dst)
  assert [c.case_id for c in folder.cases()] == list(knees)


def test_an_image_that_lost_its_pose_is_refused_and_nothing_is_written(oai_zib, knees, tmp_path):
  # A converter that wrote an identity affine: the in-plane grid makes the shapes match, so
  # the mask would land transposed without a word.
  root = tmp_path / 'posed_lost'
  os.makedirs(root / 'images')
  os.symlink(oai_zib / 'segmentation_masks', root / 'segmentation_masks')
  for case, (image, _, _) in knees.items():
    data = nib.load(image)
    affine = np.eye(4) if case == 'knee_0001' else data.affine
    nib.save(nib.Nifti1Image(np.asarray(data.dataobj), affine), root / 'images' / f'{case}.nii.gz')
  dst = tmp_path / 'prepared'
  assert prepare.main(['oai-zib', str(root), str(dst)]) == EXIT_REFUSED
  assert not dst.exists() and os.listdir(tmp_path) == ['posed_lost']
  report = prepare.prepare('oai-zib', str(root), str(tmp_path / 'again'))
  assert list(report['errors']) == ['knee_0001']
  assert 'no scanner pose' in report['errors']['knee_0001'][0]
  # Training reads the same layout directly: refused there too, unless asked for.
  case = dataset_folders.OaiZibFolder(root).cases()[1]
  with pytest.raises(DataError, match='image has no scanner pose'):
    readers.load_volume(case, plane='sagittal', label_values=(1, 2, 3, 4))
  # Allowed, the array axes are read as R, A, S; here the mask then does not fit (the phantom's
  # grid is not square in-plane), which is the next check's one-line error.
  with pytest.raises(DataError, match='mask does not fit its image'):
    readers.load_volume(case, plane='sagittal', label_values=(1, 2, 3, 4), allow_missing_pose=True)


def test_mask_axcodes_is_a_config_field(oai_zib, tmp_path):
  config = experiment_config('oai')
  config.data.manual_dir = str(oai_zib)
  config.data.mask_axcodes = 'LAS'  # a wrong guess: the masks' y runs posterior
  params = params_lib.params_from_config(config, tmp_path)
  folder = sources.open_folder(params, tmp_path)
  assert folder.alignment.axcodes == ('L', 'A', 'S')
  config.data.mask_axcodes = 'LPX'
  with pytest.raises(ValueError, match='data.mask_axcodes'):
    params_lib.params_from_config(config, tmp_path)


@pytest.mark.parametrize('variant', ['nifti,smoke', 'oaizib_cm,smoke', 'small,smoke'])
def test_variants_that_cannot_combine_are_refused_by_name(variant):
  with pytest.raises(ValueError, match='cannot be combined: smoke trains on generated phantoms'):
    experiment_config('oai', variant)


def test_a_phantom_config_with_a_data_folder_is_refused():
  from imask_jax import configs

  config = experiment_config('oai', 'smoke')
  config.data.manual_dir = '/data/OAIZIB-CM'
  with pytest.raises(ValueError, match='never reads it'):
    configs.check_train_config(config)


def test_tibial_parts_are_measured_whole_and_apart(knees):
  """Evaluation of a five-class scheme: the tibial plate measured from both parts joined, as a
  four-class scheme measures the same map, and each part as a plate of its own, as the
  thickness map of that part alone measures it; thickness.csv has a row for each."""
  from imask_jax import metrics
  from imask_jax.evaluation import case_metrics, report

  _, labels, affine = knees['knee_0000']
  grid = orientation_grid(labels.shape, affine)
  truth = grid.to_canonical(_split_tibial(labels, affine))
  spacing = grid.canonical_spacing
  names = experiment_config('oai', 'oaizib_cm,tibial_parts').data.class_names
  five = tissues.LabelScheme.from_values(names, (1, 2, 3, 4, 5))
  four = tissues.LabelScheme.from_values(tissues.KNEE_CLASSES, (1, 2, 3, (4, 5)))
  prediction = type('Prediction', (), {'canonical': truth, 'plane': 'sagittal'})()
  result = case_metrics.evaluate_case(
    'k', truth, prediction, five, spacing, thickness_method='nearest'
  )
  assert list(result.thickness) == [
    'femoral',
    'tibial',
    tissues.MEDIAL_TIBIAL_CARTILAGE,
    tissues.LATERAL_TIBIAL_CARTILAGE,
  ]
  merged = four.to_canonical(truth)
  whole = metrics.tibial_thickness_map(merged, spacing, labels=four.knee, method='nearest')
  assert result.thickness['tibial'].truth.mean_thickness_mm == whole.mean_thickness_mm
  for part, value in ((tissues.MEDIAL_TIBIAL_CARTILAGE, 4), (tissues.LATERAL_TIBIAL_CARTILAGE, 5)):
    alone = np.where((truth == 4) | (truth == 5), np.where(truth == value, 4, 0), truth)
    want = metrics.tibial_thickness_map(alone, spacing, labels=four.knee, method='nearest')
    got = result.thickness[part].truth
    assert got.mean_thickness_mm == want.mean_thickness_mm
    assert 0 < got.points.thickness_mm.size < whole.points.thickness_mm.size
  rows = report.thickness_rows(result)
  assert [r['plate'] for r in rows] == list(result.thickness)


def test_oaizib_cm_labels_name_the_side_and_agree_with_the_geometric_split(prepared_cm, knees):
  """Evaluation of an OAIZIB-CM test case: its labels' medial 4 / lateral 5 split names the
  knee's side (the layout puts 5 at smaller R: a right knee's lateral plate is at larger R, so
  these read as a left knee), and the geometric MT / LT split agrees with it voxel for voxel
  but for the few that project outside both plates."""
  from imask_jax.evaluation import case_metrics, knee_steps

  config = experiment_config('oai', 'oaizib_cm')
  config.data.manual_dir = str(prepared_cm)
  source = sources.volume_sources(params_lib.params_from_config(config, prepared_cm), prepared_cm)[
    'test'
  ]
  case = source.cases[0]
  stored = source.load(case, canonical=False)
  assert set(np.unique(stored.labels)) == {0, 1, 2, 3, 4, 5}
  volume = source.canonical(stored)
  scheme = tissues.LabelScheme.from_config(config)
  side = knee_steps.case_side(case, volume, scheme, stored, source)
  assert side[0] == 'left' and side[1].startswith('from the labels: medial tibial cartilage (4)')
  prediction = type('Prediction', (), {'canonical': volume.labels, 'plane': 'sagittal'})()
  result = case_metrics.evaluate_case(
    case.case_id,
    volume.labels,
    prediction,
    scheme,
    volume.spacing,
    side=side,
    label_split=knee_steps.tibial_label_split(stored, source),
    thickness_method='nearest',
  )
  # The layout cut the plates at the median R of the cartilage voxels, not at the gap between
  # them: the voxels of the larger plate beyond the median disagree, and only those.
  labels, medial, lateral = knee_steps.tibial_label_split(stored, source)
  i = np.nonzero((labels == medial) | (labels == lateral))[0]
  occupied = np.unique(i)
  gap = occupied[np.argmax(np.diff(occupied))] + 0.5  # the widest empty run of R slabs
  at_gap = np.where(
    (labels == medial) | (labels == lateral),
    np.where(np.arange(labels.shape[0])[:, None, None] < gap, lateral, medial),
    labels,
  )
  wrongly = np.mean(
    (labels[(labels == medial) | (labels == lateral)])
    != at_gap[(labels == medial) | (labels == lateral)]
  )
  assert 0 < result.split_agreement < 1
  assert result.split_agreement == pytest.approx(1 - wrongly, abs=0.005)
  # Cut at the gap, the labels and the geometric split agree.
  at_gap_result = case_metrics.evaluate_case(
    case.case_id,
    volume.labels,
    prediction,
    scheme,
    volume.spacing,
    side=side,
    label_split=(at_gap.astype(np.uint8), medial, lateral),
    thickness_method='nearest',
  )
  assert at_gap_result.split_agreement == 1.0
  assert result.subregions['truth']['MT'] == result.subregions['prediction']['MT']
