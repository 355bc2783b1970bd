"""Noise-robustness study (issue 8): do CromSS encoders beat single-modal and unselected ones?

  python -m cromss_jax.study --out DIR [--seeds 3] [--scale 1] [--locations 48] [--epochs 8]
      [--steps_per_epoch 10] [--crop 96] [--transfer_epochs 10] [--transfer_crop 128]
      [--encoder resnet18] [--noise 0.3] [--decoder pspnet] [--workers 1]

For every seed the study
1. generates its own demo world (`data_prep.make_demo`, Dynamic-World-like label noise at
   --noise, clean truth kept) and converts it (`data_prep.ssl4eo` with --clean-labels,
   `data_prep.dfc2020`);
2. pretrains, all on the same noisy labels, with configs/demo.py at reduced scale:
   (a) `s2_only`: one U-Net on S2, plain CE + Dice on the noisy labels;
   (b) `s1_only`: the same on S1;
   (c) `plain`: both sensors, mid fusion, consistency loss, but no sample selection and no
       label smoothing;
   (d) `cromss_mid`: full CromSS, mid fusion; (e) `cromss_late`: full CromSS, late fusion;
   and (f) `random`, no pretraining;
3. exports the encoders and transfers every S2 encoder (a, c-f) and every S1 encoder (b-f) to
   the generated DFC2020-style set, frozen and fine-tuned (PSPNet decoder by default);
4. during (d) and (e), measures after every epoch how well the label-selection weights find the
   wrong labels, on the validation split whose clean truth is known.

Everything reuses the project's own pieces: the generator and converters, `Task`s (cromss_jax/tasks/) +
`train.train_and_evaluate` (the single-modal runs are a `Task` whose loss is the plain
segmentation loss of one branch of a late-fusion network), `exports.export_pretrained` and
`transfer.run`. Outputs in DIR: results.json (every run), results.md (mean +- std over seeds),
study_miou.png, study_selection.png. Rerunning the command skips finished work: data with its
summary/metadata, pretrainings with their exported encoders, transfers with their metrics.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

from absl import flags
import ml_collections
import numpy as np

from cromss_jax import cli

# JAX, TensorFlow, the tasks and the converters are imported where they are used, so that
# `--help` and a command-line mistake answer in about a second instead of ~10 s.

MODALITIES = ('s1', 's2')
SETTINGS = ('frozen', 'finetuned')
SETTING_LABELS = {'frozen': 'frozen', 'finetuned': 'fine-tuned'}
RAMP_SHARE = 0.4            # the paper ramps over 80 of 200 epochs


@dataclasses.dataclass(frozen=True)
class Method:
  """One pretraining variant of the study and the encoders it hands to transfer."""
  key: str
  label: str
  modalities: tuple[str, ...]
  pretrain: str | None = 'cromss'   # 'cromss' (two-branch objective), 'single' or None
  fusion: str = 'mid'
  selection: bool = True            # CromSS sample selection + spatial-temporal smoothing


METHODS = (
    Method('s2_only', '(a) S2 only', ('s2',), 'single', fusion='late', selection=False),
    Method('s1_only', '(b) S1 only', ('s1',), 'single', fusion='late', selection=False),
    Method('plain', '(c) S1+S2, no selection/smoothing', MODALITIES, selection=False),
    Method('cromss_mid', '(d) CromSS mid', MODALITIES),
    Method('cromss_late', '(e) CromSS late', MODALITIES, fusion='late'),
    Method('random', '(f) no pretraining', MODALITIES, pretrain=None, selection=False),
)
METHODS_BY_KEY = {m.key: m for m in METHODS}


@dataclasses.dataclass(frozen=True)
class StudySettings:
  """The scale of the study; the defaults took 44.7 min on 2 shared CPU cores (docs/RESULTS.md)."""
  out: str
  seeds: tuple[int, ...] = (0, 1, 2)
  locations: int = 48
  noise: float = 0.3
  dfc_train: int = 24
  dfc_test: int = 48
  epochs: int = 8
  steps_per_epoch: int = 10
  crop: int = 96
  batch: int = 8
  encoder: str = 'resnet18'
  transfer_epochs: int = 10
  transfer_crop: int = 128
  decoder: str = 'pspnet'
  methods: tuple[str, ...] = tuple(m.key for m in METHODS)
  settings: tuple[str, ...] = SETTINGS
  val_fraction: float = 0.125
  workers: int = 1
  keep_checkpoints: bool = False

  def __post_init__(self):
    unknown = [m for m in self.methods if m not in METHODS_BY_KEY]
    if unknown:
      raise ValueError(f'Unknown methods {unknown}; expected some of {list(METHODS_BY_KEY)}.')
    bad = [s for s in self.settings if s not in SETTINGS]
    if bad:
      raise ValueError(f'Unknown transfer settings {bad}; expected some of {list(SETTINGS)}.')
    if not self.seeds:
      raise ValueError('At least one seed is needed.')


# ----------------------------------------------------------------------------------------------
# Configs of the study's runs
# ----------------------------------------------------------------------------------------------
def pretrain_config(settings: StudySettings, method: Method, seed: int,
                    dataset_dir: str) -> ml_collections.ConfigDict:
  """The `study` variant of configs/pretrain.py at the settings' scale, with the method's
  fusion and objective switches."""
  from configs import pretrain as pretrain_cfg  # pylint: disable=g-import-not-at-top
  config = pretrain_cfg.get_config('study')
  config.seed = seed
  config.data.dataset_dir = dataset_dir
  config.data.crop_size = settings.crop
  config.model.encoder = settings.encoder
  config.model.fusion = method.fusion
  config.objective.sample_selection = method.selection
  config.objective.label_smoothing = method.selection
  config.objective.ramp_epochs = max(1, round(RAMP_SHARE * settings.epochs))
  training = config.training
  training.num_epochs = settings.epochs
  training.steps_per_epoch = settings.steps_per_epoch
  training.global_batch_size = settings.batch
  training.checkpoint_every_epochs = max(1, settings.epochs // 2)
  training.log_every_steps = settings.steps_per_epoch
  return config


def transfer_config(settings: StudySettings, seed: int, dataset_dir: str, modality: str,
                    encoder_path: str, setting: str) -> ml_collections.ConfigDict:
  """The `study` variant of configs/transfer.py at the settings' scale; evaluated on the test
  split at the end only."""
  from configs import transfer as transfer_cfg  # pylint: disable=g-import-not-at-top
  config = transfer_cfg.get_config('study')
  config.seed = seed
  config.data.dataset_dir = dataset_dir
  config.data.crop_size = settings.transfer_crop
  config.model.encoder = settings.encoder
  config.transfer.modality = modality
  config.transfer.encoder_path = encoder_path
  config.transfer.freeze_encoder = setting == 'frozen'
  config.transfer.decoder = settings.decoder
  training = config.training
  training.num_epochs = settings.transfer_epochs
  training.global_batch_size = settings.batch
  training.eval_every_epochs = settings.transfer_epochs
  training.checkpoint_every_epochs = settings.transfer_epochs
  return config


# ----------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------
def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, payload: Any) -> None:
  from cromss_jax import utils  # pylint: disable=g-import-not-at-top
  utils.write_text(path, json.dumps(payload, indent=1, default=_json_default))


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f'{type(value)} is not JSON serialisable')


def _seed_dir(settings: StudySettings, seed: int) -> str:
  return os.path.join(settings.out, f'seed_{seed}')


def prepare_data(settings: StudySettings, seed: int) -> dict[str, Any]:
  """Generates and converts the seed's world; returns the record folders and label agreement."""
  from data_prep import dfc2020, make_demo, ssl4eo  # pylint: disable=g-import-not-at-top
  base = _seed_dir(settings, seed)
  raw = os.path.join(base, 'raw')
  summary_path = os.path.join(raw, 'summary.json')
  if os.path.exists(summary_path):
    summary = _read_json(summary_path)
  else:
    summary = make_demo.make_demo(raw, locations=settings.locations, noise=settings.noise,
                                  seed=seed, dfc_validation=settings.dfc_train,
                                  dfc_test=settings.dfc_test, scene_size=None)
  ssl_dir = os.path.join(base, 'tfds', 'ssl4eo_s12_nol')
  dfc_dir = os.path.join(base, 'tfds', 'dfc2020')
  root = os.path.join(raw, 'ssl4eo')
  workers = ['--workers', str(settings.workers)]
  if not os.path.exists(os.path.join(ssl_dir, 'dataset_info.json')):
    ssl4eo.main(['--s1', os.path.join(root, 's1'), '--s2', os.path.join(root, 's2c'),
                 '--labels', os.path.join(root, 'labels', 'noisy_manifest.csv'),
                 '--clean-labels', os.path.join(root, 'labels', 'clean_manifest.csv'),
                 '--out', ssl_dir, '--val-fraction', str(settings.val_fraction),
                 '--examples-per-shard', '4', '--seed', str(seed)] + workers)
  if not os.path.exists(os.path.join(dfc_dir, 'dataset_info.json')):
    dfc2020.main(['--root', os.path.join(raw, 'dfc2020'), '--out', dfc_dir,
                  '--examples-per-shard', '16'] + workers)
  return {'ssl4eo': ssl_dir, 'dfc2020': dfc_dir,
          'label_agreement': summary['label_agreement']['overall']}


