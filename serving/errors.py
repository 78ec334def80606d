"""Errors callers tell apart (kept free of heavy imports so the CLI can catch them cheaply)."""


class ModelLoadError(RuntimeError):
    """A model folder that must not be served: a checksum mismatch, a corrupt file, a provider fallback."""
