"""Config validation: every rule rejects a bad value before anything is built, naming the key.

Each rule is checked through the library (`config_validation.validate_config`) and a
representative set through the command line exactly as a user types it
(`python -m cromss_jax.main --config=configs/pretrain.py --workdir=W --config.x=y`): exit
status 1, one line `error: ...` naming the key, no traceback, within seconds, and no workdir.
The dataset-dependent rules (`validate_against_dataset`) run on tiny TFDS folders written here.
"""
from __future__ import annotations

import glob
import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import pytest

from configs import demo as demo_config
from configs import pretrain as pretrain_config
from configs import transfer as transfer_config
from cromss_jax import config_validation as cv
from cromss_jax import constants
import helpers

REPO = Path(__file__).resolve().parents[1]
NAN, INF = float('nan'), float('inf')
# A rejected config ends before TensorFlow or JAX are imported: well under a second on an idle
# machine; the bound leaves room for a loaded 2-core one.
CLI_SECONDS = 30
# A dataset-dependent rejection reads the dataset's metadata (TensorFlow) but compiles nothing.
CLI_DATASET_SECONDS = 90


def _base(kind: str) -> ml_collections.ConfigDict:
  return transfer_config.get_config() if kind == 'transfer' else pretrain_config.get_config()


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> ml_collections.ConfigDict:
  *groups, key = path.split('.')
  node = config
  for group in groups:
    node = node[group]
  node[key] = value
  return config


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  out = []
  for key in config.keys():
    if isinstance(config[key], ml_collections.ConfigDict):
      out += _leaf_paths(config[key], f'{prefix}{key}.')
    else:
      out.append(prefix + key)
  return out


