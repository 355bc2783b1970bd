"""The embedded demo behind `make demo`: the whole pipeline at toy scale, on any machine.

  python -m cromss_jax.demo --out demo_out [--locations 24] [--pretrain_epochs 6]
      [--transfer_epochs 4] [--skip_transfer]

1. generates a miniature SSL4EO-S12 + Dynamic World + DFC2020 dataset as real GeoTIFFs
   (data_prep.make_demo; clean truth included),
2. converts it to TFDS records (data_prep.ssl4eo, data_prep.dfc2020),
3. pretrains CromSS (configs/demo.py: ResNet-18, mid fusion, 128 px crops),
4. exports the S1 and S2 encoders,
5. transfers the S2 and S1 encoders and a random-init baseline to the demo DFC2020 set
   (frozen encoders, PSPNet decoder) and prints the metrics table,
6. writes a land-cover map of the demo scene with the pretrained network.
Every stage resumes: rerunning the command skips what is complete.
"""
from __future__ import annotations

import json
import os
import time

from absl import flags

from cromss_jax import cli
from cromss_jax import logs

_OUT = flags.DEFINE_string('out', 'demo_out', 'Output directory for everything the demo makes.')
_LOCATIONS = flags.DEFINE_integer('locations', 24, 'Pretraining locations to generate.')
_PRETRAIN_EPOCHS = flags.DEFINE_integer('pretrain_epochs', 6, 'Pretraining epochs.')
_TRANSFER_EPOCHS = flags.DEFINE_integer('transfer_epochs', 4, 'Transfer epochs per encoder.')
_SKIP_TRANSFER = flags.DEFINE_bool('skip_transfer', False, 'Stop after pretraining + export.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the generated data.')


def _stage(name: str) -> float:
  print(f'\n==> {name}', flush=True)
  return time.perf_counter()


def _done(start: float) -> None:
  print(f'    done in {time.perf_counter() - start:.0f} s', flush=True)


def generate(out: str) -> str:
  from data_prep import make_demo
  raw = os.path.join(out, 'raw')
  if os.path.exists(os.path.join(raw, 'summary.json')):
    print(f'    {raw} exists; keeping it')
    return raw
  summary = make_demo.make_demo(raw, locations=_LOCATIONS.value, seed=_SEED.value,
                                progress=True)
  print(f"    label/truth agreement {summary['label_agreement']['overall']:.3f}")
  return raw


def _run_converter(module, argv: list[str]) -> None:
  """`python -m data_prep.<module> argv`, its user errors raised as such (not SystemExit)."""
  from data_prep import common
  common.cli_main(module.run, module.build_parser().parse_args(argv))


def convert(raw: str, out: str) -> tuple[str, str]:
  from data_prep import dfc2020, ssl4eo
  root = os.path.join(raw, 'ssl4eo')
  ssl4eo_dir = os.path.join(out, 'tfds', 'ssl4eo_s12_nol')
  dfc_dir = os.path.join(out, 'tfds', 'dfc2020')
  _run_converter(ssl4eo, [
      '--s1', os.path.join(root, 's1'), '--s2', os.path.join(root, 's2c'),
      '--labels', os.path.join(root, 'labels', 'noisy_manifest.csv'),
      '--clean-labels', os.path.join(root, 'labels', 'clean_manifest.csv'),
      '--out', ssl4eo_dir, '--val-fraction', '0.1', '--examples-per-shard', '4'])
  _run_converter(dfc2020, ['--root', os.path.join(raw, 'dfc2020'), '--out', dfc_dir,
                           '--examples-per-shard', '16'])
  return ssl4eo_dir, dfc_dir


def pretrain(dataset_dir: str, out: str) -> str:
  from configs import demo as demo_config
  from cromss_jax import train
  from cromss_jax.tasks import pretrain as pretrain_task
  config = demo_config.get_config()
  config.data.dataset_dir = dataset_dir
  config.training.num_epochs = _PRETRAIN_EPOCHS.value
  workdir = os.path.join(out, 'pretrain')
  train.train_and_evaluate(config, workdir, pretrain_task.create_pretrain_task(config))
  with open(os.path.join(workdir, 'history.json')) as f:
    last = json.load(f)[-1]
  print('    last epoch: ' + '  '.join(f'{k} {v:.3f}' for k, v in last.items()
                                       if isinstance(v, float)))
  return workdir


