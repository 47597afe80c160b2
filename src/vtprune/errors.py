"""One base exception and a few typed subclasses.

User errors (bad input, missing files, unsupported models) derive from ``VtpruneError`` and are turned
into one line on stderr with exit code 2 by the CLI. ``InternalError`` marks our own bugs.
"""

from __future__ import annotations


class VtpruneError(Exception):
    """Base class for every error a user can cause and fix."""


class ConfigError(VtpruneError):
    """A configuration value is out of range or inconsistent."""


class CheckpointError(VtpruneError):
    """A checkpoint directory is missing, malformed or holds weights we refuse to load."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture has no registered adapter."""


class PickleWeightsError(CheckpointError):
    """The checkpoint only holds pickle weights (.bin/.pt) and pickle loading was not allowed."""


class InputError(VtpruneError):
    """An image or prompt cannot be used as given."""


class BudgetError(ConfigError):
    """A token budget does not fit the visual tokens the model produced."""


class BackendUnavailableError(VtpruneError):
    """An optional backend is not installed; the message names the extra to install."""


class ValidationError(VtpruneError):
    """Outputs of two backends or two code paths disagree."""


class InternalError(Exception):
    """A bug in vtprune, not in the user's input. Deliberately not a VtpruneError."""


class ExportError(VtpruneError):
    """Exporting a model to ONNX failed."""


class AccuracyError(ValidationError):
    """An exported graph disagrees with the PyTorch reference beyond tolerance; holds a per-output table."""

    def __init__(self, message: str, table: list[dict]) -> None:
        super().__init__(message)
        self.table = table


class BundleError(VtpruneError):
    """A bundle directory is missing, incomplete, tampered with, or would overwrite something."""


class ReportError(VtpruneError):
    """A latency report is missing, unreadable, of another schema version, or malformed."""


class ComparisonError(ReportError):
    """Reports that measure different things were compared without ``--force``."""


class EngineBuildError(VtpruneError):
    """TensorRT could not turn an ONNX graph into an engine."""


class OnnxParseError(EngineBuildError):
    """The TensorRT ONNX parser rejected nodes; ``issues`` holds one entry per parser error."""

    def __init__(self, message: str, issues: list) -> None:
        super().__init__(message)
        self.issues = issues
