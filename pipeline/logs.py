"""Logging and terminal output in one place.

* ``configure_logging``: every record at INFO and up to a log file; on the
  terminal, ``pipeline.*`` at INFO and other libraries at WARNING (Python
  warnings only in the file).
* What a step subprocess prints (``pipeline.steps.run_step``) and what
  ``airflow dags test`` prints (``pipeline.services.airflow``) is read as
  segments ended by ``\\n`` or ``\\r``; tqdm meters among them are progress,
  not lines.
* ``summarize``: the one-line summary of a step's or task's JSON result, and
  ``mark``/``parse_mark``, the ``[finsent <name>] ...`` lines that carry
  summaries and throttled progress from a task to the terminal.
* ``StatusLine``: one terminal line rewritten in place with ``\\r`` (a
  progress bar), which a finished line replaces."""

from __future__ import annotations

import codecs
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OWN_LOGGERS = ("pipeline", "serving", "dags", "__main__")
# Libraries that install their own handler (and stop propagation) when imported:
# adopted, their records reach the file and obey the terminal's thresholds.
_LIBRARY_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey", "transformers")


def log_file_for(state_dir: Path, command: str) -> Path:
    """Where ``finsent <command>`` writes its full log."""
    return Path(state_dir) / "logs" / f"{command}.log"


def _own(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in _OWN_LOGGERS)


class TerminalFilter(logging.Filter):
    """Our loggers from ``own_level`` up, third-party ones from ``library_level``
    up; ``py.warnings`` (captured ``warnings.warn``) stays in the file."""

    def __init__(self, own_level: int = logging.INFO, library_level: int = logging.WARNING):
        super().__init__()
        self.own_level, self.library_level = own_level, library_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            return False
        return record.levelno >= (self.own_level if _own(record.name) else self.library_level)


def _ours(handler: logging.Handler) -> bool:
    return getattr(handler, "_finsent", False)


