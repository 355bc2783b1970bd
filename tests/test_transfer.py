"""Transfer decoders, masked loss, metrics, frozen training, encoder loading, end-to-end run.

Tiny everywhere (ResNet-18, 64x64 patches, batch 2) so the file runs in well under a minute on
two CPU cores; shapes that need no numbers are checked with jax.eval_shape.
"""
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import transfer as transfer_config
from cromss_jax import constants
from cromss_jax import losses
from cromss_jax import checkpointing
from cromss_jax import exports
from cromss_jax import metrics as metrics_lib
from cromss_jax import models
from cromss_jax import sharding
from cromss_jax import train
from cromss_jax.tasks import transfer
from cromss_jax.models import ResNetEncoder
from cromss_jax.models import decoders

TILE = 64
NUM_CLASSES = 8


# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny DFC2020-style TFDS folder and an exported encoder
# ----------------------------------------------------------------------------------------------
def _dfc_example(index: int) -> dict:
  rng = np.random.default_rng(index)
  label = rng.integers(0, NUM_CLASSES, (TILE, TILE)).astype(np.uint8)
  label[rng.random((TILE, TILE)) < 0.1] = constants.IGNORE_LABEL
  return {'s1': rng.integers(0, 256, (TILE, TILE, 2)).astype(np.uint8),
          's2': rng.integers(0, 256, (TILE, TILE, 13)).astype(np.uint8),
          'label': label, 'patch_id': f'p{index}'}


@pytest.fixture(scope='module')
def dfc_dir(tmp_path_factory):
  f = tfds.features
  features = f.FeaturesDict({
      's1': f.Tensor(shape=(TILE, TILE, 2), dtype=np.uint8, encoding='bytes'),
      's2': f.Tensor(shape=(TILE, TILE, 13), dtype=np.uint8, encoding='bytes'),
      'label': f.Tensor(shape=(TILE, TILE), dtype=np.uint8, encoding='bytes'),
      'patch_id': f.Text(),
  })
  folder = os.path.join(str(tmp_path_factory.mktemp('dfc')), 'dfc2020', '1.0.0')
  os.makedirs(folder)
  for split, ids in (('validation', range(4)), ('test', range(10, 13))):
    path = os.path.join(folder, f'dfc2020-{split}.tfrecord-00000-of-00001')
    with tf.io.TFRecordWriter(path) as writer:
      for i in ids:
        writer.write(features.serialize_example(_dfc_example(i)))
  tfds.folder_dataset.write_metadata(data_dir=folder, features=features, check_data=False)
  return folder


def _config(dataset_dir: str, **transfer_overrides):
  config = transfer_config.get_config()
  config.data.dataset_dir = dataset_dir
  config.data.tile_size = TILE
  config.data.crop_size = TILE
  config.data.shuffle_buffer = 8
  config.model.encoder = 'resnet18'
  config.model.compute_dtype = 'float32'
  config.training.global_batch_size = 2
  config.training.num_epochs = 1
  config.training.steps_per_epoch = 2
  config.training.checkpoint_every_epochs = 1
  config.training.log_every_steps = 1
  config.transfer.update(transfer_overrides)
  return config


