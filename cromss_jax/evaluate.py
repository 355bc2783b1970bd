"""Evaluation of transferred models on a DFC2020-style split (SPEC §6), in one place.

The masked loss, the per-batch evaluation sums, the full-split pass and the report files live
here; `transfer.py` uses them during and after training, and the command line re-evaluates the
latest checkpoint of a transfer workdir:

  python -m cromss_jax.evaluate --workdir DIR [--split test] [--dataset_dir D] [--out DIR2]

writes (into --out, default the workdir) metrics.json, metrics.md and confusion_matrix.png;
for a split other than the config's test split the names get a `_<split>` suffix.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cromss_jax import cli
from cromss_jax import constants
from cromss_jax import exports
from cromss_jax import input_pipeline
from cromss_jax.losses import masked_segmentation_loss, valid_pixels
from cromss_jax import metrics as metrics_lib
from cromss_jax import models
from cromss_jax import sharding
from cromss_jax import train
from cromss_jax.models import decoders

Batch = Mapping[str, jax.Array]
unit_float = models.unit_float  # TODO(integration): callers use models.unit_float


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  num_classes = int(config.objective.num_classes)
  named = tuple(config.data.get('class_names', None) or ())  # e.g. configs/transfer_dw.py
  if len(named) == num_classes:
    return named
  if num_classes == len(constants.DFC_DW8_CLASSES):
    return constants.DFC_DW8_CLASSES
  return tuple(f'class {i}' for i in range(num_classes))


def make_eval_fn(model: nn.Module, config: ml_collections.ConfigDict) -> Callable:
  """eval_fn(params, batch_stats, batch, epoch) -> per-batch sums (train.Task contract)."""
  modality = config.transfer.modality
  num_classes = int(config.objective.num_classes)
  ignore = int(config.transfer.ignore_label)
  losses = tuple(config.objective.seg_losses)

  def eval_fn(params, batch_stats, batch: Batch, epoch) -> dict[str, jax.Array]:
    del epoch
    logits = model.apply({'params': params, 'batch_stats': batch_stats},
                         models.unit_float(batch[modality]), train=False)
    labels = batch['label']
    samples = (batch['valid'].astype(bool) if 'valid' in batch
               else jnp.ones(labels.shape[:1], bool))
    pixel_mask = jnp.broadcast_to(samples[:, None, None], labels.shape)
    n = jnp.sum(samples.astype(jnp.float32))
    loss = masked_segmentation_loss(logits, labels, num_classes, losses, ignore, pixel_mask)
    counted = pixel_mask & valid_pixels(labels, num_classes, ignore)
    cm = metrics_lib.confusion_matrix(labels, jnp.argmax(logits, -1), num_classes, counted)
    return {'loss_sum': loss * n, 'samples': n, 'cm': cm}

  return eval_fn


def summarise(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Per-epoch scalars; 'val_loss' is the evaluated split's loss (train.Task contract)."""
  scores = metrics_lib.scores_from_confusion(sums['cm'])
  return {'val_loss': float(sums['loss_sum'] / max(float(sums['samples']), 1.0)),
          'miou': scores['miou'], 'oa': scores['oa'], 'aa': scores['aa'], 'mf1': scores['mf1']}


