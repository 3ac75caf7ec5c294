"""User-facing errors.

Anything a user can cause (bad config, missing files, a run that does not match its
artifacts) raises :class:`DveError` with one line that says what is wrong and, where
possible, what to do. The CLI prints that line and exits with :data:`EXIT_USER_ERROR`;
a traceback means a bug in dve, never a mistake by the user. An operating-system error
(a full disk, a folder without permission) is one line with the path, exit 2; anything
else is one line and exit 1, with the traceback under ``DVE_DEBUG=1``.
"""

EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class DveError(Exception):
    """A problem with the user's input or files, reported as one line."""


class ConfigError(DveError):
    """The composed configuration is invalid."""


class ArtifactError(DveError):
    """A run directory is missing a file, holds a truncated one, or does not match the request."""


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what to do about a full disk."""
    import errno

    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
    text = exc.strerror or str(exc) or type(exc).__name__
    line = f"{text}: {where}" if where else text
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        line += " (free some space and rerun: finished work is kept and the run resumes)"
    return line
