"""``--html PATH``: one self-contained HTML file of a run (or of ``compare``).

Made from the JSON result alone, with the standard library: the charts are
inline SVG drawn here (no matplotlib), the styles are inline, and there is no
script and no reference to any other file or host, so the page reads offline
and the same in any browser.  Light and dark follow the system
(``prefers-color-scheme``); print styles put it on paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

__all__ = ["line_chart", "nice_ticks", "page", "render_run", "table", "write_html"]

CSS = """
:root { color-scheme: light dark; --fg: #1d232b; --muted: #5b6673; --bg: #ffffff;
  --panel: #f4f6f8; --rule: #d5dbe1; --grid: #e3e7eb; --pass: #17692f; --fail: #b3261e;
  --c1: #1f5fbf; --c2: #17803d; --c3: #b86e00; --c4: #c0392b; --c5: #7b3fb0; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e9ed; --muted: #a3adb8; --bg: #15191e; --panel: #1f252c; --rule: #39424c;
    --grid: #2a3139; --pass: #5fd17e; --fail: #ff7b72;
    --c1: #6aa5ff; --c2: #5fd17e; --c3: #f0b35a; --c4: #ff7b72; --c5: #c69cf2; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 70rem; padding: 1rem 1.25rem 3rem; color: var(--fg);
  background: var(--bg); font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
h1 { font-size: 1.5rem; margin: 0.5rem 0; } h2 { font-size: 1.15rem; margin: 2rem 0 0.5rem; }
p.sub, .muted { color: var(--muted); }
.verdict { padding: 0.6rem 0.9rem; border-radius: 6px; font-weight: 600; margin: 1rem 0;
  border: 2px solid currentColor; }
.verdict.pass, .pass { color: var(--pass); } .verdict.fail, .fail { color: var(--fail); }
table { border-collapse: collapse; margin: 0.25rem 0 0.5rem; font-variant-numeric: tabular-nums; }
th, td { padding: 0.2rem 0.6rem; border-bottom: 1px solid var(--rule); text-align: right;
  vertical-align: top; white-space: nowrap; }
th { background: var(--panel); }
th:first-child, td:first-child, .text { text-align: left; } td.text { white-space: normal; }
td.name { white-space: nowrap; }
summary { cursor: pointer; color: var(--muted); }
td.badge { font-weight: 700; }
.scroll { overflow-x: auto; }
figure { margin: 0.5rem 0 1rem; } figcaption { color: var(--muted); font-size: 0.9rem; }
svg.chart { width: 100%; height: auto; max-width: 60rem; display: block; }
svg.chart text { fill: var(--muted); font: 12px system-ui, sans-serif; }
svg.chart .grid { stroke: var(--grid); } svg.chart .axis { stroke: var(--muted); }
svg.chart polyline { fill: none; stroke-width: 1.8; }
.s1 { stroke: var(--c1); color: var(--c1); } .s2 { stroke: var(--c2); color: var(--c2); }
.s3 { stroke: var(--c3); color: var(--c3); } .s4 { stroke: var(--c4); color: var(--c4); }
.s5 { stroke: var(--c5); color: var(--c5); } .dash { stroke-dasharray: 6 4; }
.legend { display: flex; flex-wrap: wrap; gap: 0.3rem 1.2rem; font-size: 0.9rem;
  list-style: none; padding: 0; margin: 0.25rem 0; }
.legend span { display: inline-block; width: 1.4rem; border-top: 3px solid currentColor;
  vertical-align: middle; margin-right: 0.35rem; }
.legend .dash span { border-top-style: dashed; }
@media print {
  :root { --fg: #000; --muted: #333; --bg: #fff; --panel: #eee; --rule: #999; --grid: #ddd; }
  body { max-width: none; padding: 0; font-size: 11pt; }
  h2 { break-after: avoid; } figure, table { break-inside: avoid; }
  .scroll { overflow: visible; }
}
"""


def page(title: str, body: Sequence[str]) -> str:
    """A whole HTML document: the title, the inline styles and the body parts."""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing may be loaded from anywhere: no script, image, font or style from elsewhere.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        'style-src \'unsafe-inline\'">',
        f"<title>{escape(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        *body,
        "</body>",
        "</html>",
        "",
    ])


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], text_cols: Sequence[int] = (),
          cell_class: dict[tuple[int, int], str] | None = None) -> str:
    """An HTML table; ``text_cols`` are left-aligned, ``cell_class`` marks (row, col) cells."""
    classes = cell_class or {}
    out = ['<div class="scroll"><table>', "<thead><tr>"]
    out += [("<th class=\"text\">" if c in text_cols else "<th>") + f"{escape(str(h))}</th>"
            for c, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(rows):
        cells = []
        for c, value in enumerate(row):
            names = " ".join(n for n in (classes.get((r, c), ""),
                                         "text" if c in text_cols else "") if n)
            attr = f' class="{names}"' if names else ""
            cells.append(f"<td{attr}>{escape(str(value))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``top`` (about ``count`` of them)."""
    if top <= 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


Series = tuple[str, str, Sequence[tuple[float, float]]]  # label, css class, (x, y) points


def line_chart(series: Sequence[Series], x_label: str, y_label: str, caption: str,
               marks: Sequence[tuple[float, str]] = ()) -> str:
    """An inline SVG line chart with axes, grid and a legend; ``marks`` are (x, label)
    vertical lines on the time axis."""
    width, height, left, right, top, bottom = 800, 280, 60, 16, 12, 40
    xs = [x for _, _, pts in series for x, _ in pts] + [x for x, _ in marks]
    ys = [y for _, _, pts in series for _, y in pts]
    x_ticks = nice_ticks(max(xs, default=1.0), 8)
    y_ticks = nice_ticks(max(ys, default=1.0), 5)
    x_max, y_max = x_ticks[-1], y_ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return round(left + plot_w * x / x_max, 1)

    def py(y: float) -> float:
        return round(top + plot_h * (1 - y / y_max), 1)

    out = [f'<figure><svg class="chart" viewBox="0 0 {width} {height}" role="img" '
           f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(caption)}">',
           f"<title>{escape(caption)}</title>"]
    for y in y_ticks:
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{py(y)}" '
                   f'y2="{py(y)}"/><text x="{left - 6}" y="{py(y) + 4}" '
                   f'text-anchor="end">{_fmt(y)}</text>')
    for x in x_ticks:
        out.append(f'<line class="grid" x1="{px(x)}" x2="{px(x)}" y1="{top}" '
                   f'y2="{top + plot_h}"/><text x="{px(x)}" y="{top + plot_h + 16}" '
                   f'text-anchor="middle">{_fmt(x)}</text>')
    out.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + plot_h}" '
               f'y2="{top + plot_h}"/><line class="axis" x1="{left}" x2="{left}" y1="{top}" '
               f'y2="{top + plot_h}"/>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" '
               f'text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + plot_h / 2})">{escape(y_label)}</text>')
    for x, label in marks:
        out.append(f'<line class="s4 dash mark" x1="{px(x)}" x2="{px(x)}" y1="{top}" '
                   f'y2="{top + plot_h}"><title>{escape(label)}</title></line>'
                   f'<text x="{px(x) + 3}" y="{top + 12}">{escape(label.split()[0])}</text>')
    for label, css, pts in series:
        if pts:
            points = " ".join(f"{px(x)},{py(y)}" for x, y in pts)
            out.append(f'<polyline class="{css}" points="{points}">'
                       f"<title>{escape(label)}</title></polyline>")
    out.append("</svg>")
    out.append('<ul class="legend">' + "".join(
        f'<li class="{css}"><span></span>{escape(label)}</li>' for label, css, _ in series)
        + "</ul>")
    out.append(f"<figcaption>{escape(caption)}</figcaption></figure>")
    return "".join(out)


