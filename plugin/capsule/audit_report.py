"""Render an audit report: a terminal table, JSON for pipelines, a self-contained HTML page."""

from __future__ import annotations

import datetime as dt
import html
import json
from typing import Any

from capsule.audit import VERDICTS, Report

COLUMNS = ("plaintext", "capsule", "bad-signature", "sender-mismatch", "unverified", "other")


def _time(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def as_dict(report: Report) -> dict[str, Any]:
    return {
        "sources": report.sources,
        "rows": report.rows,
        "totals": report.totals(),
        "conversations": [
            {"peers": list(c.peers), "messages": c.messages, "rows": c.rows,
             "counts": c.counts, "first": _time(c.first), "last": _time(c.last),
             "verdict": c.verdict}
            for c in sorted(report.conversations.values(), key=lambda c: c.peers)
        ],
        "findings": [
            {"store": f.row.store, "row": f.row.row_id, "verdict": f.verdict, "from": f.sender,
             "to": f.recipient, "detail": f.detail}
            for f in report.findings
        ],
    }


def as_json(report: Report) -> str:
    return json.dumps(as_dict(report), indent=2)


def as_table(report: Report) -> str:
    head = ["peers", "msgs", *[c[:9] for c in COLUMNS], "first", "last", "verdict"]
    rows = [[" <> ".join(c.peers), str(c.messages), *[str(c.counts[k]) for k in COLUMNS],
             _time(c.first), _time(c.last), c.verdict]
            for c in sorted(report.conversations.values(), key=lambda c: c.peers)]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
             for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    totals = report.totals()
    lines.append(f"\n{report.rows} rows, {len(report.conversations)} conversations: "
                 + ", ".join(f"{totals[v]} {v}" for v in VERDICTS if totals[v]))
    for f in report.findings[:20]:
        lines.append(f"  ! {f.verdict}: {f.row.store} row {f.row.row_id} ({f.sender} -> "
                     f"{f.recipient}) {f.detail}")
    return "\n".join(lines)


_STYLE = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}.ENCRYPTED{background:#dfd}
.PLAINTEXT{background:#fdd}.TAMPERED{background:#f99}.UNVERIFIED{background:#ffd}"""


def as_html(report: Report) -> str:
    data = as_dict(report)
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in ("peers", "messages", *COLUMNS, "first", "last",
                                                 "verdict"))
    body = "".join(
        f"<tr class='{e(c['verdict'])}'><td>{e(' ⇄ '.join(c['peers']))}</td>"
        f"<td>{c['messages']}</td>" + "".join(f"<td>{c['counts'][k]}</td>" for k in COLUMNS)
        + f"<td>{e(c['first'])}</td><td>{e(c['last'])}</td><td>{e(c['verdict'])}</td></tr>"
        for c in data["conversations"]
    )
    findings = "".join(
        f"<li>{e(f['verdict'])}: {e(f['store'])} row {e(f['row'])} ({e(f['from'])} → "
        f"{e(f['to'])}) {e(f['detail'])}</li>" for f in data["findings"]
    )
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Capsule audit</title>"
            f"<style>{_STYLE}</style></head><body><h1>Capsule audit</h1>"
            f"<p>Sources: {e(', '.join(data['sources']))}; {data['rows']} rows.</p>"
            f"<table><tr>{head}</tr>{body}</table><h2>Findings</h2><ul>{findings or '<li>none</li>'}"
            f"</ul></body></html>")
