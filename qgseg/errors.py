"""Exceptions that the CLI turns into one clear line and an exit code."""
from __future__ import annotations


class QgsegError(Exception):
    """A failure with a message meant for the user. Exit code 1 (runtime failure)."""

    exit_code = 1


class InputError(QgsegError):
    """Bad usage, configuration or input data. Exit code 2."""

    exit_code = 2


class TrainingDiverged(QgsegError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 1


class ResumeRefused(InputError):
    """A resume refused before anything changed (exit 2): the run keeps the status it had."""

    keep_status = True


class CheckpointDamaged(InputError):
    """A checkpoint file that is truncated or otherwise not a readable torch file (exit 2)."""