def _steps(rows: Sequence[dict[str, Any]], key: str, bucket_s: float = 1.0
           ) -> list[tuple[float, float]]:
    """A per-bucket value drawn as steps: flat across each bucket."""
    pts: list[tuple[float, float]] = []
    for r in rows:
        pts += [(r["t"], r[key]), (r["t"] + bucket_s, r[key])]
    return pts


def _target(config: dict[str, Any]) -> list[tuple[float, float]]:
    """The target arrival rate of ``--stages``: linear between the stages' bounds."""
    t, rate = 0.0, config.get("start_rate") or 0.0
    pts = [(t, rate)]
    for stage in config.get("stages") or []:
        t += stage["duration_s"]
        pts.append((t, stage["target"]))
    return pts


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _verdict_line(data: dict[str, Any]) -> tuple[str, str]:
    failed = [c["name"] for c in data["checks"] if not c["passed"]]
    breached = [t["name"] for t in data["thresholds"] if not t["passed"]]
    n = len(data["checks"])
    if data.get("interrupted"):
        return "fail", "INTERRUPTED: the run was cut short"
    if failed:
        return "fail", f"FAIL: {len(failed)} of {n} checks failed: {', '.join(failed)}"
    if breached:
        return "fail", f"FAIL: all {n} checks passed but thresholds breached: " + ", ".join(
            breached)
    return "pass", f"PASS: all {n} checks passed"


