"""`cancelproc report html`: one self-contained page, opened in headless Chromium with no
network: its charts render (uPlot's canvas and one legend row per series), nothing is
logged to the console, and text from clients and operators stays text."""

from __future__ import annotations

import datetime as dt
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from freezegun import freeze_time

from processor.db import Database
from tests.chromium import find_chromium, open_page
from tests.cli_helpers import Invoke, as_json, one_line_error
from tests.conftest import IN_CI
from tests.test_reports import NOV, NOW, _night, _request, hand_computed_dataset

# A product name and a reason code as a hostile import could store them.
EVIL_PRODUCT = "</script><img src=x onerror=\"document.title='pwned'\"> & Co"
EVIL_CODE = "<b>x</b>"
# The charts the page draws and their series (x included).
CHARTS = {"chart-months": 3, "chart-reasons": 3, "chart-lateness": 2, "chart-runs": 4}


class Charts(HTMLParser):
    """Per chart container: its canvases and uPlot's legend rows (one per series); and every
    element seen, by tag."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []  # the chart id each open element is inside
        self.canvases: dict[str, int] = dict.fromkeys(CHARTS, 0)
        self.series: dict[str, int] = dict.fromkeys(CHARTS, 0)
        self.tags: dict[str, int] = {}
        self.root: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.root = a
        self.tags[tag] = self.tags.get(tag, 0) + 1
        inside = self.stack[-1] if self.stack else None
        chart = a.get("id") if a.get("id") in CHARTS else inside
        if chart and tag == "canvas":
            self.canvases[chart] += 1
        if chart and tag == "tr" and "u-series" in (a.get("class") or "").split():
            self.series[chart] += 1
        if tag not in ("meta", "br", "img", "input", "link", "col", "hr"):
            self.stack.append(chart)

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("meta", "br", "img", "input", "link", "col", "hr") and self.stack:
            self.stack.pop()


@pytest.fixture
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        if IN_CI:
            pytest.fail("chromium is not installed (CI needs it: make chromium-binaries)")
        pytest.skip("Debian's chromium is not installed and could not be (make chromium-binaries installs it)")
    return binary


def outside_scripts(html: str) -> str:
    return re.sub(r"<(script|style)\b[^>]*>.*?</\1>", "", html, flags=re.S | re.I)


@pytest.mark.sqlite_only
def test_the_page_renders_its_charts_offline_without_console_errors(invoke: Invoke, db: Database,
                                                                     tmp_path: Path, chromium: str) -> None:
    hand_computed_dataset(invoke, db)
    _request(db, NOV + dt.timedelta(days=5), EVIL_PRODUCT, "Monthly", "9.99", EVIL_CODE)
    _night(invoke, NOV + dt.timedelta(days=5))
    page = tmp_path / "churn.html"
    with freeze_time(NOW):
        summary = as_json(invoke("report", "html", "--out", page, "--since", "2026-09-01", "--json"))
    assert summary == {"file": str(page), "since": "2026-09-01", "until": "2026-11-26", "cancellations": 12,
                       "lost_mrr": "78.77", "runs": 4}  # 68.78 computed by hand in test_reports, + 9.99
    html = page.read_text()

    # Self-contained: nothing outside the page is named, and the page forbids any fetch.
    markup = outside_scripts(html)
    tags = re.findall(r"<[a-z][^>]*>", markup, re.I)  # escaped text has no '<'
    assert [t for t in tags if re.match(r"<(img|link|iframe|object|embed)\b", t, re.I)
            or re.search(r"\s(src|href)\s*=", t, re.I)] == [], "a reference out of the page"
    assert "Content-Security-Policy\" content=\"default-src 'none';" in html
    assert "Permission is hereby granted, free of charge" in html  # uPlot's licence is kept
    # Escaped: as text in the tables, as \\u escapes in the JSON.
    assert "&lt;/script&gt;&lt;img src=x onerror=&#34;document.title=&#39;pwned&#39;&#34;&gt; &amp; Co" in markup
    assert "&lt;b&gt;x&lt;/b&gt;" in markup and EVIL_PRODUCT not in html and EVIL_CODE not in html
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html,
                                re.S).group(1))
    assert data["months"] == {"labels": ["2026-09", "2026-10", "2026-11"], "cancellations": [2, 3, 7],
                              "lost_mrr": [32.33, 21.66, 24.78]}
    assert EVIL_CODE in data["reasons"]["labels"]
    assert data["lateness"] == {"days_late": [3], "cancellations": [1]}
    assert (data["runs"]["due"], data["runs"]["failed"]) == ([2, 3, 7, 1], [0, 0, 0, 0])

    opened = open_page(chromium, page, tmp_path / "profile")
    assert opened.console_lines() == [], "\n".join(opened.console_lines())
    charts = Charts()
    charts.feed(opened.dom)
    assert charts.root.get("data-report") == "rendered", opened.dom[:500]
    assert "data-report-errors" not in charts.root, charts.root
    assert charts.canvases == dict.fromkeys(CHARTS, 1)
    assert charts.series == CHARTS
    assert "img" not in charts.tags and "<title>pwned" not in opened.dom


@pytest.mark.sqlite_only
def test_an_empty_window_renders_too(invoke: Invoke, db: Database, tmp_path: Path, chromium: str) -> None:
    page = tmp_path / "empty.html"
    with freeze_time(NOW):
        assert "0 cancellation(s), 0.00 MRR lost, 0 run(s)" in invoke("report", "html", "--out", page).stdout
    opened = open_page(chromium, page, tmp_path / "profile")
    charts = Charts()
    charts.feed(opened.dom)
    assert (charts.root.get("data-report"), opened.console_lines()) == ("rendered", [])
    assert charts.series == CHARTS


@pytest.mark.sqlite_only
def test_a_bad_out_is_one_line(invoke: Invoke, db: Database, tmp_path: Path) -> None:
    one_line_error(invoke("report", "html", "--out", tmp_path), f"--out {tmp_path}: is a folder")
    one_line_error(invoke("report", "html", "--out", tmp_path / "no" / "r.html"),
                   f"--out {tmp_path / 'no' / 'r.html'}: the folder {tmp_path / 'no'} does not exist")
    assert list(tmp_path.glob("*.html")) == []