def pretrain(settings: StudySettings, method: Method, seed: int,
             dataset_dir: str) -> dict[str, Any]:
  """Pretrains (or resumes) one method and exports its encoders; returns the run record."""
  # pylint: disable=g-import-not-at-top
  import jax
  from cromss_jax import exports, train
  from cromss_jax.config_validation import validate_pretrain_config
  from cromss_jax.tasks import ablations
  from cromss_jax.tasks import pretrain as pretrain_task
  # pylint: enable=g-import-not-at-top
  base = _seed_dir(settings, seed)
  workdir = os.path.join(base, 'pretrain', method.key)
  export_dir = os.path.join(base, 'export', method.key)
  record_path = os.path.join(workdir, 'study_run.json')
  if os.path.exists(record_path):
    return _read_json(record_path)
  start = time.perf_counter()
  config = pretrain_config(settings, method, seed, dataset_dir)
  validate_pretrain_config(config, device_count=jax.device_count())
  if method.pretrain == 'single':
    task = ablations.create_single_modal_task(config, method.modalities[0])
  else:
    task = (ablations.create_selection_task(config) if method.selection
            else pretrain_task.create_pretrain_task(config))
  train.train_and_evaluate(config, workdir, task)
  paths = exports.export_pretrained(workdir, export_dir, overwrite=True)
  history = _read_json(os.path.join(workdir, 'history.json'))
  if not settings.keep_checkpoints:
    shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
  record = {'seed': seed, 'method': method.key, 'seconds': time.perf_counter() - start,
            'encoders': {m: paths[m] for m in method.modalities}, 'history': history,
            'final': history[-1] if history else {}}
  _write_json(record_path, record)
  return record


