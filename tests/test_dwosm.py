"""SSL4EO-S12@DW / @OSM: converter on tiny fixtures in the release layout, configs end to end.

The fixtures are real-size tiles (510 px training, 512 px hold-out) written as GeoTIFFs in the
folder layout of the NoLDO-S12 downstream release. The README commands are taken from
README.md itself and run as subprocesses; expected values are recomputed here from rasterio
reads with the CromSS reader's formula written out independently (float64, truncation).
"""
import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import rasterio
from rasterio.transform import from_origin
import tensorflow_datasets as tfds

from configs import transfer_dw
from configs import transfer_osm
from cromss_jax.models import ResNetEncoder, jit_init
from helpers import S1_STATS, S2_MEAN, S2_STD
from cromss_jax.tasks import transfer
from data_prep import ssl4eo_dwosm

# One xdist worker for the module: the module-scoped conversion of both releases (`converted`,
# ~10 s of subprocesses) is then made once, not once per worker.
pytestmark = pytest.mark.xdist_group('test_dwosm')

REPO = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT_S = 420
CRS = 'EPSG:32633'
# Tile ids as the release names them (decimal point written as '.' or 'p').
TRAIN_IDS = ('-0.0520777954_32.9493499204-20190816', '12.4861033333_41.8929166667-20190322')
TEST_IDS = ('-0p6481384406_6p8231873947-20190226', '7p1234567890_50p1234567890-20191103')


# ----------------------------------------------------------------------------------------------
# Fixture generator: the release layout
# ----------------------------------------------------------------------------------------------
def _write_tif(path: Path, data: np.ndarray, origin=(500000.0, 4600000.0), nodata=None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  bands, height, width = data.shape
  with rasterio.open(path, 'w', driver='GTiff', height=height, width=width, count=bands,
                     dtype=data.dtype, crs=CRS, transform=from_origin(*origin, 10.0, 10.0),
                     nodata=nodata) as dst:
    dst.write(data)


def write_tile(split_dir: Path, labels: str, tile_id: str, size: int, seed: int, *,
               label_bands: int = 1, s2_bands: int = 13, label_values=None,
               skip: tuple = ()) -> None:
  """One tile: image_s1/s1_<id>.tif, image_s2/s2_<id>.tif, label_<labels>/<labels>_<id>.tif."""
  rng = np.random.default_rng(seed)
  s1 = rng.normal(-15.0, 6.0, (2, size, size)).astype(np.float32)
  s1[0, :3, :5] = np.nan                       # swath border
  s1[1, -1, -4:] = -np.inf
  s2 = rng.integers(0, 6000, (s2_bands, size, size)).astype(np.int16)
  top = ssl4eo_dwosm.DW_CLOUD_CODE if labels == 'dw' else len(ssl4eo_dwosm.OSM_CLASSES)
  values = np.arange(top + 1) if label_values is None else np.asarray(label_values)
  label = rng.choice(values, (label_bands, size, size)).astype(np.uint8)
  if 's1' not in skip:
    _write_tif(split_dir / 'image_s1' / f's1_{tile_id}.tif', s1)
  if 's2' not in skip:
    _write_tif(split_dir / 'image_s2' / f's2_{tile_id}.tif', s2)
  _write_tif(split_dir / f'label_{labels}' / f'{labels}_{tile_id}.tif', label)
  if labels == 'osm':   # the OSM release also carries the DW labels of its tiles
    _write_tif(split_dir / 'label_dw' / f'dw_{tile_id}.tif', label % 11)


def make_release(root: Path, labels: str) -> dict:
  """A tiny SSL4EO-S12@<labels> release under root/ssl4eo_s12_<labels>/; returns what is where."""
  base = root / f'ssl4eo_s12_{labels}'
  train, test = base / f'{labels}_train', base / f'{labels}_test'
  for i, tile_id in enumerate(TRAIN_IDS):
    write_tile(train, labels, tile_id, 510, seed=i,
               label_bands=2 if (labels == 'dw' and i == 1) else 1)
  for i, tile_id in enumerate(TEST_IDS):
    write_tile(test, labels, tile_id, 512, seed=10 + i)
  # Two bad tiles in the training folder: a label value off the table and a missing S2 file.
  write_tile(train, labels, 'bad_label', 510, seed=20, label_values=[1, 2, 99])
  write_tile(train, labels, 'no_s2', 510, seed=21, skip=('s2',))
  return {'root': base, 'train': train, 'test': test}


# ----------------------------------------------------------------------------------------------
# Expected values, written out independently of the converter
# ----------------------------------------------------------------------------------------------
def _expected_uint8(x: np.ndarray, mean: float, std: float) -> np.ndarray:
  """CromSS DW/OSM reader: (x - (m - 2s)) / 4s * 255, clipped to [0, 255], truncated."""
  x = np.asarray(x, np.float64)
  v = np.floor(np.clip((np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) - (mean - 2 * std))
                       / (4 * std) * 255.0, 0, 255))
  v[~np.isfinite(x)] = 0
  return v.astype(np.uint8)


