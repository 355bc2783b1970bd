"""Whole-scene prediction: tiling, blending, georeferencing, nodata, models and input errors.

How the tiled result is compared with the untiled one (the model applied to the whole scene):
* a per-pixel model (receptive field 1 px): blending mixes identical probabilities, so the
  class map must equal the untiled one EVERYWHERE, with any overlap;
* a 5x5-receptive-field conv model without overlap: exact on every pixel at least 2 px away
  from a window edge and from the scene edge (there the zero padding of one whole-scene pass
  and the windows' padding differ);
* a real ResNet-18 transfer model: exact where one window is the whole scene; on a larger
  scene its receptive field exceeds the windows, so the agreement with the untiled map on the
  interior is only reported (printed with -s).
"""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from configs import transfer as transfer_config
from helpers import TinyClassifier, patchy_s2_scene
from cromss_jax import checkpointing
from cromss_jax import constants
from cromss_jax import exports
from cromss_jax import models
from cromss_jax import mapping
from cromss_jax.models import decoders

H, W = 200, 300
CRS_UTM = CRS.from_epsg(32632)
TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)
NODATA_BLOCK = (slice(10, 20), slice(30, 50))


def _write_tif(path, data, *, crs=CRS_UTM, transform=TRANSFORM, nodata=None) -> str:
  with rasterio.open(path, 'w', driver='GTiff', height=data.shape[1], width=data.shape[2],
                     count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform,
                     nodata=nodata) as dst:
    dst.write(data)
  return str(path)


def _s2_scene(seed=0, height=H, width=W) -> np.ndarray:
  """13-band uint16 L1C-like reflectances: 25 px patches of 4 "land covers" (distinct spectra)
  plus noise, so that a network's classes vary over the scene; one all-zero (nodata) block."""
  scene = patchy_s2_scene(height, width, seed)
  scene[:, NODATA_BLOCK[0], NODATA_BLOCK[1]] = 0
  return scene


def _normalised(scene: np.ndarray, subset) -> np.ndarray:
  """The converters' normalisation, [H, W, bands] uint8 (independent of predict's reader)."""
  x = np.moveaxis(scene[list(subset)], 0, -1)
  out, _ = constants.normalise_to_uint8(x, [constants.S2_MEAN[i] for i in subset],
                                        [constants.S2_STD[i] for i in subset])
  return out


def _toy_predictor(kernel: int, subset=constants.S2_BAND_SUBSETS[13], uses_s1=False):
  net = TinyClassifier(kernel)
  variables = net.init(jax.random.PRNGKey(kernel), jnp.zeros((1, 8, 8, len(subset))))
  apply = jax.jit(lambda v, s2: jax.nn.softmax(net.apply(v, s2.astype(jnp.float32) / 255.0)))
  predictor = mapping.Predictor(
      probs_fn=lambda inputs: apply(variables, inputs['s2']),
      class_names=tuple(f'c{i}' for i in range(5)), s2_bands=tuple(subset), uses_s1=uses_s1,
      description=f'toy {kernel}x{kernel}')
  return predictor, lambda image: np.asarray(apply(variables, image[None]))[0]


def _read(path):
  with rasterio.open(path) as src:
    return src.read(), src.profile, src


def _check_georeferencing(path, bands):
  with rasterio.open(path) as src:
    assert src.crs == CRS_UTM and src.transform == TRANSFORM
    assert (src.height, src.width, src.count) == (H, W, bands)
    assert src.dtypes[0] == 'uint8' and src.nodata == 255
    colormap = src.colormap(1)
    assert colormap[0][:3] == constants.DW_PALETTE[0]
    return src.read()


