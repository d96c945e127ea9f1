"""Fusion of several deletion requests' unlearning layers: Gram matrices of the layers' inputs, the
closed-form fusion, and the ledger of requests (add, undo, refuse). Imports :mod:`unlearn_fast.train`
and below."""

from .closed_form import DEFAULT_RHO, artifacts_in, check_compatible, fuse_artifacts, fuse_paths

__all__ = ["DEFAULT_RHO", "artifacts_in", "check_compatible", "fuse_artifacts", "fuse_paths"]
