"""Every rule a configuration must satisfy, checked before anything is built or compiled.

A bad value costs minutes when it surfaces after compilation (or never, when it trains silently),
so each rule runs first and names the key and what it accepts:
* `validate_config` (alias `validate_pretrain_config` / `validate_transfer_config`): keys and
  values alone. The keys must be those of the config file the kind of run comes from
  (configs/pretrain.py, or configs/transfer.py for a config with a `transfer` group).
* `validate_mesh`: the device mesh against the device count.
* `validate_against_dataset`: what needs the dataset's metadata (splits, classes, channels).
* `parse_flags`: absl flag parsing for the apps, turning a bad `--config...` flag into one line
  `error: ...` (exit status 1) before the app imports anything heavy.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import ml_collections

from cromss_jax import cli
from cromss_jax import constants
from cromss_jax.cli import UserError


class ConfigError(UserError, ValueError):
  """A configuration value that cannot work; the message names the key and the allowed values."""


Rule = tuple[Callable[[Any], bool], str]


# ------------------------------------------------------------------------------------------------
# Rule builders
# ------------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _one_of(*allowed: Any) -> Rule:
  return (lambda v: any(v == a and type(v) is type(a) for a in allowed),
          'one of ' + ', '.join(repr(a) for a in allowed))


def _subset_of(*allowed: str) -> Rule:
  def check(v: Any) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) > 0 and len(set(v)) == len(v)
            and all(x in allowed for x in v))
  return check, 'a non-empty tuple of distinct values from ' + ', '.join(map(repr, allowed))


def _number(lo: float | None = None, hi: float | None = None, *, integer: bool = False,
            lo_open: bool = False, hi_open: bool = False, also: Any = None) -> Rule:
  """A finite number (an int if `integer`) in the given bounds, or exactly `also`."""
  def check(v: Any) -> bool:
    if also is not None and _is_int(v) and v == also:
      return True
    if not (_is_int(v) if integer else _is_number(v)) or not math.isfinite(v):
      return False
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return hi is None or (v < hi if hi_open else v <= hi)
  kind = 'an integer' if integer else 'a finite number'
  bounds = []
  if lo is not None:
    bounds.append(('> ' if lo_open else '>= ') + str(lo))
  if hi is not None:
    bounds.append(('< ' if hi_open else '<= ') + str(hi))
  text = kind + (' ' + ' and '.join(bounds) if bounds else '')
  return check, text + (f' (or {also})' if also is not None else '')


def _string(non_empty: bool = False) -> Rule:
  return ((lambda v: isinstance(v, str) and (bool(v) or not non_empty)),
          'a non-empty string' if non_empty else 'a string')


def _smoothing_factors(v: Any) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) in (1, 2)
          and all(_is_number(x) and math.isfinite(x) and x >= 0 for x in v) and sum(v) <= 1)


def _names(v: Any) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) > 0
          and all(isinstance(x, str) and x for x in v))


def _decoders() -> tuple[str, ...]:
  from cromss_jax.models import decoders  # pylint: disable=g-import-not-at-top  (jax, flax)
  return tuple(decoders.DECODERS)


_BOOL: Rule = ((lambda v: isinstance(v, bool)), 'True or False')
_POSITIVE_INT = _number(1, integer=True)

# One rule per key of configs/pretrain.py and configs/transfer.py (cross-key rules below).
RULES: dict[str, Rule] = {
    'seed': _number(integer=True),
    # data
    'data.dataset_dir': _string(),
    'data.s2_bands': _one_of(*constants.S2_BAND_SUBSETS),
    'data.tile_size': _number(32, integer=True),
    'data.crop_size': _number(32, integer=True),
    'data.flip': _BOOL,
    'data.rotation': _one_of('free', 'rot90', 'none'),
    'data.rotation_prob': _number(0, 1),
    'data.image_interpolation': _one_of('bilinear', 'nearest'),
    'data.shuffle_buffer': _POSITIVE_INT,
    'data.num_parallel_calls': _number(1, integer=True, also=-1),
    'data.prefetch': _number(0, integer=True, also=-1),
    'data.cache': _BOOL,
    'data.num_workers': _number(0, integer=True),
    'data.train_split': _string(non_empty=True),
    'data.test_split': _string(non_empty=True),
    'data.class_names': (_names, 'a non-empty tuple of class names (strings)'),
    # model
    'model.encoder': _one_of('resnet18', 'resnet34', 'resnet50'),
    'model.fusion': _one_of('mid', 'late'),
    'model.decoder_channels': ((lambda v: isinstance(v, (tuple, list)) and len(v) == 5
                                and all(_is_int(c) and c > 0 for c in v)),
                               'a tuple of 5 positive integers'),
    'model.s1_channels': _POSITIVE_INT,
    'model.compute_dtype': _one_of('float32', 'bfloat16'),
    # objective
    'objective.num_classes': _number(2, integer=True),
    'objective.seg_losses': _subset_of('ce', 'dice', 'focal'),
    'objective.consistency': _one_of('ce', 'kl', 'mse', 'none'),
    'objective.consistency_weight': _number(0),
    'objective.label_smoothing': _BOOL,
    'objective.smoothing_factors': (
        _smoothing_factors, 'a tuple (a,) or (a, b) of non-negative factors with a + b <= 1'),
    'objective.prior_type': _one_of('ts', 't', 's'),
    'objective.prior_sigma': _number(0, lo_open=True),
    'objective.prior_truncate': _number(0, lo_open=True),
    'objective.sample_selection': _BOOL,
    'objective.confidence': _one_of('entropy', 'gini'),
    'objective.ramp': _one_of('exp', 'linear', 'none'),
    'objective.ramp_epochs': _number(0, integer=True),
    'objective.keep_ratio': _number(0, 1),
    # optimiser and schedule: a non-finite or absurd step poisons the parameters long before
    # the loss turns non-finite.
    'optimizer.name': _one_of('adam'),
    'optimizer.learning_rate': _number(0, 1.0, lo_open=True),
    'optimizer.weight_decay': _number(0, 1.0),
    'optimizer.b1': _number(0, 1, hi_open=True),
    'optimizer.b2': _number(0, 1, hi_open=True),
    'optimizer.eps': _number(0, 1.0, lo_open=True),
    'schedule.name': _one_of('plateau', 'constant', 'cosine'),
    'schedule.factor': _number(0, 1, lo_open=True, hi_open=True),
    'schedule.patience': _number(0, integer=True),
    'schedule.rel_threshold': _number(0, 1, hi_open=True),
    'schedule.min_lr': _number(0),
    # training
    'training.num_epochs': _POSITIVE_INT,
    'training.global_batch_size': _POSITIVE_INT,
    'training.steps_per_epoch': _number(1, integer=True, also=-1),
    'training.eval_every_epochs': _POSITIVE_INT,
    'training.checkpoint_every_epochs': _POSITIVE_INT,
    'training.keep_checkpoints': _POSITIVE_INT,
    'training.log_every_steps': _POSITIVE_INT,
    'training.panel_every_epochs': _number(0, integer=True),
    'training.max_consecutive_nonfinite': _POSITIVE_INT,
    # mesh (against the device count: validate_mesh)
    'mesh.data': _number(1, integer=True, also=-1),
    'mesh.fsdp': _POSITIVE_INT,
    # transfer
    'transfer.encoder_path': (
        (lambda v: isinstance(v, str) and bool(v)),
        "an exported encoder folder (EXPORT/encoder_s2) or 'random'"),
    'transfer.modality': _one_of('s1', 's2'),
    'transfer.decoder': ((lambda v: v in _decoders()), 'one of the transfer decoders'),
    'transfer.freeze_encoder': _BOOL,
    'transfer.ignore_label': _number(integer=True),
}


# ------------------------------------------------------------------------------------------------
# Keys: exactly those of the reference config file
# ------------------------------------------------------------------------------------------------
def _leaves(node: Any, prefix: str = '') -> Iterator[tuple[str, Any]]:
  for key in node.keys():
    value = node[key]
    path = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _leaves(value, path + '.')
    else:
      yield path, value


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def _import_configs() -> None:
  """Makes the repository's `configs` package importable (also when run from elsewhere)."""
  if importlib.util.find_spec('configs') is None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
      sys.path.append(root)