def model_batches(config: ml_collections.ConfigDict,
                  batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
  """Only what the transfer model reads (its modality, label, valid) goes to the devices."""
  keep = (config.transfer.modality, 'label', 'valid')
  for batch in batches:
    yield {k: v for k, v in batch.items() if k in keep}


def evaluate(config: ml_collections.ConfigDict, model: nn.Module, variables: Mapping[str, Any],
             split: str, mesh: jax.sharding.Mesh | None = None,
             eval_fn: Callable | None = None) -> dict[str, Any]:
  """Scores over the WHOLE split from one accumulated confusion matrix.

  `variables` must already live on `mesh` (e.g. a TrainState's, or `jax.device_put(...,
  sharding.replicated(mesh))`). `eval_fn` (default make_eval_fn(model, config)) may be passed
  to reuse an already compiled one. Returns metrics.scores_from_confusion's dict plus 'loss',
  'confusion_matrix' (int64 [C, C], rows = reference), 'split' and 'samples'.
  """
  mesh = sharding.create_mesh(config) if mesh is None else mesh
  eval_fn = make_eval_fn(model, config) if eval_fn is None else eval_fn
  eval_step = jax.jit(eval_fn, out_shardings=sharding.replicated(mesh))
  batches = input_pipeline.create_downstream_iterator(config, split, train=False)
  totals, _ = train.sum_over_split(eval_step, variables['params'], variables['batch_stats'],
                                   model_batches(config, batches), mesh, 0)
  if totals is None:
    raise ValueError(f'Split {split!r} gave no batches; nothing to evaluate.')
  scores = metrics_lib.scores_from_confusion(totals['cm'])
  scores.update(loss=float(totals['loss_sum'] / max(float(totals['samples']), 1.0)),
                confusion_matrix=totals['cm'], split=split,
                samples=int(totals['samples']))
  return scores


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def _finite_or_none(value: float) -> float | None:
  return None if value is None or not math.isfinite(value) else float(value)


def run_name(config: ml_collections.ConfigDict) -> str:
  """'resnet50+pspnet S2 frozen (encoder_s2)': one Markdown row label per setting."""
  t = config.transfer
  source = 'random init' if t.encoder_path == 'random' else os.path.basename(
      os.path.normpath(t.encoder_path))
  mode = 'frozen' if t.freeze_encoder else 'fine-tuned'
  return f'{config.model.encoder}+{t.decoder} {t.modality.upper()} {mode} ({source})'


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def plot_confusion_matrix(matrix: np.ndarray, names: tuple[str, ...], title: str,
                          path: str) -> None:
  """Row-normalised (per reference class) matrix with percentages in the cells."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  m = np.asarray(matrix, np.float64)
  rows = m.sum(axis=1, keepdims=True)
  norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
  size = 1.0 + 0.75 * len(names)
  fig, ax = plt.subplots(figsize=(size + 1.5, size + 0.5))
  image = ax.imshow(norm, cmap='Blues', vmin=0.0, vmax=1.0)
  for i in range(norm.shape[0]):
    for j in range(norm.shape[1]):
      ax.text(j, i, f'{100 * norm[i, j]:.0f}', ha='center', va='center', fontsize=8,
              color='white' if norm[i, j] > 0.5 else 'black')
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right')
  ax.set_yticks(range(len(names)), [f'{n} ({int(c):,})' for n, c in zip(names, rows[:, 0])])
  ax.set_xlabel('prediction')
  ax.set_ylabel('reference (pixels)')
  ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='share of reference row')
  fig.tight_layout()
  _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format='png', bbox_inches='tight'))
  plt.close(fig)


def write_report(out_dir: str, scores: Mapping[str, Any], config: ml_collections.ConfigDict,
                 *, step: int, suffix: str = '') -> dict[str, str]:
  """metrics{suffix}.json, metrics{suffix}.md, confusion_matrix{suffix}.png; returns paths."""
  os.makedirs(out_dir, exist_ok=True)
  names = class_names(config)
  cm = np.asarray(scores['confusion_matrix'], np.int64)
  name = run_name(config)
  payload = {
      'name': name, 'split': scores['split'], 'step': int(step),
      'samples': scores.get('samples'), 'pixels': int(scores['pixels']),
      'oa': _finite_or_none(scores['oa']), 'aa': _finite_or_none(scores['aa']),
      'miou': _finite_or_none(scores['miou']), 'mf1': _finite_or_none(scores['mf1']),
      'loss': _finite_or_none(scores.get('loss')),
      'per_class': {
          c: {'iou': _finite_or_none(scores['iou'][i]), 'f1': _finite_or_none(scores['f1'][i]),
              'recall': _finite_or_none(scores['recall'][i]),
              'precision': _finite_or_none(scores['precision'][i]),
              'reference_pixels': int(cm[i].sum())}
          for i, c in enumerate(names)},
      'classes': list(names),
      'confusion_matrix': cm.tolist(),
      'confusion_matrix_axes': 'rows = reference, columns = prediction',
      'scores_in': 'percent',
      'model': {'encoder': config.model.encoder, 'decoder': config.transfer.decoder,
                'modality': config.transfer.modality, 's2_bands': int(config.data.s2_bands),
                'freeze_encoder': bool(config.transfer.freeze_encoder),
                'encoder_path': config.transfer.encoder_path},
  }
  paths = {kind: os.path.join(out_dir, f'{stem}{suffix}.{ext}') for kind, stem, ext in
           (('json', 'metrics', 'json'), ('md', 'metrics', 'md'),
            ('png', 'confusion_matrix', 'png'))}

  def dump_json(tmp):
    with open(tmp, 'w') as f:
      json.dump(payload, f, indent=1)

  def dump_md(tmp):
    with open(tmp, 'w') as f:
      f.write(f'Split `{scores["split"]}`, step {step}, {int(scores["pixels"]):,} labelled '
              'pixels; scores in %.\n\n')
      f.write(metrics_lib.markdown_table({name: dict(scores)}, names))

  _atomic_write(paths['json'], dump_json)
  _atomic_write(paths['md'], dump_md)
  plot_confusion_matrix(cm, names, f'{name}\n{scores["split"]}: mIoU {scores["miou"]:.2f}  '
                        f'OA {scores["oa"]:.2f}', paths['png'])
  return paths


# ----------------------------------------------------------------------------------------------
# Re-evaluating a workdir
# ----------------------------------------------------------------------------------------------
def load_transfer_checkpoint(workdir: str) -> tuple[ml_collections.ConfigDict, dict, dict, int]:
  """(config, variables, meta, step) of a transfer workdir's latest checkpoint."""
  state, meta, step = exports.load_latest_checkpoint(workdir)
  if meta.get('task') != 'transfer':
    raise cli.UserError(f'{workdir} holds a {meta.get("task")!r} run, not a transfer run; '
                     'evaluate works on workdirs of `main --config=configs/transfer.py`.')
  config = exports.config_from_meta(meta)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return config, variables, meta, int(step)


def evaluate_workdir(workdir: str, split: str | None = None, *, dataset_dir: str | None = None,
                     batch_size: int | None = None,
                     out_dir: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
  """Re-evaluates the latest checkpoint of a transfer workdir and writes the report."""
  config, variables, _, step = load_transfer_checkpoint(workdir)
  split = split or config.data.test_split
  devices = jax.device_count()
  config.mesh.data, config.mesh.fsdp = -1, 1    # whatever mesh trained it: all devices here
  if dataset_dir:
    config.data.dataset_dir = dataset_dir
  batch = int(batch_size or config.training.global_batch_size)
  config.training.global_batch_size = -(-batch // devices) * devices
  mesh = sharding.create_mesh(config)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  model = decoders.build_transfer_model(config)
  scores = evaluate(config, model, variables, split, mesh)
  suffix = '' if split == config.data.test_split else f'_{split}'
  paths = write_report(out_dir or workdir, scores, config, step=step, suffix=suffix)
  logging.info('Evaluated step %d of %s on %s: mIoU %.2f, OA %.2f.', step, workdir, split,
               scores['miou'], scores['oa'])
  return scores, paths


if __name__ == '__main__':
  from cromss_jax.apps import evaluate as evaluate_app
  evaluate_app.run()
