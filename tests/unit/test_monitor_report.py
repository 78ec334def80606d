"""The morning report is one self-contained HTML file: every plot inline, every data string escaped,
and empty inputs give a readable page instead of an exception."""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from matplotlib.colors import to_rgb

from pipeline.monitor.report import ALERT, render_report, report_figures, write_report

DAYS = [d.strftime("%Y-%m-%d") for d in pd.date_range("2026-03-02", periods=11) if d.day != 6]  # 10 days, one gap
LOW_DAY, ALERT_DAY, DRIFT_DAY = DAYS[2], DAYS[7], DAYS[8]
ENTITIES = {"Acme Corp": 9, "Globex": 5, "Initech": 3}
TOPICS = {"earnings": 8, "mergers": 4}
SHA = "ab" * 32


def index_row(day: str, dimension: str, key: str, stories: int, net: float | None, low: bool = False) -> dict:
    return {"day": day, "dimension": dimension, "key": key, "stories": stories, "net_mean": net,
            "positive_share": 0.5, "negative_share": 0.3, "neutral_share": 0.2, "confidence_mean": 0.8,
            "decayed_net": None if net is None else net * 0.9, "zscore": None if low else 0.4,
            "baseline_days": 5, "low_coverage": low, "model_version": "7", "onnx_sha256": SHA}


def frames(entity_names: dict[str, int] = ENTITIES, alert_key: str = "Acme Corp") -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    rows = []
    for day in DAYS:
        low = day == LOW_DAY
        rows.append(index_row(day, "overall", "all", 2 if low else 20, 0.3 if low else rng.uniform(-0.5, 0.5), low))
        rows += [index_row(day, "entity", name, n, rng.uniform(-1, 1)) for name, n in entity_names.items()]
        rows += [index_row(day, "topic", name, n, rng.uniform(-1, 1)) for name, n in TOPICS.items()]
    alerts = pd.DataFrame([{"day": ALERT_DAY, "dimension": "entity", "key": alert_key, "net_mean": -0.8,
                            "zscore": -3.4, "stories": 9, "baseline_days": 6, "threshold": 3.0, "model_version": "7"}])
    drift = pd.DataFrame([{"day": day, "statistic": statistic, "value": 0.5 if day == DRIFT_DAY else 0.05,
                           "threshold": 0.2, "drifted": day == DRIFT_DAY}
                          for day in DAYS for statistic in ("psi_length", "label_share_shift")])
    shadow = pd.DataFrame([{"day": day, "champion_version": "7", "candidate_version": "8", "texts": 40,
                            "agreement": 0.9} for day in DAYS[-4:]])
    return {"index": pd.DataFrame(rows), "alerts": alerts, "drift": drift, "shadow": shadow}


