"""Ablation tasks of the noise-robustness study, and how label selection is scored.

Single-modal pretraining (one U-Net on the noisy labels, no cross-modal terms) and CromSS
pretraining whose evaluation also measures how well the label-selection weights separate
correct from wrong noisy labels (needs the clean truth, which only generated data has).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cromss_jax import constants
from cromss_jax import losses as losses_lib
from cromss_jax import metrics as metrics_lib
from cromss_jax import models
from cromss_jax import objective
from cromss_jax.tasks import pretrain
from cromss_jax.train.task import Evaluation, Task

MODALITIES = constants.MODALITIES
SELECTION_BINS = 100        # weight histogram buckets in [0, 1), plus one for weight exactly 1


# ----------------------------------------------------------------------------------------------
# Label-selection quality: pure functions (jit-able sums, numpy summary)
# ----------------------------------------------------------------------------------------------
def _bucket(values: jax.Array, bins: int) -> jax.Array:
  """Bucket index of values in [0, 1]: bins equal buckets on [0, 1) and one for >= 1."""
  inner = jnp.clip(jnp.floor(values * bins), 0, bins - 1)
  return jnp.where(values >= 1.0, bins, inner).astype(jnp.int32)


def selection_sums(scores: jax.Array, noisy: jax.Array, clean: jax.Array, mask: jax.Array,
                   bins: int = SELECTION_BINS) -> dict[str, jax.Array]:
  """Additive sums describing `scores` (e.g. label weights in [0, 1]) on correct/wrong labels.

  A pixel counts where `mask` is set; its noisy label is correct where it equals the clean one.
  Returns per-group histograms over `bins + 1` buckets (the last holds scores >= 1) and score
  sums; summing these over batches and passing them to `selection_summary` gives the means,
  the shares at full weight and the AUC.
  """
  counted = mask.astype(bool)
  correct = counted & (noisy == clean)
  wrong = counted & (noisy != clean)
  bucket = _bucket(scores.astype(jnp.float32), bins).reshape(-1)
  out = {}
  for name, group in (('correct', correct), ('wrong', wrong)):
    group = group.reshape(-1)
    index = jnp.where(group, bucket, bins + 1)
    out[f'hist_{name}'] = jnp.bincount(index, length=bins + 2)[:bins + 1].astype(jnp.int32)
    out[f'sum_{name}'] = jnp.sum(jnp.where(group, scores.reshape(-1), 0.0).astype(jnp.float32))
  return out


def histogram_auc(hist_wrong: np.ndarray, hist_correct: np.ndarray) -> float:
  """P(score of a wrong label < score of a correct one), ties counted one half.

  The AUC of "low score" as a detector of wrong labels, from bucket counts (scores in the same
  bucket count as ties). NaN when either group is empty.
  """
  wrong = np.asarray(hist_wrong, np.float64)
  correct = np.asarray(hist_correct, np.float64)
  n_wrong, n_correct = wrong.sum(), correct.sum()
  if n_wrong == 0 or n_correct == 0:
    return float('nan')
  correct_above = np.cumsum(correct[::-1])[::-1] - correct      # sum over buckets j > i
  return float(np.sum(wrong * (correct_above + 0.5 * correct)) / (n_wrong * n_correct))


def selection_summary(sums: Mapping[str, Any]) -> dict[str, float]:
  """Means on correct/wrong pixels, shares at full score, AUC and the wrong-label rate."""
  hist_correct = np.asarray(sums['hist_correct'], np.float64)
  hist_wrong = np.asarray(sums['hist_wrong'], np.float64)
  n_correct, n_wrong = hist_correct.sum(), hist_wrong.sum()

  def ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float('nan')

  return {'mean_correct': ratio(float(sums['sum_correct']), n_correct),
          'mean_wrong': ratio(float(sums['sum_wrong']), n_wrong),
          'full_correct': ratio(hist_correct[-1], n_correct),
          'full_wrong': ratio(hist_wrong[-1], n_wrong),
          'auc': histogram_auc(hist_wrong, hist_correct),
          'wrong_rate': ratio(n_wrong, n_wrong + n_correct)}


# ----------------------------------------------------------------------------------------------
# Pretraining tasks (built on train.create_pretrain_task; the loop is train.train_and_evaluate)
# ----------------------------------------------------------------------------------------------
def _pixel_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
  valid = batch['valid'].astype(bool)
  return jnp.broadcast_to(valid[:, None, None], batch['labels'].shape)


def create_single_modal_task(config: ml_collections.ConfigDict, modality: str) -> Task:
  """A pretraining `Task` that trains one branch (one U-Net) on the noisy labels only.

  The network is the late-fusion pair of U-Nets; only the `modality` branch is used: its loss
  is the plain segmentation loss (config.objective.seg_losses, every pixel weight 1, unsmoothed
  one-hot targets), the other branch is frozen and its BatchNorm statistics are passed through,
  so XLA drops its forward pass. Evaluation: that branch's validation loss and its confusion
  matrices against the noisy and (when present) the clean labels.
  """
  if config.model.fusion != 'late':
    raise ValueError('The single-modal task uses the late-fusion network (two separate U-Nets); '
                     f'got config.model.fusion={config.model.fusion!r}.')
  if modality not in MODALITIES:
    raise ValueError(f'modality={modality!r}; expected one of {MODALITIES}.')
  base = pretrain.create_pretrain_task(config)
  model = base.learner.model
  other = 's1' if modality == 's2' else 's2'
  unused = (f'encoder_{other}', f'decoder_{other}')
  num_classes = int(config.objective.num_classes)
  losses = tuple(config.objective.seg_losses)

  def logits(params, batch_stats, batch, train_mode):
    variables = {'params': params, 'batch_stats': batch_stats}
    inputs = (models.unit_float(batch['s1']), models.unit_float(batch['s2']))
    if train_mode:
      (z1, z2), updates = model.apply(variables, *inputs, train=True, mutable=['batch_stats'])
      stats = dict(updates['batch_stats'])
      stats.update({k: batch_stats[k] for k in unused})
    else:
      z1, z2 = model.apply(variables, *inputs, train=False)
      stats = batch_stats
    return (z1 if modality == 's1' else z2), stats

  def loss_fn(params, batch_stats, batch, epoch, rng):
    del epoch, rng
    z, new_stats = logits(params, batch_stats, batch, True)
    labels = batch['labels']
    loss = losses_lib.masked_segmentation_loss(z, labels, num_classes, losses,
                                             constants.IGNORE_LABEL)
    return loss, (new_stats, {f'train_acc_{modality}': jnp.mean(jnp.argmax(z, -1) == labels)})

  def eval_fn(params, batch_stats, batch, epoch):
    del epoch
    z, _ = logits(params, batch_stats, batch, False)
    mask = _pixel_mask(batch)
    n = jnp.sum(batch['valid'].astype(jnp.float32))
    loss = losses_lib.masked_segmentation_loss(z, batch['labels'], num_classes, losses,
                                             constants.IGNORE_LABEL, mask)
    pred = jnp.argmax(z, -1)
    sums = {'val_loss_sum': loss * n, 'val_samples': n,
            f'cm_noisy_{modality}': metrics_lib.confusion_matrix(batch['labels'], pred,
                                                                 num_classes, mask)}
    if 'clean_labels' in batch:
      sums[f'cm_clean_{modality}'] = metrics_lib.confusion_matrix(batch['clean_labels'], pred,
                                                                  num_classes, mask)
    return sums

  return Task(
      name=f'pretrain_{modality}_only',
      # The data are the base task's: whole tiles, augmented in the step.
      learner=dataclasses.replace(base.learner,
                                  loss_fn=pretrain.augmented(loss_fn,
                                                             pretrain.device_augment(config)),
                                  trainable=lambda path: path[0] not in unused),
      data=base.data,
      evaluation=Evaluation(eval_fn=eval_fn, summarise=pretrain.summarise_confusions,
                            eval_iterator=base.evaluation.eval_iterator))


def create_selection_task(config: ml_collections.ConfigDict) -> Task:
  """The CromSS pretraining task whose evaluation also measures label-selection quality.

  After every epoch, on the validation split (centre crops, one fixed season per location,
  BatchNorm in inference mode), the label-selection weights `objective.cromss_loss` gives each
  branch (with the keep ratio of the epoch just trained) and the entangled label confidences
  behind them are compared on pixels whose noisy label is right vs. wrong (clean truth).
  Adds `sel_<s1|s2>_<w|conf>_<stat>`, `sel_keep_ratio` to each epoch's history entry.
  """
  base = pretrain.create_pretrain_task(config)
  obj_cfg = config.objective
  num_classes = int(obj_cfg.num_classes)
  model = base.learner.model

  def eval_fn(params, batch_stats, batch, epoch):
    sums = dict(base.evaluation.eval_fn(params, batch_stats, batch, epoch))
    if 'clean_labels' not in batch:
      return sums
    z1, z2 = model.apply({'params': params, 'batch_stats': batch_stats},
                         models.unit_float(batch['s1']), models.unit_float(batch['s2']),
                         train=False)
    mask = _pixel_mask(batch)
    # Padded samples get an out-of-range label: no weight, no part in the class thresholds.
    labels = jnp.where(mask, batch['labels'], num_classes)
    trained_epoch = jnp.maximum(jnp.asarray(epoch, jnp.float32) - 1.0, 0.0)
    # The prior changes the targets only, not the weights, so it is left out here.
    _, aux = objective.cromss_loss(z1, z2, labels, None, trained_epoch, obj_cfg)
    probs = [jax.nn.softmax(z, axis=-1) for z in (z1, z2)]
    label_conf = objective.entangle(*[objective.label_confidence(p, batch['labels'])
                                      for p in probs])
    for i, name in enumerate(MODALITIES):
      for kind, scores in (('w', aux[f'seg_weights_{name}']), ('conf', label_conf[i])):
        part = selection_sums(scores, batch['labels'], batch['clean_labels'], mask)
        sums.update({f'sel_{name}_{kind}_{k}': v for k, v in part.items()})
    sums['sel_keep_ratio_sum'] = aux['keep_ratio']
    sums['sel_batches'] = jnp.ones((), jnp.float32)
    return sums

  def summarise(sums):
    out = pretrain.summarise_confusions(sums)
    if 'sel_batches' not in sums:
      return out
    out['sel_keep_ratio'] = float(sums['sel_keep_ratio_sum'] / sums['sel_batches'])
    for name in MODALITIES:
      for kind in ('w', 'conf'):
        prefix = f'sel_{name}_{kind}_'
        part = {k[len(prefix):]: v for k, v in sums.items() if k.startswith(prefix)}
        out.update({prefix + k: v for k, v in selection_summary(part).items()})
    return out

  return dataclasses.replace(base, evaluation=Evaluation(
      eval_fn=eval_fn, summarise=summarise, eval_iterator=base.evaluation.eval_iterator))