def reference_config(config: ml_collections.ConfigDict) -> tuple[str, ml_collections.ConfigDict]:
  """(file name, config) that `config` must have the keys of: transfer or pretraining."""
  _import_configs()
  if 'transfer' in config:
    from configs import transfer  # pylint: disable=g-import-not-at-top
    return 'configs/transfer.py', transfer.get_config()
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  return 'configs/pretrain.py', pretrain.get_config()


def _first_unknown(config: Any, paths: Iterable[str]) -> tuple[str, list[str]] | None:
  """(path up to its first component `config` lacks, the keys at that level) of the first
  path that is not a key of `config`; None if all are."""
  for path in paths:
    node, done = config, []
    for part in path.split('.'):
      keys = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      if part not in keys:
        return '.'.join(done + [part]), keys
      node, done = node[part], done + [part]
  return None


def _unknown_key_message(path: str, siblings: Iterable[str], where: str) -> str:
  parent, _, name = path.rpartition('.')
  siblings = sorted(siblings)
  group = 'config' + ('.' + parent if parent else '')
  close = difflib.get_close_matches(name, siblings, n=1)
  hint = f' Did you mean {group}.{close[0]}?' if close else ''
  return (f'config.{path} is not a config key ({where} has no {path}).{hint} '
          f'{group} has: {", ".join(siblings)}.')


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Every key of `config` exists in its reference file, and none of the file's is missing."""
  where, reference = reference_config(config)
  unknown = _first_unknown(reference, (path for path, _ in _leaves(config)))
  if unknown is not None:
    raise ConfigError(_unknown_key_message(*unknown, where))
  missing = _first_unknown(config, (path for path, _ in _leaves(reference)))
  if missing is not None:
    path = missing[0]
    value = _get(reference, path)
    what = (f'the group {path}' if isinstance(value, ml_collections.ConfigDict)
            else f'it (to {value!r})')
    raise ConfigError(f'config.{path} is missing; {where} sets {what}.')


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------
def _check_rules(config: ml_collections.ConfigDict, prefix: str = '') -> None:
  for path, value in _leaves(config, prefix):
    floats = value if isinstance(value, (tuple, list)) else (value,)
    if any(isinstance(x, float) and not math.isfinite(x) for x in floats):
      raise ConfigError(f'config.{path}={value!r} is not allowed; every number must be finite.')
    if path in RULES:
      ok, allowed = RULES[path]
      if not ok(value):
        if path == 'transfer.decoder':
          allowed = 'one of ' + ', '.join(map(repr, _decoders()))
        raise ConfigError(f'config.{path}={value!r} is not allowed; expected {allowed}.')


