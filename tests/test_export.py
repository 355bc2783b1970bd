"""`python -m cromss_jax.export`: the S1/S2 encoders and the whole model of a pretraining run.

The run is run A of test_train.py (made once by `pretrain_run.shared_run`: ResNet-18
mid fusion, 13 S2 bands, 3 epochs, latest checkpoint at step 6); the export runs through the
command line, as a user would call it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import pretrain_run
from cromss_jax import constants
from cromss_jax import checkpointing
from cromss_jax import exports
from cromss_jax import models

# Both modules use the one shared pretraining run: keep them on one xdist worker.
pytestmark = pytest.mark.xdist_group(pretrain_run.GROUP)


# Made once (pretrain_run memoises it): function scope, so that a test after the shared run's
# release (see pretrain_run.py) gets a new one, not the removed one.
@pytest.fixture
def exported(tmp_path_factory, request):
  return pretrain_run.exported_run(tmp_path_factory, request)


def _assert_same_tree(actual, expected, what):
  helpers.assert_trees_equal(actual, expected, what)


def test_export_cli_writes_encoders_and_model_with_metadata(exported):
  out = exported['out']
  for name in ('encoder_s1', 'encoder_s2', 'pretrain_model'):
    assert (out / name).is_dir() and (out / f'{name}.json').is_file(), name
    assert f'{str(out / name)}  (+ {name}.json)' in exported['stdout']
  assert not [p for p in os.listdir(out) if p.endswith('.tmp')]

  s1 = json.loads((out / 'encoder_s1.json').read_text())
  s2 = json.loads((out / 'encoder_s2.json').read_text())
  model = json.loads((out / 'pretrain_model.json').read_text())
  for info, modality in ((s1, 's1'), (s2, 's2')):
    assert info['kind'] == 'encoder' and info['modality'] == modality
    assert info['encoder'] == 'resnet18'
    assert info['classes'] == list(constants.DW_CLASSES) and info['num_classes'] == 9
    assert info['source_step'] == exported['step'] == helpers.TOTAL_STEPS
    assert info['epoch'] == helpers.NUM_EPOCHS
    assert info['config']['objective']['keep_ratio'] == 0.3
  # Bands in the order of docs/METHOD.md §2.1, with the normalisation the records were made with.
  assert s1['bands'] == ['VV', 'VH']
  np.testing.assert_allclose(s1['mean'], constants.S1_MEAN)
  np.testing.assert_allclose(s1['std'], constants.S1_STD)
  assert s2['bands'] == ['B1', 'B2', 'B3', 'B4', 'B5', 'B6', 'B7', 'B8', 'B8A', 'B9', 'B10',
                         'B11', 'B12']
  np.testing.assert_allclose(s2['mean'], constants.S2_MEAN)
  np.testing.assert_allclose(s2['std'], constants.S2_STD)
  assert model['kind'] == 'pretrain_model' and model['fusion'] == 'mid'
  assert model['s1']['bands'] == s1['bands'] and model['s2']['bands'] == s2['bands']
  assert model['s2']['mean'] == s2['mean'] and model['s1']['std'] == s1['std']


def test_band_metadata_of_subsets_follows_spec_order():
  nine = exports.band_metadata('s2', 9)
  assert nine['bands'] == ['B2', 'B3', 'B4', 'B5', 'B6', 'B7', 'B8', 'B11', 'B12']
  assert nine['mean'] == [constants.S2_MEAN[i] for i in (1, 2, 3, 4, 5, 6, 7, 11, 12)]
  assert exports.band_metadata('s2', 3)['bands'] == ['B4', 'B3', 'B2']
  assert 'B10' not in exports.band_metadata('s2', 12)['bands']


@pytest.mark.parametrize('modality', ['s1', 's2'])
def test_load_exported_returns_exactly_the_checkpoint_encoder(exported, modality):
  variables, meta = exports.load_exported(str(exported['out'] / f'encoder_{modality}'))
  assert sorted(variables) == ['batch_stats', 'params']
  assert meta['modality'] == modality
  expected = models.extract_encoder(exported['variables'], modality)
  _assert_same_tree(variables, expected, f'exported encoder_{modality}')


def test_load_exported_model_is_the_whole_checkpoint_network(exported):
  variables, meta = exports.load_exported(str(exported['out'] / 'pretrain_model'))
  assert meta['kind'] == 'pretrain_model'
  assert sorted(variables['params']) == ['decoder', 'encoder_s1', 'encoder_s2']
  _assert_same_tree(variables, exported['variables'], 'exported pretrain_model')


def test_exported_s2_encoder_in_a_fresh_model_reproduces_the_features(exported):
  config = checkpointing.config_from_meta(exported['meta'])
  model = models.build_pretrain_model(config.model, config.objective.num_classes,
                                      config.data.s2_bands)
  s2 = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 64, 64, 13)), jnp.float32)
  # The run's freshly initialised network (train.init_state, before any step).
  initial = dict(np.load(exported['init']))
  fresh = {c: helpers.unflat(initial, c) for c in ('params', 'batch_stats')}
  encoder, _ = exports.load_exported(str(exported['out'] / 'encoder_s2'))
  inserted = models.insert_encoder(fresh, encoder, 's2')

  @jax.jit
  def s2_features(variables):
    return model.apply(variables, s2, method=lambda m, x: m.encoder_s2(x, train=False))

  want = s2_features(exported['variables'])
  got = s2_features(inserted)
  before = s2_features(fresh)
  assert len(got) == 5
  for level, (g, w, b) in enumerate(zip(got, want, before)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f'level {level}')
    assert not np.allclose(np.asarray(b), np.asarray(w)), 'fresh init already matched'
  # The rest of the fresh model is untouched.
  _assert_same_tree(inserted['params']['decoder'], fresh['params']['decoder'], 'decoder')
  _assert_same_tree(inserted['params']['encoder_s1'], fresh['params']['encoder_s1'], 's1')
  # The exported encoder also runs as a standalone ResNetEncoder (the transfer use).
  standalone = jax.jit(lambda v: models.ResNetEncoder(depth=18).apply(v, s2, train=False))(
      encoder)
  for level, (g, w) in enumerate(zip(standalone, want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5,
                               err_msg=f'standalone level {level}')


def test_load_exported_rejects_a_non_export(tmp_path):
  (tmp_path / 'not_an_export').mkdir()
  with pytest.raises(FileNotFoundError, match='python -m cromss_jax.export'):
    exports.load_exported(str(tmp_path / 'not_an_export'))
  with pytest.raises(FileNotFoundError, match='train first'):
    exports.export_pretrained(str(tmp_path / 'empty_workdir'), str(tmp_path / 'out'))


@pytest.mark.slow
def test_export_replaces_an_existing_export_only_when_asked_and_never_half(exported, tmp_path):
  """Refused without --overwrite; kill -9 while replacing leaves the old export whole; the
  completed --overwrite run leaves exactly the new export (here in safetensors) and removes
  the killed run's unfinished folder."""
  out = tmp_path / 'E'
  shutil.copytree(exported['out'], out)
  (out / 'stale_from_an_earlier_run').write_text('old')
  before = sorted(os.listdir(out))
  cmd = [sys.executable, '-m', 'cromss_jax.export', f'--workdir={exported["workdir"]}',
         f'--out={out}']
  refused = helpers.Proc(cmd, tmp_path / 'refused.log')
  assert refused.wait() == 1, refused.tail()
  assert f'error: {out} exists; pass --overwrite to replace it' in refused.text
  assert 'Traceback' not in refused.text and sorted(os.listdir(out)) == before

  # kill -9 as soon as the replacement has started writing (its temporary sibling folder).
  victim = helpers.Proc(cmd + ['--overwrite', '--format=safetensors'], tmp_path / 'killed.log')
  deadline = time.time() + 300
  while time.time() < deadline and victim.p.poll() is None:
    if any(p.startswith('.E.') and os.listdir(tmp_path / p) for p in os.listdir(tmp_path)):
      break
    time.sleep(0.005)
  assert victim.p.poll() is None, 'the export finished before it could be killed'
  os.kill(victim.p.pid, signal.SIGKILL)
  victim.p.wait()
  assert sorted(os.listdir(out)) == before
  variables, meta = exports.load_exported(str(out / 'pretrain_model'))
  assert meta['storage'] == 'orbax'
  _assert_same_tree(variables, exported['variables'], 'old export after kill -9')

  abandoned = [p for p in os.listdir(tmp_path)
               if p.startswith('.E.') and f'.{victim.p.pid}.' in p]
  assert abandoned, os.listdir(tmp_path)   # what kill -9 leaves: the unfinished folder

  replaced = helpers.Proc(cmd + ['--overwrite', '--format=safetensors'],
                          tmp_path / 'replaced.log')
  assert replaced.wait() == 0, replaced.tail()
  assert [p for p in os.listdir(tmp_path) if p.startswith('.E.')] == []
  assert f'left by process {victim.p.pid} (no longer running)' in replaced.text
  assert sorted(os.listdir(out)) == ['encoder_s1', 'encoder_s1.json', 'encoder_s2',
                                     'encoder_s2.json', 'pretrain_model', 'pretrain_model.json']
  for name in ('encoder_s1', 'encoder_s2', 'pretrain_model'):
    assert os.listdir(out / name) == [exports.SAFETENSORS_FILE]
    new, meta = exports.load_exported(str(out / name))
    old, _ = exports.load_exported(str(exported['out'] / name))
    assert meta['storage'] == 'safetensors'
    _assert_same_tree(new, old, f'safetensors {name}')