def _random_like(abstract, seed: int) -> dict:
  """Numbers for an eval_shape tree without compiling an init (variances kept positive)."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(abstract)
  out = {}
  for path, leaf in flat.items():
    values = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
    out[path] = np.abs(values) + 0.5 if path[-1] == 'var' else values
  return flax.traverse_util.unflatten_dict(out)


def write_encoder_export(folder: str, modality: str = 's2', bands: int = 13,
                         encoder: str = 'resnet18', seed: int = 0) -> tuple[str, dict]:
  """An export as `cromss_jax.export` writes it: Orbax tree + JSON metadata."""
  channels = 2 if modality == 's1' else bands
  depth = int(encoder[len('resnet'):])
  abstract = jax.eval_shape(lambda: ResNetEncoder(depth=depth).init(
      jax.random.PRNGKey(0), jnp.zeros((1, TILE, TILE, channels)), train=False))
  variables = _random_like(abstract, seed)
  path = os.path.join(folder, f'encoder_{modality}')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, variables)
  meta = dict(kind='encoder', modality=modality, encoder=encoder, source_step=7,
              **exports.band_metadata(modality, bands))
  with open(path + '.json', 'w') as f:
    json.dump(meta, f)
  return path, variables


# ----------------------------------------------------------------------------------------------
# Decoders
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('decoder', decoders.DECODERS)
def test_decoder_output_shapes_and_variable_layout(decoder):
  model = decoders.TransferModel(18, decoder, NUM_CLASSES)
  x = jnp.zeros((2, TILE, TILE, 13))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  assert set(variables['params']) == {'encoder', 'decoder'}
  logits, updates = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.PRNGKey(1)}), variables)
  assert logits.shape == (2, TILE, TILE, NUM_CLASSES) and logits.dtype == jnp.float32
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(
      variables['batch_stats'])
  # The encoder subtree is exactly a standalone ResNetEncoder's: exports load 1:1.
  standalone = jax.eval_shape(lambda: ResNetEncoder(depth=18).init(
      jax.random.PRNGKey(0), x, train=False))
  for collection in ('params', 'batch_stats'):
    assert (jax.tree.map(lambda a: a.shape, variables[collection]['encoder'])
            == jax.tree.map(lambda a: a.shape, standalone[collection]))


@pytest.mark.slow
def test_decoder_parameter_counts_resnet50():
  """smp defaults (ResNet-50, 13 bands, 8 classes): trainable decoder parameters."""
  expected = {'pspnet': 825_224, 'deeplabv3plus': 3_171_352, 'fpn': 2_608_904,
              'unet': 9_014_088}
  x = jnp.zeros((1, 64, 64, 13))
  for decoder, count in expected.items():
    model = decoders.TransferModel(50, decoder, NUM_CLASSES)
    params = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), x, train=False)
                            )['params']
    got = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params['decoder']))
    assert got == count, decoder


def test_deeplab_runs_last_stage_at_output_stride_16():
  model = decoders.TransferModel(18, 'deeplabv3plus', NUM_CLASSES)
  x = jnp.zeros((1, TILE, TILE, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  _, state = jax.eval_shape(lambda v: model.apply(
      v, x, train=False, capture_intermediates=lambda m, _: m.path == ('encoder', 'layer4')),
      variables)
  assert state['intermediates']['encoder']['layer4']['__call__'][0].shape == (1, 4, 4, 512)


def test_resampling_matches_torch_conventions():
  # align_corners=True: corners kept, 2 -> 3 gives the midpoint.
  x = jnp.asarray([[0.0, 2.0]])[None, :, :, None] * jnp.ones((1, 2, 1, 1))
  y = decoders.resize_bilinear(x, (2, 3))
  np.testing.assert_allclose(np.asarray(y[0, 0, :, 0]), [0.0, 1.0, 2.0])
  # AdaptiveAvgPool(3) of 5 values: bins [0,2), [1,4), [3,5).
  x = jnp.arange(5.0)[None, :, None, None] * jnp.ones((1, 1, 5, 1))
  pooled = decoders.adaptive_avg_pool(x, 3)
  np.testing.assert_allclose(np.asarray(pooled[0, :, 0, 0]), [0.5, 2.0, 3.5])


# ----------------------------------------------------------------------------------------------
# Metrics and the masked loss
# ----------------------------------------------------------------------------------------------
def test_metrics_against_hand_computed_confusion():
  labels = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
  preds = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
  cm = np.asarray(metrics_lib.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 3))
  # By hand, rows = reference: class 0 -> (0, 1); class 1 -> 1,1,2; class 2 -> 2, 0; 255 skipped.
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 1], [1, 0, 1]])
  s = metrics_lib.scores_from_confusion(cm)
  assert s['oa'] == pytest.approx(100 * 4 / 7)
  assert s['aa'] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
  ious = [1 / (2 + 2 - 1), 2 / (3 + 3 - 2), 1 / (2 + 2 - 1)]
  f1s = [2 * 1 / 4, 2 * 2 / 6, 2 * 1 / 4]
  np.testing.assert_allclose(s['iou'], np.multiply(ious, 100))
  assert s['miou'] == pytest.approx(100 * np.mean(ious))
  assert s['mf1'] == pytest.approx(100 * np.mean(f1s))


@pytest.mark.slow
def test_ignore_label_adds_nothing_to_loss_gradient_or_confusion():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, NUM_CLASSES, (2, 8, 8))
  labels[:, :3] = 255
  labels = jnp.asarray(labels)
  logits = jnp.asarray(rng.normal(size=(2, 8, 8, NUM_CLASSES)), jnp.float32)
  ignored = (labels == 255)[..., None]
  other = jnp.where(ignored, 50.0 * jnp.asarray(rng.normal(size=logits.shape)), logits)

  @jax.jit
  def loss(z):
    return losses.masked_segmentation_loss(z, labels, NUM_CLASSES, ('ce', 'dice'), 255)

  assert float(loss(logits)) == pytest.approx(float(loss(other)), rel=1e-6)
  grad = jax.grad(loss)(logits)
  assert float(jnp.abs(jnp.where(ignored, grad, 0.0)).max()) == 0.0
  assert float(jnp.abs(grad).max()) > 0.0
  everything_ignored = losses.masked_segmentation_loss(
      logits, jnp.full_like(labels, 255), NUM_CLASSES, ('ce', 'dice'), 255)
  assert float(everything_ignored) == 0.0

  class PerPixel(flax.linen.Module):
    @flax.linen.compact
    def __call__(self, x, *, train):
      del train
      return flax.linen.Conv(NUM_CLASSES, (1, 1))(x)

  config = _config('unused')
  model = PerPixel()
  x = jnp.zeros((2, 8, 8, 13), jnp.uint8)
  variables = model.init(jax.random.PRNGKey(0), x.astype(jnp.float32), train=False)
  eval_fn = transfer.make_eval_fn(model, config)
  batch = {'s2': x, 'label': labels, 'valid': jnp.asarray([True, False])}
  sums = jax.jit(eval_fn)(variables['params'], {}, batch, 0)
  # Only the valid sample counts, and only its labelled pixels.
  assert int(sums['cm'].sum()) == int(jnp.sum(labels[0] != 255)) and float(sums['samples']) == 1


# ----------------------------------------------------------------------------------------------
# Training pieces
# ----------------------------------------------------------------------------------------------
def _train_a_few_steps(config, steps=2):
  """train.train_step on a hand-built TrainState (no init compile: numbers via eval_shape)."""
  model = decoders.build_transfer_model(config)
  channels = decoders.input_channels(config)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, TILE, TILE, channels)), train=False))
  variables = _random_like(abstract, seed=1)
  tx = train.create_optimizer(config.optimizer, transfer.trainable_fn(config))
  params = jax.tree.map(jnp.asarray, variables['params'])
  state = train.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=jax.tree.map(jnp.asarray, variables['batch_stats']),
      opt_state=tx.init(params), plateau=train.create_plateau(config).init(params),
      rng=jax.random.PRNGKey(2), nonfinite_streak=jnp.zeros((), jnp.int32),
      nonfinite_total=jnp.zeros((), jnp.int32))
  before = jax.device_get(state)
  step = jax.jit(lambda s, b: train.train_step(
      s, b, loss_fn=transfer.make_loss_fn(model, config), tx=tx, lr_fn=lambda _: 1e-2,
      steps_per_epoch=10))
  for i in range(steps):
    examples = [_dfc_example(2 * i), _dfc_example(2 * i + 1)]
    batch = {'s2': np.stack([e['s2'] for e in examples]),
             'label': np.stack([e['label'] for e in examples]).astype(np.int32)}
    state, metrics = step(state, batch)
    assert float(metrics['finite']) == 1.0
  return before, jax.device_get(state)


def _changed(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
@pytest.mark.parametrize('freeze', [True, False])
def test_frozen_encoder_unchanged_decoder_trains(freeze):
  config = _config('unused', decoder='pspnet', freeze_encoder=freeze)
  before, after = _train_a_few_steps(config)
  for collection in ('params', 'batch_stats'):
    enc_b, enc_a = getattr(before, collection)['encoder'], \
        getattr(after, collection)['encoder']
    # PSPNet never reads layer3/layer4 (smp builds its encoder with depth 3): never updated.
    for stage in ('layer3', 'layer4'):
      assert not _changed(enc_b[stage], enc_a[stage]), (collection, stage)
    assert _changed(enc_b['layer1'], enc_a['layer1']) == (not freeze), collection
    assert _changed(getattr(before, collection)['decoder'],
                    getattr(after, collection)['decoder']), collection


# ----------------------------------------------------------------------------------------------
# Pretrained encoders
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_exported_encoder_is_inserted_exactly_and_mismatches_are_refused(dfc_dir, tmp_path):
  path, exported = write_encoder_export(str(tmp_path))
  config = _config(dfc_dir, encoder_path=path, decoder='fpn')
  loaded = transfer.load_pretrained_encoder(config)
  model = decoders.build_transfer_model(config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, TILE, TILE, 13)), train=False))
  variables = transfer.insert_pretrained_encoder(_random_like(abstract, seed=5), loaded)
  for collection in ('params', 'batch_stats'):
    flat_exported = flax.traverse_util.flatten_dict(exported[collection])
    flat_loaded = flax.traverse_util.flatten_dict(variables[collection]['encoder'])
    assert flat_exported.keys() == flat_loaded.keys()
    for key, value in flat_exported.items():
      np.testing.assert_array_equal(np.asarray(flat_loaded[key]), value, err_msg=str(key))
  assert 'decoder' in variables['params']
  other, _ = write_encoder_export(str(tmp_path / 'r34'), encoder='resnet34')
  with pytest.raises(ValueError, match='does not fit'):
    transfer.insert_pretrained_encoder(_random_like(abstract, seed=5),
                                       exports.load_exported(other)[0])

  with pytest.raises(ValueError, match='modality'):
    transfer.load_pretrained_encoder(_config(dfc_dir, encoder_path=path, modality='s1'))
  wrong_bands = _config(dfc_dir, encoder_path=path)
  wrong_bands.data.s2_bands = 12
  with pytest.raises(ValueError, match='s2_bands=13'):
    transfer.load_pretrained_encoder(wrong_bands)
  wrong_depth = _config(dfc_dir, encoder_path=path)
  wrong_depth.model.encoder = 'resnet34'
  with pytest.raises(ValueError, match='resnet34'):
    transfer.load_pretrained_encoder(wrong_depth)
  with pytest.raises(FileNotFoundError):
    transfer.load_pretrained_encoder(_config(dfc_dir, encoder_path=str(tmp_path / 'nope')))
  with pytest.raises(ValueError, match='decoder'):
    transfer.validate_transfer_config(_config(dfc_dir, decoder='segformer'))


@pytest.mark.slow
def test_pretrained_encoder_is_an_argument_of_the_init_program(dfc_dir, tmp_path, monkeypatch):
  """Two exports with other numbers: one init program (the encoder is not compiled in as
  constants, so every transfer of these shapes shares one compiled init), and each initial
  state holds its own export exactly."""
  programs = []
  jit_init = models.jit_init

  def recording_jit_init(fn, platform=None, **jit_kwargs):
    jitted = jit_init(fn, platform, **jit_kwargs)

    def call(*args):
      programs.append(jitted.lower(*args).as_text())
      return jitted(*args)
    return call

  monkeypatch.setattr(models, 'jit_init', recording_jit_init)
  for seed in (1, 2):
    path, exported = write_encoder_export(str(tmp_path / str(seed)), seed=seed)
    config = _config(dfc_dir, encoder_path=path, freeze_encoder=False)
    learner = transfer.create_transfer_task(config).learner
    state, _ = train.init_state(learner, config, sharding.create_mesh(config),
                                train.create_optimizer(config.optimizer, learner.trainable),
                                train.create_plateau(config))
    for collection, tree in (('params', state.params), ('batch_stats', state.batch_stats)):
      expected = flax.traverse_util.flatten_dict(exported[collection])
      actual = flax.traverse_util.flatten_dict(jax.device_get(tree['encoder']))
      assert actual.keys() == expected.keys()
      for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=f'{seed} {key}')
  assert len(programs) == 2
  assert programs[0] == programs[1]


@pytest.mark.slow
def test_run_writes_reports_and_evaluate_reproduces_them(dfc_dir, tmp_path):
  path, exported = write_encoder_export(str(tmp_path))
  workdir = str(tmp_path / 'run')
  config = _config(dfc_dir, encoder_path=path, decoder='pspnet', freeze_encoder=True)
  scores = transfer.run(config, workdir)
  with open(os.path.join(workdir, 'metrics.json')) as f:
    report = json.load(f)
  labelled = sum(int(np.sum(_dfc_example(i)['label'] != 255)) for i in range(10, 13))
  assert report['pixels'] == labelled == int(np.sum(report['confusion_matrix']))
  assert list(report['per_class']) == list(constants.DFC_DW8_CLASSES)
  assert report['miou'] == pytest.approx(scores['miou'])
  assert report['step'] == 2 and report['split'] == 'test'
  with open(os.path.join(workdir, 'metrics.md')) as f:
    table = f.read()
  assert '| model | OA | AA | mIoU | mF1 |' in table and 'IoU Bare ground' in table
  with open(os.path.join(workdir, 'confusion_matrix.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  history = json.load(open(os.path.join(workdir, 'history.json')))
  assert history[-1]['miou'] == pytest.approx(scores['miou'], abs=1e-6)

  # Through the real loop: the frozen encoder is still exactly the exported one.
  state, _, _ = checkpointing.load_latest_checkpoint(workdir)
  for collection in ('params', 'batch_stats'):
    got = flax.traverse_util.flatten_dict(state[collection]['encoder'])
    want = flax.traverse_util.flatten_dict(exported[collection])
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=str(key))

  again, paths = transfer.evaluate_workdir(workdir, out_dir=str(tmp_path / 'again'))
  np.testing.assert_array_equal(again['confusion_matrix'], report['confusion_matrix'])
  assert again['loss'] == pytest.approx(report['loss'], rel=1e-5)
  assert os.path.basename(paths['png']) == 'confusion_matrix.png'

  # The documented command (README: `python -m cromss_jax.evaluate --workdir DIR`), as typed.
  out = tmp_path / 'cli'
  proc = subprocess.run([sys.executable, '-m', 'cromss_jax.evaluate', '--workdir', workdir,
                         '--out', str(out)], capture_output=True, text=True, timeout=600,
                        check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| model | OA | AA | mIoU | mF1 |' in proc.stdout
  cli_report = json.load(open(out / 'metrics.json'))
  assert cli_report['confusion_matrix'] == report['confusion_matrix']
  proc = subprocess.run([sys.executable, '-m', 'cromss_jax.evaluate', '--workdir',
                         str(tmp_path / 'nowhere')], capture_output=True, text=True,
                        timeout=600, check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith('error: no checkpoints in ')