def validate_keys(config: ml_collections.ConfigDict, paths: Iterable[str]) -> None:
  """The rules of just these keys, for library code that may get an unvalidated config."""
  for path in paths:
    value = _get(config, path)
    ok, allowed = RULES[path]
    if not ok(value):
      raise ConfigError(f'config.{path}={value!r} is not allowed; expected {allowed}.')


def _check_cross_rules(config: ml_collections.ConfigDict) -> None:
  data = config.data
  if data.crop_size > data.tile_size:
    raise ConfigError(f'config.data.crop_size={data.crop_size} exceeds '
                      f'config.data.tile_size={data.tile_size}; use a crop <= the tile.')
  if data.crop_size % 32:
    raise ConfigError(f'config.data.crop_size={data.crop_size} must be a multiple of 32 '
                      '(the encoder downsamples 5 times).')
  lr = config.optimizer.learning_rate
  if config.schedule.min_lr > lr:
    raise ConfigError(f'config.schedule.min_lr={config.schedule.min_lr!r} exceeds '
                      f'config.optimizer.learning_rate={lr!r}; use a floor <= the rate.')
  num_classes = config.objective.num_classes
  if 'transfer' in config:
    ignore = config.transfer.ignore_label
    if 0 <= ignore < num_classes:
      raise ConfigError(f'config.transfer.ignore_label={ignore!r} is not allowed; expected an '
                        f'integer outside the classes 0..{num_classes - 1}.')
    names = config.data.class_names
    if len(names) != num_classes:
      raise ConfigError(f'config.data.class_names has {len(names)} names but '
                        f'config.objective.num_classes={num_classes}; give one name per class.')