def transfer_one(settings: StudySettings, seed: int, dataset_dir: str, method: Method,
                 modality: str, setting: str, encoder_path: str) -> dict[str, Any]:
  """Transfers one encoder (or a random one) to the seed's DFC2020-style set; returns scores."""
  from cromss_jax.tasks import transfer  # pylint: disable=g-import-not-at-top
  base = _seed_dir(settings, seed)
  workdir = os.path.join(base, 'transfer', f'{method.key}_{modality}_{setting}')
  metrics_path = os.path.join(workdir, 'metrics.json')
  record_path = os.path.join(workdir, 'study_run.json')
  if os.path.exists(metrics_path) and os.path.exists(record_path):
    return _read_json(record_path)
  start = time.perf_counter()
  config = transfer_config(settings, seed, dataset_dir, modality, encoder_path, setting)
  transfer.run(config, workdir)
  scores = _read_json(metrics_path)
  if not settings.keep_checkpoints:
    shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
  record = {'seed': seed, 'method': method.key, 'modality': modality, 'setting': setting,
            'seconds': time.perf_counter() - start,
            **{k: scores[k] for k in ('oa', 'aa', 'miou', 'mf1', 'pixels')},
            'iou': {c: v['iou'] for c, v in scores['per_class'].items()}}
  _write_json(record_path, record)
  return record