def configure_logging(log_file: Path | None = None, *, quiet: bool = False, stream: TextIO | None = None) -> Path | None:
    """Root logging for a ``finsent`` process: the full log (INFO and up, every
    library) in ``log_file`` when given, a concise one on ``stream`` (stderr).
    ``quiet``: our own INFO lines stay in the file too (``finsent demo`` prints
    its own progress). Calling it again replaces what it set up before."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _ours(h)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    terminal = logging.StreamHandler(stream if stream is not None else sys.stderr)
    terminal.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    terminal.addFilter(TerminalFilter(logging.WARNING if quiet else logging.INFO))
    handlers: list[logging.Handler] = [terminal]
    if log_file is not None:
        log_file = Path(log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8", delay=True)  # no file for a silent command
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        handler._finsent = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    # Off first: captureWarnings(True) does nothing if it believes it is on, though something
    # (warnings.catch_warnings on exit) may have put the previous showwarning back since.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    adopt_library_loggers()
    return log_file


def adopt_library_loggers(names: tuple[str, ...] = _LIBRARY_LOGGERS) -> None:
    """Routes the loggers of already imported libraries that set up their own
    stderr handler (MLflow, alembic, transformers) through the root handlers."""
    for name in names:
        if name.split(".")[0] not in sys.modules:
            continue
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        if logger.level in (logging.NOTSET, logging.DEBUG):
            logger.setLevel(logging.INFO)


# ---------------------------------------------------------------- reading output

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# tqdm's time bracket closes every meter: "[00:10<00:12,  1.80it/s]", "[00:00, 7.2 examples/s]".
_TQDM_TIME = re.compile(r"\[\d+:\d{2}(?::\d{2})?(?:<[^\],]*)?,[^\]]*(?:/s|/it)[^\]]*\]$")
_PERCENT = re.compile(r"(\d{1,3})%\|")


class Segments:
    """Splits a byte stream into text segments, each ended by ``\\n`` or ``\\r``
    (``\\r\\n`` within a chunk is a newline). Yields ``(text, ending)``; what
    is left at ``close`` comes with ending ``""``."""

    _SPLIT = re.compile(r"\r\n|\r|\n")

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, chunk: bytes | str) -> Iterator[tuple[str, str]]:
        text = self._pending + (self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk)
        start = 0
        for match in self._SPLIT.finditer(text):
            yield text[start:match.start()], "\n" if match.group() != "\r" else "\r"
            start = match.end()
        self._pending = text[start:]

    def close(self) -> Iterator[tuple[str, str]]:
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        if rest:
            yield rest, ""


def plain(text: str) -> str:
    """A segment without terminal escapes and trailing blanks."""
    return _ANSI.sub("", text).rstrip()


def clean(text: str) -> str:
    """A segment without terminal escapes and surrounding blanks."""
    return _ANSI.sub("", text).strip()


def parse_meter(text: str) -> str | None:
    """The tqdm meter a segment shows (``desc: 45%|####5 | 18/40 [00:10<00:12, 1.80it/s]``), or None."""
    text = clean(text)
    return text if text and _TQDM_TIME.search(text) else None


def meter_percent(meter: str) -> int | None:
    found = _PERCENT.search(meter)
    return int(found.group(1)) if found else None


# ---------------------------------------------------------------- marked lines

_MARK = re.compile(r"^\[finsent (?P<name>[\w.\[\]-]+)\] (?P<text>.*)$")


def mark(name: str, text: str) -> str:
    """A line that ``services.airflow`` shows on the terminal: ``[finsent <name>] <text>``."""
    return f"[finsent {name}] {text}"


def parse_mark(text: str) -> tuple[str, str] | None:
    found = _MARK.match(clean(text))
    return (found.group("name"), found.group("text")) if found else None


class ProgressThrottle:
    """Turns a step's tqdm meters into at most one marked progress line per
    ``interval`` seconds and percent, so a log (Airflow's task log, the
    ``dags test`` log) gets tens of progress lines, not thousands."""

    def __init__(self, name: str, write: Callable[[str], None], interval: float = 1.0, heartbeat: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.name, self._write, self.interval, self.heartbeat, self._clock = name, write, interval, heartbeat, clock
        self._last_time = float("-inf")
        self._last_percent: int | None = None
        self._unsent: str | None = None

    def update(self, meter: str) -> None:
        now, percent = self._clock(), meter_percent(meter)
        due = now - self._last_time >= self.interval and percent != self._last_percent
        finished = percent == 100 and self._last_percent != 100
        if due or finished or now - self._last_time >= self.heartbeat:
            self._send(meter, now, percent)
        else:
            self._unsent = meter

    def _send(self, meter: str, now: float, percent: int | None) -> None:
        self._write(mark(self.name, meter))
        self._last_time, self._last_percent, self._unsent = now, percent, None

    def flush(self) -> None:
        """The last meter, if it was held back (before the step's other lines and at its end)."""
        if self._unsent is not None:
            self._send(self._unsent, self._clock(), meter_percent(self._unsent))


# ---------------------------------------------------------------- summaries


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _counts(result: dict, what: str) -> str:
    return (f"{_n(result.get('rows_in', '?'))} {what} in: {_n(result.get('clean', '?'))} clean, "
            f"{_n(result.get('quarantined', '?'))} quarantined, {_n(result.get('duplicates', '?'))} duplicates")


def _ingest_labeled(result: dict) -> str:
    splits = result.get("splits") or {}
    split_text = "/".join(_n(splits.get(name, "?")) for name in ("train", "validation", "test"))
    text = f"{_counts(result, 'labeled rows')}; train/validation/test {split_text}"
    return text + ("; the test split differs from the frozen one" if result.get("test_changed") else "")


def _ingest_corpus(result: dict | None) -> str:
    return "no corpus (FINSENT_REUTERS_DIR unset)" if result is None else _counts(result, "corpus stories")


def _ingest_news(result: dict) -> str:
    day = result.get("date", "?")
    if result.get("status") == "no files":
        return f"news of {day}: no landing files"
    return f"news of {day}: {_counts(result, 'stories')}"


def _mlm_adapt(result: dict) -> str:
    before, after = result.get("perplexity_base"), result.get("perplexity_adapted")
    if after is None:
        return f"masked-LM adaptation skipped: {result.get('reason', '')}"
    verdict = "adapted model kept" if result.get("used") == "adapted" else "no gain beyond the margin, fine-tuning the base"
    return f"masked-LM perplexity {before:.2f} -> {after:.2f} after {result.get('steps', '?')} steps: {verdict}"


def _finetune(result: dict) -> str:
    return (f"best val macro-F1 {result.get('best_val_macro_f1', float('nan')):.4f} "
            f"(accuracy {result.get('best_val_accuracy', float('nan')):.4f}) "
            f"at epoch {result.get('best_epoch', '?')} of {result.get('epochs_run', '?')}")


def _test_metrics(metrics: dict) -> str:
    text = f"test accuracy {metrics.get('accuracy', float('nan')):.4f}, macro-F1 {metrics.get('macro_f1', float('nan')):.4f}"
    if "accuracy_allagree" in metrics:
        text += f", AllAgree accuracy {metrics['accuracy_allagree']:.4f}"
    return text


def _start_run(result: dict) -> str:
    if result.get("cached"):
        return (f"reused run {result.get('run_id')} (cache): version {result.get('model_version', '?')} was trained "
                "on the same data, code, config and base; no_cache=true trains anyway")
    return f"MLflow run {result.get('run_id')}"


def _register(result: dict) -> str:
    return f"registered {result.get('name', '?')} version {result.get('version', '?')} as @candidate"


def _export(result: dict) -> str:
    if result.get("reused"):
        return f"version {result.get('version', '?')} was released before: its files stay as they are"
    blessed = result.get("variants") or []
    refused = [name for name in (result.get("blessing") or {}) if name not in blessed]
    text = (f"version {result.get('version', '?')}: blessed {', '.join(blessed)}; "
            f"served on CPU: {result.get('default_cpu', '?')}")
    for name in refused:
        text += f"; {name} {result['blessing'][name]}"
    return text


def _gate(result: dict) -> str:
    if result.get("no_op"):
        return f"no-op: {result.get('reason', '')}"
    verdict = "promote" if result.get("promote") else "reject"
    return f"{verdict} version {result.get('candidate_version', '?')}: {result.get('reason', '')}"


def _infra_check(result: dict | None) -> str:
    if not result:
        return "skipped: the gate rejected the candidate"
    verdict = "passed" if result.get("passed") else "FAILED"
    return (f"infra check {verdict}: {result.get('requests')} requests, {result.get('errors')} errors, "
            f"p95 {result.get('p95_ms')} ms (SLO {result.get('slo_p95_ms')} ms)")


def _promote(result: dict) -> str:
    if result.get("no_op"):
        return f"no-op; champion stays version {result.get('champion_version')}"
    if result.get("promoted"):
        return f"champion is now version {result.get('champion_version')}"
    return f"not promoted; champion stays version {result.get('champion_version')}"


def _score_news(result: dict) -> str:
    if result.get("status") != "scored":
        return f"news of {result.get('date', '?')}: nothing to score"
    text = (f"news of {result['date']}: {_n(result.get('stories'))} stories ({_n(result.get('reprints'))} reprints) "
            f"scored as {_n(result.get('texts'))} texts by version {result.get('model_version', '?')}")
    shadow = result.get("shadow")
    return text + (f"; candidate v{shadow['candidate_version']} agrees on {shadow['agreement']:.1%}" if shadow else "")


def _build_index(result: dict) -> str:
    overall = result.get("overall")
    if not overall:
        return f"index of {result.get('date', '?')}: no stories"
    zscore = overall.get("zscore")
    z_text = "no z-score yet" if zscore is None else f"z-score {zscore:+.2f} over {overall.get('baseline_days')} days"
    return (f"index of {result['date']}: net sentiment {overall['net_mean']:+.3f} over {_n(overall['stories'])} "
            f"stories, {z_text}; {len(result.get('alerts') or [])} alerts")


def _detect_drift(result: dict) -> str:
    if result.get("status") != "checked":
        return f"drift of {result.get('date', '?')}: {result.get('status', 'not checked')}"
    fired = result.get("fired") or []
    return f"drift of {result['date']}: " + (f"DRIFT in {', '.join(fired)}" if fired else "within thresholds")


def _monitor(result: dict) -> str:
    return (f"{result.get('days_with_news', '?')} of {result.get('days', '?')} days with news, "
            f"{_n(result.get('stories'))} stories, {len(result.get('alerts') or [])} alerts, "
            f"{len(result.get('drifted_days') or [])} drifted days")


# Keys: `finsent` step names (what run_step runs) and "<dag>.<task>" for the
# tasks that run inside Airflow's process (their results come from its log).
_SUMMARIES: dict[str, Callable[[Any], str]] = {
    "mlm-adapt": _mlm_adapt,
    "finetune": _finetune,
    "evaluate": lambda result: _test_metrics(result.get("metrics") or {}),
    "register": _register,
    "export-onnx": _export,
    "gate": _gate,
    "ingest.ingest_labeled": _ingest_labeled,
    "ingest.ingest_corpus": _ingest_corpus,
    "ingest.ingest_news": _ingest_news,
    "ingest.version_data": lambda digest: f"data/ versioned with DVC ({str(digest)[:12]})",
    "train.start_run": _start_run,
    "release.gate": _gate,
    "release.infra_check": _infra_check,
    "release.promote": _promote,
    "monitor": _monitor,
    "monitor.score_news": _score_news,
    "monitor.build_index": _build_index,
    "monitor.detect_drift": _detect_drift,
    "monitor.trigger_retraining": lambda result: f"finsent-drift emitted for {result.get('date')} ({', '.join(result.get('fired', []))})",
}


def summarize(name: str, result: Any) -> str | None:
    """The one-line summary of a step's (or DAG task's) result, None for those
    without one; a result of an unexpected shape gives None, never an error."""
    summary = _SUMMARIES.get(name)
    if summary is None:
        return None
    try:
        return summary(result)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------- the terminal


class StatusLine:
    """A terminal line rewritten in place (``\\r``, padded, no newline): piped
    into a file it stays one line. ``line`` prints a finished line over it."""

    def __init__(self, stream: TextIO | None = None, width: int | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.width = width or max(40, shutil.get_terminal_size((100, 24)).columns - 1)
        self._shown = 0

    @property
    def open(self) -> bool:
        return self._shown > 0

    def show(self, text: str) -> None:
        text = text[: self.width]
        self.stream.write(text.ljust(self._shown) + "\r")
        self.stream.flush()
        self._shown = len(text)

    def line(self, text: str) -> None:
        self.stream.write(text.ljust(self._shown) + "\n")
        self.stream.flush()
        self._shown = 0

    def clear(self) -> None:
        if self._shown:
            self.stream.write(" " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0


def configure_cli_logging(command: str, state_dir: Path | None) -> Path | None:
    """``finsent <command>``'s logging: the full log in ``<state_dir>/logs/<command>.log``
    (none without a ``state_dir``: settings that could not be read); ``finsent
    demo`` keeps its own INFO lines off the terminal."""
    log_file = None if state_dir is None else log_file_for(state_dir, command)
    try:
        return configure_logging(log_file, quiet=command == "demo")
    except OSError:  # an unwritable state folder: log to the terminal only
        return configure_logging(None, quiet=command == "demo")