def _expected_label(raw: np.ndarray, labels: str) -> np.ndarray:
  out = np.full(raw.shape, 255, np.uint8)
  classes = 9 if labels == 'dw' else 13
  for code in range(1, classes + 1):        # DW 10 (cloud) and 0 (unlabelled) stay 255
    out[raw == code] = code - 1
  return out


def _read(path: Path) -> np.ndarray:
  with rasterio.open(path) as src:
    return src.read()


def _assert_images_match(got: np.ndarray, raw: np.ndarray, stats) -> None:
  """got [H,W,C] uint8 vs raw [C,H,W]: exact but where the reference float32 arithmetic and
  this float64 one fall on the two sides of an integer (about 1e-5 of continuous S1 values)."""
  expected = np.stack([_expected_uint8(raw[c], *stats[c]) for c in range(raw.shape[0])], -1)
  diff = np.abs(got.astype(int) - expected.astype(int))
  assert diff.max() <= 1
  assert np.count_nonzero(diff) <= expected.size * 1e-4


def _readme_commands(prefix: str) -> list[str]:
  """The README.md command lines starting with `prefix` (continuation lines joined)."""
  text = (REPO / 'README.md').read_text()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
    joined = block.replace('\\\n', ' ')
    commands += [line.strip() for line in joined.splitlines() if line.strip().startswith(prefix)]
  assert commands, f'README.md has no `{prefix}` command'
  return commands