@dataclasses.dataclass
class _Progress:
  """Elapsed time and an ETA from the cost units done so far (skipped work does not count)."""
  total_units: float
  start: float = dataclasses.field(default_factory=time.perf_counter)
  done_units: float = 0.0
  worked_units: float = 0.0
  worked_seconds: float = 0.0
  count: int = 0
  skipped: int = 0
  total: int = 0

  def finish(self, what: str, units: float, seconds: float, skipped: bool) -> None:
    self.count += 1
    self.skipped += int(skipped)
    self.done_units += units
    if not skipped:
      self.worked_units += units
      self.worked_seconds += seconds
    elapsed = time.perf_counter() - self.start
    if self.worked_units > 0:
      eta = _duration((self.total_units - self.done_units) * self.worked_seconds
                      / self.worked_units)
    else:
      eta = '?'
    status = 'done before' if skipped else f'{seconds:.0f} s'
    print(f'[{self.count}/{self.total}] {what}: {status}  (elapsed {_duration(elapsed)}, '
          f'ETA {eta})', flush=True)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _plan(settings: StudySettings) -> list[tuple[str, float]]:
  """(kind, cost units) of every job, for the ETA; units are rough seconds on 2 CPU cores."""
  pixels = (settings.crop / 96) ** 2 * settings.batch / 8
  steps = settings.epochs * settings.steps_per_epoch
  transfer_steps = settings.transfer_epochs * math.ceil(settings.dfc_train / settings.batch)
  transfer_pixels = (settings.transfer_crop / 128) ** 2 * settings.batch / 8
  jobs = []
  for _ in settings.seeds:
    jobs.append(('data', 5 + 0.6 * settings.locations))
    for key in settings.methods:
      method = METHODS_BY_KEY[key]
      if method.pretrain:
        per_step = 0.9 if method.pretrain == 'single' else 1.8
        jobs.append(('pretrain', 20 + steps * per_step * pixels))
      for _ in method.modalities:
        for setting in settings.settings:
          per_step = 0.12 if setting == 'frozen' else 0.35
          jobs.append(('transfer', 8 + transfer_steps * per_step * transfer_pixels))
  return jobs


def _cpu_seconds() -> float:
  """User + system CPU time of this process and its finished children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_study(settings: StudySettings) -> dict[str, Any]:
  """Runs (or resumes) the whole study; writes results.json, results.md and the plots."""
  os.makedirs(settings.out, exist_ok=True)
  start = time.perf_counter()
  cpu_start = _cpu_seconds()
  load_start = os.getloadavg()
  plan = _plan(settings)
  progress = _Progress(total_units=sum(u for _, u in plan), total=len(plan))
  units = iter(u for _, u in plan)
  pretrain_runs, transfer_runs, data_info = [], [], {}

  def timed(what: str, fn: Callable[[], Any], done_marker: str | None) -> Any:
    skipped = done_marker is not None and os.path.exists(done_marker)
    t = time.perf_counter()
    result = fn()
    progress.finish(what, next(units), time.perf_counter() - t, skipped)
    return result

  for seed in settings.seeds:
    base = _seed_dir(settings, seed)
    data = timed(f'seed {seed} data', lambda s=seed: prepare_data(settings, s),
                 os.path.join(base, 'tfds', 'dfc2020', 'dataset_info.json'))
    data_info[str(seed)] = data
    encoders = {}
    for key in settings.methods:
      method = METHODS_BY_KEY[key]
      if method.pretrain:
        record = timed(f'seed {seed} pretrain {key}',
                       lambda m=method, s=seed: pretrain(settings, m, s, data['ssl4eo']),
                       os.path.join(base, 'pretrain', key, 'study_run.json'))
        pretrain_runs.append(record)
        encoders[key] = record['encoders']
      else:
        encoders[key] = {m: 'random' for m in method.modalities}
    for key in settings.methods:
      method = METHODS_BY_KEY[key]
      for modality in method.modalities:
        for setting in settings.settings:
          name = f'{key}_{modality}_{setting}'
          record = timed(
              f'seed {seed} transfer {name}',
              lambda m=method, mod=modality, st=setting, s=seed: transfer_one(
                  settings, s, data['dfc2020'], m, mod, st, encoders[m.key][mod]),
              os.path.join(base, 'transfer', name, 'study_run.json'))
          transfer_runs.append(record)
  results_path = os.path.join(settings.out, 'results.json')
  invocations = _read_json(results_path).get('invocations', []) if os.path.exists(
      results_path) else []
  invocations.append({
      'wall_seconds': time.perf_counter() - start, 'cpu_seconds': _cpu_seconds() - cpu_start,
      'jobs_run': progress.count - progress.skipped, 'jobs_skipped': progress.skipped,
      'loadavg_start': list(load_start), 'loadavg_end': list(os.getloadavg()),
      'cpu_count': len(os.sched_getaffinity(0)),
      'finished': time.strftime('%Y-%m-%d %H:%M:%S %Z')})
  results = {
      'settings': dataclasses.asdict(settings),
      'methods': {m.key: m.label for m in METHODS if m.key in settings.methods},
      'data': data_info,
      'pretrain': pretrain_runs,
      'transfer': transfer_runs,
      'invocations': invocations,
  }
  _write_json(results_path, results)
  write_report(results, settings.out)
  return results


# ----------------------------------------------------------------------------------------------
# Aggregation, tables and plots
# ----------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; NaN for a single value), NaNs dropped."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return float('nan'), float('nan')
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float('nan')


def _fmt(values: Sequence[float], digits: int = 2) -> str:
  mean, std = mean_std(values)
  if not math.isfinite(mean):
    return '–'
  if not math.isfinite(std):
    return f'{mean:.{digits}f}'
  return f'{mean:.{digits}f} ± {std:.{digits}f}'


def transfer_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One row per (encoder modality, method): mean +- std strings of each setting's scores."""
  runs = results['transfer']
  settings = results['settings']['settings']
  rows = []
  for modality in ('s2', 's1'):
    for key, label in results['methods'].items():
      chosen = [r for r in runs if r['method'] == key and r['modality'] == modality]
      if not chosen:
        continue
      row = {'method': key, 'label': label, 'modality': modality,
             'seeds': len({r['seed'] for r in chosen})}
      for setting in settings:
        for metric in ('oa', 'aa', 'miou', 'mf1'):
          values = [r[metric] for r in chosen if r['setting'] == setting]
          row[f'{setting}_{metric}'] = values
      rows.append(row)
  return rows


