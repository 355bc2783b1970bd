"""`python -m cromss_jax.import_weights --checkpoint FILE --out EXPORT`: published PyTorch weights.

Reads, without torch and without running any code from the file (`cromss_jax.torch_weights`):
* a CromSS PyTorch Lightning checkpoint (mid or late fusion): writes both encoders and the
  whole network (`pretrain_model`), which `python -m cromss_jax.predict --model EXPORT` maps
  scenes with;
* a torchvision/timm-style ResNet state dict (e.g. SSL4EO-S12 / TorchGeo backbones), S1 (2
  input bands) or S2 (13, 12, 9 or 3): writes that one encoder, for transfer.
The encoder depth, bands and fusion are read from the tensor shapes; the JSON metadata records
the source file and its sha256.

  [--prefix module.encoder_q.]  take the ResNet under this key prefix (other keys ignored)
  [--format orbax|safetensors]  storage of the variables (as `python -m cromss_jax.export`)
  [--overwrite]                 replace an existing EXPORT (refused otherwise)
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from cromss_jax import cli
from cromss_jax import constants

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'PyTorch checkpoint (.ckpt, .pth, .pt).')
_OUT = flags.DEFINE_string('out', None, 'Export directory to write.')
_PREFIX = flags.DEFINE_string('prefix', None, 'Key prefix of the ResNet to take, e.g. '
                              '"module.encoder_q." (default: found from the keys).')
_FORMAT = flags.DEFINE_enum('format', 'orbax', list(constants.EXPORT_FORMATS),
                            'Storage of the variables: orbax or safetensors.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing export directory.')


def main(argv: Sequence[str]) -> None:
  cli.check_command_line(argv, checkpoint=_CHECKPOINT.value, out=_OUT.value)
  # pylint: disable=g-import-not-at-top
  from cromss_jax import exports
  from cromss_jax import logs
  from cromss_jax import torch_weights
  # pylint: enable=g-import-not-at-top
  logs.quiet_libraries()
  paths = torch_weights.import_checkpoint(_CHECKPOINT.value, _OUT.value, prefix=_PREFIX.value,
                                          overwrite=_OVERWRITE.value, fmt=_FORMAT.value)
  print(exports.describe(paths))


def run() -> None:
  cli.run_absl(main)


if __name__ == '__main__':
  run()
