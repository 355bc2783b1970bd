"""The export format: pretrained S1 and S2 encoders, separately, for transfer to other tasks.

`export_pretrained(workdir, out)` (the command `python -m cromss_jax.export`) reads the
workdir's latest complete checkpoint and writes, for each modality m in (s1, s2):
  EXPORT/encoder_<m>/        the encoder's Flax variables (params + batch_stats), Orbax format
  EXPORT/encoder_<m>.json    what a user of the encoder must know: encoder depth, input bands
                             in order, their normalisation, classes of the pretraining, config
and EXPORT/pretrain_model/ + pretrain_model.json, the whole pretraining network (both branches
and decoder), which `cromss_jax.predict` can use directly for Dynamic World class maps.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cromss_jax import constants
from cromss_jax import models

MODALITIES = ('s1', 's2')


def _abstract_on_one_device(metadata_tree: Any) -> Any:
  device = jax.local_devices()[0]
  single = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=single),
                      metadata_tree)


def load_latest_checkpoint(workdir: str) -> tuple[dict, dict, int]:
  """(state as nested dicts, meta, step) of the latest complete checkpoint, on one device."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoints in {directory}: train first with '
                            f'`python -m cromss_jax.main --workdir={workdir} ...`.')
  # Explicit handlers, so the saved tree's metadata (not its device layout) shapes the restore:
  # a checkpoint written by N devices or hosts restores onto this one device.
  handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'No complete checkpoint in {directory}.')
    metadata = manager.item_metadata(step)['state']
    tree = metadata.tree if hasattr(metadata, 'tree') else metadata
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract_on_one_device(tree)),
        meta=ocp.args.JsonRestore()))
  return restored['state'], dict(restored['meta']), step


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(meta['config']))


def band_metadata(modality: str, s2_bands: int) -> dict:
  if modality == 's1':
    return {'bands': list(constants.S1_BANDS), 'mean': list(constants.S1_MEAN),
            'std': list(constants.S1_STD), 'units': 'dB'}
  subset = constants.S2_BAND_SUBSETS[s2_bands]
  return {'bands': [constants.S2_BANDS[i] for i in subset],
          'mean': [constants.S2_MEAN[i] for i in subset],
          'std': [constants.S2_STD[i] for i in subset], 'units': 'reflectance x 1e4 (L1C)'}


def _save_tree(path: str, tree: Any) -> None:
  if os.path.exists(path):
    shutil.rmtree(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, jax.device_get(tree))


def _write_json(path: str, payload: dict) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, path)


def export_pretrained(workdir: str, out_dir: str) -> dict[str, str]:
  """Writes both encoders and the whole pretraining model; returns their paths."""
  state, meta, step = load_latest_checkpoint(workdir)
  config = config_from_meta(meta)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  common = {
      'source_workdir': os.path.abspath(workdir), 'source_step': int(step),
      'epoch': int(step) // int(meta['steps_per_epoch']),
      'encoder': config.model.encoder, 'classes': list(constants.DW_CLASSES),
      'num_classes': int(config.objective.num_classes),
      'normalisation': 'uint8 = round(clip((x - (mean - 2 std)) / (4 std), 0, 1) * 255); '
                       'the network input is uint8 / 255',
      'config': json.loads(meta['config']),
  }
  paths = {}
  for modality in MODALITIES:
    encoder = models.extract_encoder(variables, modality)
    path = os.path.join(out_dir, f'encoder_{modality}')
    _save_tree(path, encoder)
    info = dict(common, modality=modality, kind='encoder',
                **band_metadata(modality, config.data.s2_bands))
    _write_json(path + '.json', info)
    paths[modality] = path
  path = os.path.join(out_dir, 'pretrain_model')
  _save_tree(path, variables)
  _write_json(path + '.json', dict(common, kind='pretrain_model', fusion=config.model.fusion,
                                   s1=band_metadata('s1', config.data.s2_bands),
                                   s2=band_metadata('s2', config.data.s2_bands)))
  paths['pretrain_model'] = path
  logging.info('Exported step %d of %s to %s', step, workdir, out_dir)
  return paths


def load_exported(path: str) -> tuple[dict, dict]:
  """(variables, metadata) of an exported encoder or model directory."""
  path = os.path.abspath(path.rstrip('/'))
  meta_path = path + '.json'
  if not os.path.isdir(path) or not os.path.isfile(meta_path):
    raise FileNotFoundError(f'{path} is not an export (expected the folder and {meta_path}); '
                            'create one with `python -m cromss_jax.export`.')
  with open(meta_path) as f:
    meta = json.load(f)
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    tree = metadata.item_metadata if hasattr(metadata, 'item_metadata') else metadata
    tree = tree.tree if hasattr(tree, 'tree') else tree
    variables = checkpointer.restore(path, _abstract_on_one_device(tree))
  return jax.tree.map(np.asarray, variables), meta
