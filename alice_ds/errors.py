"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (a file, a flag, a datalist). The message names the file and
    the problem; `alice-ds` prints `error: <message>` and exits with status 2."""


class DataError(UserError):
    """A data file that cannot be used (corrupt, wrong dimensionality, NaN voxels, missing)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(UserError, ValueError):
    """A configuration value out of range: the message names the field (`sampler.mask_block`) and
    the value. Also a `ValueError`, for library callers that build a config section directly."""
