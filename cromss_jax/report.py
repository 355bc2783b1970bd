"""Reports of a scored split: metrics.json, a Markdown table and the confusion-matrix figure."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cromss_jax import metrics as metrics_lib
from cromss_jax import utils


def _finite_or_none(value: float) -> float | None:
  return None if value is None or not math.isfinite(value) else float(value)


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
  with utils.atomic_output(path) as tmp:
    fig.savefig(tmp, dpi=120, format='png', bbox_inches='tight')
  plt.close(fig)


def write_report(out_dir: str, scores: Mapping[str, Any], *, name: str,
                 names: Sequence[str], model: Mapping[str, Any], step: int,
                 suffix: str = '') -> dict[str, str]:
  """metrics{suffix}.json, metrics{suffix}.md, confusion_matrix{suffix}.png; returns paths.

  `scores` as metrics.scores_from_confusion gives them plus 'confusion_matrix', 'split',
  'samples' and 'loss'; `name` labels the Markdown row, `model` describes what was scored.
  """
  os.makedirs(out_dir, exist_ok=True)
  names = tuple(names)
  cm = np.asarray(scores['confusion_matrix'], np.int64)
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
      'model': dict(model),
  }
  paths = {kind: os.path.join(out_dir, f'{stem}{suffix}.{ext}') for kind, stem, ext in
           (('json', 'metrics', 'json'), ('md', 'metrics', 'md'),
            ('png', 'confusion_matrix', 'png'))}

  utils.write_text(paths['json'], json.dumps(payload, indent=1))
  utils.write_text(paths['md'], f'Split `{scores["split"]}`, step {step}, '
                   f'{int(scores["pixels"]):,} labelled pixels; scores in %.\n\n'
                   + metrics_lib.markdown_table({name: dict(scores)}, names))
  plot_confusion_matrix(cm, names, f'{name}\n{scores["split"]}: mIoU {scores["miou"]:.2f}  '
                        f'OA {scores["oa"]:.2f}', paths['png'])
  return paths
