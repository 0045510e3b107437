"""`cancelproc report html`: the churn and the runs of a window as ONE self-contained HTML
page with charts, for a finance person to open from a mail attachment or a share.

Self-contained: the chart library (uPlot, MIT, shipped in processor/resources/report/ with
its licence) and its stylesheet are inlined, the figures are JSON inside the page, and a
Content-Security-Policy forbids every fetch, so the page never touches the network.

Escaping: text from operators and clients (reason codes, product names, billing cycles)
reaches the page only through Jinja with autoescape on, or inside the JSON block, where
'<', '>' and '&' are written as \\u escapes so no text can close the script element.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import Environment, StrictUndefined
from markupsafe import Markup
from sqlalchemy.orm import Session

from processor import reports
from processor.resources import shipped

TEMPLATE = "report.html.jinja"
# The vendored library (https://github.com/leeoniya/uPlot, dist/ of the tagged release).
UPLOT_VERSION = "1.6.32"


@dataclass(frozen=True)
class HtmlReport:
    html: str
    cancellations: int
    lost_mrr: Decimal
    runs: int


def _resource(name: str) -> str:
    return shipped("report", name).read_text(encoding="utf-8")


def script_json(data: Any) -> Markup:
    """JSON safe inside <script type="application/json">: no '<', '>' or '&' as such (so no
    '</script>' or '<!--' can end or confuse the element), and no raw U+2028/U+2029."""
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return Markup(text)  # noqa: S704 - escaped for a script element just above


def _inline(code: str, element: str) -> Markup:
    """Vendored code inlined in a <script> or <style>: refused if it could end the element early."""
    if f"</{element}" in code.lower():
        raise ValueError(f"the vendored code contains '</{element}': it cannot be inlined")
    return Markup(code)  # noqa: S704 - our shipped file, checked above


def _chart_data(closed: list[reports.Closed], runs: list[dict[str, Any]], *, since: dt.date, until: dt.date,
                zone: ZoneInfo) -> dict[str, Any]:
    """The series the page's charts draw (numbers; money as floats, for drawing only: the
    tables carry the exact amounts)."""
    months = reports.by_month(closed, since=since, until=until, zone=zone)
    by_reason = reports.churn(closed)["by_reason"]
    late = reports.lateness(closed)
    return {
        "months": {"labels": [m["month"] for m in months], "cancellations": [m["cancellations"] for m in months],
                   "lost_mrr": [float(m["lost_mrr"]) for m in months]},
        "reasons": {"labels": [r["reason_code"] for r in by_reason],
                    "cancellations": [r["cancellations"] for r in by_reason],
                    "lost_mrr": [float(r["lost_mrr"]) for r in by_reason]},
        "lateness": {"days_late": [r["days_late"] for r in late], "cancellations": [r["cancellations"] for r in late]},
        "runs": {"started": [r["started_at"].timestamp() for r in runs], "id": [r["id"] for r in runs],
                 "duration": [r["duration_seconds"] for r in runs], "due": [r["due"] for r in runs],
                 "failed": [r["failed"] for r in runs]},
    }


def build(session: Session, *, since: dt.date, until: dt.date, zone: ZoneInfo, generated_at: dt.datetime,
          company: str) -> HtmlReport:
    """The page for the window (business-time-zone days, both ends included)."""
    closed = reports.closed_requests(session, since=since, until=until, zone=zone)
    runs = reports.runs_between(session, since=since, until=until, zone=zone)
    churn = reports.churn(closed)
    env = Environment(autoescape=True, undefined=StrictUndefined, keep_trailing_newline=True)
    html = env.from_string(_resource(TEMPLATE)).render(
        company=company, since=since, until=until, zone=str(zone),
        generated_at=generated_at.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z"),
        churn=churn, months=reports.by_month(closed, since=since, until=until, zone=zone),
        lateness=reports.lateness(closed), runs=runs,
        data=script_json(_chart_data(closed, runs, since=since, until=until, zone=zone)),
        uplot_js=_inline(_resource("uPlot.iife.min.js"), "script"),
        uplot_css=_inline(_resource("uPlot.min.css"), "style"),
        uplot_licence=_resource("uPlot-LICENSE.txt"), uplot_version=UPLOT_VERSION,
    )
    return HtmlReport(html=html, cancellations=churn["cancellations"], lost_mrr=churn["lost_mrr"], runs=len(runs))
