"""Render an audit report: a terminal table, JSON for pipelines, a self-contained HTML page.

All three carry the same facts (:func:`as_dict`): per conversation the counts by verdict and a
timeline; per finding the row, its time, the peers, the signer and the signing certificate
(serial, fingerprint, whether the capsule was signed inside its validity). The page needs no
external asset: the timelines are inline SVG, the filters (verdict, peer) a few lines of inline
JavaScript that also read and write the URL fragment (``#verdict=plaintext&peer=a@b``).
"""

from __future__ import annotations

import datetime as dt
import html
import json
from typing import Any

from capsule.audit.findings import VERDICTS, CertFacts, Conversation, Finding, Report

COLOURS = {"capsule": "#2e7d32", "plaintext": "#c62828", "bad-signature": "#6a1b9a",
           "sender-mismatch": "#ad1457", "recipient-mismatch": "#d81b60", "unverified": "#f9a825",
           "malformed": "#795548", "other": "#9e9e9e"}
SPARKS = " ▁▂▃▄▅▆▇█"


class ReportError(Exception):
    """The report cannot be written where it was asked for (a directory, a missing folder)."""


def _time(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _cert(cert: CertFacts | None) -> dict[str, Any] | None:
    if cert is None:
        return None
    return {"fingerprint": cert.fingerprint, "serial": cert.serial or None,
            "not_before": _time(cert.not_before), "not_after": _time(cert.not_after),
            "signed_at": _time(cert.signed_at), "valid_at_signing": cert.valid_at_signing}


def _finding(f: Finding) -> dict[str, Any]:
    return {"store": f.row.store, "row": f.row.row_id, "time": _time(f.row.when),
            "verdict": f.verdict, "from": f.sender, "to": f.recipient, "signer": f.signer or None,
            "certificate": _cert(f.cert), "detail": f.detail}


def _timeline(conv: Conversation) -> dict[str, Any]:
    return {"bucket_seconds": conv.timeline.width,
            "bars": [{"start": _time(start), "counts": {v: n for v, n in counts.items() if n}}
                     for start, counts in conv.timeline.bars()]}


def as_dict(report: Report) -> dict[str, Any]:
    return {
        "sources": report.sources,
        "missing_tables": report.missing,
        "rows": report.rows,
        "totals": report.totals(),
        "conversations": [
            {"peers": list(c.peers), "messages": c.messages, "rows": c.rows,
             "counts": c.counts, "first": _time(c.first), "last": _time(c.last),
             "verdict": c.verdict, "timeline": _timeline(c)}
            for c in sorted(report.conversations.values(), key=lambda c: c.peers)
        ],
        "findings": [_finding(f) for f in report.findings],
        "findings_not_listed": report.unlisted,
    }


def as_json(report: Report) -> str:
    return json.dumps(as_dict(report), indent=2)


def _spark(bars: list[dict[str, Any]]) -> str:
    totals = [sum(b["counts"].values()) for b in bars]
    top = max(totals, default=0) or 1
    return "".join(SPARKS[(-(-8 * n // top)) if n else 0] for n in totals)


def _valid(cert: dict[str, Any] | None) -> str:
    if cert is None:
        return "-"
    if cert["valid_at_signing"] is None:
        return "unknown"
    return "yes" if cert["valid_at_signing"] else "NO"


def _shown(text: str) -> str:
    """Operator-stored text made safe for a terminal: control characters (an escape sequence
    hiding the rest of the report, a line break forging a line) and other unprintable ones
    (bidi overrides) shown as ``\\uXXXX``."""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def as_table(report: Report) -> str:
    data = as_dict(report)
    head = ["peers", "msgs", *[c[:9] for c in VERDICTS], "first", "last", "verdict", "timeline"]
    rows = [[_shown(" <> ".join(c["peers"])), str(c["messages"]),
             *[str(c["counts"][k]) for k in VERDICTS], c["first"], c["last"], c["verdict"],
             _spark(c["timeline"]["bars"])] for c in data["conversations"]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    totals = data["totals"]
    lines.append(f"\n{data['rows']} rows, {len(rows)} conversations: "
                 + ", ".join(f"{totals[v]} {v}" for v in VERDICTS if totals[v]))
    lines += [f"  missing table {_shown(m)}" for m in data["missing_tables"]]
    for f in data["findings"][:20]:
        cert = f["certificate"]
        signed = (f" signer {f['signer']} cert serial {cert['serial'] or '?'} "
                  f"sha256 {cert['fingerprint'][:16]}… valid at signing: {_valid(cert)}"
                  if cert else "")
        lines.append(_shown(f"  ! {f['verdict']}: {f['store']} row {f['row']} at {f['time']} "
                            f"({f['from']} -> {f['to']}){signed} {f['detail']}".rstrip()))
    hidden = len(data["findings"]) - 20 + data["findings_not_listed"]
    if hidden > 0:
        lines.append(f"  … and {hidden} more findings (see --json or --html)")
    return "\n".join(lines)


_STYLE = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.ENCRYPTED td.v{background:#dfd}.PLAINTEXT td.v{background:#fdd}
.TAMPERED td.v{background:#f99}.UNVERIFIED td.v{background:#ffd}.chip{display:inline-block;
width:.8em;height:.8em;margin:0 .3em 0 .8em}.missing{background:#fff3cd;padding:.5em 1em}
.fp{font-family:monospace}.no{color:#c62828;font-weight:bold}#filters{margin:1em 0}
tr.timeline td{border-top:none}"""

_SCRIPT = """(function(){
const $ = id => document.getElementById(id);
function apply(){
  const v = $('f-verdict').value, p = $('f-peer').value;
  let shown = 0;
  document.querySelectorAll('[data-verdicts]').forEach(el => {
    const ok = (!v || el.dataset.verdicts.split(' ').includes(v)) &&
               (!p || el.dataset.peers.split(' ').includes(p));
    el.hidden = !ok;
    if (ok && el.classList.contains('finding')) shown++;
  });
  $('shown').textContent = shown;
  const q = new URLSearchParams();
  if (v) q.set('verdict', v);
  if (p) q.set('peer', p);
  try { history.replaceState(null, '', '#' + q.toString()); } catch (e) {}
}
const q = new URLSearchParams(location.hash.slice(1));
for (const [name, id] of [['verdict', 'f-verdict'], ['peer', 'f-peer']]) {
  const want = q.get(name);
  if (want && [...$(id).options].some(o => o.value === want)) $(id).value = want;
  $(id).addEventListener('change', apply);
}
apply();
})();"""


def _svg(timeline: dict[str, Any], width: int = 560, height: int = 56) -> str:
    bars = timeline["bars"]
    if not bars:
        return "<em>no timestamps</em>"
    top = max(sum(b["counts"].values()) for b in bars) or 1
    step = width / len(bars)
    bar = min(max(step - 1, 1), 14)
    e = html.escape
    shapes = []
    for i, slot in enumerate(bars):
        y = float(height)
        for verdict in VERDICTS:
            n = slot["counts"].get(verdict, 0)
            if not n:
                continue
            h = n / top * height
            y -= h
            shapes.append(f"<rect class='bar {verdict}' x='{i * step + (step - bar) / 2:.1f}' "
                          f"y='{y:.1f}' width='{bar:.1f}' height='{h:.1f}' "
                          f"fill='{COLOURS[verdict]}'><title>{e(slot['start'])}: {n} {verdict}"
                          f"</title></rect>")
    minutes = timeline["bucket_seconds"] // 60
    return (f"<svg class='timeline' width='{width}' height='{height + 16}' role='img' "
            f"aria-label='stored rows by verdict over time'>{''.join(shapes)}"
            f"<line x1='0' x2='{width}' y1='{height}' y2='{height}' stroke='#999'/>"
            f"<text x='0' y='{height + 13}' font-size='11'>{e(bars[0]['start'])}</text>"
            f"<text x='{width}' y='{height + 13}' font-size='11' text-anchor='end'>"
            f"{e(bars[-1]['start'])} · one bar = {minutes} min · at most {top} per bar"
            f"</text></svg>")


def _conversation(c: dict[str, Any]) -> str:
    e = html.escape
    present = " ".join(v for v in VERDICTS if c["counts"][v])
    attrs = f"data-verdicts='{e(present)}' data-peers='{e(' '.join(c['peers']))}'"
    cells = "".join(f"<td>{c['counts'][k]}</td>" for k in VERDICTS)
    return (f"<tbody class='conv {e(c['verdict'])}' {attrs}><tr><td>{e(' ⇄ '.join(c['peers']))}"
            f"</td><td>{c['messages']}</td>{cells}<td>{e(c['first'])}</td><td>{e(c['last'])}</td>"
            f"<td class='v'>{e(c['verdict'])}</td></tr><tr class='timeline'>"
            f"<td colspan='{len(VERDICTS) + 5}'>{_svg(c['timeline'])}</td></tr></tbody>")


def _finding_row(f: dict[str, Any]) -> str:
    e = html.escape
    cert = f["certificate"] or {}
    valid = _valid(f["certificate"])
    attrs = (f"data-verdicts='{e(f['verdict'])}' "
             f"data-peers='{e(' '.join(p for p in (f['from'], f['to']) if p))}'")
    fp = cert.get("fingerprint", "")
    return (f"<tr class='finding' {attrs}><td>{e(f['store'])} #{e(f['row'])}</td>"
            f"<td>{e(f['time'])}</td><td style='color:{COLOURS[f['verdict']]}'>"
            f"{e(f['verdict'])}</td><td>{e(f['from'])} → {e(f['to'])}</td>"
            f"<td>{e(f['signer'] or '-')}</td><td class='fp'>{e(cert.get('serial') or '-')}</td>"
            f"<td class='fp' title='{e(fp)}'>{e(fp[:16] + '…' if fp else '-')}</td>"
            f"<td class='{'no' if valid == 'NO' else ''}'>{valid}"
            f"{' (signed ' + e(cert['signed_at']) + ')' if cert.get('signed_at') else ''}</td>"
            f"<td>{e(f['detail'])}</td></tr>")


def as_html(report: Report) -> str:
    data = as_dict(report)
    e = html.escape
    totals = data["totals"]
    legend = "".join(f"<span class='chip' style='background:{COLOURS[v]}'></span>{e(v)} "
                     f"<b>{totals[v]}</b>" for v in VERDICTS)
    missing = "".join(f"<p class='missing'>Missing table: {e(m)}</p>"
                      for m in data["missing_tables"])
    peers = sorted({p for c in data["conversations"] for p in c["peers"] if p})
    options = "".join(f"<option value='{e(v)}'>{e(v)}</option>" for v in VERDICTS)
    peer_options = "".join(f"<option value='{e(p)}'>{e(p)}</option>" for p in peers)
    head = "".join(f"<th>{e(h)}</th>" for h in ("peers", "messages", *VERDICTS, "first", "last",
                                                 "verdict"))
    conversations = "".join(_conversation(c) for c in data["conversations"])
    finding_head = "".join(f"<th>{h}</th>" for h in (
        "row", "time", "verdict", "from → to", "signer", "cert serial", "cert SHA-256",
        "valid at signing", "detail"))
    findings = "".join(_finding_row(f) for f in data["findings"])
    unlisted = (f"<p>{data['findings_not_listed']} further findings are counted above but not "
                f"listed.</p>" if data["findings_not_listed"] else "")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Capsule audit</title>"
            f"<style>{_STYLE}</style></head><body><h1>Capsule audit</h1>"
            f"<p>Sources: {e(', '.join(data['sources']))}; {data['rows']} rows, "
            f"{len(data['conversations'])} conversations.</p>{missing}<p>{legend}</p>"
            f"<div id='filters'>Verdict <select id='f-verdict'><option value=''>all</option>"
            f"{options}</select> Peer <select id='f-peer'><option value=''>all</option>"
            f"{peer_options}</select></div><h2>Conversations</h2><table id='conversations'>"
            f"<thead><tr>{head}</tr></thead>{conversations}</table>"
            f"<h2>Findings (<span id='shown'>{len(data['findings'])}</span> shown)</h2>"
            f"<table id='findings'><thead><tr>{finding_head}</tr></thead><tbody>"
            f"{findings}</tbody></table>{unlisted}<script>{_SCRIPT}</script></body></html>")
