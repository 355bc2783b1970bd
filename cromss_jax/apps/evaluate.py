"""`python -m cromss_jax.evaluate --workdir DIR`: re-score a transfer run on a whole split.

Writes (into --out, default the workdir) metrics.json, metrics.md and confusion_matrix.png;
for a split other than the config's test split the names get a `_<split>` suffix.
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from cromss_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Transfer workdir (with checkpoints/).')
_SPLIT = flags.DEFINE_string('split', None, "Split to evaluate; default the config's test split.")
_DATASET_DIR = flags.DEFINE_string('dataset_dir', None,
                                   'Override config.data.dataset_dir (data moved).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Evaluation batch size (global).')
_OUT = flags.DEFINE_string('out', None, 'Folder for the report files; default the workdir.')


def main(argv: Sequence[str]) -> None:
  cli.check_command_line(argv, workdir=_WORKDIR.value)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # tf.data only
  from cromss_jax.tasks import transfer  # pylint: disable=g-import-not-at-top
  scores, paths = transfer.evaluate_workdir(_WORKDIR.value, _SPLIT.value,
                                            dataset_dir=_DATASET_DIR.value,
                                            batch_size=_BATCH_SIZE.value, out_dir=_OUT.value)
  with open(paths['md'], encoding='utf-8') as fh:
    print(fh.read(), end='')
  print(f'loss {scores["loss"]:.4f}; wrote ' + ', '.join(paths.values()))


def run() -> None:
  cli.run_absl(main)


if __name__ == '__main__':
  run()