def test_per_pixel_model_blends_to_the_untiled_map_everywhere(tmp_path):
  scene = _s2_scene()
  s2 = _write_tif(tmp_path / 's2.tif', scene)
  predictor, untiled_fn = _toy_predictor(kernel=1)
  out = str(tmp_path / 'map.tif')
  summary = mapping.predict_scene(predictor, out, s2_path=s2, window=64, overlap=24, batch=5,
                                  confidence=True, progress=False)
  classes, confidence = _check_georeferencing(out, bands=2)
  probs = untiled_fn(_normalised(scene, range(13)))
  invalid = np.zeros((H, W), bool)
  invalid[NODATA_BLOCK] = True
  np.testing.assert_array_equal(classes[invalid], 255)
  np.testing.assert_array_equal(confidence[invalid], 255)
  assert not np.any(classes[~invalid] == 255)                  # every valid pixel covered
  np.testing.assert_array_equal(classes[~invalid], np.argmax(probs, -1)[~invalid])
  expected_conf = np.minimum(np.rint(probs.max(-1) * 255), 254)
  assert np.abs(confidence[~invalid].astype(int) - expected_conf[~invalid]).max() <= 1
  assert summary['nodata_pixels'] == invalid.sum()
  assert sum(summary['pixels_per_class'].values()) == (~invalid).sum()
  assert not [p for p in os.listdir(tmp_path) if 'tmp' in p]   # written atomically

  # A file with exactly the model's band subset is taken as that subset, in order.
  subset = constants.S2_BAND_SUBSETS[9]
  predictor9, _ = _toy_predictor(kernel=1, subset=subset)
  full = str(tmp_path / 'from13.tif')
  mapping.predict_scene(predictor9, full, s2_path=s2, window=64, overlap=0, batch=8,
                        progress=False)
  nine = _write_tif(tmp_path / 's2_9.tif', scene[list(subset)])
  part = str(tmp_path / 'from9.tif')
  mapping.predict_scene(predictor9, part, s2_path=nine, window=64, overlap=0, batch=8,
                        progress=False)
  np.testing.assert_array_equal(_read(full)[0], _read(part)[0])


@pytest.mark.slow
def test_local_model_without_overlap_is_exact_away_from_window_edges(tmp_path):
  scene = _s2_scene(seed=1)
  scene[:, NODATA_BLOCK[0], NODATA_BLOCK[1]] = 7       # no nodata here: compare everywhere
  s2 = _write_tif(tmp_path / 's2.tif', scene)
  predictor, untiled_fn = _toy_predictor(kernel=3)
  out = str(tmp_path / 'map.tif')
  mapping.predict_scene(predictor, out, s2_path=s2, window=64, overlap=0, batch=4,
                        confidence=True, progress=False)
  classes, confidence = _check_georeferencing(out, bands=2)
  probs = untiled_fn(_normalised(scene, range(13)))
  ys, xs = np.arange(H), np.arange(W)
  inner_y = (ys % 64 >= 2) & (ys % 64 < 62) & (ys < H - 2)
  inner_x = (xs % 64 >= 2) & (xs % 64 < 62) & (xs < W - 2)
  inner = inner_y[:, None] & inner_x[None, :]
  np.testing.assert_array_equal(classes[inner], np.argmax(probs, -1)[inner])
  expected_conf = np.minimum(np.rint(probs.max(-1) * 255), 254)
  assert np.abs(confidence[inner].astype(int) - expected_conf[inner]).max() <= 1
  assert not np.any(classes == 255)


