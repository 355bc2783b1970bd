"""One command-line convention for every tool of the project.

A user mistake (bad config value, missing file, bad input data, an output that would destroy an
input) is raised as a `UserError` anywhere in the library; the entry points below turn it into
one line `error: ...` on stderr and exit status 1. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, NoReturn, Sequence

EXIT_USER_ERROR = 1
# Preempted (SIGTERM) before the run was complete: the state is saved, rerun to continue. Distinct
# from success so that job schedulers requeue the job (143 = 128 + SIGTERM, the shell convention).
EXIT_PREEMPTED = 143


class UserError(Exception):
  """A problem the user can fix; its message says what is wrong and names the key or file."""


def fail(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr, flush=True)
  raise SystemExit(EXIT_USER_ERROR)


def _error_text(err: BaseException) -> str:
  text = str(err)
  if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                      NotADirectoryError)) and err.filename and err.filename not in text:
    text = f'{err.filename}: {err.strerror or text}'
  return ' '.join(text.split()) or type(err).__name__


# Errors of the operating system about a path the user gave count as user errors too.
_USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, PermissionError,
                IsADirectoryError, NotADirectoryError)


def guarded(main: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps `main` so that user errors become `error: ...` and exit status 1."""

  def wrapper(*args: Any, **kwargs: Any) -> Any:
    try:
      return main(*args, **kwargs)
    except _USER_ERRORS as err:
      fail(_error_text(err))

  wrapper.__name__ = getattr(main, '__name__', 'main')
  wrapper.__doc__ = main.__doc__
  return wrapper


def check_command_line(argv: Sequence[str], **required: Any) -> None:
  """No positional arguments, and every flag of `required` (name=value) given a value."""
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  missing = [f'--{name}' for name, value in required.items() if value in (None, '')]
  if missing:
    raise UserError(f'{" and ".join(missing)} {"is" if len(missing) == 1 else "are"} required '
                    '(see --help)')


def run_absl(main: Callable[[Sequence[str]], Any]) -> None:
  """`absl.app.run(main)` with the project's error convention, flag errors and config errors
  (`config_validation.parse_flags`) included."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from cromss_jax import config_validation  # pylint: disable=g-import-not-at-top
  app.run(guarded(main), flags_parser=config_validation.parse_flags)