PAIRED_COMPARISONS = (('cromss_mid', 'plain'), ('cromss_late', 'plain'),
                      ('cromss_mid', 'single'), ('plain', 'single'), ('cromss_mid', 'random'),
                      ('cromss_late', 'cromss_mid'))


def paired_differences(results: Mapping[str, Any], method: str, baseline: str, modality: str,
                       setting: str, metric: str = 'miou') -> list[float]:
  """Per-seed `metric` of `method` minus `baseline` (same seed, encoder and setting).

  baseline 'single' means the single-modal run of `modality` (s2_only or s1_only).
  """
  if baseline == 'single':
    baseline = f'{modality}_only'
  scores = {}
  for r in results['transfer']:
    if r['modality'] == modality and r['setting'] == setting:
      scores[(r['method'], r['seed'])] = r[metric]
  seeds = sorted({seed for (_, seed) in scores})
  return [scores[(method, s)] - scores[(baseline, s)] for s in seeds
          if (method, s) in scores and (baseline, s) in scores]


def selection_curves(results: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """{method: {history key: [seeds, epochs] array}} of the selection-quality entries."""
  curves: dict[str, dict[str, list]] = {}
  for run in results['pretrain']:
    history = run.get('history', [])
    if not history or 'sel_keep_ratio' not in history[0]:
      continue
    per_method = curves.setdefault(run['method'], {})
    for key in ['epoch'] + [k for k in history[0] if k.startswith('sel_')]:
      per_method.setdefault(key, []).append([h.get(key, float('nan')) for h in history])
  return {m: {k: np.asarray(v, np.float64) for k, v in d.items()} for m, d in curves.items()}


def markdown_report(results: Mapping[str, Any]) -> str:
  """results.md: transfer table, pretraining quality, selection quality, run time."""
  s = results['settings']
  lines = [f"# Noise-robustness study: {len(s['seeds'])} seed(s) {s['seeds']}, mean ± std "
           '(sample std over seeds), scores in %', '',
           f"Pretraining: {s['locations']} generated locations/seed, label noise {s['noise']}, "
           f"{s['encoder']}, {s['crop']} px crops, batch {s['batch']}, {s['epochs']} epochs x "
           f"{s['steps_per_epoch']} steps. Transfer: {s['decoder']}, {s['transfer_crop']} px, "
           f"{s['transfer_epochs']} epochs on {s['dfc_train']} patches, tested on "
           f"{s['dfc_test']} patches (central {s['transfer_crop']} px).", '']
  agreement = [d['label_agreement'] for d in results['data'].values()]
  lines += [f'Noisy/clean label agreement of the generated pretraining labels: '
            f'{_fmt([100 * a for a in agreement], 1)} %.', '']
  settings = s['settings']
  header = ['encoder', 'pretraining']
  for setting in settings:
    header += [f'{m} {SETTING_LABELS[setting]}' for m in ('OA', 'AA', 'mIoU', 'mF1')]
  lines += ['## Transfer to the DFC2020-style test split', '',
            '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in transfer_rows(results):
    cells = [row['modality'].upper(), row['label']]
    for setting in settings:
      cells += [_fmt(row[f'{setting}_{m}']) for m in ('oa', 'aa', 'miou', 'mf1')]
    lines.append('| ' + ' | '.join(cells) + ' |')

  labels = dict(results['methods'], single='(a/b) single-modal')
  comparisons = [(m, b) for m, b in PAIRED_COMPARISONS
                 if m in labels and (b in labels or b == 'single')]
  columns = [(m, st) for m in ('s2', 's1') for st in settings]
  if comparisons:
    lines += ['', '## Paired differences of transfer mIoU (same seed, same data): mean ± std '
              '[seeds where the first is better]', '',
              '| comparison | ' + ' | '.join(f'{m.upper()} {SETTING_LABELS[st]}'
                                            for m, st in columns) + ' |',
              '|---|' + '---|' * len(columns)]
    for method, baseline in comparisons:
      cells = [f'{labels[method]} − {labels[baseline]}']
      for modality, setting in columns:
        diffs = paired_differences(results, method, baseline, modality, setting)
        cells.append(f'{_fmt(diffs)} [{sum(d > 0 for d in diffs)}/{len(diffs)}]' if diffs
                     else '–')
      lines.append('| ' + ' | '.join(cells) + ' |')

  lines += ['', '## Pretraining: validation mIoU of each branch against the clean truth and '
            'against the noisy labels (last epoch)', '',
            '| pretraining | S2 vs clean | S2 vs noisy | S1 vs clean | S1 vs noisy | minutes |',
            '|---|---|---|---|---|---|']
  for key, label in results['methods'].items():
    runs = [r for r in results['pretrain'] if r['method'] == key]
    if not runs:
      continue
    cells = [label]
    for m in ('s2', 's1'):
      for ref in ('clean', 'noisy'):
        cells.append(_fmt([r['final'].get(f'miou_{ref}_{m}', float('nan')) for r in runs]))
    cells.append(_fmt([r['seconds'] / 60 for r in runs], 1))
    lines.append('| ' + ' | '.join(cells) + ' |')

  curves = selection_curves(results)
  for key, curve in curves.items():
    lines += ['', f'## Label-selection quality during {results["methods"][key]} '
              '(validation split; weights with the keep ratio of the epoch just trained)', '',
              'mean w: mean selection weight on pixels whose noisy label is correct / wrong; '
              'AUC: P(weight of a wrong label < weight of a correct one); AUC conf: the same for '
              "the entangled label confidence l' behind the weights.", '',
              '| epoch | keep ratio | wrong labels | S2 mean w correct / wrong | S2 AUC | '
              'S2 AUC conf | S1 mean w correct / wrong | S1 AUC | S1 AUC conf |',
              '|---|---|---|---|---|---|---|---|---|']
    for e in range(curve['epoch'].shape[1]):
      cells = [str(int(curve['epoch'][0, e])), _fmt(curve['sel_keep_ratio'][:, e], 3),
               _fmt(100 * curve['sel_s2_w_wrong_rate'][:, e], 1) + ' %']
      for m in ('s2', 's1'):
        cells += [f"{_fmt(curve[f'sel_{m}_w_mean_correct'][:, e], 3)} / "
                  f"{_fmt(curve[f'sel_{m}_w_mean_wrong'][:, e], 3)}",
                  _fmt(curve[f'sel_{m}_w_auc'][:, e], 3),
                  _fmt(curve[f'sel_{m}_conf_auc'][:, e], 3)]
      lines.append('| ' + ' | '.join(cells) + ' |')

  lines += ['', '## Run time', '']
  for i, inv in enumerate(results['invocations'], 1):
    lines.append(
        f"- invocation {i} (finished {inv['finished']}): {inv['wall_seconds'] / 60:.1f} min "
        f"wall, {inv['cpu_seconds'] / 60:.1f} min CPU on {inv['cpu_count']} core(s), "
        f"{inv['jobs_run']} jobs run, {inv['jobs_skipped']} already done; load average "
        f"(1/5/15 min) {', '.join(f'{x:.1f}' for x in inv['loadavg_start'])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in inv['loadavg_end'])} at the end.")
  lines.append('')
  return '\n'.join(lines)


def plot_miou(results: Mapping[str, Any], path: str) -> None:
  """Bars of mean transfer mIoU per method (frozen and fine-tuned), one panel per encoder."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = transfer_rows(results)
  settings = results['settings']['settings']
  panels = [m for m in ('s2', 's1') if any(r['modality'] == m for r in rows)]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
  colours = {'frozen': '#4c72b0', 'finetuned': '#dd8452'}
  width = 0.8 / len(settings)
  for ax, modality in zip(axes[0], panels):
    chosen = [r for r in rows if r['modality'] == modality]
    x = np.arange(len(chosen))
    for i, setting in enumerate(settings):
      values = [r[f'{setting}_miou'] for r in chosen]
      stats = [mean_std(v) for v in values]
      offset = (i - (len(settings) - 1) / 2) * width
      ax.bar(x + offset, [m for m, _ in stats], width,
             yerr=[0 if not math.isfinite(sd) else sd for _, sd in stats], capsize=3,
             color=colours[setting], label=SETTING_LABELS[setting])
      for j, v in enumerate(values):
        ax.plot(np.full(len(v), x[j] + offset), v, 'k.', ms=3)
    ax.set_xticks(x)
    ax.set_xticklabels([r['label'].replace(', ', ',\n') for r in chosen], rotation=30,
                       ha='right', fontsize=8)
    ax.set_ylabel('test mIoU (%)')
    ax.set_title(f'{modality.upper()} encoder -> {results["settings"]["decoder"]}')
    ax.grid(axis='y', alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle('Transfer mIoU, mean ± std over seeds (dots: seeds)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_selection(results: Mapping[str, Any], path: str) -> bool:
  """Per-epoch selection weights on correct vs wrong labels and their AUC; False if no data."""
  curves = selection_curves(results)
  if not curves:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']

  def band(ax, x, values, **kwargs):
    mean = np.nanmean(values, axis=0)
    line, = ax.plot(x, mean, marker='o', ms=3, **kwargs)
    if values.shape[0] > 1:
      std = np.nanstd(values, axis=0, ddof=1)
      ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)

  keep_drawn = False
  for c, (key, curve) in enumerate(curves.items()):
    x = curve['epoch'][0]
    label = results['methods'][key]
    if not keep_drawn:
      axes[0].plot(x, np.nanmean(curve['sel_keep_ratio'], axis=0), ':', color='grey',
                   label='keep ratio k(e)')
      keep_drawn = True
    for b, m in enumerate(('s2', 's1')):
      colour = colours[(2 * c + b) % len(colours)]
      name = f'{label} {m.upper()}'
      band(axes[0], x, curve[f'sel_{m}_w_mean_correct'], color=colour, linestyle='-',
           label=f'{name}: correct labels')
      band(axes[0], x, curve[f'sel_{m}_w_mean_wrong'], color=colour, linestyle='--',
           label=f'{name}: wrong labels')
      band(axes[1], x, curve[f'sel_{m}_w_auc'], color=colour, label=name)
      band(axes[2], x, curve[f'sel_{m}_conf_auc'], color=colour, label=name)
  axes[0].set_title('mean label-selection weight (solid: correct, dashed: wrong labels)',
                    fontsize=10)
  axes[1].set_title('AUC: low weight as a detector of wrong labels', fontsize=10)
  axes[2].set_title("AUC: low label confidence l' (before the class-wise cut)", fontsize=10)
  for ax in axes:
    ax.set_xlabel('epoch')
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes[1:]:
    ax.axhline(0.5, color='grey', lw=0.8)
  fig.suptitle('Label selection on the validation split (clean truth known), after each '
               'epoch; mean ± std over seeds')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write_report(results: Mapping[str, Any], out: str) -> dict[str, str]:
  """results.md and the two plots into `out`; returns their paths."""
  paths = {'md': os.path.join(out, 'results.md'), 'miou': os.path.join(out, 'study_miou.png'),
           'selection': os.path.join(out, 'study_selection.png')}
  with open(paths['md'], 'w') as f:
    f.write(markdown_report(results))
  if results['transfer']:
    plot_miou(results, paths['miou'])
  if not plot_selection(results, paths['selection']):
    del paths['selection']
  return paths


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def define_flags() -> None:
  """The command line; defined at run time, so importing this module defines no flags."""
  flags.DEFINE_string('out', None, 'Output folder of the study (resumes when rerun).')
  flags.DEFINE_integer('seeds', 3, 'Number of seeds (0, 1, ...); each has its own data.')
  flags.DEFINE_float('scale', 1.0, 'Multiplies locations, DFC patches and all epochs, for '
                     'bigger machines.')
  flags.DEFINE_integer('locations', 48, 'Pretraining locations per seed (x scale).')
  flags.DEFINE_float('noise', 0.3, 'Share of wrong pretraining label pixels (Dynamic World '
                     'disagrees with expert labels on about 30%).')
  flags.DEFINE_integer('epochs', 8, 'Pretraining epochs (x scale).')
  flags.DEFINE_integer('steps_per_epoch', 10, 'Pretraining steps per epoch.')
  flags.DEFINE_integer('crop', 96, 'Pretraining crop (multiple of 32).')
  flags.DEFINE_integer('batch', 8, 'Global batch of pretraining and transfer.')
  flags.DEFINE_enum('encoder', 'resnet18', ['resnet18', 'resnet34', 'resnet50'],
                    'Encoder of every run.')
  flags.DEFINE_integer('transfer_epochs', 10, 'Transfer epochs (x scale).')
  flags.DEFINE_integer('transfer_crop', 128, 'Transfer crop (multiple of 32, <= 256); the test '
                       'split is scored on its centre crop.')
  flags.DEFINE_integer('dfc_train', 24, 'DFC2020-style training patches (x scale).')
  flags.DEFINE_integer('dfc_test', 48, 'DFC2020-style test patches (x scale).')
  flags.DEFINE_enum('decoder', 'pspnet', ['pspnet', 'deeplabv3plus', 'fpn', 'unet'],
                    'Transfer decoder.')
  flags.DEFINE_list('methods', [m.key for m in METHODS], 'Methods to run.')
  flags.DEFINE_list('settings', list(SETTINGS), 'Transfer settings to run.')
  flags.DEFINE_integer('workers', 1, 'Processes of the data converters (1 = inline, the '
                       'fastest for the small generated sets).')
  flags.DEFINE_bool('keep_checkpoints', False, 'Keep the training checkpoints (by default '
                    'deleted once a run is exported or scored).')


def settings_from_flags() -> StudySettings:
  """StudySettings from the parsed command line (after define_flags)."""
  f = flags.FLAGS

  def scaled(value: int) -> int:
    return max(1, round(value * f.scale))

  return StudySettings(
      out=os.path.abspath(f.out), seeds=tuple(range(f.seeds)), locations=scaled(f.locations),
      noise=f.noise, dfc_train=scaled(f.dfc_train), dfc_test=scaled(f.dfc_test),
      epochs=scaled(f.epochs), steps_per_epoch=f.steps_per_epoch, crop=f.crop, batch=f.batch,
      encoder=f.encoder, transfer_epochs=scaled(f.transfer_epochs),
      transfer_crop=f.transfer_crop, decoder=f.decoder, methods=tuple(f.methods),
      settings=tuple(f.settings), workers=f.workers, keep_checkpoints=f.keep_checkpoints)


def configure_runtime(out: str) -> None:
  """CPU-friendly defaults: no GPU for TF, one persistent XLA cache under the output folder."""
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(out, 'xla_cache')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def main(argv):
  del argv
  from cromss_jax import logs  # pylint: disable=g-import-not-at-top
  logs.quiet_libraries()
  settings = settings_from_flags()
  configure_runtime(settings.out)
  results = run_study(settings)
  inv = results['invocations'][-1]
  print(f"\nStudy finished in {_duration(inv['wall_seconds'])} "
        f"(CPU {_duration(inv['cpu_seconds'])}). Results: {settings.out}/results.md, "
        'results.json, study_miou.png, study_selection.png', flush=True)
  with open(os.path.join(settings.out, 'results.md')) as f:
    print('\n' + f.read())


def run(*, flags_defined: bool = False) -> None:
  if not flags_defined:   # the shim (cromss_jax/study.py) defines them before adopting them
    define_flags()
  cli.run_absl(main)


if __name__ == '__main__':
  run()
