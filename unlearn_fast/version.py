"""The package version (one place, read by the manifests and by packaging)."""

__version__ = "0.1.0"
