"""The export format: pretrained S1 and S2 encoders, separately, for transfer to other tasks.

An export folder EXPORT holds, for each modality m in (s1, s2):
  EXPORT/encoder_<m>/        the encoder's Flax variables (params + batch_stats)
  EXPORT/encoder_<m>.json    what a user of the encoder must know: encoder depth, input bands
                             in order, their normalisation, classes of the pretraining, config
and, when a whole network is known, EXPORT/pretrain_model/ + pretrain_model.json (both
branches and decoder), which `cromss_jax.predict` can use directly for Dynamic World maps.

The variables are stored either as an Orbax tree (the default) or, with `fmt='safetensors'`,
as one `variables.safetensors` file per folder (keys 'params/layer1/block0/conv1/kernel', ...)
that any safetensors reader can open, without pickles. `load_exported` tells them apart by
the folder's content.

Writers: `export_pretrained(workdir, out)` (the command `python -m cromss_jax.export`) from a
pretraining checkpoint, and `write_export(out, items)` for any variables with their metadata
(used by `cromss_jax.import_weights` for published PyTorch weights). The whole folder is
written under a temporary name and swapped into place (`utils.atomic_directory`), so a run
killed at any moment leaves either the old export or the new one, never a mix; an existing
export is only replaced with `overwrite=True`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from cromss_jax import checkpointing
from cromss_jax import constants
from cromss_jax import models
from cromss_jax import utils

MODALITIES = ('s1', 's2')
SAFETENSORS_FILE = 'variables.safetensors'
NORMALISATION = ('uint8 = round(clip((x - (mean - 2 std)) / (4 std), 0, 1) * 255); '
                 'the network input is uint8 / 255')


def band_metadata(modality: str, s2_bands: int) -> dict:
  if modality == 's1':
    return {'bands': list(constants.S1_BANDS), 'mean': list(constants.S1_MEAN),
            'std': list(constants.S1_STD), 'units': 'dB'}
  subset = constants.S2_BAND_SUBSETS[s2_bands]
  return {'bands': [constants.S2_BANDS[i] for i in subset],
          'mean': [constants.S2_MEAN[i] for i in subset],
          'std': [constants.S2_STD[i] for i in subset], 'units': 'reflectance x 1e4 (L1C)'}


def _check_format(fmt: str) -> None:
  if fmt not in constants.EXPORT_FORMATS:
    raise ValueError(f'export format {fmt!r} is not supported; expected one of '
                     f'{constants.EXPORT_FORMATS}.')


def _flat_names(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(dict(tree))
  out = {}
  for path, leaf in flat.items():
    if any('/' in str(p) for p in path):
      raise ValueError(f'variable path {path} has a "/" in a name; cannot be stored flat.')
    out['/'.join(str(p) for p in path)] = np.ascontiguousarray(np.asarray(leaf))
  return out


def _save_tree(path: str, tree: Any, fmt: str) -> None:
  tree = jax.device_get(tree)
  if fmt == 'safetensors':
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
    os.makedirs(path)
    file = os.path.join(path, SAFETENSORS_FILE)
    st.save_file(_flat_names(tree), file, metadata={'format': 'cromss_jax flax variables'})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)  # safetensors creates it 0600; an export is meant to be shared
    return
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)


def write_export(out_dir: str, items: Mapping[str, tuple[Any, dict]], *, overwrite: bool = False,
                 fmt: str = 'orbax') -> dict[str, str]:
  """Writes {name: (variables, metadata)} as EXPORT/<name>/ + EXPORT/<name>.json, atomically.

  Returns {name: path}. The folder appears complete or not at all; an existing `out_dir` is
  replaced only with `overwrite` (FileExistsError otherwise, before anything is written).
  """
  _check_format(fmt)
  out_dir = os.path.abspath(out_dir)
  paths = {}
  with utils.atomic_directory(out_dir, overwrite=overwrite) as tmp:
    for name, (variables, meta) in items.items():
      _save_tree(os.path.join(tmp, name), variables, fmt)
      utils.write_json(os.path.join(tmp, name + '.json'), dict(meta, storage=fmt))
      paths[name] = os.path.join(out_dir, name)
  return paths


def export_pretrained(workdir: str, out_dir: str, *, overwrite: bool = False,
                      fmt: str = 'orbax') -> dict[str, str]:
  """Writes both encoders and the whole pretraining model; returns their paths.

  Keys of the result: 's1', 's2' (the encoder folders) and 'pretrain_model'.
  """
  _check_format(fmt)
  out_abs = os.path.abspath(out_dir)
  if os.path.exists(out_abs) and not overwrite:  # before the (slow) restore
    raise FileExistsError(f'{out_abs} exists; pass --overwrite to replace it')
  state, meta, step = checkpointing.load_latest_checkpoint(workdir)
  config = checkpointing.config_from_meta(meta)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  common = {
      'source_workdir': os.path.abspath(workdir), 'source_step': int(step),
      'epoch': int(step) // int(meta['steps_per_epoch']),
      'encoder': config.model.encoder, 'classes': list(constants.DW_CLASSES),
      'num_classes': int(config.objective.num_classes),
      'normalisation': NORMALISATION,
      'config': json.loads(meta['config']),
  }
  items = {}
  for modality in MODALITIES:
    items[f'encoder_{modality}'] = (
        models.extract_encoder(variables, modality),
        dict(common, modality=modality, kind='encoder',
             **band_metadata(modality, config.data.s2_bands)))
  items['pretrain_model'] = (variables, dict(
      common, kind='pretrain_model', fusion=config.model.fusion,
      s1=band_metadata('s1', config.data.s2_bands), s2=band_metadata('s2', config.data.s2_bands)))
  written = write_export(out_abs, items, overwrite=overwrite, fmt=fmt)
  logging.info('Exported step %d of %s to %s (%s)', step, workdir, out_abs, fmt)
  return {'s1': written['encoder_s1'], 's2': written['encoder_s2'],
          'pretrain_model': written['pretrain_model']}


def _load_safetensors(path: str) -> dict:
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  flat = st.load_file(os.path.join(path, SAFETENSORS_FILE))
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def _load_orbax(path: str) -> dict:
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    tree = metadata.item_metadata if hasattr(metadata, 'item_metadata') else metadata
    tree = tree.tree if hasattr(tree, 'tree') else tree
    variables = checkpointer.restore(path, checkpointing.abstract_on_one_device(tree))
  return jax.tree.map(np.asarray, variables)


def load_exported(path: str) -> tuple[dict, dict]:
  """(variables, metadata) of an exported encoder or model directory (Orbax or safetensors)."""
  path = os.path.abspath(path.rstrip('/'))
  meta_path = path + '.json'
  if not os.path.isdir(path) or not os.path.isfile(meta_path):
    raise FileNotFoundError(f'{path} is not an export (expected the folder and {meta_path}); '
                            'create one with `python -m cromss_jax.export`.')
  with open(meta_path, encoding='utf-8') as f:
    meta = json.load(f)
  if os.path.isfile(os.path.join(path, SAFETENSORS_FILE)):
    return _load_safetensors(path), meta
  return _load_orbax(path), meta


def describe(paths: Mapping[str, str]) -> str:
  """One line per written item: 'name: path  (+ name.json)'."""
  return '\n'.join(f'{name}: {path}  (+ {os.path.basename(path)}.json)'
                   for name, path in paths.items())
