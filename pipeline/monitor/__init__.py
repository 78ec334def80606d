"""Daily news sentiment monitoring: scoring, reprints, the index, alerts, drift, the report."""


class MonitorError(RuntimeError):
    """A day cannot be monitored; the message says why and what to do."""