def export(workdir: str, out: str) -> dict[str, str]:
  from cromss_jax import exports
  return exports.export_pretrained(workdir, os.path.join(out, 'export'), overwrite=True)


def transfer_all(paths: dict[str, str], dfc_dir: str, out: str) -> dict[str, str]:
  """Frozen-encoder transfer of each pretrained encoder and a random-init baseline."""
  from configs import transfer as transfer_config
  from cromss_jax import constants, metrics
  from cromss_jax.tasks import transfer
  runs = {'CromSS S2 encoder (frozen)': ('s2', paths['s2']),
          'CromSS S1 encoder (frozen)': ('s1', paths['s1']),
          'random init S2 (frozen)': ('s2', 'random')}
  rows = {}
  for name, (modality, encoder_path) in runs.items():
    config = transfer_config.get_config('demo')
    config.data.dataset_dir = dfc_dir
    config.transfer.modality = modality
    config.transfer.encoder_path = encoder_path
    config.training.num_epochs = _TRANSFER_EPOCHS.value
    workdir = os.path.join(out, 'transfer', name.split(' (')[0].replace(' ', '_').lower())
    print(f'    {name} -> {workdir}', flush=True)
    rows[name] = transfer.run(config, workdir)
  table = metrics.markdown_table(rows, constants.DFC_DW8_CLASSES)
  table_path = os.path.join(out, 'transfer', 'results.md')
  with open(table_path, 'w') as f:
    f.write(table)
  print('\n' + table)
  return {'transfer results table': table_path}


def map_scene(paths: dict[str, str], raw: str, out: str) -> dict[str, str]:
  """Dynamic World map of the generated scene with the pretraining network (both sensors)."""
  from cromss_jax import mapping
  scene = os.path.join(raw, 'scene')
  map_path = os.path.join(out, 'map.tif')
  predictor = mapping.load_predictor(paths['pretrain_model'], with_s1=True)
  mapping.predict_scene(predictor, map_path, s2_path=os.path.join(scene, 's2.tif'),
                        s1_path=os.path.join(scene, 's1.tif'), window=128, overlap=32,
                        batch=8, confidence=True)
  return {'land-cover map (GeoTIFF, DW classes + confidence)': map_path}


def main(argv):
  del argv
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  logs.quiet_libraries()
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  from data_prep import common
  try:
    _run_stages(out)
  except common.ExistingOutputError as err:
    # `make demo` has no --overwrite: the converter's own advice would not apply.
    raise cli.UserError(
        f'{err.problem}. The demo resumes from what it finds in {out} and cannot use these '
        'files: to start over, delete that folder (`make clean` deletes the default one) or '
        'choose another (`make demo DEMO_DIR=...`, or --out)') from None


def _run_stages(out: str) -> None:
  t0 = time.perf_counter()
  start = _stage('1/6 generating demo GeoTIFFs (SSL4EO-S12, Dynamic World labels, DFC2020)')
  raw = generate(out)
  _done(start)
  start = _stage('2/6 converting GeoTIFFs to TFDS records')
  ssl4eo_dir, dfc_dir = convert(raw, out)
  _done(start)
  start = _stage('3/6 CromSS pretraining (configs/demo.py)')
  workdir = pretrain(ssl4eo_dir, out)
  _done(start)
  start = _stage('4/6 exporting the S1 and S2 encoders')
  paths = export(workdir, out)
  _done(start)
  results = {'raw data': raw, 'records': os.path.dirname(ssl4eo_dir),
             'pretraining workdir (TensorBoard, panels/, history.json)': workdir,
             'exported encoders': os.path.dirname(paths['s2'])}
  if not _SKIP_TRANSFER.value:
    start = _stage('5/6 transfer to the demo DFC2020 set (frozen encoders, PSPNet)')
    results.update(transfer_all(paths, dfc_dir, out))
    _done(start)
    start = _stage('6/6 land-cover map of the demo scene')
    results.update(map_scene(paths, raw, out))
    _done(start)
  print(f'\nDemo finished in {time.perf_counter() - t0:.0f} s. Results:')
  for name, path in results.items():
    print(f'  {name}: {path}')


def run() -> None:
  cli.run_absl(main)


if __name__ == '__main__':
  run()
