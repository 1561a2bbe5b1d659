"""ldmkit's error types for mistakes a user can fix: a bad option, a missing file, a run folder in use.

The `ldmkit` command prints these in one line (`error: ...`) and exits with status 2; any other exception is a
defect or an environment failure (out of memory, a shape bug) and keeps its traceback. Each type also derives
from the built-in exception it refines, so `except ValueError` in calling code keeps working.
Every message says what was wrong and what to do instead.
"""

from __future__ import annotations


class LdmkitError(Exception):
    """A mistake in what the user asked for; the message says what to change."""


class InputError(LdmkitError, ValueError):
    """A bad argument or setting value: out of range, not finite, of the wrong kind."""


class ConfigError(InputError):
    """A configuration file or setting that cannot be used (the message names the key or the file)."""


class MissingFileError(LdmkitError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class CheckpointError(LdmkitError, ValueError):
    """A checkpoint that is missing, unreadable or of the wrong kind."""


class RunFolderError(LdmkitError, FileExistsError):
    """A run folder that holds another run, or that another process is writing."""


class DeviceError(LdmkitError, RuntimeError):
    """A device that was asked for but is not available."""


class NonFiniteError(LdmkitError, FloatingPointError):
    """NaN or infinite values where finite numbers are needed (a loss, sampled latents, weights)."""


class MissingDependencyError(LdmkitError, ImportError):
    """An optional package a feature needs is not installed (the message says what to install)."""


class OutputExistsError(LdmkitError, FileExistsError):
    """An output path exists and the command was not told to replace it."""


class OutputWriteError(LdmkitError, OSError):
    """An output could not be written after the work was done (a full disk, a folder removed meanwhile); the
    message says where the results were saved instead."""


class DiskSpaceError(LdmkitError, OSError):
    """Too little free disk space for a file ldmkit must write; the message says how much it needs and where, and
    that nothing half-written was left."""
