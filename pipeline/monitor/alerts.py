"""Alert delivery: a log line per alert and, when a webhook is configured, one
JSON POST per day with its alerts, retried; a webhook that is down is
logged, never raised: the index is written whatever the receiver does."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)


def post_webhook(url: str, payload: dict, attempts: int = 3, backoff_s: float = 1.0, timeout_s: float = 5.0) -> dict:
    """``{"delivered": bool, "attempts": n, "status": http status or None, "error": text or None}``."""
    body = json.dumps(payload, default=str).encode()
    error = None
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return {"delivered": True, "attempts": attempt, "status": response.status, "error": None}
        except urllib.error.HTTPError as err:
            error = f"HTTP {err.code}"
            if err.code < 500 and err.code != 429:  # the receiver refused the payload: retrying will not help
                break
        except (urllib.error.URLError, OSError) as err:
            error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    log.warning("alert webhook %s not delivered after %d attempt(s): %s", url, attempt, error)
    return {"delivered": False, "attempts": attempt, "status": None, "error": error}


def describe(alert: dict) -> str:
    return (f"ALERT {alert['day']} {alert['dimension']}={alert['key']}: net sentiment {alert['net_mean']:+.3f}, "
            f"z-score {alert['zscore']:+.2f} over {alert['baseline_days']} baseline days, {alert['stories']} stories")