# Keys of the objective beyond its published contract (docs/METHOD.md §4.13): an objective
# section without them (built by hand from the contract's list) uses the method's values,
# objective.PRIOR_SIGMA / PRIOR_TRUNCATE (the values configs/pretrain.py sets).
OBJECTIVE_EXTENSION_KEYS = ('objective.prior_sigma', 'objective.prior_truncate')


def validate_objective_config(objective: ml_collections.ConfigDict) -> None:
  """Checks the `objective` section alone (used by the objective's own entry points)."""
  root = ml_collections.ConfigDict({'objective': objective})
  for path in RULES:
    if path in OBJECTIVE_EXTENSION_KEYS:
      continue
    if path.startswith('objective.') and path[len('objective.'):] not in objective:
      raise ConfigError(f'config.{path} is missing; expected {RULES[path][1]}.')
  _check_rules(root)


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Raises ConfigError naming the first key whose value cannot work (or that is unknown).

  A config with a `transfer` group is a transfer run, anything else pretraining. With
  `device_count`, the mesh is checked against it too.
  """
  check_keys(config)
  _check_rules(config)
  _check_cross_rules(config)
  if device_count is not None:
    validate_mesh(config, device_count)


def validate_pretrain_config(config: ml_collections.ConfigDict,
                             device_count: int | None = None) -> None:
  """`validate_config` (kept under its name for the pretraining entry points)."""
  validate_config(config, device_count)


def validate_transfer_config(config: ml_collections.ConfigDict,
                             device_count: int | None = None) -> None:
  """`validate_config` for a config that must be a transfer one."""
  if 'transfer' not in config:
    raise ConfigError('config.transfer is missing: a transfer run needs a config from '
                      'configs/transfer.py.')
  validate_config(config, device_count)


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------
def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> tuple[int, int]:
  """(data, fsdp) axis sizes; -1 for data means all devices not used by fsdp."""
  fsdp = config.mesh.fsdp
  if not _is_int(fsdp) or fsdp < 1 or device_count % fsdp:
    raise ConfigError(f'config.mesh.fsdp={fsdp!r} must be a positive divisor of the device '
                      f'count ({device_count}).')
  data = config.mesh.data
  if data == -1:
    data = device_count // fsdp
  if not _is_int(data) or data < 1 or data * fsdp != device_count:
    raise ConfigError(f'config.mesh.data={config.mesh.data!r} x config.mesh.fsdp={fsdp} must '
                      f'equal the device count ({device_count}); use -1 for data to fill it.')
  return data, fsdp


def validate_mesh(config: ml_collections.ConfigDict, device_count: int,
                  batch_paths: Iterable[str] = ('training.global_batch_size',)) -> None:
  data, fsdp = mesh_shape(config, device_count)
  for path in batch_paths:
    batch = _get(config, path)
    if batch % (data * fsdp):
      raise ConfigError(
          f'config.{path}={batch} is not divisible by the {data * fsdp} devices of the mesh '
          f'(data={data}, fsdp={fsdp}); pick a multiple of {data * fsdp}.')


# ------------------------------------------------------------------------------------------------
# Against the dataset's metadata
# ------------------------------------------------------------------------------------------------
def validate_against_dataset(config: ml_collections.ConfigDict, info: Any) -> None:
  """Rules that need the dataset: call right after reading its info, before compiling.

  `info` is an `input_pipeline.PipelineInfo` (pretrain_info / downstream_info): the evaluation
  split must exist, and the classes and S1 channels of the records must be the config's.
  """
  where = f'{info.dataset_dir} (config.data.dataset_dir)'
  if info.num_eval_examples == 0:
    if 'transfer' in config:
      raise ConfigError(f'config.data.test_split={info.eval_split!r}: {where} has no such '
                        'split to evaluate on; name one of its splits.')
    raise ConfigError(f'{where} has no {info.eval_split!r} split: pretraining evaluates on it '
                      f'every config.training.eval_every_epochs epochs. Convert the data again '
                      'with a validation share (--val-fraction > 0).')
  num_classes = config.objective.num_classes
  if info.num_classes is not None and info.num_classes != num_classes:
    raise ConfigError(f'config.objective.num_classes={num_classes} but {where} holds labels of '
                      f'{info.num_classes} classes; set --config.objective.num_classes='
                      f'{info.num_classes}.')
  if config.model.s1_channels != info.s1_channels:
    raise ConfigError(f'config.model.s1_channels={config.model.s1_channels} but {where} '
                      f'stores {info.s1_channels} S1 bands; set --config.model.s1_channels='
                      f'{info.s1_channels}.')


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _override_paths(argv: Sequence[str], flag: str) -> list[str]:
  """The dotted paths of the `--flag.a.b=v` / `--flag.a.b v` arguments, in order."""
  paths = []
  for arg in argv[1:]:
    if arg == '--':
      break
    name = arg.lstrip('-').split('=', 1)[0]
    if arg.startswith('-') and name.startswith(flag + '.'):
      paths.append(name[len(flag) + 1:])
  return paths


def _config_file_arg(argv: Sequence[str], flag: str) -> str | None:
  """The value of `--flag=FILE[:VARIANT]` (or `--flag FILE`) in argv."""
  for i, arg in enumerate(argv[1:], 1):
    for prefix in (f'--{flag}', f'-{flag}'):
      if arg.startswith(prefix + '='):
        return arg[len(prefix) + 1:]
      if arg == prefix and i + 1 < len(argv):
        return argv[i + 1]
  return None


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
  """What ml_collections' config flag loads for `FILE[:VARIANT]`."""
  import runpy  # pylint: disable=g-import-not-at-top
  path, _, variant = spec.partition(':')
  get_config = runpy.run_path(path)['get_config']
  return get_config(variant) if variant else get_config()


