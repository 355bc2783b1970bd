"""Transfer of one pretrained encoder to a downstream segmentation set (docs/METHOD.md §6).

`run(config, workdir)` (the main command for configs with a `transfer` group) builds the task
and hands it to the shared loop `train.train_and_evaluate`: the same compiled step,
checkpoints, resume and summaries as pretraining. One exported encoder (or a random one) + a
new decoder (`models.decoders`), CE + Dice over labelled pixels only, the encoder frozen
(no updates, inference-mode BatchNorm) or fine-tuned; every evaluation scores the WHOLE test
split from one confusion matrix. After training the final model is scored once more and
metrics.json, metrics.md and confusion_matrix.png are written to the workdir
(`evaluate_workdir` does the same for any saved checkpoint).

The pretrained encoder enters the variables in the task's `apply_init`, as an argument of the
init program (not compiled in), i.e. only in the freshly initialised state; a resumed run
overwrites that state with its checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cromss_jax import checkpointing
from cromss_jax import cli
from cromss_jax import config_validation
from cromss_jax import constants
from cromss_jax import exports
from cromss_jax import input_pipeline
from cromss_jax import metrics as metrics_lib
from cromss_jax import models
from cromss_jax import report
from cromss_jax import sharding
from cromss_jax import train
from cromss_jax.losses import masked_segmentation_loss, valid_pixels
from cromss_jax.models import decoders

MODALITIES = constants.MODALITIES
Batch = Mapping[str, jax.Array]


class TransferError(cli.UserError, ValueError):
  """The encoder, data and config of a transfer do not fit together (the message says how)."""


def validate_transfer_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first setting that cannot work (config_validation's rules)."""
  config_validation.validate_transfer_config(config)


