"""Print a per-module summary of the CromSS pretraining network described by a config.

  python -m cromss_jax.models --config=configs/pretrain.py \
      [--config.model.fusion=late] [--config.model.encoder=resnet18] [--config.data.s2_bands=13]

Shapes only (jax.eval_shape): nothing is computed, so this is fast on any machine. The last
line is always `trainable parameters: N` (BatchNorm running statistics not counted), to compare
with docs/METHOD.md §3.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

from absl import flags
from absl import logging

from cromss_jax import cli
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util
from flax.core import unfreeze
from ml_collections import config_flags

from cromss_jax.models.fusion import build_pretrain_model

def _count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _format_shapes(out: Any) -> str:
  """Output shape(s) of one module call, e.g. '1x32x32x64' or a list for the encoder pyramid."""
  shapes = ['x'.join(map(str, x.shape)) for x in jax.tree.leaves(out)]
  return shapes[0] if len(shapes) == 1 else '[' + ', '.join(shapes) + ']'


# Module names in the order they run; numbered names (layerN, blockN) sort by number after these.
_FIRST = ('encoder_s1', 'encoder_s2', 'decoder', 'decoder_s1', 'decoder_s2', 'conv1', 'bn1',
          'conv2', 'bn2', 'conv3', 'bn3', 'downsample_conv', 'downsample_bn')
_LAST = ('head',)


def _run_order(path: tuple[str, ...]) -> tuple[tuple[int, str, int], ...]:
  """Sort key putting modules in execution order (pytrees come back sorted by name)."""
  key = []
  for name in path:
    if name in _FIRST:
      key.append((0, '', _FIRST.index(name)))
    elif name in _LAST:
      key.append((2, '', _LAST.index(name)))
    else:
      stem = name.rstrip('0123456789')
      key.append((1, stem, int(name[len(stem):] or -1)))
  return tuple(key)


def summarize(config: ml_collections.ConfigDict, depth: int = 2) -> str:
  """The summary table as text; its last line is `trainable parameters: N`."""
  num_classes = config.objective.num_classes
  s2_channels = config.data.s2_bands
  model = build_pretrain_model(config.model, num_classes, s2_channels)
  size = config.data.crop_size
  s1 = jax.ShapeDtypeStruct((1, size, size, config.model.s1_channels), jnp.float32)
  s2 = jax.ShapeDtypeStruct((1, size, size, s2_channels), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), s1, s2)
  _, state = jax.eval_shape(
      functools.partial(model.apply, train=False, capture_intermediates=True,
                        mutable=['intermediates']), variables, s1, s2)

  params = traverse_util.flatten_dict(unfreeze(variables['params']))
  outputs = traverse_util.flatten_dict(unfreeze(state['intermediates']))
  rows: list[tuple[str, str, str]] = []
  seen: set[tuple[str, ...]] = set()
  for path in sorted(params, key=_run_order):
    for d in range(1, min(depth, len(path) - 1) + 1):
      prefix = path[:d]
      if prefix in seen:
        continue
      seen.add(prefix)
      count = sum(math.prod(v.shape) for k, v in params.items() if k[:d] == prefix)
      calls = outputs.get(prefix + ('__call__',), ())
      shapes = ' | '.join(_format_shapes(c) for c in calls)
      rows.append(('  ' * (d - 1) + '/'.join(prefix), f'{count:,}', shapes))

  trainable = _count(variables['params'])
  width = max(len(r[0]) for r in rows + [('module', '', '')])
  lines = [
      f'CromSS pretraining model: {config.model.encoder}, {config.model.fusion} fusion, '
      f'S1 {config.model.s1_channels} ch, S2 {s2_channels} ch, {num_classes} classes, '
      f'compute {config.model.compute_dtype}, input 1x{size}x{size}',
      f'{"module":<{width}}  {"params":>12}  output (per call)',
  ]
  lines += [f'{name:<{width}}  {count:>12}  {shapes}' for name, count, shapes in rows]
  logits = outputs.get(('__call__',), ())
  if logits:
    lines.append(f'logits (s1 | s2): {" | ".join(_format_shapes(x) for x in logits[0])}')
  running_stats = _count(variables.get('batch_stats', {}))
  lines.append(f'BatchNorm running statistics (not trainable): {running_stats:,}')
  lines.append(f'trainable parameters: {trainable:,}')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # hide JAX's backend probing (e.g. libtpu) on stderr
  print(summarize(flags.FLAGS.config, flags.FLAGS.depth))


def define_flags() -> None:
  """Flags are defined only when run as a program, so importing `summarize` (tests, other
  tools) does not collide with other modules' --config flag."""
  config_flags.DEFINE_config_file('config', None, 'Pretraining config file.', lock_config=True)
  flags.DEFINE_integer('depth', 2, 'Module nesting depth shown in the table.')
  flags.mark_flag_as_required('config')


def run(*, flags_defined: bool = False) -> None:
  if not flags_defined:
    define_flags()
  cli.run_absl(main)


if __name__ == '__main__':
  run()
