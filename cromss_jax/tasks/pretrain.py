"""The CromSS pretraining task: two branches, the cross-modal objective, validation metrics."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cromss_jax import augment as augment_lib
from cromss_jax import input_pipeline
from cromss_jax import metrics as metrics_lib
from cromss_jax import models
from cromss_jax import objective
from cromss_jax import visualize
from cromss_jax.config_validation import validate_against_dataset, validate_pretrain_config
from cromss_jax.train.task import Batch, Data, Evaluation, Learner, LossFn, Task


def _pretrain_forward(model: nn.Module, params, batch_stats, batch: Batch, train: bool):
  variables = {'params': params, 'batch_stats': batch_stats}
  s1, s2 = models.unit_float(batch['s1']), models.unit_float(batch['s2'])
  if train:
    (z1, z2), updates = model.apply(variables, s1, s2, train=True, mutable=['batch_stats'])
    return z1, z2, updates['batch_stats']
  z1, z2 = model.apply(variables, s1, s2, train=False)
  return z1, z2, batch_stats


def _pretrain_prior(batch: Batch, obj_cfg: ml_collections.ConfigDict) -> jax.Array | None:
  if not obj_cfg.label_smoothing:
    return None
  return objective.smoothing_prior(batch['season_labels'], batch['season'], obj_cfg)


def device_augment(config: ml_collections.ConfigDict) -> augment_lib.AugmentConfig:
  """The augmentation the train step applies to the whole tiles the pipeline reads."""
  return augment_lib.from_config(config)


def augmented(loss_fn: LossFn, augment: augment_lib.AugmentConfig | None) -> LossFn:
  """`loss_fn` of the batch augmented first (whole tiles in, crops out); as is for None.

  The augmentation key is the step's `rng` (fold_in(state.rng, step)), so a resumed run repeats
  the same crops, flips and rotations. Also wraps the ablations' losses, which share the data.
  """
  if augment is None:
    return loss_fn

  def loss_fn_augmented(params, batch_stats, batch, epoch, rng):
    return loss_fn(params, batch_stats, augment_lib.augment_batch(batch, rng, augment), epoch,
                   rng)
  return loss_fn_augmented


def pretrain_loss_fn(model: nn.Module, obj_cfg: ml_collections.ConfigDict,
                     augment: augment_lib.AugmentConfig | None = None) -> LossFn:
  """The CromSS loss; with `augment`, of the batch's whole tiles augmented in the step."""
  def loss_fn(params, batch_stats, batch, epoch, rng):
    del rng  # the networks are deterministic; the augmentation key is taken by `augmented`
    z1, z2, new_batch_stats = _pretrain_forward(model, params, batch_stats, batch, True)
    loss, aux = objective.cromss_loss(z1, z2, batch['labels'], _pretrain_prior(batch, obj_cfg),
                                      epoch, obj_cfg)
    labels = batch['labels']
    step_metrics = {
        'seg_loss': aux['seg_loss'], 'cons_loss': aux['cons_loss'],
        'keep_ratio': aux['keep_ratio'],
        'seg_weight_s1': jnp.mean(aux['seg_weights_s1']),
        'seg_weight_s2': jnp.mean(aux['seg_weights_s2']),
        'cons_weight_s1': jnp.mean(aux['cons_weights_s1']),
        'cons_weight_s2': jnp.mean(aux['cons_weights_s2']),
        'train_acc_s1': jnp.mean(jnp.argmax(z1, -1) == labels),
        'train_acc_s2': jnp.mean(jnp.argmax(z2, -1) == labels),
    }
    return loss, (new_batch_stats, step_metrics)
  return augmented(loss_fn, augment)


def pretrain_eval_fn(model: nn.Module, obj_cfg: ml_collections.ConfigDict,
                     has_clean: bool) -> Callable:
  num_classes = obj_cfg.num_classes

  def eval_fn(params, batch_stats, batch, epoch):
    del epoch
    z1, z2, _ = _pretrain_forward(model, params, batch_stats, batch, False)
    valid = batch['valid'].astype(bool)
    pixel_mask = jnp.broadcast_to(valid[:, None, None], batch['labels'].shape)
    n = jnp.sum(valid.astype(jnp.float32))
    sums = {'val_loss_sum': objective.validation_loss(z1, z2, batch['labels'], obj_cfg,
                                                      mask=pixel_mask) * n,
            'val_samples': n}
    for name, z in (('s1', z1), ('s2', z2)):
      pred = jnp.argmax(z, -1)
      sums[f'cm_noisy_{name}'] = metrics_lib.confusion_matrix(batch['labels'], pred,
                                                              num_classes, pixel_mask)
      if has_clean:
        sums[f'cm_clean_{name}'] = metrics_lib.confusion_matrix(batch['clean_labels'], pred,
                                                                num_classes, pixel_mask)
    return sums
  return eval_fn


def summarise_confusions(sums: dict[str, np.ndarray]) -> dict[str, float]:
  out = {'val_loss': float(sums['val_loss_sum'] / max(float(sums['val_samples']), 1.0))}
  for key, value in sums.items():
    if key.startswith('cm_'):
      scores = metrics_lib.scores_from_confusion(value)
      name = key[3:]
      out[f'miou_{name}'] = scores['miou']
      out[f'oa_{name}'] = scores['oa']
  return out


def create_pretrain_learner(config: ml_collections.ConfigDict) -> Learner:
  """The two-branch network and the CromSS loss (all the compiled train step needs).

  The loss augments the batch (whole tiles from the host) inside the step; `init_batch` has
  the crop's shape.
  """
  obj_cfg = config.objective
  model = models.build_pretrain_model(config.model, obj_cfg.num_classes, config.data.s2_bands)
  crop = config.data.crop_size

  def init_batch():
    return {'s1': np.zeros((1, crop, crop, config.model.s1_channels), np.uint8),
            's2': np.zeros((1, crop, crop, config.data.s2_bands), np.uint8)}

  def apply_init(module, rng, batch, inputs):
    del inputs  # none: every variable is drawn
    return module.init(rng, models.unit_float(batch['s1']), models.unit_float(batch['s2']),
                       train=False)

  return Learner(model=model, init_batch=init_batch, apply_init=apply_init,
                 loss_fn=pretrain_loss_fn(model, obj_cfg, device_augment(config)))


def create_pretrain_task(config: ml_collections.ConfigDict) -> Task:
  """CromSS pretraining on a converted SSL4EO-S12 dataset (config.data.dataset_dir)."""
  validate_pretrain_config(config)
  info = input_pipeline.pretrain_info(config)
  validate_against_dataset(config, info)
  learner = create_pretrain_learner(config)
  obj_cfg = config.objective

  def panel(params, batch_stats, batch, epoch, path):
    visualize.write_pretrain_panel(learner.model, obj_cfg, params, batch_stats, batch, epoch,
                                   path)

  return Task(
      name='pretrain', learner=learner,
      data=Data(train_iterator=lambda start: input_pipeline.create_pretrain_iterator(
                    config, 'train', start_step=start),
                steps_per_epoch=info.steps_per_epoch,
                global_batch_size=config.training.global_batch_size,
                stream=input_pipeline.pretrain_stream(config, info)),
      evaluation=Evaluation(
          eval_fn=pretrain_eval_fn(learner.model, obj_cfg, info.has_clean_labels),
          summarise=summarise_confusions,
          eval_iterator=lambda: input_pipeline.create_pretrain_iterator(config, 'validation'),
          panel=panel))