# ------------------------------------------------------------------------------------------------
# 1. One rule per key, through the library
# ------------------------------------------------------------------------------------------------
BAD_VALUES = [
    # (config kind, key, value, what the message must say after the key)
    ('pretrain', 'training.log_every_steps', 0, 'an integer >= 1'),
    ('transfer', 'data.shuffle_buffer', 0, 'an integer >= 1'),
    ('pretrain', 'data.num_workers', -1, 'an integer >= 0'),
    ('pretrain', 'optimizer.learning_rate', NAN, 'finite'),
    ('pretrain', 'optimizer.learning_rate', INF, 'finite'),
    ('pretrain', 'optimizer.learning_rate', -INF, 'finite'),
    ('pretrain', 'optimizer.learning_rate', 0.0, '> 0'),
    ('pretrain', 'optimizer.learning_rate', -1e-3, '> 0'),
    ('pretrain', 'optimizer.learning_rate', 1e38, '<= 1.0'),
    ('pretrain', 'optimizer.learning_rate', 2.0, '<= 1.0'),
    ('pretrain', 'training.steps_per_epoch', 0, r'>= 1 \(or -1\)'),
    ('pretrain', 'training.steps_per_epoch', -2, r'>= 1 \(or -1\)'),
    ('pretrain', 'optimizer.b1', 1.5, '< 1'),
    ('pretrain', 'optimizer.b1', 1.0, '< 1'),
    ('pretrain', 'optimizer.b1', -0.1, '>= 0'),
    ('pretrain', 'optimizer.b2', 1.0, '< 1'),
    ('pretrain', 'optimizer.b2', NAN, 'finite'),
    ('pretrain', 'schedule.patience', -3, 'an integer >= 0'),
    ('pretrain', 'optimizer.eps', 0.0, '> 0'),
    ('pretrain', 'optimizer.eps', -1e-8, '> 0'),
    ('pretrain', 'optimizer.weight_decay', -1e-8, '>= 0'),
    ('pretrain', 'optimizer.weight_decay', INF, 'finite'),
    ('pretrain', 'optimizer.weight_decay', NAN, 'finite'),
    ('pretrain', 'objective.consistency_weight', INF, 'finite'),
    ('pretrain', 'objective.smoothing_factors', (NAN, 0.05), 'finite'),
    ('pretrain', 'objective.smoothing_factors', (0.8, 0.5), 'a \\+ b <= 1'),
    ('pretrain', 'objective.prior_sigma', 0.0, '> 0'),
    ('pretrain', 'objective.prior_truncate', NAN, 'finite'),
    ('pretrain', 'objective.keep_ratio', 1.5, '<= 1'),
    ('pretrain', 'objective.ramp_epochs', -1, '>= 0'),
    ('pretrain', 'objective.num_classes', 1, '>= 2'),
    ('pretrain', 'schedule.rel_threshold', NAN, 'finite'),
    ('pretrain', 'schedule.factor', 1.0, '< 1'),
    ('pretrain', 'schedule.factor', 0.0, '> 0'),
    ('pretrain', 'schedule.min_lr', -1e-6, '>= 0'),
    ('pretrain', 'schedule.name', 'step', "'plateau', 'constant', 'cosine'"),
    ('pretrain', 'optimizer.name', 'sgd', "'adam'"),
    ('pretrain', 'data.rotation', 'diagonal', "'free', 'rot90', 'none'"),
    ('pretrain', 'data.rotation_prob', 1.5, '<= 1'),
    ('pretrain', 'data.rotation_prob', -0.1, '>= 0'),
    ('pretrain', 'data.image_interpolation', 'cubic', "'bilinear', 'nearest'"),
    ('transfer', 'data.num_parallel_calls', 0, r'>= 1 \(or -1\)'),
    ('pretrain', 'data.prefetch', -2, r'>= 0 \(or -1\)'),
    ('pretrain', 'data.s2_bands', 5, 'one of 13, 12, 9, 3'),
    ('pretrain', 'data.tile_size', 16, '>= 32'),
    ('pretrain', 'training.num_epochs', 0, 'an integer >= 1'),
    ('pretrain', 'training.global_batch_size', 0, 'an integer >= 1'),
    ('pretrain', 'training.eval_every_epochs', 0, 'an integer >= 1'),
    ('pretrain', 'training.checkpoint_every_epochs', 0, 'an integer >= 1'),
    ('pretrain', 'training.keep_checkpoints', 0, 'an integer >= 1'),
    ('pretrain', 'training.panel_every_epochs', -1, 'an integer >= 0'),
    ('pretrain', 'training.max_consecutive_nonfinite', 0, 'an integer >= 1'),
    ('pretrain', 'model.encoder', 'resnet101', "'resnet18', 'resnet34', 'resnet50'"),
    ('pretrain', 'model.fusion', 'early', "'mid', 'late'"),
    ('pretrain', 'model.decoder_channels', (256, 128), 'a tuple of 5 positive integers'),
    ('pretrain', 'model.compute_dtype', 'float16', "'float32', 'bfloat16'"),
    ('pretrain', 'mesh.data', 0, r'>= 1 \(or -1\)'),
    ('pretrain', 'mesh.fsdp', 0, 'an integer >= 1'),
    ('transfer', 'transfer.decoder', 'segformer', "'pspnet', 'deeplabv3plus', 'fpn', 'unet'"),
    ('transfer', 'transfer.modality', 's3', "'s1', 's2'"),
    ('transfer', 'transfer.encoder_path', '', 'exported encoder folder'),
    ('transfer', 'data.test_split', '', 'a non-empty string'),
    ('transfer', 'data.train_split', '', 'a non-empty string'),
    ('transfer', 'optimizer.learning_rate', NAN, 'finite'),
]


@pytest.mark.parametrize('kind, path, value, expected', BAD_VALUES,
                         ids=[f'{k}-{p}={v!r}' for k, p, v, _ in BAD_VALUES])
def test_a_bad_value_is_rejected_naming_the_key(kind, path, value, expected):
  config = _set(_base(kind), path, value)
  with pytest.raises(cv.ConfigError) as info:
    cv.validate_config(config)
  message = str(info.value)
  assert message.startswith(f'config.{path}='), message
  assert re.search(expected, message), f'{expected!r} not in {message!r}'
  assert isinstance(info.value, ValueError) and isinstance(info.value, cv.UserError)


CROSS_KEY = [
    ('pretrain', {'data.crop_size': 288}, r'config\.data\.crop_size=288 exceeds '
                                          r'config\.data\.tile_size=264'),
    ('pretrain', {'data.crop_size': 100}, r'config\.data\.crop_size=100 must be a multiple of 32'),
    ('pretrain', {'schedule.min_lr': 1e-2}, r'config\.schedule\.min_lr=0\.01 exceeds '
                                            r'config\.optimizer\.learning_rate=0\.005'),
    ('transfer', {'transfer.ignore_label': 3}, r'config\.transfer\.ignore_label=3 is not allowed;'
                                               r' expected an integer outside the classes 0\.\.7'),
    ('transfer', {'data.class_names': ('a', 'b')}, r'config\.data\.class_names has 2 names but '
                                                   r'config\.objective\.num_classes=8'),
    ('transfer', {'objective.num_classes': 5}, r'config\.data\.class_names has 8 names but '
                                               r'config\.objective\.num_classes=5'),
]