def empty_like(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[0:0]


EVIL = "<script>alert(1)</script>"
DOLLARS = "$AAPL^$ vs $x_{"  # unescaped, matplotlib would parse this as (broken) mathtext


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report") / "reports"  # write_report creates it
    return write_report(folder / "daily.html", **frames(), title="Daily sentiment")


@pytest.fixture(scope="module")
def page(written) -> str:
    return written.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tricky_page() -> str:
    """An alert on an entity named like a script tag, a cashtag entity, and more alerts to sort."""
    data = frames({**ENTITIES, EVIL: 20, DOLLARS: 4}, alert_key=EVIL)
    extra = [{**data["alerts"].iloc[0], "day": day, "key": key, "zscore": z}
             for day, key, z in [(DAYS[9], "late", 3.1), (DAYS[1], "small", 3.2), (DAYS[1], "large", -5.0)]]
    data["alerts"] = pd.concat([data["alerts"], pd.DataFrame(extra)], ignore_index=True)
    return render_report(**data, title="Report <b>bold</b>")


def images(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*>", page)


def section(page: str, heading: str) -> str:
    return page.split(f"<h2>{heading}</h2>", 1)[1].split("</section>", 1)[0]


def test_the_report_is_written_self_contained_with_one_image_per_chart(written, page):
    assert written.is_file() and written.parent.name == "reports" and page.startswith("<!DOCTYPE html>")
    # overall trend + story counts, label shares, entities, topics, drift, shadow
    assert len(images(page)) == 6
    assert all('src="data:image/png;base64,' in tag for tag in images(page))
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<link" not in page and "<script" not in page
    assert "2026-03-02 to 2026-03-12" in page and "sha256 abababababab" in page


def test_the_header_counts_days_stories_alerts_and_drifted_days(page):
    header = page.split("</header>", 1)[0]
    assert "<b>10</b> days" in header and f"<b>{9 * 20 + 2}</b> stories" in header
    assert "<b>1</b> alerts" in header and "<b>1</b> drifted days" in header


def test_the_alert_day_and_entity_are_in_the_alerts_table(page):
    alerts = section(page, "Alerts")
    assert "<table>" in alerts and ALERT_DAY in alerts and "Acme Corp" in alerts and "-3.400" in alerts


def test_alerts_are_sorted_by_day_then_by_the_size_of_the_zscore(tricky_page):
    alerts = section(tricky_page, "Alerts")
    keys = ["large", "small", html.escape(EVIL), "late"]
    assert [alerts.index(f"<td>{key}</td>") for key in keys] == sorted(alerts.index(f"<td>{key}</td>") for key in keys)


def test_data_strings_are_escaped(tricky_page):
    assert "<script" not in tricky_page and "<b>bold</b>" not in tricky_page
    assert "Report &lt;b&gt;bold&lt;/b&gt;" in tricky_page
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in section(tricky_page, "Alerts")


def test_dollar_signs_in_names_do_not_become_mathtext(tricky_page):
    assert len(images(tricky_page)) == 6
    titles = [ax.get_title() for ax in report_figures(**frames({DOLLARS: 40}))["entities"].axes]
    assert titles == [r"\$AAPL^\$ vs \$x_{ (400 stories)"]


def test_drifted_days_are_listed_with_the_statistics_that_fired(page):
    drift = section(page, "Drift")
    assert DRIFT_DAY in drift and "label_share_shift = 0.500" in drift and "psi_length = 0.500" in drift
    assert DAYS[0] not in drift.split("</table>")[0].split("<table>")[-1]


def test_empty_alerts_drift_and_shadow_render_their_placeholders():
    data = frames()
    for name in ("alerts", "drift", "shadow"):
        data[name] = empty_like(data[name])
    page = render_report(**data, title="t")
    assert "No alerts" in section(page, "Alerts")
    assert "No candidate was shadow-scored" in section(page, "Shadow scoring")
    assert "No drift statistics" in section(page, "Drift")
    assert len(images(page)) == 4


@pytest.mark.parametrize("make_empty", [empty_like, lambda frame: pd.DataFrame(columns=frame.columns)])
def test_all_empty_inputs_render_a_page_without_images(make_empty):
    data = {name: make_empty(frame) for name, frame in frames().items()}
    page = render_report(**data, title="Nothing yet")
    assert "Nothing yet" in page and images(page) == [] and "no index rows" in page
    assert report_figures(**data) == {}


@pytest.mark.parametrize("top", [0, 2, 3, 10])
def test_top_entities_limits_the_entity_small_multiples(top):
    figures = report_figures(**frames(), top_entities=top)
    entity_axes = [ax for ax in figures["entities"].axes if ax.get_visible()] if "entities" in figures else []
    assert [ax.get_title().split(" (")[0] for ax in entity_axes] == list(ENTITIES)[:top]


def test_low_coverage_days_are_hollow_markers_and_gaps_break_the_line():
    overall_axes = report_figures(**frames())["overall"].axes[0]
    by_label = {line.get_label(): line for line in overall_axes.get_lines()}
    net = pd.Series(np.asarray(by_label["net mean"].get_ydata(), dtype=float),
                    index=pd.to_datetime(by_label["net mean"].get_xdata()))
    assert len(net) == 11 and net.isna().sum() == 2  # one point per calendar day
    assert np.isnan(net[pd.Timestamp(LOW_DAY)]) and np.isnan(net[pd.Timestamp("2026-03-06")])
    hollow = by_label["low coverage"]
    assert hollow.get_markerfacecolor() == "none" and list(hollow.get_ydata()) == [0.3]


def test_the_overall_daily_table_lists_every_day_and_flags_low_coverage(page):
    table = section(page, "Label shares").split("<h3>Overall daily index</h3>", 1)[1]
    assert table.count("<tr>") == 1 + len(DAYS) and "<td>yes</td>" in table and "0.300" in table


def alert_spans(ax) -> list[str]:
    return [patch.get_label() for patch in ax.patches if patch.get_facecolor()[:3] == to_rgb(ALERT)]


def test_alert_days_are_red_spans_on_the_chart_they_belong_to():
    data = frames()
    overall_alert = {**data["alerts"].iloc[0], "dimension": "overall", "key": "all", "day": DAYS[4]}
    data["alerts"] = pd.concat([data["alerts"], pd.DataFrame([overall_alert])], ignore_index=True)
    figures = report_figures(**data)
    assert alert_spans(figures["overall"].axes[0]) == ["alert"]
    entity_spans = {ax.get_title().split(" (")[0]: alert_spans(ax) for ax in figures["entities"].axes}
    assert entity_spans == {"Acme Corp": ["alert"], "Globex": [], "Initech": []}
    assert all(alert_spans(ax) == [] for ax in figures["topics"].axes)