def _unknown_override(argv: Sequence[str], flags_module: Any) -> str | None:
  """The message for an override of a key the config file lacks (None: not that)."""
  names = [n for n in flags_module.FLAGS
           if type(flags_module.FLAGS[n]).__name__ == '_ConfigFlag']
  for name in dict.fromkeys(names):
    spec = _config_file_arg(argv, name)
    if spec is None:
      continue
    try:
      config = _load_config_file(spec)
    except Exception:  # pylint: disable=broad-except  (the flag itself reports load errors)
      continue
    unknown = _first_unknown(config, _override_paths(argv, name))
    if unknown is not None:
      return _unknown_key_message(*unknown, spec.partition(':')[0])
  return None


def _loaded_configs(flags_module: Any) -> list[ml_collections.ConfigDict]:
  """The configs of the config-file flags; a file that failed to load is a user error."""
  out = []
  for name in dict.fromkeys(flags_module.FLAGS):
    value = flags_module.FLAGS[name].value
    if type(value).__name__ == '_ErrorConfig':   # ml_collections defers a load failure
      error = object.__getattribute__(value, '_error')
      lines = [line.strip() for line in str(error).splitlines() if line.strip()]
      cli.fail(f'flag --{name}: cannot load the config file: {lines[-1] if lines else error}')
    if isinstance(value, ml_collections.ConfigDict):
      out.append(value)
  return out


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing (app.run's `flags_parser`) with config problems as `error: ...`.

  A flag error, an unknown `--config.a.b` key, a value of the wrong type, an unknown variant
  (`--config=FILE:NAME`) and any rule of `validate_config` exit with status 1 and one line
  naming the flag or key, before the app imports anything heavy.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = list(argv)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as err:
    text = str(err)
    if 'Traceback (most recent call last)' in text:   # a config file that raised: its message
      head, _, trace = text.partition('Traceback (most recent call last)')
      text = f'{head.strip()} {trace.strip().splitlines()[-1]}'
    cli.fail(' '.join(text.split()))
  except (AttributeError, KeyError):   # ml_collections: an override of an unknown key
    message = _unknown_override(argv, flags)
    if message is None:
      raise
    cli.fail(message)
  for config in _loaded_configs(flags):
    try:
      validate_config(config)
    except ConfigError as err:
      cli.fail(str(err))
  return rest