@pytest.mark.parametrize('kind, changes, expected', CROSS_KEY,
                         ids=[f'{k}-{",".join(c)}' for k, c, _ in CROSS_KEY])
def test_rules_across_keys(kind, changes, expected):
  config = _base(kind)
  for path, value in changes.items():
    _set(config, path, value)
  with pytest.raises(cv.ConfigError, match=expected):
    cv.validate_config(config)


GOOD_VALUES = [
    ('training.steps_per_epoch', -1), ('training.steps_per_epoch', 1), ('schedule.patience', 0),
    ('optimizer.b1', 0.0), ('optimizer.b2', 0.0), ('optimizer.learning_rate', 1.0),
    ('optimizer.weight_decay', 0.0), ('training.panel_every_epochs', 0), ('data.prefetch', -1),
    ('data.prefetch', 0), ('data.num_workers', 0), ('data.num_workers', 32),
    ('data.rotation', 'none'), ('data.rotation_prob', 1.0), ('objective.ramp_epochs', 0),
    ('mesh.data', 2), ('schedule.min_lr', 5e-3),
]


@pytest.mark.parametrize('path, value', GOOD_VALUES, ids=[f'{p}={v!r}' for p, v in GOOD_VALUES])
def test_boundary_values_are_accepted(path, value):
  cv.validate_config(_set(pretrain_config.get_config(), path, value))


def test_transfer_wrapper_uses_the_same_rules():
  from cromss_jax.tasks import transfer  # pylint: disable=g-import-not-at-top
  config = _set(transfer_config.get_config(), 'training.log_every_steps', 0)
  with pytest.raises(cv.ConfigError, match=r'config\.training\.log_every_steps=0'):
    transfer.validate_transfer_config(config)
  with pytest.raises(cv.ConfigError, match='config.transfer is missing'):
    cv.validate_transfer_config(pretrain_config.get_config())


# ------------------------------------------------------------------------------------------------
# 2. Keys: exactly those of the config file the run comes from
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kind, path, expected', [
    ('pretrain', 'training.foo', r'config\.training\.foo is not a config key \(configs/pretrain'
                                 r'\.py has no training\.foo\)\. config\.training has: .*'
                                 r'log_every_steps'),
    ('pretrain', 'training.log_every_step', r'config\.training\.log_every_step is not a config '
                                            r'key .*Did you mean config\.training\.log_every_'
                                            r'steps\?'),
    ('pretrain', 'fooo', r'config\.fooo is not a config key \(configs/pretrain\.py'),
    ('transfer', 'transfer.foo', r'config\.transfer\.foo is not a config key \(configs/transfer'
                                 r'\.py has no transfer\.foo\)'),
    # A transfer key in a pretraining config is unknown there.
    ('pretrain', 'data.train_split', r'config\.data\.train_split is not a config key'),
])
def test_an_unknown_key_is_rejected_naming_it(kind, path, expected):
  config = _base(kind)
  _set(config, path, 1)
  with pytest.raises(cv.ConfigError, match=expected):
    cv.validate_config(config)


def test_an_unknown_group_is_rejected_naming_it():
  config = pretrain_config.get_config()
  config.extra = ml_collections.ConfigDict({'x': 1})
  with pytest.raises(cv.ConfigError, match=r'config\.extra is not a config key'):
    cv.validate_config(config)


@pytest.mark.parametrize('path', ['objective.prior_sigma', 'objective.prior_truncate',
                                  'data.image_interpolation', 'data.flip', 'seed'])
def test_a_missing_key_is_rejected_naming_it(path):
  config = pretrain_config.get_config()
  *groups, key = path.split('.')
  node = config
  for group in groups:
    node = node[group]
  del node[key]
  with pytest.raises(cv.ConfigError, match=rf'config\.{re.escape(path)} is missing; '
                                           r'configs/pretrain\.py sets it'):
    cv.validate_config(config)


