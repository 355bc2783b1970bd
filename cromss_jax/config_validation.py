"""Reject configurations that cannot work, before anything is built or compiled.

Each rule names the config key and what it accepts, so a bad `--config.x=y` override fails with
a message that says what to change.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import ml_collections

from cromss_jax.cli import UserError


class ConfigError(UserError, ValueError):
  """A configuration value that cannot work; the message names the key and the allowed values."""


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def _one_of(*allowed: Any) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in allowed), 'one of ' + ', '.join(repr(a) for a in allowed)


def _subset_of(*allowed: str) -> tuple[Callable[[Any], bool], str]:
  def check(v: Any) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) > 0 and len(set(v)) == len(v)
            and all(x in allowed for x in v))
  return check, 'a non-empty tuple of distinct values from ' + ', '.join(map(repr, allowed))


def _number(lo: float | None = None, hi: float | None = None, *, integer: bool = False,
            lo_open: bool = False) -> tuple[Callable[[Any], bool], str]:
  def check(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    if integer and int(v) != v:
      return False
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return hi is None or v <= hi
  kind = 'an integer' if integer else 'a number'
  bounds = []
  if lo is not None:
    bounds.append(('> ' if lo_open else '>= ') + str(lo))
  if hi is not None:
    bounds.append('<= ' + str(hi))
  return check, kind + (' ' + ' and '.join(bounds) if bounds else '')


def _smoothing_factors(v: Any) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) in (1, 2)
          and all(isinstance(x, (int, float)) and x >= 0 for x in v) and sum(v) <= 1)


_BOOL = ((lambda v: isinstance(v, bool)), 'True or False')

OBJECTIVE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    'num_classes': _number(2, integer=True),
    'seg_losses': _subset_of('ce', 'dice', 'focal'),
    'consistency': _one_of('ce', 'kl', 'mse', 'none'),
    'consistency_weight': _number(0),
    'label_smoothing': _BOOL,
    'smoothing_factors': (_smoothing_factors,
                          'a tuple (a,) or (a, b) of non-negative factors with a + b <= 1'),
    'prior_type': _one_of('ts', 't', 's'),
    'prior_sigma': _number(0, lo_open=True),
    'prior_truncate': _number(0, lo_open=True),
    'sample_selection': _BOOL,
    'confidence': _one_of('entropy', 'gini'),
    'ramp': _one_of('exp', 'linear', 'none'),
    'ramp_epochs': _number(0, integer=True),
    'keep_ratio': _number(0, 1),
}

MODEL_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    'encoder': _one_of('resnet18', 'resnet34', 'resnet50'),
    'fusion': _one_of('mid', 'late'),
    'decoder_channels': ((lambda v: isinstance(v, (tuple, list)) and len(v) == 5
                          and all(isinstance(c, int) and c > 0 for c in v)),
                         'a tuple of 5 positive integers'),
    's1_channels': _number(1, integer=True),
    'compute_dtype': _one_of('float32', 'bfloat16'),
}

DATA_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    's2_bands': _one_of(13, 12, 9, 3),
    'crop_size': _number(32, integer=True),
    'rotation': _one_of('free', 'rot90', 'none'),
    'rotation_prob': _number(0, 1),
    'flip': _BOOL,
}


# Keys that may be absent (their documented default applies).
OPTIONAL_KEYS = frozenset({'objective.prior_sigma', 'objective.prior_truncate'})


def _check_section(config: ml_collections.ConfigDict, section: str,
                   rules: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
  for key, (ok, allowed) in rules.items():
    path = f'{section}.{key}'
    try:
      value = _get(config, path)
    except (KeyError, AttributeError):
      if path in OPTIONAL_KEYS:
        continue
      raise ConfigError(f'config.{path} is missing; expected {allowed}.') from None
    if not ok(value):
      raise ConfigError(f'config.{path}={value!r} is not allowed; expected {allowed}.')


def validate_objective_config(objective: ml_collections.ConfigDict) -> None:
  """Checks the `objective` section alone (used by the objective's own entry points)."""
  root = ml_collections.ConfigDict({'objective': objective})
  _check_section(root, 'objective', OBJECTIVE_RULES)


def validate_pretrain_config(config: ml_collections.ConfigDict,
                             device_count: int | None = None) -> None:
  """Raises ConfigError naming the first key whose value cannot work."""
  _check_section(config, 'objective', OBJECTIVE_RULES)
  _check_section(config, 'model', MODEL_RULES)
  _check_section(config, 'data', DATA_RULES)
  if config.data.crop_size > config.data.tile_size:
    raise ConfigError(f'config.data.crop_size={config.data.crop_size} exceeds '
                      f'config.data.tile_size={config.data.tile_size}; use a crop <= the tile.')
  if config.data.crop_size % 32:
    raise ConfigError(f'config.data.crop_size={config.data.crop_size} must be a multiple of 32 '
                      '(the encoder downsamples 5 times).')
  for path in ('training.num_epochs', 'training.global_batch_size',
               'training.checkpoint_every_epochs', 'training.eval_every_epochs',
               'training.keep_checkpoints', 'training.max_consecutive_nonfinite'):
    value = _get(config, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f'config.{path}={value!r} is not allowed; expected an integer >= 1.')
  if not 0 < config.training.val_fraction < 1:
    raise ConfigError(f'config.training.val_fraction={config.training.val_fraction!r} is not '
                      'allowed; expected a number in (0, 1).')
  _check_section(config, 'schedule', {'name': _one_of('plateau', 'constant', 'cosine')})
  _check_section(config, 'optimizer', {'name': _one_of('adam'),
                                       'learning_rate': _number(0, lo_open=True),
                                       'weight_decay': _number(0)})
  if device_count is not None:
    validate_mesh(config, device_count)


def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> tuple[int, int]:
  """(data, fsdp) axis sizes; -1 for data means all devices not used by fsdp."""
  fsdp = config.mesh.fsdp
  if not isinstance(fsdp, int) or fsdp < 1 or device_count % fsdp:
    raise ConfigError(f'config.mesh.fsdp={fsdp!r} must be a positive divisor of the device '
                      f'count ({device_count}).')
  data = config.mesh.data
  if data == -1:
    data = device_count // fsdp
  if not isinstance(data, int) or data < 1 or data * fsdp != device_count:
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
