"""Readable logs: INFO from this project, only WARNING and above from the libraries below it.

Orbax, TFDS and XLA log every file they touch at INFO, which would drown the progress lines.
"""
from __future__ import annotations

import logging as std_logging
import os

from absl import logging

_OWN_PACKAGES = (os.sep + 'cromss_jax' + os.sep, os.sep + 'data_prep' + os.sep)


class _ProjectInfoFilter(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return any(part in record.pathname for part in _OWN_PACKAGES)


def quiet_libraries() -> None:
  """Call once in an entry point, after absl has parsed flags."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _ProjectInfoFilter) for f in handler.filters):
    handler.addFilter(_ProjectInfoFilter())
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