def test_prior_keys_are_config_keys_and_optional_in_a_bare_objective_section():
  """The config files set them; an objective section built from the contract's keys alone
  (without them) uses the same values."""
  from cromss_jax import objective as objective_lib
  objective = pretrain_config.get_config().objective
  assert (objective.prior_sigma, objective.prior_truncate) == (
      objective_lib.PRIOR_SIGMA, objective_lib.PRIOR_TRUNCATE) == (3.0, 4.0)
  cv.validate_objective_config(objective)
  labels = np.random.default_rng(0).integers(0, 9, (1, 4, 32, 32))
  season = np.zeros((1,), np.int32)
  full = objective_lib.smoothing_prior(labels, season, objective)
  del objective['prior_sigma'], objective['prior_truncate']
  cv.validate_objective_config(objective)
  np.testing.assert_array_equal(objective_lib.smoothing_prior(labels, season, objective), full)
  objective.prior_sigma = 0.0
  with pytest.raises(cv.ConfigError, match=r'config\.objective\.prior_sigma=0\.0'):
    cv.validate_objective_config(objective)


def test_unused_keys_are_gone():
  config = pretrain_config.get_config()
  assert 'num_seasons' not in config.data and 'val_fraction' not in config.training


def test_every_key_has_a_rule():
  """A key added to a config file without a rule here fails this test (one validator)."""
  paths = set(_leaf_paths(pretrain_config.get_config())) | set(
      _leaf_paths(transfer_config.get_config()))
  assert paths == set(cv.RULES), (paths ^ set(cv.RULES))


def _uncommented_keys(path: Path) -> list[str]:
  """`group.key = value` lines with no comment of their own and none above their block."""
  lines = path.read_text().splitlines()
  assignment = re.compile(r'^\s+[a-z_]+(\.[a-z_0-9]+)+ = (?!.*ConfigDict\()')
  alias = re.compile(r'^\s+[a-z_]+ = config\.[a-z_]+$')
  out = []
  for i, line in enumerate(lines):
    if not assignment.match(line) or '#' in line:
      continue
    j = i - 1   # up through the block of assignments (and `group = config.group`) it is in
    while j >= 0 and (assignment.match(lines[j]) or alias.match(lines[j])):
      j -= 1
    if j < 0 or not lines[j].strip().startswith('#'):
      out.append(f'{path.name}:{i + 1}: {line.strip()}')
  return out


@pytest.mark.parametrize('name', ['pretrain.py', 'transfer.py'])
def test_every_key_is_commented_in_its_config_file(name):
  uncommented = _uncommented_keys(REPO / 'configs' / name)
  assert not uncommented, '\n'.join(uncommented)


def test_no_config_lookup_with_a_fallback_default():
  """`config.x.get(key, default)` would let code and config files disagree."""
  pattern = re.compile(r'\b(config|cfg|obj_cfg|model_cfg|opt_cfg)(\.[a-z_]+)*\.get\(')
  hits = []
  for path in sorted(glob.glob(str(REPO / 'cromss_jax' / '**' / '*.py'), recursive=True)):
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
      if pattern.search(line):
        hits.append(f'{os.path.relpath(path, REPO)}:{n}: {line.strip()}')
  assert not hits, '\n'.join(hits)


# ------------------------------------------------------------------------------------------------
# 3. Config files and variants
# ------------------------------------------------------------------------------------------------
def _config_modules() -> list[str]:
  names = []
  for path in sorted((REPO / 'configs').glob('*.py')):
    if path.stem.startswith('_'):
      continue
    module = importlib.import_module(f'configs.{path.stem}')
    if hasattr(module, 'get_config'):
      names.append(path.stem)
  return names


@pytest.mark.parametrize('name', _config_modules())
def test_every_config_file_and_variant_is_valid(name):
  module = importlib.import_module(f'configs.{name}')
  variants = [None] + sorted(getattr(module, 'VARIANTS', {}))
  for variant in variants:
    config = module.get_config(variant) if variant else module.get_config()
    cv.validate_config(config)


@pytest.mark.parametrize('module', [pretrain_config, transfer_config])
def test_variants_change_only_their_keys(module):
  paper = module.get_config()
  assert module.get_config(None).to_dict() == paper.to_dict() == module.get_config('').to_dict()
  for name in module.VARIANTS:
    variant = module.get_config(name)
    assert _leaf_paths(variant) == _leaf_paths(paper)
    changed = {p for p in _leaf_paths(paper)
               if cv._get(variant, p) != cv._get(paper, p)}  # pylint: disable=protected-access
    settings = dict(module.VARIANTS[name])
    while '_base' in settings:   # the keys of the variant it starts from count as its own
      base = settings.pop('_base')
      settings = {**module.VARIANTS[base], **settings}
    assert changed <= set(settings), changed - set(settings)
    assert changed, f'variant {name} changes nothing'


