"""TensorBoard scalar summaries, written without TensorFlow.

Pretraining reads its records with grain and needs nothing else from TensorFlow; importing it
only for `tf.summary` cost ~9 s of CPU at every start (docs/PERFORMANCE.md). The `tensorboard`
package's own record framing and protos are pure Python and write the event files that
`tf.summary` writes and `tensorboard --logdir` reads. (Its `EventFileWriter` is not used: it
opens files through `tensorboard.compat.tf`, which imports TensorFlow wherever it is installed.)
"""
from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from etils import epath
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import record_writer

class ScalarWriter:
  """Appends scalar events to a new `events.out.tfevents.*` file in `logdir`.

  The file is created at the first write, and every write is flushed, so a killed run keeps
  all its summaries. A resumed run writes a file of its own beside the earlier ones (TensorBoard
  reads them as one run). `logdir` may be local or any path `etils.epath` opens (`gs://...`).
  """

  def __init__(self, logdir: str):
    self._logdir = epath.Path(logdir)
    self._records: record_writer.RecordWriter | None = None

  def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in values.items()])
    self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self) -> None:
    if self._records is not None:
      self._records.close()
      self._records = None

  def __enter__(self) -> ScalarWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _write(self, event: event_pb2.Event) -> None:
    if self._records is None:
      self._records = self._open()
    self._records.write(event.SerializeToString())
    self._records.flush()

  def _open(self) -> record_writer.RecordWriter:
    self._logdir.mkdir(parents=True, exist_ok=True)
    # Host, pid and a monotonic clock keep the files of several writers apart (tf.summary adds
    # a per-process counter instead).
    name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.'
            f'{time.monotonic_ns()}')
    records = record_writer.RecordWriter((self._logdir / name).open('wb'))
    # The first event of every event file names the format version (tf.summary writes it too).
    records.write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2')
                  .SerializeToString())
    return records