def _random_like(abstract, seed):
  """He-scaled random weights, unit BatchNorm: a network whose output follows its input."""
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    if path[-1] == 'kernel':
      return rng.normal(0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    return np.full(leaf.shape, 1.0 if path[-1] in ('scale', 'var') else 0.0)

  flat = flax.traverse_util.flatten_dict(abstract)
  return flax.traverse_util.unflatten_dict(
      {k: value(k, v).astype(np.float32) for k, v in flat.items()})


def _padded_scene(scene: np.ndarray) -> np.ndarray:
  """The scene normalised and reflect-padded to multiples of 32 (one whole-scene pass)."""
  return np.pad(_normalised(scene, range(13)), ((0, 224 - H), (0, 320 - W), (0, 0)),
                mode='reflect')


def _transfer_workdir(root, scene, decoder='pspnet') -> str:
  """A transfer workdir as train.train_and_evaluate leaves it (random weights, no training).

  BatchNorm statistics are set to the scene's own (one training-mode pass): a random ResNet
  with unit statistics predicts one class everywhere, which would make the tiled-vs-untiled
  comparison meaningless.
  """
  config = transfer_config.get_config()
  config.model.encoder = 'resnet18'
  config.model.compute_dtype = 'float32'
  config.transfer.decoder = decoder
  model = decoders.build_transfer_model(config)
  x = jnp.asarray(_padded_scene(scene)[None], jnp.float32) / 255.0
  variables = _random_like(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x,
                                                             train=False)), seed=3)
  _, updates = jax.jit(lambda v: model.clone(freeze_encoder=False).apply(
      v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(1)}))(
          variables)
  momentum = models.resnet.BN_MOMENTUM     # running = m * old + (1 - m) * batch
  variables['batch_stats'] = jax.tree.map(
      lambda new, old: np.asarray((new - momentum * old) / (1 - momentum)),
      updates['batch_stats'], variables['batch_stats'])
  workdir = os.path.join(root, 'transfer')
  manager = checkpointing.create_manager(workdir, keep=1)
  checkpointing.save(manager, 5, variables, {'task': 'transfer', 'steps_per_epoch': 1,
                                             'config': config.to_json_best_effort()})
  manager.close()
  return workdir


@pytest.mark.slow
def test_transfer_workdir_model_on_an_odd_sized_scene(tmp_path):
  scene = _s2_scene(seed=2)
  s2 = _write_tif(tmp_path / 's2.tif', scene)
  predictor = mapping.load_predictor(_transfer_workdir(str(tmp_path), scene))
  assert predictor.class_names == constants.DFC_DW8_CLASSES
  out = str(tmp_path / 'map.tif')
  mapping.predict_scene(predictor, out, s2_path=s2, window=64, overlap=16, batch=8,
                        progress=False)
  (classes,) = _check_georeferencing(out, bands=1)
  invalid = np.zeros((H, W), bool)
  invalid[NODATA_BLOCK] = True
  np.testing.assert_array_equal(classes[invalid], 255)
  assert classes[~invalid].max() < len(constants.DFC_DW8_CLASSES)

  # Against the network on the whole scene at once. Its receptive field (and PSPNet's pooled
  # context) exceeds a 64 px window, so only agreement can be measured: reported, not asserted.
  untiled = np.argmax(np.asarray(predictor.probs_fn(
      {'s2': _padded_scene(scene)[None]}))[0, :H, :W], -1)
  interior = np.zeros((H, W), bool)
  interior[32:H - 32, 32:W - 32] = True
  interior &= ~invalid
  agreement = float(np.mean(classes[interior] == untiled[interior]))
  shares = np.bincount(untiled[interior], minlength=8) / interior.sum()
  print(f'random ResNet-18 PSPNet, 64 px windows, overlap 16: tiled vs untiled class agreement '
        f'on interior pixels {agreement:.3f}; untiled class shares {np.round(shares, 2)}')
  assert np.sort(shares)[-2] > 0.05        # BN statistics from the scene: not a one-class map

  # Where one window is the whole scene, tiled and untiled are the same computation: exact.
  crop = scene[:, :64, :64]
  small = str(tmp_path / 'small.tif')
  mapping.predict_scene(predictor, small, s2_path=_write_tif(tmp_path / 's2_64.tif', crop),
                        window=64, overlap=0, batch=8, confidence=True, progress=False)
  with rasterio.open(small) as src:
    classes, confidence = src.read()
  image = np.repeat(_normalised(crop, range(13))[None], 8, axis=0)   # the compiled batch shape
  probs = np.asarray(predictor.probs_fn({'s2': image}))[0]
  valid = ~invalid[:64, :64]
  np.testing.assert_array_equal(classes[valid], np.argmax(probs, -1)[valid])
  expected_conf = np.minimum(np.rint(probs.max(-1) * 255), 254)
  assert np.abs(confidence[valid].astype(int) - expected_conf[valid]).max() <= 1
  assert len(np.unique(classes[valid])) > 1