def test_named_scales():
  tiny, demo, study = (pretrain_config.get_config(v) for v in ('tiny', 'demo', 'study'))
  assert demo.to_dict() == demo_config.get_config().to_dict()
  assert demo_config.get_config('tiny').to_dict() == tiny.to_dict()
  assert (demo.data.crop_size, demo.model.encoder, demo.training.num_epochs) == (128, 'resnet18',
                                                                               6)
  assert (study.data.crop_size, study.training.num_epochs, study.model.encoder) == (96, 8,
                                                                                  'resnet18')
  assert (tiny.data.crop_size, tiny.training.global_batch_size,
          tiny.training.steps_per_epoch, tiny.training.num_epochs) == (64, 2, 2, 3)
  assert tiny.model.compute_dtype == 'float32'
  transfer_demo = transfer_config.get_config('demo')
  assert 'transfer' in transfer_demo and transfer_demo.model.encoder == 'resnet18'
  assert transfer_config.get_config().data.rotation_prob == 0.2


@pytest.mark.parametrize('module', [pretrain_config, transfer_config, demo_config])
def test_an_unknown_variant_names_the_choices(module):
  with pytest.raises(ValueError, match=r"unknown config variant 'bogus'; expected one of "
                                       r"'demo', 'study', 'tiny'"):
    module.get_config('bogus')


# ------------------------------------------------------------------------------------------------
# 4. Mesh shape against the device count
# ------------------------------------------------------------------------------------------------
def test_mesh_shape_rules():
  config = pretrain_config.get_config()
  assert cv.mesh_shape(config, 8) == (8, 1)
  config.mesh.fsdp = 2
  assert cv.mesh_shape(config, 8) == (4, 2)
  config.mesh.fsdp = 3
  with pytest.raises(cv.ConfigError, match=r'config\.mesh\.fsdp=3 must be a positive divisor '
                                           r'of the device count \(8\)'):
    cv.validate_mesh(config, 8)
  config.mesh.fsdp, config.mesh.data = 1, 3
  with pytest.raises(cv.ConfigError, match=r'config\.mesh\.data=3 x config\.mesh\.fsdp=1 must '
                                           r'equal the device count \(8\)'):
    cv.validate_config(config, device_count=8)
  config.mesh.data, config.training.global_batch_size = -1, 6
  with pytest.raises(cv.ConfigError, match=r'config\.training\.global_batch_size=6 is not '
                                           r'divisible by the 4 devices'):
    cv.validate_config(config, device_count=4)


# ------------------------------------------------------------------------------------------------
# 5. Against the dataset's metadata
# ------------------------------------------------------------------------------------------------
TILE, SEASONS = 64, 4


