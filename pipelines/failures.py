"""Errors that a retry would only repeat: found in any wrapping, carried as one line, never retried by Ray Train.

A bad config value, a corrupt sample or missing weights fail the same way on every attempt, so retrying them under
``train.max_failures`` only multiplies the tracebacks. Worker crashes and lost nodes (anything else) are retried.

- Inside a worker, :func:`fail_fast` turns such an error into a :class:`DeterministicError`: its one-line message
  survives the trip to the Ray Train controller, where an exception's ``__cause__`` chain does not.
- On the controller, ``pipelines.handoff.FailFastCallback`` ends the run at the first one instead of retrying it.
- On the driver, :func:`deterministic_cause` finds it again in what ``trainer.fit`` raises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class RunError(Exception):
    """A run or sweep failed; the message is one line for people (the CLI prints it and exits 2)."""


class DeterministicError(RunError):
    """An error that every retry would raise again (bad config or data, missing weights)."""


#: Error types that a retry raises again. ConfigError and cvtasks' DataFormatError are ValueErrors.
DETERMINISTIC: tuple[type[BaseException], ...] = (DeterministicError, ValueError, FileNotFoundError)


def _wrapped(error: BaseException) -> list[BaseException]:
    """The errors ``error`` wraps: Ray Train's controller / worker failures, a Ray task's cause, Python's chain."""
    inner = [getattr(error, "controller_failure", None), *getattr(error, "worker_failures", {}).values(),
             getattr(error, "cause", None), error.__cause__, error.__context__]
    return [e for e in inner if isinstance(e, BaseException)]


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and everything it wraps, outermost first, each once."""
    seen: list[BaseException] = []
    pending = [error]
    while pending:
        current = pending.pop(0)
        if any(current is e for e in seen):
            continue
        seen.append(current)
        pending += _wrapped(current)
    return seen


def deterministic_cause(error: BaseException) -> BaseException | None:
    """The first deterministic error in ``error``'s wrappings, or None when a retry might succeed.

    Ray's own wrappers (``RayTaskError`` is also an instance of the error it carries) are looked through: their text
    is a remote traceback, not a message.
    """
    from ray.exceptions import RayError  # here: the CLI imports this module before it needs Ray

    for current in _chain(error):
        if isinstance(current, DETERMINISTIC) and not isinstance(current, RayError):
            return current
    return None


def root_cause(error: BaseException) -> BaseException:
    """The deterministic cause if there is one, else the innermost error that is not one of Ray's wrappers."""
    from ray.exceptions import RayError

    found = deterministic_cause(error)
    if found is not None:
        return found
    plain = [e for e in _chain(error) if not isinstance(e, RayError)]
    return plain[-1] if plain else error


def one_line(error: BaseException) -> str:
    """What went wrong, in one line: a deterministic error's own message, else ``Type: first line``."""
    cause = root_cause(error)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = lines[0] if lines else type(cause).__name__
    if isinstance(cause, (RunError, ValueError)):
        return text
    return f"{type(cause).__name__}: {text}"


def fail_fast(train_fn: F) -> F:
    """Decorate a Ray Train worker function: a deterministic error leaves it as a :class:`DeterministicError`."""

    @functools.wraps(train_fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return train_fn(*args, **kwargs)
        except Exception as error:
            if deterministic_cause(error) is None:
                raise
            raise DeterministicError(one_line(error)) from error

    return wrapper  # type: ignore[return-value]