def _pretrain_export(root) -> str:
  config = transfer_config.get_config()      # the pretraining fields are all there
  config.model.encoder = 'resnet18'
  config.model.compute_dtype = 'float32'
  model = models.build_pretrain_model(config.model, 9, 13)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 2)), jnp.zeros((1, 64, 64, 13)), train=False))
  path = os.path.join(root, 'export', 'pretrain_model')
  os.makedirs(os.path.dirname(path))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, _random_like(abstract, seed=4))
  with open(path + '.json', 'w') as f:
    json.dump({'kind': 'pretrain_model', 'num_classes': 9, 'classes': list(constants.DW_CLASSES),
               'config': config.to_dict(), 'source_step': 1, 'source_workdir': 'x',
               's1': exports.band_metadata('s1', 13), 's2': exports.band_metadata('s2', 13)}, f)
  return os.path.dirname(path)


@pytest.mark.slow
def test_pretrain_export_with_both_sensors(tmp_path):
  height, width = 64, 96
  scene = _s2_scene(seed=3, height=height, width=width)
  s2 = _write_tif(tmp_path / 's2.tif', scene)
  s1_data = np.random.default_rng(5).normal(-15, 4, (2, height, width)).astype(np.float32)
  s1_data[0, 0, :5] = np.nan                          # swath border: mapped to 0, still valid
  s1 = _write_tif(tmp_path / 's1.tif', s1_data)
  predictor = mapping.load_predictor(_pretrain_export(str(tmp_path)), with_s1=True)
  assert predictor.uses_s1 and predictor.class_names == constants.DW_CLASSES
  assert predictor.normalisation == {'s2': (constants.S2_MEAN, constants.S2_STD),
                                     's1': (constants.S1_MEAN, constants.S1_STD)}
  out = str(tmp_path / 'map.tif')
  summary = mapping.predict_scene(predictor, out, s2_path=s2, s1_path=s1, window=64, overlap=0,
                                  batch=2, progress=False)
  with rasterio.open(out) as src:
    classes = src.read(1)
    assert src.crs == CRS_UTM and src.transform == TRANSFORM
  assert classes[(classes != 255)].max() < 9 and summary['windows'] == 2
  assert np.all(classes[10:20, 30:50] == 255) and not np.any(classes[:10] == 255)


