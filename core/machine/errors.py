"""Errors that the CLI turns into one clear line and an exit code (never a traceback)."""

from __future__ import annotations


class PtlabError(Exception):
    """Base: a message meant for the user.  exit_code: 2 bad input, 1 a finding, 3 a failed run."""

    exit_code = 2


class ConfigError(PtlabError):
    """Bad input: an option out of range, an unknown name, an impossible configuration."""

    exit_code = 2


class RunFailed(PtlabError):
    """A run that could not complete: a CPU process died, the watchdog fired, Ray failed."""

    exit_code = 3


class Stopped(Exception):
    """The run was stopped (time up, watchdog, another CPU failed, a finding that ends it):
    unwind and report."""


class OwnerDied(RuntimeError):
    """A lock's owner process died while holding it; waiters raise this instead of hanging."""


class Deadlock(RuntimeError):
    """The watchdog saw no progress for its limit; carries the lock dump."""