def _write_dataset(root: Path, name: str, splits: dict[str, int], *, seasonal: bool) -> str:
  """A TFDS version folder with `splits` {split: samples} of tiny records (pretraining:
  array_record, one record per (location, season); downstream: TFRecord patches)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  f = tfds.features
  label_key, label_shape = (('season_labels', (SEASONS, TILE, TILE)) if seasonal else
                            ('label', (TILE, TILE)))
  spec = {'s1': f.Tensor(shape=(TILE, TILE, 2), dtype=np.uint8),
          's2': f.Tensor(shape=(TILE, TILE, 13), dtype=np.uint8),
          label_key: f.Tensor(shape=label_shape, dtype=np.uint8)}
  spec.update({'location_id': f.Scalar(dtype=np.int64), 'season': f.Scalar(dtype=np.int64)}
              if seasonal else {'patch_id': f.Text()})
  rng = np.random.default_rng(0)
  records = {}
  for split, count in splits.items():
    examples = []
    for i in range(count):
      example = {key: rng.integers(0, 8, feature.shape).astype(np.uint8)
                 for key, feature in spec.items() if key in ('s1', 's2', label_key)}
      if seasonal:
        examples += [dict(example, location_id=i, season=t) for t in range(SEASONS)]
      else:
        examples.append(dict(example, patch_id=f'p{i}'))
    records[split] = [examples]
  return helpers.write_tfds_folder(str(root / name / '1.0.0'), name, f.FeaturesDict(spec),
                                   records, 'array_record' if seasonal else 'tfrecord')


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp('datasets')
  return {
      'pretrain': _write_dataset(root / 'a', 'ssl4eo_s12_nol', {'train': 4, 'validation': 2},
                                 seasonal=True),
      'no_validation': _write_dataset(root / 'b', 'ssl4eo_s12_nol', {'train': 4},
                                      seasonal=True),
      'dfc': _write_dataset(root / 'c', 'dfc2020', {'validation': 4, 'test': 2},
                            seasonal=False),
      'dfc_no_test': _write_dataset(root / 'd', 'dfc2020', {'validation': 4}, seasonal=False),
      'unknown': _write_dataset(root / 'e', 'my_downstream', {'validation': 4, 'test': 2},
                                seasonal=False),
  }


def _tiny(dataset_dir: str, kind: str = 'pretrain') -> ml_collections.ConfigDict:
  config = (transfer_config if kind == 'transfer' else pretrain_config).get_config('tiny')
  config.data.dataset_dir = dataset_dir
  config.data.tile_size = config.data.crop_size = TILE
  return config


def test_dataset_metadata_gives_splits_and_classes(datasets):
  from cromss_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  info = ip.pretrain_info(_tiny(datasets['pretrain']), process_count=1)
  assert (info.num_classes, info.num_eval_examples, info.s1_channels) == (9, 2, 2)
  cv.validate_against_dataset(_tiny(datasets['pretrain']), info)
  info = ip.downstream_info(_tiny(datasets['dfc'], 'transfer'), process_count=1)
  assert (info.num_classes, info.num_eval_examples) == (len(constants.DFC_DW8_CLASSES), 2)
  cv.validate_against_dataset(_tiny(datasets['dfc'], 'transfer'), info)
  # A dataset no converter of the project wrote: its classes are unknown, so not checked.
  info = ip.downstream_info(_tiny(datasets['unknown'], 'transfer'), process_count=1)
  assert info.num_classes is None
  config = _tiny(datasets['unknown'], 'transfer')
  config.objective.num_classes = 3
  config.data.class_names = ('a', 'b', 'c')
  cv.validate_against_dataset(config, info)


def test_wrong_number_of_classes_is_rejected(datasets):
  from cromss_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  config = _tiny(datasets['pretrain'])
  config.objective.num_classes = 5
  info = ip.pretrain_info(config, process_count=1)
  with pytest.raises(cv.ConfigError, match=r'config\.objective\.num_classes=5 but .*holds labels '
                                           r'of 9 classes; set --config\.objective\.num_classes=9'):
    cv.validate_against_dataset(config, info)
  config = _tiny(datasets['dfc'], 'transfer')
  config.objective.num_classes = 9
  config.data.class_names = constants.DW_CLASSES
  info = ip.downstream_info(config, process_count=1)
  with pytest.raises(cv.ConfigError, match=r'config\.objective\.num_classes=9 but .*8 classes'):
    cv.validate_against_dataset(config, info)


def test_missing_evaluation_split_is_rejected(datasets):
  from cromss_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  config = _tiny(datasets['no_validation'])
  info = ip.pretrain_info(config, process_count=1)
  with pytest.raises(cv.ConfigError, match=r"config\.data\.dataset_dir\) has no 'validation' "
                                           r'split.*--val-fraction'):
    cv.validate_against_dataset(config, info)
  config = _tiny(datasets['dfc_no_test'], 'transfer')
  info = ip.downstream_info(config, process_count=1)
  with pytest.raises(cv.ConfigError, match=r"config\.data\.test_split='test': .* has no such "
                                           'split'):
    cv.validate_against_dataset(config, info)


def test_s1_channels_must_match_the_records(datasets):
  from cromss_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  config = _tiny(datasets['pretrain'])
  config.model.s1_channels = 1
  info = ip.pretrain_info(config, process_count=1)
  with pytest.raises(cv.ConfigError, match=r'config\.model\.s1_channels=1 but .* stores 2 S1 '
                                           'bands'):
    cv.validate_against_dataset(config, info)


# ------------------------------------------------------------------------------------------------
# 6. Through the command line, as a user types it
# ------------------------------------------------------------------------------------------------
def _main(workdir: Path, config: str, *overrides: str) -> list[str]:
  return [sys.executable, '-m', 'cromss_jax.main', f'--config={config}', f'--workdir={workdir}',
          *overrides]


def _run_all(commands: dict[str, list[str]], timeout: float) -> dict[str, tuple[int, str, str,
                                                                              float]]:
  """Runs the commands two at a time; {case: (status, stdout, stderr, seconds)}."""
  results, pending = {}, list(commands.items())
  running: dict[str, tuple[subprocess.Popen, float]] = {}
  while pending or running:
    while pending and len(running) < 2:
      name, command = pending.pop(0)
      running[name] = (subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True), time.monotonic())
    for name, (proc, start) in list(running.items()):
      try:
        out, err = proc.communicate(timeout=0.1)
      except subprocess.TimeoutExpired:
        if time.monotonic() - start > timeout:
          proc.kill()
          out, err = proc.communicate()
          results[name] = (proc.returncode, out, err, time.monotonic() - start)
          del running[name]
        continue
      results[name] = (proc.returncode, out, err, time.monotonic() - start)
      del running[name]
  return results


def _assert_one_error_line(name: str, result: tuple[int, str, str, float], expected: str,
                           workdir: Path, seconds: float) -> None:
  status, out, err, elapsed = result
  text = f'[{name}] status {status} after {elapsed:.1f} s\nstdout:\n{out}\nstderr:\n{err}'
  assert 'Traceback' not in out + err, text
  assert elapsed < seconds, text
  assert status == 1, text
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and err.rstrip().endswith(errors[0]), text
  assert re.search(expected, errors[0]), f'{expected!r} not in the error line\n{text}'
  assert not workdir.exists(), f'the workdir was created\n{text}'


CLI_CASES = {
    # name: (config argument, overrides, what the error line must say)
    'unknown-key': ('configs/pretrain.py', ['--config.training.foo=1'],
                    r'^error: config\.training\.foo is not a config key \(configs/pretrain\.py '
                    r'has no training\.foo\)'),
    'unknown-group': ('configs/pretrain.py', ['--config.trainin.log_every_steps=1'],
                      r'config\.trainin is not a config key.*Did you mean config\.training\?'),
    'log-every-0': ('configs/pretrain.py', ['--config.training.log_every_steps=0'],
                    r'^error: config\.training\.log_every_steps=0 is not allowed; expected an '
                    r'integer >= 1\.$'),
    'shuffle-buffer-0': ('configs/transfer.py', ['--config.data.shuffle_buffer=0'],
                         r'config\.data\.shuffle_buffer=0 is not allowed'),
    'lr-nan': ('configs/pretrain.py', ['--config.optimizer.learning_rate=nan'],
               r'config\.optimizer\.learning_rate=nan is not allowed; every number must be '
               'finite'),
    'lr-absurd': ('configs/pretrain.py', ['--config.optimizer.learning_rate=1e38'],
                  r'config\.optimizer\.learning_rate=1e\+38 is not allowed; expected a finite '
                  r'number > 0 and <= 1\.0'),
    'steps-0': ('configs/pretrain.py', ['--config.training.steps_per_epoch=0'],
                r'config\.training\.steps_per_epoch=0 is not allowed; .*\(or -1\)'),
    'b1': ('configs/pretrain.py', ['--config.optimizer.b1=1.5'],
           r'config\.optimizer\.b1=1\.5 is not allowed; expected a finite number >= 0 and < 1'),
    'patience': ('configs/pretrain.py', ['--config.schedule.patience=-3'],
                 r'config\.schedule\.patience=-3 is not allowed'),
    'wrong-type': ('configs/pretrain.py', ['--config.training.log_every_steps=abc'],
                   r'^error: flag --config\.training\.log_every_steps=abc: '),
    'bad-variant': ('configs/pretrain.py:bogus', [],
                    r"^error: flag --config=configs/pretrain\.py:bogus: .*unknown config variant "
                    r"'bogus'; expected one of 'demo', 'study', 'tiny'"),
    'missing-file': ('configs/nope.py', [],
                     r"^error: flag --config: cannot load the config file: .*configs/nope\.py"),
    'variant-override': ('configs/pretrain.py:tiny', ['--config.optimizer.eps=0'],
                         r'config\.optimizer\.eps=0\.0 is not allowed'),
    'transfer-decoder': ('configs/transfer.py', ['--config.transfer.decoder=segformer'],
                         r"config\.transfer\.decoder='segformer' is not allowed; expected one of "
                         r"'pspnet'"),
    'transfer-unknown': ('configs/transfer.py:demo', ['--config.transfer.foo=1'],
                         r'config\.transfer\.foo is not a config key \(configs/transfer\.py'),
}


@pytest.mark.slow
def test_cli_config_errors_are_one_line_before_anything_starts(tmp_path):
  commands = {name: _main(tmp_path / name, config, *overrides)
              for name, (config, overrides, _) in CLI_CASES.items()}
  results = _run_all(commands, timeout=CLI_SECONDS + 30)
  for name, (_, _, expected) in CLI_CASES.items():
    _assert_one_error_line(name, results[name], expected, tmp_path / name, CLI_SECONDS)


@pytest.mark.slow
def test_cli_dataset_errors_fail_before_compiling(datasets, tmp_path):
  """No validation split / 5 classes on 9-class data: rejected after reading the metadata, before
  the workdir exists (the training loop creates it before compiling). A third run shows that
  `--config=configs/pretrain.py:tiny` itself is accepted: it fails only on its missing data."""
  tiny = ['--config.data.tile_size=64', '--config.data.crop_size=64']
  cases = {
      'no-validation-split': (
          ['--config.data.dataset_dir=' + datasets['no_validation'], *tiny],
          r"^error: .* \(config\.data\.dataset_dir\) has no 'validation' split"),
      'num-classes': (
          ['--config.data.dataset_dir=' + datasets['pretrain'], *tiny,
           '--config.objective.num_classes=5'],
          r'^error: config\.objective\.num_classes=5 but .* holds labels of 9 classes'),
      'variant-accepted': (
          [f'--config.data.dataset_dir={tmp_path / "nowhere"}'], r'nowhere.*does not exist'),
  }
  commands = {name: _main(tmp_path / name, 'configs/pretrain.py:tiny', *overrides)
              for name, (overrides, _) in cases.items()}
  results = _run_all(commands, timeout=CLI_DATASET_SECONDS + 30)
  for name, (_, expected) in cases.items():
    _assert_one_error_line(name, results[name], expected, tmp_path / name, CLI_DATASET_SECONDS)


def test_finite_checks_cover_tuples():
  config = pretrain_config.get_config()
  config.objective.smoothing_factors = (0.15, INF)
  with pytest.raises(cv.ConfigError, match=r'config\.objective\.smoothing_factors=\(0\.15, inf\) '
                                           'is not allowed; every number must be finite'):
    cv.validate_config(config)


def test_the_input_pipeline_applies_the_validators_rotation_rules(datasets):
  """Library callers that skip validate_config still meet the same rotation rules (pretraining
  augments in the train step, transfer in the input pipeline)."""
  from cromss_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  from cromss_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top
  config = _tiny(datasets['pretrain'])
  config.data.rotation = 'diagonal'
  with pytest.raises(cv.ConfigError, match=r"config\.data\.rotation='diagonal' is not allowed; "
                                           r"expected one of 'free', 'rot90', 'none'"):
    pretrain.create_pretrain_learner(config)
  config = _tiny(datasets['dfc'], 'transfer')
  config.data.image_interpolation = 'cubic'
  with pytest.raises(cv.ConfigError, match=r"config\.data\.image_interpolation='cubic'"):
    ip.create_downstream_iterator(config, 'validation', train=True, process_index=0,
                                  process_count=1)


def test_config_against_the_records_is_a_config_error(datasets):
  """Tile size, crop and bands that the records contradict: user errors naming the key."""
  from cromss_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  cases = [({'data.tile_size': 96, 'data.crop_size': 96},
            r'config\.data\.tile_size=96 but .* stores 64x64 tiles; set --config\.data\.tile_size'
            r'=64'),
           ({'data.s2_bands': 5}, r'config\.data\.s2_bands=5 is not allowed; expected one of '
                                  r'13, 12, 9, 3'),
           ({'training.global_batch_size': 3}, r'config\.training\.global_batch_size=3 is not '
                                               r'divisible by the 2 processes')]
  for changes, expected in cases:
    config = _tiny(datasets['pretrain'])
    for path, value in changes.items():
      _set(config, path, value)
    with pytest.raises(cv.ConfigError, match=expected):
      ip.pretrain_info(config, process_count=2)