def _config_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, value in config.items():
        if key == "stages" and value:
            value = ", ".join(f"{s['duration_s']:g}s:{s['target']:g}" for s in value)
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        if value is None or value == "":
            continue
        rows.append((key, str(value)))
    return rows


#: Up to this many booths the per-booth table shows unfolded.
_OPEN_BOOTHS = 20


def _snapshot(when: str, snap: dict[str, int] | None) -> tuple[object, ...]:
    if snap is None:
        return (when, "unknown", "", "")
    return (when, snap["remaining"], snap["sold"], snap["total"])


def render_run(data: dict[str, Any]) -> str:
    """The HTML report of one run, from its JSON result."""
    config = data["config"]
    kind, verdict = _verdict_line(data)
    lat = data["latency_ms"]
    body = [
        "<h1>ticketbooth load test</h1>",
        f'<p class="sub">started {escape(data["started_at"])} UTC, against '
        f'{escape(", ".join(config["urls"]))}</p>',
        f'<p class="verdict {kind}" id="verdict">{escape(verdict)}</p>',
        "<h2>Checks</h2>",
        table(["verdict", "check", "what", "detail"],
              [("PASS" if c["passed"] else "FAIL", c["name"], c["title"], c["detail"])
               for c in data["checks"]], text_cols=(1, 2, 3),
              cell_class={(i, col): ("badge " + ("pass" if c["passed"] else "fail")) if col == 0
                          else "name"
                          for i, c in enumerate(data["checks"]) for col in (0, 1)}),
    ]
    if data["thresholds"]:
        body += ["<h2>Thresholds</h2>", table(
            ["verdict", "threshold", "limit", "value"],
            [("PASS" if t["passed"] else "FAIL", t["name"], f"{t['limit']:g}",
              f"{t['value']:.4g}") for t in data["thresholds"]], text_cols=(1,),
            cell_class={(i, 0): "badge " + ("pass" if t["passed"] else "fail")
                        for i, t in enumerate(data["thresholds"])})]
    body += [
        "<h2>Summary</h2>",
        table(["requests", "elapsed s", "requests/s", "tickets sold", "tickets unknown",
               "409 sold out", "error rate"],
              [(data["requests"], f"{data['elapsed_s']:.2f}", f"{data['throughput_rps']:.1f}",
                data["tickets_acknowledged"], data["tickets_unknown"],
                data["sold_out_responses"], f"{data['error_rate']:.2%}")]),
        table([f"{k} ms" for k in lat], [[_ms(v) for v in lat.values()]]),
        '<p class="muted">Latency percentiles (ms) are measured from each request\'s intended '
        "send time.</p>" if config["mode"] == "open" else "",
    ]
    series = data["timeseries"]
    # Injected faults (--faults), when the run had any: marks on the time axis and a table.
    injected = (data.get("faults") or {}).get("injected") or []
    marks = [(f["at_s"], f"{f['kind']} instance {f['instance']}") for f in injected]
    if series:
        throughput: list[Series] = [
            ("200 sold/s", "s2", _steps(series, "ok")),
            ("409 sold out/s", "s3", _steps(series, "sold_out")),
            ("errors/s", "s4", _steps(series, "errors")),
            ("all requests/s", "s1 dash", _steps(series, "requests")),
        ]
        if config.get("stages"):
            throughput.append(("target rate/s", "s5", _target(config)))
        body += [
            "<h2>Over time</h2>",
            line_chart(throughput, "seconds since the start", "requests/s",
                       "Throughput by outcome, per second of completion"
                       + (" (dashed red lines: faults)" if marks else ""), marks),
            line_chart([(f"{k}", css, _steps(series, f"{k}_ms"))
                        for k, css in (("p50", "s1"), ("p90", "s3"), ("p99", "s4"))],
                       "seconds since the start", "latency ms",
                       "Latency percentiles, per second of completion", marks),
        ]
    if injected:
        body += ["<h2>Faults</h2>", table(
            ["at s", "kind", "instance", "answering again after s"],
            [(f"{f['at_s']:.2f}", f["kind"], f["instance"],
              "never" if f.get("healed_after_s") is None else f"{f['healed_after_s']:.2f}")
             for f in injected], text_cols=(1,))]
    if data.get("stages"):
        body += ["<h2>Stages</h2>", table(
            ["stage", "from s", "rate/s", "scheduled", "sent", "target/s", "achieved/s",
             "p50 ms", "p90 ms", "p99 ms", "200", "409", "errors", "late"],
            [(s["stage"], f"{s['start_s']:g}", f"{s['start_rate']:g} → {s['end_rate']:g}",
              s["scheduled"], s["sent"], f"{s['target_rps']:.1f}", f"{s['achieved_rps']:.1f}",
              *(_ms(s["latency_ms"][k]) for k in ("p50", "p90", "p99")),
              s["ok"], s["sold_out"], s["errors"], s["late"]) for s in data["stages"]])]
    late = data.get("lateness")
    if late:
        body.append(f'<p class="muted" id="lateness">'
                    f'{late["late"]} of {late["sent"]} requests sent more than '
                    f'{late["threshold_ms"]:g} ms after their intended time (p99 '
                    f'{_ms(late["p99_ms"])} ms, max {_ms(late["max_ms"])} ms).</p>')
    body += [
        "<h2>Statuses and errors</h2>",
        table(["HTTP status", "answers"], sorted(data["status_counts"].items()),
              text_cols=(0,)),
        table(["error kind", "count"], list(data["errors"].items()), text_cols=(0,)),
        "<h2>Stock</h2>",
        table(["GET /remaining", "remaining", "sold", "total"],
              [_snapshot(when, data[f"remaining_{when}"]) for when in ("before", "after")],
              text_cols=(0,)),
        "<h2>Booths</h2>",
        # Many booths are folded away (and then not printed); the figures above sum them.
        f'<details{" open" if len(data["booths"]) <= _OPEN_BOOTHS else ""}>'
        f'<summary>{len(data["booths"])} booths</summary>',
        table(["booth", "url", "tickets", "requests", "sold out", "errors"],
              [(b["booth"], b["url"], b["tickets"], b["requests"], b["sold_out"], b["errors"])
               for b in data["booths"]], text_cols=(1,)),
        "</details>",
        "<h2>Configuration</h2>",
        table(["setting", "value"], _config_rows(config), text_cols=(0, 1)),
        f'<p class="muted">exit status {data["exit_status"]}</p>',
    ]
    return page("ticketbooth load test: " + verdict, body)


def write_html(data: dict[str, Any], path: str) -> None:
    """Write the HTML report of a run's JSON result to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_run(data))
