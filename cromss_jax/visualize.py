"""PNG panels of a validation sample, so a user can see what the two branches learn."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
from matplotlib.colors import ListedColormap  # noqa: E402

from cromss_jax import constants  # noqa: E402
from cromss_jax import models
from cromss_jax import objective  # noqa: E402
from cromss_jax import utils  # noqa: E402


def class_colormap(num_classes: int) -> ListedColormap:
  palette = np.asarray(constants.DW_PALETTE[:num_classes], np.float32) / 255.0
  return ListedColormap(palette)


def s2_rgb(s2: np.ndarray, s2_bands: int) -> np.ndarray:
  """RGB (B4, B3, B2) of a uint8 S2 tile with the configured band subset, contrast-stretched."""
  subset = constants.S2_BAND_SUBSETS[s2_bands]
  channels = [subset.index(b) for b in (3, 2, 1)]
  rgb = s2[..., channels].astype(np.float32)
  lo, hi = np.percentile(rgb, 2), np.percentile(rgb, 98)
  return np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1)


def write_pretrain_panel(model, obj_cfg: ml_collections.ConfigDict, params, batch_stats,
                         batch: dict[str, np.ndarray], epoch: int, path: str) -> None:
  """S2 RGB, S1 VV, noisy (and clean) label, both predictions and both weight maps."""
  sample = {k: np.asarray(v[:1]) for k, v in batch.items()}
  s1 = models.unit_float(sample['s1'])
  s2 = models.unit_float(sample['s2'])
  z1, z2 = model.apply({'params': params, 'batch_stats': batch_stats}, s1, s2, train=False)
  prior = (objective.smoothing_prior(jnp.asarray(sample['season_labels']),
                                     jnp.asarray(sample['season']), obj_cfg)
           if obj_cfg.label_smoothing else None)
  _, aux = objective.cromss_loss(z1, z2, jnp.asarray(sample['labels']), prior,
                                 jnp.float32(epoch), obj_cfg)
  aux = jax.device_get(aux)
  num_classes = obj_cfg.num_classes
  cmap = class_colormap(num_classes)
  tiles = [('S2 RGB', s2_rgb(sample['s2'][0], sample['s2'].shape[-1]), None),
           ('S1 VV', sample['s1'][0, ..., 0], 'gray'),
           ('noisy label', sample['labels'][0], cmap)]
  if 'clean_labels' in sample:
    tiles.append(('clean label', sample['clean_labels'][0], cmap))
  tiles += [('S1 prediction', np.argmax(np.asarray(z1[0]), -1), cmap),
            ('S2 prediction', np.argmax(np.asarray(z2[0]), -1), cmap),
            ('S1 label weight', aux['seg_weights_s1'][0], 'viridis'),
            ('S2 label weight', aux['seg_weights_s2'][0], 'viridis')]
  fig, axes = plt.subplots(1, len(tiles), figsize=(2.4 * len(tiles), 2.8))
  for ax, (title, image, colormap) in zip(axes, tiles):
    if colormap is cmap:
      ax.imshow(image, cmap=cmap, vmin=-0.5, vmax=num_classes - 0.5, interpolation='nearest')
    elif colormap == 'viridis':
      ax.imshow(image, cmap='viridis', vmin=0, vmax=1)
    else:
      ax.imshow(image, cmap=colormap)
    ax.set_title(title, fontsize=8)
    ax.axis('off')
  fig.suptitle(f'epoch {epoch}', fontsize=9)
  fig.tight_layout()
  with utils.atomic_output(path) as tmp:
    fig.savefig(tmp, dpi=80, format='png')
  plt.close(fig)
