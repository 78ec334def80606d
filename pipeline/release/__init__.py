"""The release: blessing, the gate, promotion, lineage."""


class ReleaseError(RuntimeError):
    """A release step that cannot go on; the champion is left as it was."""
