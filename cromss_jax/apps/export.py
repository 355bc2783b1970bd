"""`python -m cromss_jax.export --workdir DIR --out EXPORT`: both encoders of a pretraining run.

  [--format orbax|safetensors]  how the variables are stored (safetensors: no pickles, readable
                                by any safetensors library); `exports.load_exported` reads both
  [--overwrite]                 replace an existing EXPORT (refused otherwise); the new export
                                is written aside and swapped in, so EXPORT is never half-written
"""
from __future__ import annotations

from typing import Sequence

from absl import flags

from cromss_jax import cli
from cromss_jax import constants

_WORKDIR = flags.DEFINE_string('workdir', None, 'Pretraining workdir (with checkpoints/).')
_OUT = flags.DEFINE_string('out', None, 'Export directory to write.')
_FORMAT = flags.DEFINE_enum('format', 'orbax', list(constants.EXPORT_FORMATS),
                            'Storage of the variables: orbax or safetensors.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing export directory.')


def main(argv: Sequence[str]) -> None:
  cli.check_command_line(argv, workdir=_WORKDIR.value, out=_OUT.value)
  from cromss_jax import exports  # pylint: disable=g-import-not-at-top
  paths = exports.export_pretrained(_WORKDIR.value, _OUT.value, overwrite=_OVERWRITE.value,
                                    fmt=_FORMAT.value)
  print(exports.describe(paths))


def run() -> None:
  cli.run_absl(main)


if __name__ == '__main__':
  run()