# ----------------------------------------------------------------------------------------------
# Pretrained encoders
# ----------------------------------------------------------------------------------------------
def load_pretrained_encoder(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The exported encoder's variables (numpy), after checking it fits the config; None = random.

  The export's JSON must say: an encoder (not a whole model), of config.transfer.modality, of
  config.model.encoder, and (S2) with exactly the bands of config.data.s2_bands, in order.
  """
  path = config.transfer.encoder_path
  if path == 'random':
    return None
  variables, meta = exports.load_exported(os.path.expanduser(path))
  where = f'{path} (config.transfer.encoder_path)'
  if meta.get('kind') != 'encoder':
    raise TransferError(f'{where} is a {meta.get("kind")!r} export, not an encoder; use the '
                     'encoder_s1 or encoder_s2 folder of the export.')
  modality = config.transfer.modality
  if meta.get('modality') != modality:
    raise TransferError(f'{where} is the {meta.get("modality")!r} encoder but '
                     f'config.transfer.modality={modality!r}; use encoder_{modality} or set '
                     f'--config.transfer.modality={meta.get("modality")}.')
  if meta.get('encoder') != config.model.encoder:
    raise TransferError(f'{where} is a {meta.get("encoder")} but config.model.encoder='
                     f'{config.model.encoder!r}; set --config.model.encoder='
                     f'{meta.get("encoder")}.')
  expected = exports.band_metadata(modality, config.data.s2_bands)['bands']
  if list(meta.get('bands', [])) != list(expected):
    hint = (f' Set --config.data.s2_bands={len(meta.get("bands", []))}.'
            if modality == 's2' and len(meta.get('bands', [])) in constants.S2_BAND_SUBSETS
            else '')
    raise TransferError(f'{where} was pretrained on the bands {meta.get("bands")} but this '
                     f'transfer feeds {expected} (config.data.s2_bands='
                     f'{config.data.s2_bands}).{hint}')
  logging.info('Pretrained %s encoder (%s) from %s, step %s.', modality, meta.get('encoder'),
               path, meta.get('source_step'))
  return variables


def insert_pretrained_encoder(variables: dict[str, Any],
                              encoder_variables: dict[str, Any]) -> dict[str, Any]:
  """Variables with the 'encoder' subtree replaced by `encoder_variables` (shapes checked)."""
  # models.insert_encoder does the structure and shape checks on a two-branch layout.
  wrapped = {c: {'encoder_s2': tree['encoder']} for c, tree in variables.items()
             if 'encoder' in tree}
  try:
    merged = models.insert_encoder(wrapped, encoder_variables, 's2')
  except ValueError as err:
    raise TransferError(f'The exported encoder does not fit the transfer model: {err}') from None
  out = {c: dict(tree) for c, tree in variables.items()}
  for collection, tree in merged.items():
    out[collection]['encoder'] = jax.tree.map(
        lambda new, old: jnp.asarray(new, old.dtype), tree['encoder_s2'],
        variables[collection]['encoder'])
  return out


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
def make_loss_fn(model: decoders.TransferModel, config: ml_collections.ConfigDict) -> train.LossFn:
  """loss_fn(params, batch_stats, batch, epoch, rng) of the train.Task contract."""
  modality = config.transfer.modality
  num_classes = int(config.objective.num_classes)
  ignore = int(config.transfer.ignore_label)
  losses = tuple(config.objective.seg_losses)
  unused = decoders.unused_encoder_stages(model.decoder)

  def loss_fn(params, batch_stats, batch, epoch, rng):
    del epoch
    logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, models.unit_float(batch[modality]),
        train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    new_batch_stats = updates['batch_stats']
    if unused and not model.freeze_encoder:
      # Stages the decoder never reads keep their statistics (as if absent, like smp), which
      # also lets XLA drop their forward pass.
      encoder_stats = dict(new_batch_stats['encoder'])
      encoder_stats.update({k: batch_stats['encoder'][k] for k in unused
                            if k in batch_stats['encoder']})
      new_batch_stats = dict(new_batch_stats, encoder=encoder_stats)
    labels = batch['label']
    loss = masked_segmentation_loss(logits, labels, num_classes, losses, ignore)
    valid = valid_pixels(labels, num_classes, ignore)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid)
    step_metrics = {'train_acc': correct / jnp.maximum(jnp.sum(valid), 1),
                    'labelled_share': jnp.mean(valid.astype(jnp.float32))}
    return loss, (new_batch_stats, step_metrics)

  return loss_fn


def trainable_fn(config: ml_collections.ConfigDict):
  """Which parameter paths the optimiser updates."""
  unused = decoders.unused_encoder_stages(config.transfer.decoder)
  freeze = bool(config.transfer.freeze_encoder)
  if not freeze and not unused:
    return train.train_everything

  def trainable(path: tuple[str, ...]) -> bool:
    if not path or path[0] != 'encoder':
      return True
    return not freeze and (len(path) < 2 or path[1] not in unused)

  return trainable


def create_transfer_task(config: ml_collections.ConfigDict) -> train.Task:
  """The train.Task of one transfer run (DFC2020-style TFDS data, see docs/DESIGN.md)."""
  validate_transfer_config(config)
  data = config.data
  info = input_pipeline.downstream_info(config, train_split=data.train_split,
                                        eval_split=data.test_split)
  config_validation.validate_against_dataset(config, info)
  modality = config.transfer.modality
  channels = decoders.input_channels(config)
  stored = info.s1_channels if modality == 's1' else info.s2_channels
  if stored != channels:
    raise TransferError(f'The {modality} encoder needs {channels} channels but '
                     f'{info.dataset_dir} gives {stored}.')
  model = decoders.build_transfer_model(config)
  pretrained = load_pretrained_encoder(config)
  crop = data.crop_size

  def init_batch() -> dict[str, np.ndarray]:
    return {modality: np.zeros((1, crop, crop, channels), np.uint8)}

  def apply_init(module, rng, batch, pretrained_encoder):
    variables = module.init({'params': rng}, models.unit_float(batch[modality]), train=False)
    variables = {k: dict(v) for k, v in variables.items()}
    if pretrained_encoder is not None:
      variables = insert_pretrained_encoder(variables, pretrained_encoder)
    return variables

  def batches(split: str, train_mode: bool, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    return model_batches(config, input_pipeline.create_downstream_iterator(
        config, split, train=train_mode, start_step=start))

  names = class_names(config)
  return train.Task(
      name='transfer',
      learner=train.Learner(model=model, init_batch=init_batch, apply_init=apply_init,
                            init_inputs=lambda: pretrained, loss_fn=make_loss_fn(model, config),
                            trainable=trainable_fn(config)),
      data=train.Data(train_iterator=lambda start: batches(data.train_split, True, start),
                      steps_per_epoch=info.steps_per_epoch,
                      global_batch_size=config.training.global_batch_size),
      evaluation=train.Evaluation(eval_fn=make_eval_fn(model, config),
                                  summarise=summarise,
                                  eval_iterator=lambda: batches(data.test_split, False)),
      checkpoint_meta={'transfer': {
          'modality': modality, 'decoder': config.transfer.decoder,
          'encoder': config.model.encoder, 'freeze_encoder': bool(config.transfer.freeze_encoder),
          'encoder_path': config.transfer.encoder_path, 'classes': list(names),
          'bands': exports.band_metadata(modality, data.s2_bands)}})


def run(config: ml_collections.ConfigDict, workdir: str, *,
        allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) a transfer run, then writes the final test-split report."""
  task = create_transfer_task(config)
  logging.info('Transfer: %s, %d steps/epoch, %d epochs.', run_name(config),
               task.data.steps_per_epoch, config.training.num_epochs)
  state = train.train_and_evaluate(config, workdir, task,
                                   allow_config_change=allow_config_change)
  mesh = sharding.create_mesh(config)
  scores = score_split(config, task.learner.model,
                             {'params': state.params, 'batch_stats': state.batch_stats},
                             config.data.test_split, mesh, task.evaluation.eval_fn)
  if jax.process_index() == 0:
    paths = write_report(workdir, scores, config, step=int(jax.device_get(state.step)))
    logging.info('Final %s: mIoU %.2f  OA %.2f  AA %.2f  mF1 %.2f -> %s', config.data.test_split,
                 scores['miou'], scores['oa'], scores['aa'], scores['mf1'], paths['md'])
  return scores


# ----------------------------------------------------------------------------------------------
# Scoring a split
# ----------------------------------------------------------------------------------------------
def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  num_classes = int(config.objective.num_classes)
  named = tuple(config.data.class_names)  # e.g. configs/transfer_dw.py
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


def score_split(config: ml_collections.ConfigDict, model: nn.Module, variables: Mapping[str, Any],
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
    raise cli.UserError(f'split {split!r} of {config.data.dataset_dir} gave no batches; '
                        'nothing to evaluate')
  scores = metrics_lib.scores_from_confusion(totals['cm'])
  scores.update(loss=float(totals['loss_sum'] / max(float(totals['samples']), 1.0)),
                confusion_matrix=totals['cm'], split=split,
                samples=int(totals['samples']))
  return scores


def run_name(config: ml_collections.ConfigDict) -> str:
  """'resnet50+pspnet S2 frozen (encoder_s2)': one Markdown row label per setting."""
  t = config.transfer
  source = 'random init' if t.encoder_path == 'random' else os.path.basename(
      os.path.normpath(t.encoder_path))
  mode = 'frozen' if t.freeze_encoder else 'fine-tuned'
  return f'{config.model.encoder}+{t.decoder} {t.modality.upper()} {mode} ({source})'


def write_report(out_dir: str, scores: Mapping[str, Any], config: ml_collections.ConfigDict,
                 *, step: int, suffix: str = '') -> dict[str, str]:
  """The report files of a transfer run's scores (report.write_report); returns their paths."""
  t = config.transfer
  return report.write_report(
      out_dir, scores, name=run_name(config), names=class_names(config), step=step,
      suffix=suffix,
      model={'encoder': config.model.encoder, 'decoder': t.decoder, 'modality': t.modality,
             's2_bands': int(config.data.s2_bands), 'freeze_encoder': bool(t.freeze_encoder),
             'encoder_path': t.encoder_path})


def evaluate_workdir(workdir: str, split: str | None = None, *, dataset_dir: str | None = None,
                     batch_size: int | None = None,
                     out_dir: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
  """Re-evaluates the latest checkpoint of a transfer workdir and writes the report."""
  config, variables, _, step = checkpointing.load_transfer_checkpoint(workdir)
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
  scores = score_split(config, model, variables, split, mesh)
  suffix = '' if split == config.data.test_split else f'_{split}'
  paths = write_report(out_dir or workdir, scores, config, step=step, suffix=suffix)
  logging.info('Evaluated step %d of %s on %s: mIoU %.2f, OA %.2f.', step, workdir, split,
               scores['miou'], scores['oa'])
  return scores, paths
