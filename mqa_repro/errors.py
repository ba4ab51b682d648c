"""User-facing errors: one readable sentence, a non-zero exit, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad spec, missing file, ...).

    The CLI prints ``str(err)`` on one line and exits with status 2.
    """


class SpecError(UserError):
    """An experiment spec that does not validate. The message names the file and the key."""

    def __init__(self, path, key: str, message: str):
        self.path, self.key = str(path), key
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {message}")


class ResumeError(UserError):
    """A checkpoint that does not continue the run asked for. ``why`` says what differs, ``advice`` what to do
    with ``train``; ``run`` gives its own advice (it has no --resume)."""

    def __init__(self, why: str, advice: str = ""):
        self.why, self.advice = why, advice
        super().__init__(f"--resume: {why}" + (f"; {advice}" if advice else ""))


class OutputError(UserError, OSError):
    """An output path that cannot be written (missing parent, a file in the way, read-only, disk full).

    A UserError (the CLI prints one line, exit 2) and still an OSError, so that callers that tolerate
    an unwritable optional file (a cache) keep doing so.
    """
