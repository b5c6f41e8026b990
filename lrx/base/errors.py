"""Exceptions for what a user can fix: ``UserError`` (bad config, missing data, bad rank) and its
subclass ``TrainingDiverged`` (a NaN loss; lower the learning rate). The CLI prints either on one line."""
from __future__ import annotations

__all__ = ["UserError", "TrainingDiverged", "EXIT_INTERRUPTED", "interrupt"]

EXIT_INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C or SIGTERM


def interrupt(signum, frame):
    """A SIGTERM handler: raise KeyboardInterrupt, so that SIGTERM (schedulers, `timeout`) stops lrx as Ctrl-C does."""
    raise KeyboardInterrupt


class UserError(ValueError):
    """A mistake in the user's input. The CLI prints ``str(err)`` on one line and exits with code 2.

    Parameters
    ----------
    message : what is wrong, with the bad value and the allowed ones.
    file : the file the value came from, if any.
    key : the dotted config key, if any (e.g. ``decompose.bases``).
    """

    def __init__(self, message: str, file: str | None = None, key: str | None = None):
        self.file, self.key, self.message = file, key, message
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite. The checkpoint on disk (the last finished epoch) is kept;
    the model in memory holds the diverged weights and should not be used.

    Parameters
    ----------
    value : the first non-finite loss.
    epoch, step, steps : where it happened (1-based), of ``steps`` in the epoch.
    ckpt_path : the checkpoint that is kept, if known.
    last_good : the epoch that checkpoint holds, if known.
    """

    def __init__(self, value: float, epoch: int, step: int, steps: int, ckpt_path=None, last_good: int | None = None):
        self.value, self.epoch, self.step = value, epoch, step
        kept = f"; the checkpoint of epoch {last_good} is kept" if last_good is not None else ""
        super().__init__(f"the loss became {value} at epoch {epoch}, step {step} of {steps}; training stopped{kept}. "
                         "Lower the learning rate or the loss weights and run again",
                         file=str(ckpt_path) if ckpt_path is not None else None)