def _run(command: str, placeholders: dict, extra: tuple = ()) -> subprocess.CompletedProcess:
  for placeholder, value in placeholders.items():
    command = command.replace(placeholder, value)
  args = shlex.split(command)
  assert args[0] == 'python'
  result = subprocess.run([sys.executable] + args[1:] + list(extra), cwd=REPO,
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """Both sets converted by the README commands, as subprocesses."""
  base = tmp_path_factory.mktemp('dwosm')
  releases = {labels: make_release(base / 'data', labels) for labels in ('dw', 'osm')}
  for command in _readme_commands('python -m data_prep.ssl4eo_dwosm'):
    _run(command, {'/data/': f'{base}/data/'}, extra=('--workers', '1'))
  yield base, releases
  shutil.rmtree(base, ignore_errors=True)   # ~220 MB of 512 px tiles and records


@pytest.mark.slow
@pytest.mark.parametrize('labels', ['dw', 'osm'])
def test_conversion_matches_rasterio_reads(converted, labels):
  base, releases = converted
  release = releases[labels]
  out = base / 'data' / 'tfds' / f'ssl4eo_s12_{labels}'
  builder = tfds.builder_from_directory(str(out))
  assert builder.info.name == f'ssl4eo_s12_{labels}'
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {'train': 2, 'test': 2}
  assert builder.info.features['s2'].shape == (512, 512, 13)

  for split, ids in (('train', TRAIN_IDS), ('test', TEST_IDS)):
    examples = {ex['patch_id'].decode(): ex
                for ex in tfds.as_numpy(builder.as_dataset(split=split))}
    assert sorted(examples) == sorted(ids)
    for tile_id in ids:
      ex = examples[tile_id]
      folder = release[split]
      s1 = _read(folder / 'image_s1' / f's1_{tile_id}.tif')
      s2 = _read(folder / 'image_s2' / f's2_{tile_id}.tif')
      raw_label = _read(folder / f'label_{labels}' / f'{labels}_{tile_id}.tif')
      raw_label = raw_label[1] if raw_label.shape[0] > 1 else raw_label[0]  # DW: 2nd band
      size = s2.shape[-1]
      inner = slice(1, 511) if size == 510 else slice(0, 512)
      _assert_images_match(ex['s2'][inner, inner], s2, list(zip(S2_MEAN, S2_STD)))
      _assert_images_match(ex['s1'][inner, inner], s1, S1_STATS)
      np.testing.assert_array_equal(ex['label'][inner, inner], _expected_label(raw_label, labels))
      if size == 510:   # padded: images repeat their edge, labels are ignored there
        np.testing.assert_array_equal(ex['s2'][0, 1:511], ex['s2'][1, 1:511])
        np.testing.assert_array_equal(ex['s1'][1:511, -1], ex['s1'][1:511, -2])
        assert np.all(ex['label'][[0, -1], :] == 255) and np.all(ex['label'][:, [0, -1]] == 255)
  # Every class and the ignore label occur; nothing outside them.
  labels_seen = np.unique(np.concatenate(
      [ex['label'].ravel() for ex in tfds.as_numpy(builder.as_dataset(split='train'))]))
  classes = 9 if labels == 'dw' else 13
  assert labels_seen.tolist() == list(range(classes)) + [255]

  with open(out / 'rejects.csv') as f:
    rejects = {row['location']: row['reason'] for row in csv.DictReader(f)}
  assert rejects.keys() == {'train/bad_label', 'train/no_s2'}
  assert rejects['train/bad_label'].startswith('label_out_of_range: values 1..99')
  assert rejects['train/no_s2'].startswith('missing_file')
  summary = json.loads((out / 'conversion_summary.json').read_text())
  assert summary['splits']['train']['padded_tiles'] == 2
  assert summary['splits']['test']['padded_tiles'] == 0
  assert summary['splits']['train']['non_finite_values'] == 2 * (15 + 4)


def test_quantise_round_and_floor_differ_as_documented():
  x = np.array([[[1605.57504906 - 2 * 786.78685367 + 786.78685367 * 4 / 255 * 10.7]]])
  floor, _ = ssl4eo_dwosm.normalise_truncated(x, [1605.57504906], [786.78685367])
  assert floor.item() == 10
  from cromss_jax import constants
  rounded, _ = constants.normalise_to_uint8(x, [1605.57504906], [786.78685367])
  assert rounded.item() == 11


def test_layout_errors_are_one_line(tmp_path):
  (tmp_path / 'empty').mkdir()
  result = subprocess.run(
      [sys.executable, '-m', 'data_prep.ssl4eo_dwosm', '--root', str(tmp_path / 'empty'),
       '--labels', 'osm', '--out', str(tmp_path / 'out')],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert 'error: no osm_train / osm_test folder' in result.stderr
  assert 'Traceback' not in result.stderr


def test_configs_follow_the_paper():
  dw, osm = transfer_dw.get_config(), transfer_osm.get_config()
  assert (dw.transfer.decoder, dw.objective.num_classes, dw.data.crop_size) == \
      ('deeplabv3plus', 9, 512)
  assert (osm.transfer.decoder, osm.objective.num_classes, osm.data.crop_size) == ('fpn', 13, 480)
  for config in (dw, osm):
    assert (config.data.train_split, config.data.test_split, config.data.tile_size) == \
        ('train', 'test', 512)
    assert config.optimizer.learning_rate == 5e-4 and config.training.num_epochs == 50
    assert config.training.global_batch_size == 32
  assert transfer.class_names(dw) == ssl4eo_dwosm.DW_CLASSES
  assert transfer.class_names(osm) == ssl4eo_dwosm.OSM_CLASSES


def _write_encoder_export(folder: Path) -> str:
  """A ResNet-18 S2 encoder in the export format (Orbax tree + JSON metadata)."""
  variables = jit_init(lambda: ResNetEncoder(depth=18).init(
      jax.random.PRNGKey(1), jnp.zeros((1, 64, 64, 13)), train=False))()
  path = folder / 'encoder_s2'
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(path), jax.device_get(variables))
  from cromss_jax import exports
  meta = dict(kind='encoder', modality='s2', encoder='resnet18', source_step=1,
              **exports.band_metadata('s2', 13))
  (folder / 'encoder_s2.json').write_text(json.dumps(meta))
  return str(path)


@pytest.mark.slow
def test_transfer_dw_runs_end_to_end(converted):
  """The README transfer command, with overrides that make it tiny (ResNet-18, 64 px, 2 steps)."""
  base, _ = converted
  export = _write_encoder_export(base)
  (command,) = _readme_commands('python -m cromss_jax.main --config=configs/transfer_dw.py')
  workdir = base / 'runs' / 'transfer_dw'
  tiny = ('--config.model.encoder=resnet18', '--config.model.compute_dtype=float32',
          '--config.data.crop_size=64', '--config.data.shuffle_buffer=4',
          '--config.training.global_batch_size=2', '--config.training.num_epochs=1',
          '--config.training.steps_per_epoch=2', '--config.training.checkpoint_every_epochs=1',
          '--config.training.log_every_steps=1')
  _run(command, {'/data/': f'{base}/data/', '/runs/': f'{base}/runs/',
                 '/exports/cromss/encoder_s2': export}, extra=tiny)
  scores = json.loads((workdir / 'metrics.json').read_text())
  assert scores['classes'] == list(ssl4eo_dwosm.DW_CLASSES)   # the DW names, not 'class 8'
  assert scores['split'] == 'test' and scores['model']['decoder'] == 'deeplabv3plus'
  assert scores['pixels'] > 0 and 0.0 <= scores['oa'] <= 100.0



@pytest.mark.slow   # the module fixture converts both releases in subprocesses (~20 s)
def test_osm_config_reads_the_converted_data(converted):
  """The OSM config against its converted records: sizes, channels, batches, FPN (no compile)."""
  from cromss_jax import input_pipeline
  from cromss_jax.tasks import transfer
  from cromss_jax.models import decoders
  base, _ = converted
  config = transfer_osm.get_config()
  config.data.dataset_dir = str(base / 'data' / 'tfds' / 'ssl4eo_s12_osm')
  config.model.encoder = 'resnet18'
  config.data.crop_size = 64
  config.training.global_batch_size = 2
  transfer.validate_transfer_config(config)
  info = input_pipeline.downstream_info(config, train_split=config.data.train_split,
                                        eval_split=config.data.test_split)
  assert (info.num_train_examples, info.num_eval_examples, info.tile_size) == (2, 2, 512)
  assert info.steps_per_epoch == 1 and info.s2_channels == 13
  batch = next(input_pipeline.create_downstream_iterator(config, 'train', train=True))
  assert batch['label'].shape == (2, 64, 64) and batch['s2'].shape == (2, 64, 64, 13)
  assert set(np.unique(batch['label'])) <= set(range(13)) | {255}
  model = decoders.build_transfer_model(config)
  assert (model.decoder, model.num_classes) == ('fpn', 13)
