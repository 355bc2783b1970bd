"""Segmentation metrics from one accumulated confusion matrix (docs/METHOD.md §6).

The matrix is accumulated on the device over the whole split (rows = reference, columns =
prediction) and the scores are computed once from it, as the paper does: OA, AA (mean per-class
recall), mIoU, mF1 and per-class IoU / F1. Classes absent from both reference and prediction are
left out of the means (their per-class scores are NaN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     mask: jax.Array | None = None) -> jax.Array:
  """int32 [C, C] counts; labels outside [0, C) (e.g. the ignore label 255) are skipped."""
  labels = labels.reshape(-1).astype(jnp.int32)
  predictions = predictions.reshape(-1).astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  if mask is not None:
    valid &= mask.reshape(-1).astype(bool)
  index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
  counts = jnp.bincount(index, length=num_classes * num_classes + 1)[:-1]
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def scores_from_confusion(matrix: np.ndarray) -> dict[str, float | list[float]]:
  """OA, AA, mIoU, mF1 (in %) and per-class IoU / F1 / recall / precision from a [C, C] matrix."""
  m = np.asarray(matrix, np.float64)
  total = m.sum()
  tp = np.diag(m)
  ref = m.sum(axis=1)
  pred = m.sum(axis=0)
  present = (ref + pred) > 0
  with np.errstate(invalid='ignore', divide='ignore'):
    recall = np.where(ref > 0, tp / ref, np.nan)
    precision = np.where(pred > 0, tp / pred, np.nan)
    iou = np.where(present, tp / (ref + pred - tp), np.nan)
    f1 = np.where(present, 2 * tp / (ref + pred), np.nan)

  def mean(values: np.ndarray, where: np.ndarray) -> float:
    return float(np.mean(values[where]) * 100) if where.any() else float('nan')

  return {
      'oa': float(tp.sum() / total * 100) if total else float('nan'),
      'aa': mean(recall, ref > 0),
      'miou': mean(iou, present),
      'mf1': mean(f1, present),
      'iou': [float(v * 100) for v in iou],
      'f1': [float(v * 100) for v in f1],
      'recall': [float(v * 100) for v in recall],
      'precision': [float(v * 100) for v in precision],
      'pixels': int(total),
  }


def markdown_table(rows: dict[str, dict], class_names: tuple[str, ...]) -> str:
  """One row per model/setting: OA, AA, mIoU, mF1 and per-class IoU."""
  header = ['model', 'OA', 'AA', 'mIoU', 'mF1'] + [f'IoU {c}' for c in class_names]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for name, s in rows.items():
    cells = [name] + [f"{s[k]:.2f}" for k in ('oa', 'aa', 'miou', 'mf1')]
    cells += [f'{v:.2f}' for v in s['iou']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
