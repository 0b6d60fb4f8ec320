"""The error of ``fsr-compare``'s options and inputs (shared by its modules, which do not import each other)."""

from fsr.errors import FsrError


class CompareError(FsrError, ValueError):
    """Bad options or an unusable export; the message says what to do."""
