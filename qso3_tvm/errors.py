"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class QSO3Error(Exception):
    """An error caused by the user's input (file, flag, molecule), with a message that names it."""


class BucketError(QSO3Error):
    """A call exceeds every static size bucket of a tuned artifact."""