def test_clear_errors(tmp_path):
  scene = _s2_scene()
  s2 = _write_tif(tmp_path / 's2.tif', scene)
  predictor, _ = _toy_predictor(kernel=1, uses_s1=True)
  out = str(tmp_path / 'map.tif')

  s1 = np.zeros((2, H, W), np.float32)
  good_s1 = _write_tif(tmp_path / 's1.tif', s1)

  def run(**kwargs):
    args = dict(s2_path=s2, s1_path=good_s1, window=64, overlap=0, batch=4, progress=False)
    args.update(kwargs)
    mapping.predict_scene(predictor, out, **args)

  bad_bands = _write_tif(tmp_path / 'five.tif', scene[:5])
  with pytest.raises(mapping.PredictionError, match=r'five\.tif has 5 bands; an S2 input needs 13'):
    run(s2_path=bad_bands)
  with pytest.raises(mapping.PredictionError, match=r's1_3\.tif has 3 bands'):
    run(s1_path=_write_tif(tmp_path / 's1_3.tif', np.zeros((3, H, W), np.float32)))
  # S1 on another grid is reprojected onto the S2 grid; refused only when they do not overlap.
  far = Affine(10.0, 0.0, 900_000.0, 0.0, -10.0, 6_000_000.0)
  with pytest.raises(mapping.PredictionError, match='does not overlap'):
    run(s1_path=_write_tif(tmp_path / 'far.tif', s1, transform=far))
  with pytest.raises(mapping.PredictionError, match='does not overlap'):
    run(s1_path=_write_tif(tmp_path / 'crs.tif', s1, crs=CRS.from_epsg(32610)))
  with pytest.raises(mapping.PredictionError, match='no CRS to reproject by'):
    with rasterio.open(tmp_path / 'nocrs.tif', 'w', driver='GTiff', height=H, width=W,
                       count=2, dtype='float32') as dst:
      dst.write(s1)
    run(s1_path=str(tmp_path / 'nocrs.tif'))
  garbage = tmp_path / 'garbage.tif'
  garbage.write_bytes(b'not a tiff at all')
  with pytest.raises(mapping.PredictionError, match='garbage.tif cannot be read'):
    run(s2_path=str(garbage))
  with pytest.raises(mapping.PredictionError, match='does not exist'):
    run(s2_path=str(tmp_path / 'missing.tif'))
  with pytest.raises(mapping.PredictionError, match='give --s1'):
    run(s1_path=None)
  with pytest.raises(mapping.PredictionError, match='multiple of 32'):
    run(window=100)
  with pytest.raises(mapping.PredictionError, match='neither a transfer workdir'):
    mapping.load_predictor(str(tmp_path))
  assert not os.path.exists(out)


def test_window_grid_covers_scene_and_taper_is_complementary():
  for size, window, overlap in ((200, 64, 24), (300, 64, 0), (20, 64, 16), (64, 64, 32)):
    grid = mapping.WindowGrid.create(size, size, window, overlap)
    assert grid.padded_height >= size + grid.margin
    assert grid.padded_height == (grid.rows - 1) * grid.stride + window
  t = mapping.taper(64, 24)
  np.testing.assert_allclose(t[40:] + t[:24], 1.0, atol=1e-6)   # neighbours add up to 1
  assert t.min() > 0
  np.testing.assert_array_equal(mapping.reflect_indices(-3, 10, 5),
                                np.pad(np.arange(5), (3, 2), mode='reflect')[:10])
  np.testing.assert_array_equal(mapping.reflect_indices(-20, 50, 4),
                                np.pad(np.arange(4), (20, 26), mode='reflect')[:50])


# ----------------------------------------------------------------------------------------------
# The command line: one `error:` line for every bad input, and the README's commands as written
# ----------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, cwd):
  import shlex
  import subprocess
  import sys
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  argv = shlex.split(args) if isinstance(args, str) else args
  assert argv[:3] == ['python', '-m', 'cromss_jax.predict']
  return subprocess.run([sys.executable] + argv[1:], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=900)


def _one_error_line(result, *fragments):
  assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = [line for line in result.stderr.splitlines() if line.strip()][-1]
  assert last.startswith('error: '), result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in last, last


