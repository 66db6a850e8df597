"""Session-wide fixtures: one smoke-trained workdir (and its restored model) shared by every test
module that needs a trained checkpoint.

`smoke_workdir` trains experiments/phantom_knee.py:smoke (5 knee phantoms, 64 x 64 inputs, 6
steps) once per test session into a temporary folder, its TFDS data beside it; `smoke_model`
restores its latest checkpoint once, so the detection function compiles once per session.
The smoke run writes its compiled programs to a session-wide persistent compilation cache
(`xla_cache_dir`), so that later runs of the same config (tests/e2e/test_train.py's
subprocesses, the resumed runs of tests/test_user_mistakes.py) load them instead of compiling
them again, whichever test module asks for the smoke run first.

`make test` runs two pytest-xdist workers, a test file on one worker (`--dist loadfile`): the
smoke run and the compilation cache then live in the folder both workers share, the first
worker to ask trains it under a file lock and the other waits for it and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs one fixed set of examples (HYPOTHESIS_PROFILE=ci, set by .ci/run) so that a gate never
# turns on a new random draw; local runs keep exploring new examples each time.
settings.register_profile('ci', derandomize=True, print_blob=True)
if os.environ.get('HYPOTHESIS_PROFILE'):
  settings.load_profile(os.environ['HYPOTHESIS_PROFILE'])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A voxel -> mm affine with a scanner pose (1 mm voxels, axes R, A, S, the origin moved): what
# test scans use, because an identity affine reads as a pose lost in conversion and is refused.
POSED_AFFINE = np.array(
  [[1.0, 0.0, 0.0, -40.0], [0.0, 1.0, 0.0, -30.0], [0.0, 0.0, 1.0, 12.0], [0.0, 0.0, 0.0, 1.0]]
)

# Fixtures that train a model: a test that uses one is an end-to-end run (`-m e2e`), outside the
# unit tier that `make test-fast` runs.
TRAINED_FIXTURES = frozenset({'smoke_workdir', 'smoke_model', 'reference', 'parallel_jobs'})
SMOKE_FIXTURES = frozenset({'smoke_workdir', 'smoke_model'})


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the e2e marks added here
def pytest_collection_modifyitems(config, items):
  for item in items:
    if TRAINED_FIXTURES.intersection(getattr(item, 'fixturenames', ())):
      item.add_marker(pytest.mark.e2e)

  # Files with end-to-end runs first, then files with slow tests, then the rest (each file's
  # tests kept together and in order): under pytest-xdist (`make test`: two workers, a file on
  # one worker, --no-loadscope-reorder) the long runs start at once and the many short files
  # even out the end, instead of one long run finishing alone. Among the end-to-end files, one
  # that needs the smoke run comes first (its worker trains it) and the others after the files
  # that do not (so the other worker has work while the smoke run trains).
  def path(item):
    return item.nodeid.split('::')[0]

  rank: dict[str, tuple[int, int]] = {}
  for item in items:
    smoke = bool(SMOKE_FIXTURES.intersection(getattr(item, 'fixturenames', ())))
    e2e, slow = item.get_closest_marker('e2e'), item.get_closest_marker('slow')
    here = (0, 2 if smoke else 1) if e2e else (1, 0) if slow else (2, 0)
    rank[path(item)] = min(rank.get(path(item), (2, 0)), here)
  smoke_files = [p for p, r in rank.items() if r == (0, 2)]
  if smoke_files:
    rank[smoke_files[0]] = (0, 0)
  order = {p: i for i, p in enumerate(dict.fromkeys(path(i) for i in items))}
  items.sort(key=lambda i: (rank[path(i)], order[path(i)]))


def experiment_config(name: str, arg: str | None = None):
  """`get_config(arg)` of experiments/<name>.py (the experiments folder is not a package)."""
  from imask_jax import configs

  return configs.load_experiment(os.path.join(REPO, 'experiments', f'{name}.py'), arg)


def box_painting_model(config, boxes, classes=None):
  """A `loading.LoadedModel` whose detector finds, in every slice, one detection per box
  (network pixels [y1, x1, y2, x2]) of its class in `classes` (default: all class 1) with
  mask probability 1 over the box and score 0.9: what it paints is known exactly, for tests
  of the steps after the network."""
  import numpy as np

  from data_pipelines import tissues
  from imask_jax import parallel
  from imask_jax.inference import loading

  boxes = np.asarray(boxes, np.float32)
  n = len(boxes)
  class_ids = np.ones(n, np.int32) if classes is None else np.asarray(classes, np.int32)

  def detect(variables, images):
    batch = images.shape[0]
    return {
      'boxes': np.tile(boxes, (batch, 1, 1)),
      'scores': np.full((batch, n), 0.9, np.float32),
      'classes': np.tile(class_ids, (batch, 1)),
      'valid': np.ones((batch, n), bool),
      'mask_probs': np.ones((batch, n, 28, 28), np.float32),
    }

  return loading.LoadedModel(
    workdir='fake',
    config=config,
    scheme=tissues.LabelScheme.from_config(config),
    step=0,
    variables=None,
    detect=detect,
    mesh=parallel.data_mesh(),
    batch_size=int(config.eval.batch_size),
  )


def noise_scan(folder, plane: str, mm: float, slices: int = 4, size: int = 64):
  """A scan of noise, read back as predict reads it (`loading.load_image`): `slices` slices
  along `plane`, 3 mm apart, each size x size pixels of `mm` (a scale-true model at that
  spacing takes them as they are, so painted network pixels are the scan's pixels)."""
  import nibabel as nib
  import numpy as np

  from data_pipelines import orientation
  from imask_jax.inference import loading

  axis = orientation.plane_axes(plane).slice_axis
  shape, spacing = [size] * 3, [mm] * 3
  shape[axis], spacing[axis] = slices, 3.0
  image = np.random.default_rng(0).gamma(2.0, 100.0, shape).astype(np.float32)
  path = os.path.join(folder, f'{plane}.nii.gz')
  nib.save(nib.Nifti1Image(image, np.diag(spacing + [1.0])), path)
  return loading.load_image(path, plane)


@contextlib.contextmanager
def persistent_compilation_cache(path: str):
  """JAX's persistent compilation cache in `path` for every compile inside the block (all
  programs, however small), then the settings as they were. A program loaded from the cache is
  the compiled executable itself: results are bit for bit those of a fresh compile."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  names = (
    'jax_compilation_cache_dir',
    'jax_persistent_cache_min_compile_time_secs',
    'jax_persistent_cache_min_entry_size_bytes',
  )
  saved = {name: getattr(jax.config, name) for name in names}
  compilation_cache.reset_cache()  # this process may have decided "no cache" already
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  try:
    yield path
  finally:
    compilation_cache.reset_cache()
    for name, value in saved.items():
      jax.config.update(name, value)


def subprocess_cache_env(path: str) -> dict[str, str]:
  """The environment variables that give a subprocess the same persistent cache."""
  return dict(
    JAX_COMPILATION_CACHE_DIR=path,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )


def _shared_folder(tmp_path_factory, name: str):
  """A session folder every xdist worker of this run sees (the workers' common base
  temporary folder), or this session's own one without xdist."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  path = base / name
  path.mkdir(exist_ok=True)
  return path


@contextlib.contextmanager
def _exclusive(path):
  """Holds an exclusive lock on the file `path` (created if missing) for the block."""
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope='session')
def xla_cache_dir(tmp_path_factory) -> str:
  """The session's persistent compilation cache folder (filled by the smoke run)."""
  return str(_shared_folder(tmp_path_factory, 'xla_cache'))


@pytest.fixture(scope='session')
def smoke_workdir(tmp_path_factory, xla_cache_dir) -> str:
  """A workdir trained with the knee smoke config (checkpoints, config.json, metrics)."""
  from imask_jax.training import train

  base = _shared_folder(tmp_path_factory, 'smoke')
  workdir, done = str(base / 'run'), base / 'trained'
  with _exclusive(base / 'lock'):
    if not done.exists():
      config = experiment_config('phantom_knee', 'smoke')
      # An explicit data_dir keeps the run independent of $IMASK_DATA_DIR.
      config.data.data_dir = str(base / 'tfds')
      with persistent_compilation_cache(xla_cache_dir):
        train.train_and_evaluate(config, workdir)
      done.touch()
  return workdir


@pytest.fixture(scope='session')
def smoke_model(smoke_workdir):
  """The latest checkpoint of `smoke_workdir`, restored (loading.LoadedModel)."""
  from imask_jax.inference import loading

  return loading.load_model(smoke_workdir)
