"""User-facing errors.

Anything a user can cause (bad config, missing files, a run that does not match its
artifacts) raises :class:`DveError` with one line that says what is wrong and, where
possible, what to do. The CLI prints that line and exits with :data:`EXIT_USER_ERROR`;
a traceback means a bug in dve, never a mistake by the user.
"""

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class DveError(Exception):
    """A problem with the user's input or files, reported as one line."""


class ConfigError(DveError):
    """The composed configuration is invalid."""


class ArtifactError(DveError):
    """A run directory is missing a file, holds a truncated one, or does not match the request."""
