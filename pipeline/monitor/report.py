"""The morning report on the daily news sentiment index: one self-contained HTML page
(inline CSS, plots as inline base64 PNGs) for the analyst and the ML engineer."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
# Figure without pyplot: no global figure registry, no backend switch; savefig uses Agg for PNG.
from matplotlib.figure import Figure

TOP_TOPICS = 6
ALERT, NET, DECAYED, BAR, LOW = "#d62728", "#1f77b4", "#ff7f0e", "#7f7f7f", "#d9d9d9"
SHARE_COLORS = {"negative_share": "#d62728", "neutral_share": "#bdbdbd", "positive_share": "#2ca02c"}
NUMERIC = {"stories", "net_mean", "positive_share", "negative_share", "neutral_share", "confidence_mean",
           "decayed_net", "zscore", "baseline_days", "threshold", "value", "texts", "agreement"}
COUNTS = {"stories", "baseline_days", "texts"}
OVERALL_COLUMNS = ["day", "stories", "net_mean", "positive_share", "negative_share", "decayed_net", "zscore",
                   "baseline_days", "low_coverage"]
ALERT_COLUMNS = ["day", "dimension", "key", "net_mean", "zscore", "stories", "baseline_days", "threshold",
                 "model_version"]
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.facts{display:flex;flex-wrap:wrap;gap:1em}.facts div{background:#f3f3f3;padding:.4em .8em;border-radius:4px}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{border:1px solid #ddd;padding:.2em .5em}
td{text-align:right}th{background:#f3f3f3}img{max-width:100%}.empty{color:#777;font-style:italic}
footer{margin-top:2em;font-size:.85em;color:#555;border-top:1px solid #ccc;padding-top:.6em}"""
FOOTER = ("Net sentiment is P(positive) &minus; P(negative), averaged over a day's stories, in [&minus;1, 1]. "
          "The z-score compares a day with the trailing 30 days that have stories (how many there were is the "
          "baseline_days column). Low coverage: fewer stories than the minimum; such days are drawn as hollow "
          "markers, are left out of baselines and never alert.")