@pytest.mark.slow
def test_cli_bad_inputs_give_one_error_line(tmp_path):
  scene = _s2_scene(height=64, width=64)
  s2 = _write_tif(tmp_path / 's2.tif', scene)
  # A pretraining workdir (its checkpoint says task 'pretrain'): points at the export.
  workdir = str(tmp_path / 'pretrain_run')
  manager = checkpointing.create_manager(workdir, keep=1)
  checkpointing.save(manager, 3, {'params': {'w': np.zeros(2, np.float32)}},
                     {'task': 'pretrain', 'steps_per_epoch': 1, 'config': '{}'})
  manager.close()
  _one_error_line(_cli(['python', '-m', 'cromss_jax.predict', '--model', workdir, '--s2', s2,
                        '--out', 'map.tif'], tmp_path),
                  "is a 'pretrain' workdir", 'python -m cromss_jax.export')
  export = _pretrain_export(str(tmp_path))
  garbage = tmp_path / 'garbage.tif'
  garbage.write_bytes(b'not a tiff at all')
  five = _write_tif(tmp_path / 'five.tif', scene[:5])
  s1_far = _write_tif(tmp_path / 's1_far.tif', np.zeros((2, 64, 64), np.float32),
                      crs=CRS.from_epsg(32610))
  cases = [     # (in-process, test_clear_errors covers the rest; each process costs ~10 s)
      (['--s2', str(garbage)], 'garbage.tif cannot be read'),
      (['--s2', five, '--s1', s1_far], 'five.tif has 5 bands'),
      (['--s2', s2, '--s1', s1_far], 'does not overlap'),
      (['--s2', s2, '--out', str(tmp_path / 'five.tif' / 'map.tif')], 'five.tif'),
  ]
  for args, fragment in cases:
    if '--out' not in args:
      args = args + ['--out', str(tmp_path / 'map.tif')]
    _one_error_line(_cli(['python', '-m', 'cromss_jax.predict', '--model', export] + args,
                         tmp_path), fragment)
  assert not os.path.exists(tmp_path / 'map.tif')


@pytest.mark.slow
def test_readme_commands_as_written(tmp_path):
  """The commands of README section 4, run as written in a folder holding what they name."""
  scene = _s2_scene(seed=7, height=90, width=130)
  _write_tif(tmp_path / 'scene_s2.tif', scene)
  _write_tif(tmp_path / 's2.tif', scene)
  # S1 on its own grid (EPSG:4326), covering the S2 scene.
  from rasterio.warp import transform_bounds
  west, south, east, north = transform_bounds(CRS_UTM, CRS.from_epsg(4326), 500_000,
                                              5_000_000 - 900, 501_300, 5_000_000)
  step = 8e-5
  s1 = np.random.default_rng(1).normal(-15, 3, (2, int((north - south) / step) + 8,
                                               int((east - west) / step) + 8))
  _write_tif(tmp_path / 's1.tif', s1.astype(np.float32), crs=CRS.from_epsg(4326),
             transform=Affine(step, 0, west - 4 * step, 0, -step, north + 4 * step))
  bands = tmp_path / 'S2_bands'
  bands.mkdir()
  for i, band in enumerate(constants.S2_BANDS):
    f = constants.S2_RESOLUTION_M[i] // 10
    data = scene[i, :90 // f * f, :126 // f * f]
    data = data.reshape(90 // f, f, 126 // f, f).mean((1, 3)).astype(np.uint16)
    _write_tif(bands / f'B{band[1:].zfill(2)}.tif', data[None],
               transform=TRANSFORM @ Affine.scale(f))
  os.makedirs(tmp_path / 'runs')
  os.rename(_transfer_workdir(str(tmp_path), _s2_scene(seed=2)),
            tmp_path / 'runs' / 'dfc_s2_pspnet_frozen')
  os.makedirs(tmp_path / 'exports')
  os.rename(_pretrain_export(str(tmp_path)), tmp_path / 'exports' / 'cromss_mid')

  readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  section = readme.split('## 4. Mapping a scene')[1].split('\n## ')[0]
  commands = [line for line in section.splitlines()
              if line.startswith('python -m cromss_jax.predict')]
  assert len(commands) >= 3
  for command in commands:
    result = _cli(command, tmp_path)
    assert result.returncode == 0, (command, result.stderr[-3000:])
    out = command.split('--out ')[1].split()[0]
    with rasterio.open(tmp_path / out) as src:
      assert src.tags(ns='IMAGE_STRUCTURE').get('LAYOUT') == 'COG'
      assert src.crs == CRS_UTM and src.transform == TRANSFORM
      assert src.count == (2 if '--confidence' in command else 1)
    assert os.path.isfile(tmp_path / (os.path.splitext(out)[0] + '.qml'))
    summary = json.loads(result.stdout)
    assert summary['out'] == str(tmp_path / out)
