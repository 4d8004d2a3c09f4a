"""Shared tensor kernels used by more than one method (one topic per module)."""