def _prepared(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy sorted by day, with `date` as real dates, numbers as floats (None -> NaN), flags as bools."""
    out = frame.copy()
    out["date"] = pd.to_datetime(out["day"])
    for column in NUMERIC & set(out.columns):
        out[column] = pd.to_numeric(out[column], errors="coerce")
    for column in {"low_coverage", "drifted"} & set(out.columns):
        out[column] = out[column].astype("boolean").fillna(False).astype(bool)
    return out.sort_values("date", kind="stable").reset_index(drop=True)


def _plain(text: object) -> str:
    """Data text as matplotlib shows it verbatim: `$` would otherwise start mathtext (cashtags)."""
    return str(text).replace("$", r"\$")


def _daily(rows: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """One row per calendar day; missing days become NaN rows so lines break at gaps instead of bridging them."""
    rows = rows.drop_duplicates("date", keep="last").set_index("date")
    return rows.reindex(pd.date_range(start, end, freq="D"))


def _date_axis(ax: Axes) -> None:
    """Call after plotting: a span under three days is widened so that ticks stay whole days, not hours."""
    left, right = ax.get_xlim()
    if right - left < 3:
        ax.set_xlim((left + right) / 2 - 1.5, (left + right) / 2 + 1.5)
    locator = AutoDateLocator(minticks=2, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))


def _alert_dates(alerts: pd.DataFrame, dimension: str, key: str) -> list[pd.Timestamp]:
    chosen = (alerts["dimension"] == dimension) & (alerts["key"].astype(str) == str(key))
    return sorted(alerts.loc[chosen, "date"].unique())


def _plot_net(ax: Axes, daily: pd.DataFrame, alert_dates: list[pd.Timestamp], decayed: bool) -> None:
    half_day = pd.Timedelta(hours=12)
    for number, date in enumerate(alert_dates):
        ax.axvspan(date - half_day, date + half_day, color=ALERT, alpha=0.2, lw=0,
                   label="alert" if number == 0 else "_nolegend_")
    low = daily["low_coverage"].eq(True)
    ax.plot(daily.index, daily["net_mean"].where(~low), "o-", color=NET, ms=4, label="net mean")
    if daily["net_mean"][low].notna().any():
        ax.plot(daily.index[low], daily["net_mean"][low], "o", mfc="none", color=NET, ms=7, label="low coverage")
    if decayed:
        ax.plot(daily.index, daily["decayed_net"], "-", color=DECAYED, label="decayed average")
    ax.axhline(0, color=BAR, lw=0.6)
    _date_axis(ax)


def _legend_above(ax: Axes) -> None:
    ax.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=4, fontsize=8, frameon=False)


def _overall_figures(overall: pd.DataFrame, alerts: pd.DataFrame) -> dict[str, Figure]:
    if overall.empty:
        return {}
    daily = _daily(overall, overall["date"].min(), overall["date"].max())
    low = daily["low_coverage"].eq(True)
    trend = Figure(figsize=(10, 5), layout="constrained")
    net_ax, count_ax = trend.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    _plot_net(net_ax, daily, _alert_dates(alerts, "overall", "all"), decayed=True)
    net_ax.set_title("Overall net sentiment", loc="left")
    net_ax.set_ylabel("net")
    _legend_above(net_ax)
    count_ax.bar(daily.index, daily["stories"].fillna(0), width=0.8, color=[LOW if flag else BAR for flag in low])
    count_ax.set_ylabel("stories\n(light: low cov.)", fontsize=8)
    shares = Figure(figsize=(10, 3), layout="constrained")
    share_ax = shares.subplots()
    bottom = pd.Series(0.0, index=daily.index)
    for column, color in SHARE_COLORS.items():
        share_ax.bar(daily.index, daily[column].fillna(0), width=0.8, bottom=bottom, color=color,
                     label=column.removesuffix("_share"))
        bottom = bottom + daily[column].fillna(0)
    share_ax.set_ylim(0, 1)
    share_ax.set_title("Label shares (overall)", loc="left")
    _legend_above(share_ax)
    _date_axis(share_ax)
    return {"overall": trend, "shares": shares}


def _small_multiples(index: pd.DataFrame, alerts: pd.DataFrame, dimension: str, top: int) -> Figure | None:
    rows = index[index["dimension"] == dimension]
    totals = rows.groupby(rows["key"].astype(str))["stories"].sum()
    keys = sorted(totals.index, key=lambda key: (-totals[key], key))[:max(top, 0)]
    if not keys:
        return None
    columns = min(3, len(keys))
    figure = Figure(figsize=(3.5 * columns, 2.5 * math.ceil(len(keys) / columns)), layout="constrained")
    axes = figure.subplots(math.ceil(len(keys) / columns), columns, sharex=True, sharey=True, squeeze=False).ravel()
    for position, (ax, key) in enumerate(zip(axes, keys)):
        key_rows = rows[rows["key"].astype(str) == key]
        _plot_net(ax, _daily(key_rows, rows["date"].min(), rows["date"].max()),
                  _alert_dates(alerts, dimension, key), decayed=False)
        ax.set_title(f"{_plain(key)} ({totals[key]:.0f} stories)", fontsize=9)
        if position + columns >= len(keys):  # nothing below it: sharex would hide its dates otherwise
            ax.tick_params(labelbottom=True)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    figure.suptitle(f"Net sentiment per {dimension} (top {len(keys)} by stories; red = alert day)")
    return figure


def _drift_figure(drift: pd.DataFrame) -> Figure | None:
    if drift.empty:
        return None
    statistics = sorted(drift["statistic"].astype(str).unique())
    figure = Figure(figsize=(10, 1.9 * len(statistics) + 0.6), layout="constrained")
    axes = figure.subplots(len(statistics), 1, sharex=True, squeeze=False).ravel()
    for ax, statistic in zip(axes, statistics):
        daily = _daily(drift[drift["statistic"].astype(str) == statistic], drift["date"].min(), drift["date"].max())
        fired = daily["drifted"].eq(True)
        ax.plot(daily.index, daily["value"], "o-", color=NET, ms=4, label="value")
        ax.plot(daily.index, daily["threshold"], "--", color=BAR, label="threshold")
        ax.plot(daily.index[fired], daily["value"][fired], "o", color=ALERT, ms=7, label="drifted")
        ax.set_title(_plain(statistic), loc="left", fontsize=9)
        _date_axis(ax)
    _legend_above(axes[0])
    figure.suptitle("Input drift per statistic")
    return figure


def _shadow_figure(shadow: pd.DataFrame) -> Figure | None:
    if shadow.empty:
        return None
    figure = Figure(figsize=(10, 3), layout="constrained")
    ax = figure.subplots()
    pairs = shadow.astype({"champion_version": str, "candidate_version": str})
    for (champion, candidate), rows in pairs.groupby(["champion_version", "candidate_version"]):
        daily = _daily(rows, shadow["date"].min(), shadow["date"].max())
        ax.plot(daily.index, daily["agreement"], "o-", ms=4,
                label=_plain(f"candidate {candidate} vs champion {champion}"))
    candidates = ", ".join(sorted(pairs["candidate_version"].unique()))
    ax.set(ylabel="agreement", ylim=(0, 1.02))
    ax.set_title(_plain(f"Shadow agreement with the champion: {candidates}"), loc="left")
    _legend_above(ax)
    _date_axis(ax)
    return figure


def report_figures(index: pd.DataFrame, alerts: pd.DataFrame, drift: pd.DataFrame, shadow: pd.DataFrame,
                   top_entities: int = 6) -> dict[str, Figure]:
    """The report's figures by name (overall, shares, entities, topics, drift, shadow; absent when no data),
    for a caller that also logs them, e.g. `mlflow.log_figure(figure, f"{name}.png")`."""
    index, alerts = _prepared(index), _prepared(alerts)
    figures = _overall_figures(index[index["dimension"] == "overall"], alerts)
    figures |= {"entities": _small_multiples(index, alerts, "entity", top_entities),
                "topics": _small_multiples(index, alerts, "topic", TOP_TOPICS),
                "drift": _drift_figure(_prepared(drift)), "shadow": _shadow_figure(_prepared(shadow))}
    return {name: figure for name, figure in figures.items() if figure is not None}


def _img(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    figure.clear()  # drop the artists now: a report renders a dozen figures every morning
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _cell(value: object, count: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.0f}" if count else f"{value:.3f}"
    return html.escape(str(value))


def _table(frame: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(value, column in COUNTS)}</td>" for column, value in
                                    zip(columns, row)) + "</tr>" for row in frame[columns].itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _empty(text: str) -> str:
    return f'<p class="empty">{html.escape(text)}</p>'


def _header(index: pd.DataFrame, alerts: pd.DataFrame, drift: pd.DataFrame, title: str) -> str:
    days = sorted(index["day"].astype(str).unique())
    span = f"{days[0]} to {days[-1]}" if days else "no index rows"
    models = index.assign(model=index["model_version"].fillna("?").astype(str),
                          sha=index["onnx_sha256"].fillna("?").astype(str).str[:12])
    produced = models.groupby(["model", "sha"])["day"].agg(["min", "max"]).reset_index()
    versions = "; ".join(f"{m} (sha256 {s}&hellip;, {first} to {last})" for m, s, first, last in
                         produced.map(lambda text: html.escape(str(text))).itertuples(index=False)) or "none"
    overall_stories = index.loc[index["dimension"] == "overall", "stories"].sum()
    facts = {"days": len(days), "stories (overall)": f"{overall_stories:.0f}", "alerts": len(alerts),
             "drifted days": drift.loc[drift["drifted"], "day"].nunique()}
    boxes = "".join(f"<div><b>{value}</b> {name}</div>" for name, value in facts.items())
    return (f"<header><h1>{html.escape(title)}</h1><p>{html.escape(span)} &middot; model {versions}</p>"
            f'<div class="facts">{boxes}</div></header>')


def _drifted_days(drift: pd.DataFrame) -> str:
    fired = drift[drift["drifted"]]
    if fired.empty:
        return _empty("No drift detected.") if not drift.empty else _empty("No drift statistics were computed.")
    fired = fired.assign(fired=[f"{statistic} = {value:.3f} (threshold {threshold:.3f})" for statistic, value,
                                threshold in fired[["statistic", "value", "threshold"]].itertuples(index=False)])
    return _table(fired.groupby("day", as_index=False)["fired"].agg("; ".join), ["day", "fired"])


def render_report(index: pd.DataFrame, alerts: pd.DataFrame, drift: pd.DataFrame, shadow: pd.DataFrame,
                  title: str, top_entities: int = 6) -> str:
    """The whole report as one HTML document with no external references (plots are inline PNGs)."""
    figures = report_figures(index, alerts, drift, shadow, top_entities)
    image = {name: _img(figure, f"{name} chart") for name, figure in figures.items()}
    index, alerts, drift = _prepared(index), _prepared(alerts), _prepared(drift)
    overall = index[index["dimension"] == "overall"]
    alerts = alerts.assign(magnitude=alerts["zscore"].abs()).sort_values(["date", "magnitude"],
                                                                        ascending=[True, False])
    sections = {
        "Overall sentiment": image.get("overall", _empty("No overall index rows.")),
        "Label shares": image.get("shares", "") + (
            "<h3>Overall daily index</h3>" + _table(overall, OVERALL_COLUMNS) if len(overall) else ""),
        "Entities and topics": image.get("entities", _empty("No entity rows.")) + image.get(
            "topics", _empty("No topic rows.")),
        "Alerts": _table(alerts, ALERT_COLUMNS) if len(alerts) else _empty("No alerts"),
        "Drift": image.get("drift", "") + _drifted_days(drift),
        "Shadow scoring": image.get("shadow", _empty("No candidate was shadow-scored")),
    }
    body = "".join(f"<section><h2>{name}</h2>{content}</section>" for name, content in sections.items())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{_header(index, alerts, drift, title)}{body}"
            f"<footer>{FOOTER}</footer></body></html>\n")


def write_report(path: Path, index: pd.DataFrame, alerts: pd.DataFrame, drift: pd.DataFrame,
                 shadow: pd.DataFrame, title: str, top_entities: int = 6) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(index, alerts, drift, shadow, title, top_entities), encoding="utf-8")
    return path
