"""Errors that reach users as a one-line message (the CLI prints them without a traceback)."""


class UnlearnFastError(Exception):
    """A user-facing error: bad input, a missing file, a refused operation.

    The CLI catches this class and prints ``error: <message>`` with exit status 2;
    anything else is a bug and keeps its traceback.
    """


class DataError(UnlearnFastError):
    """The forget or retain data cannot be used as given."""


class ArtifactError(UnlearnFastError):
    """An unlearning artifact is missing, tampered with, or belongs to another base model."""


class OutputError(ArtifactError):
    """An output cannot be written where asked: it exists and is not ours to replace, it is or
    holds an input, or the file system refuses (read-only, full, a file in the way)."""


class ModelError(UnlearnFastError):
    """The model cannot carry unlearning layers (unsupported structure, missing head)."""


class TrainingError(UnlearnFastError):
    """Training cannot go on (for example a NaN or infinite loss)."""
