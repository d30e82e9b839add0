"""``ticketbooth-load compare BASE.json NEW.json``: two runs side by side, and a gate.

Reads two JSON results of ``ticketbooth-load --json``, shows throughput, the
latency percentiles, the error rate and each check's verdict with the change
from BASE to NEW (per stage too when both ran the same stages), and with
limits exits 3 when NEW regressed past them.  A check that passed in BASE and
fails in NEW is always a regression.  Exit statuses: 0 no regression, 2
unreadable input or runs that cannot be compared (with the reason), 3 a
regression.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from html import escape
from typing import IO, Any

from loadtest.argtypes import non_negative_float
from loadtest.html_report import page, table
from loadtest.report import JSON_VERSION

__all__ = ["CompareError", "compare", "format_compare", "load_result", "run_compare"]

PROG = "ticketbooth-load compare"
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REGRESSION = 3

#: The whole-run figures compared: JSON path, label, and whether higher is better.
METRICS = (
    (("throughput_rps",), "throughput req/s", True),
    (("latency_ms", "p50"), "p50 ms", False),
    (("latency_ms", "p90"), "p90 ms", False),
    (("latency_ms", "p99"), "p99 ms", False),
    (("latency_ms", "p99.9"), "p99.9 ms", False),
    (("latency_ms", "max"), "max ms", False),
)
#: Per stage, when both runs ran the same stages.
STAGE_METRICS = (("achieved_rps",), ("latency_ms", "p50"), ("latency_ms", "p90"),
                 ("latency_ms", "p99"))
#: Settings whose difference is pointed out (the runs are still compared).
SETTINGS = ("mode", "booths", "quantity", "rate", "requests", "duration_s", "processes",
            "think_ms", "spawn")


class CompareError(Exception):
    """An input that cannot be read, or two runs that cannot be compared."""


def _get(data: dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = data
    for key in path:
        value = value[key]
    return value


def load_result(path: str) -> dict[str, Any]:
    """A JSON result of ``ticketbooth-load --json``; CompareError saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise CompareError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CompareError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or "version" not in data:
        raise CompareError(f"{path} is not a ticketbooth-load JSON result")
    if data["version"] != JSON_VERSION:
        raise CompareError(f"{path} has JSON version {data['version']!r}; this "
                           f"ticketbooth-load reads version {JSON_VERSION}")
    try:
        for metric, _, _ in METRICS:
            float(_get(data, metric))
        float(data["error_rate"])
        for check in data["checks"]:
            str(check["name"]), bool(check["passed"])
        dict(data["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CompareError(f"{path} is not a whole ticketbooth-load JSON result "
                           f"(missing or wrong: {exc})") from None
    if not data.get("requests"):
        raise CompareError(f"{path} holds a run that sent no request: nothing to compare")
    return data


def _change(base: float, new: float) -> float | None:
    """The change from base to new in percent of base (None when base is 0)."""
    if base == 0:
        return None if new else 0.0
    return (new - base) / base * 100.0


def _same_stages(base: dict[str, Any], new: dict[str, Any]) -> bool:
    b, n = base["config"], new["config"]
    return (bool(b.get("stages")) and b.get("stages") == n.get("stages")
            and (b.get("start_rate") or 0) == (n.get("start_rate") or 0)
            and bool(base.get("stages")) and bool(new.get("stages")))


def compare(base: dict[str, Any], new: dict[str, Any], *, max_throughput_drop: float | None = None,
            max_p99_rise: float | None = None, max_error_rate_rise: float | None = None
            ) -> dict[str, Any]:
    """The comparison as JSON-able data, with the gates' verdicts and ``exit_status``."""
    metrics: list[dict[str, Any]] = []
    for path, label, higher_better in METRICS:
        b, n = float(_get(base, path)), float(_get(new, path))
        metrics.append({"name": ".".join(path), "label": label, "base": b, "new": n,
                        "change_pct": _change(b, n), "higher_is_better": higher_better})
    error_base, error_new = float(base["error_rate"]), float(new["error_rate"])
    error_points = (error_new - error_base) * 100.0
    checks: dict[str, dict[str, Any]] = {}
    for side, data in (("base", base), ("new", new)):
        for c in data["checks"]:
            checks.setdefault(c["name"], {"name": c["name"], "base": None, "new": None})[side] = (
                bool(c["passed"]))
    for c in checks.values():
        c["regression"] = c["base"] is True and c["new"] is False

    notes = []
    stages = None
    if _same_stages(base, new):
        stages = []
        for bs, ns in zip(base["stages"], new["stages"], strict=True):
            row: dict[str, Any] = {"stage": bs["stage"]}
            for path in STAGE_METRICS:
                b, n = float(_get(bs, path)), float(_get(ns, path))
                row[".".join(path)] = {"base": b, "new": n, "change_pct": _change(b, n)}
            stages.append(row)
    elif base["config"].get("stages") or new["config"].get("stages"):
        notes.append("the runs' stages differ: comparing the whole-run figures only")
    for key in SETTINGS:
        b, n = base["config"].get(key), new["config"].get(key)
        if b != n:
            notes.append(f"the runs' {key} differ: {b} in BASE, {n} in NEW")

    gates = []
    by_name = {m["name"]: m for m in metrics}
    throughput, p99 = by_name["throughput_rps"], by_name["latency_ms.p99"]
    if max_throughput_drop is not None:
        drop = -(throughput["change_pct"] or 0.0)
        gates.append({"name": "max-throughput-drop", "limit": max_throughput_drop,
                      "value": drop, "unit": "%", "passed": drop <= max_throughput_drop})
    if max_p99_rise is not None:
        rise = p99["change_pct"] or 0.0
        gates.append({"name": "max-p99-rise", "limit": max_p99_rise, "value": rise, "unit": "%",
                      "passed": rise <= max_p99_rise})
    if max_error_rate_rise is not None:
        gates.append({"name": "max-error-rate-rise", "limit": max_error_rate_rise,
                      "value": error_points, "unit": " points",
                      "passed": error_points <= max_error_rate_rise})
    regressions = [f"check {c['name']} passed in BASE and fails in NEW"
                   for c in checks.values() if c["regression"]]
    regressions += [f"{g['name']}: {g['value']:+.2f}{g['unit']} > {g['limit']:g}{g['unit']}"
                    for g in gates if not g["passed"]]
    return {
        "base": {"started_at": base.get("started_at"), "config": base["config"]},
        "new": {"started_at": new.get("started_at"), "config": new["config"]},
        "metrics": metrics,
        "error_rate": {"base": error_base, "new": error_new, "change_points": error_points},
        "checks": list(checks.values()),
        "stages": stages,
        "notes": notes,
        "gates": gates,
        "regressions": regressions,
        "exit_status": EXIT_REGRESSION if regressions else EXIT_OK,
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


def _num(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"


def _verdict(check: bool | None) -> str:
    return "-" if check is None else ("PASS" if check else "FAIL")


def verdict(result: dict[str, Any]) -> str:
    if result["regressions"]:
        return "REGRESSION: " + "; ".join(result["regressions"])
    if result["gates"]:
        return "OK: no regression past the limits"
    return "OK: no check regressed (no limits given)"


def _rows(result: dict[str, Any]) -> list[list[str]]:
    rows = [[m["label"], _num(m["base"]), _num(m["new"]), _pct(m["change_pct"])]
            for m in result["metrics"]]
    e = result["error_rate"]
    rows.append(["error rate", f"{e['base']:.2%}", f"{e['new']:.2%}",
                 f"{e['change_points']:+.2f} points"])
    rows += [[f"check {c['name']}", _verdict(c["base"]), _verdict(c["new"]),
              "REGRESSION" if c["regression"] else ""] for c in result["checks"]]
    return rows


def _stage_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in result["stages"] or []:
        for key, label in (("achieved_rps", "achieved req/s"), ("latency_ms.p50", "p50 ms"),
                           ("latency_ms.p90", "p90 ms"), ("latency_ms.p99", "p99 ms")):
            v = s[key]
            rows.append([f"stage {s['stage']} {label}", _num(v["base"]), _num(v["new"]),
                         _pct(v["change_pct"])])
    return rows


def _text_table(rows: list[list[str]]) -> list[str]:
    head = ["", "BASE", "NEW", "change"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in
                                                  zip(r[1:], widths[1:], strict=True))]).rstrip()
             for r in [head, *rows]]
    return [lines[0], "-" * max(len(x) for x in lines), *lines[1:]]


def format_compare(result: dict[str, Any], base_path: str, new_path: str) -> str:
    lines = [f"{PROG}: BASE {base_path} (started {result['base']['started_at']}), "
             f"NEW {new_path} (started {result['new']['started_at']})", ""]
    lines += _text_table(_rows(result) + _stage_rows(result))
    if result["notes"]:
        lines += ["", *(f"note: {n}" for n in result["notes"])]
    if result["gates"]:
        lines += ["", "gates"]
        for g in result["gates"]:
            sign = "<=" if g["passed"] else ">"
            lines.append(f"  {'PASS' if g['passed'] else 'FAIL'}  {g['name']}: "
                         f"{g['value']:+.2f}{g['unit']} {sign} {g['limit']:g}{g['unit']}")
    lines += ["", verdict(result)]
    return "\n".join(lines)


def render_html(result: dict[str, Any], base_path: str, new_path: str) -> str:
    ok = not result["regressions"]
    rows = _rows(result) + _stage_rows(result)
    body = [
        "<h1>ticketbooth load test: compare</h1>",
        f'<p class="sub">BASE {escape(base_path)} (started '
        f'{escape(str(result["base"]["started_at"]))}), NEW {escape(new_path)} (started '
        f'{escape(str(result["new"]["started_at"]))})</p>',
        f'<p class="verdict {"pass" if ok else "fail"}" id="verdict">'
        f"{escape(verdict(result))}</p>",
        table(["", "BASE", "NEW", "change"], rows, text_cols=(0,),
              cell_class={(i, 3): "fail" for i, r in enumerate(rows) if r[3] == "REGRESSION"}),
    ]
    if result["gates"]:
        body += ["<h2>Gates</h2>", table(
            ["verdict", "gate", "value", "limit"],
            [("PASS" if g["passed"] else "FAIL", g["name"], f"{g['value']:+.2f}{g['unit']}",
              f"{g['limit']:g}{g['unit']}") for g in result["gates"]], text_cols=(1,),
            cell_class={(i, 0): "badge " + ("pass" if g["passed"] else "fail")
                        for i, g in enumerate(result["gates"])})]
    body += [f'<p class="muted">note: {escape(n)}</p>' for n in result["notes"]]
    return page("ticketbooth load test compare: " + verdict(result), body)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compare two JSON results of ticketbooth-load --json side by side: "
                    "throughput, latency percentiles, error rate, each check's verdict (and "
                    "each stage when both ran the same stages), with the change in percent.",
        epilog="Exit status: 0 no regression, 2 unreadable input or runs that cannot be "
               "compared, 3 a regression: a limit breached, or a check that passed in BASE "
               "fails in NEW.")
    p.add_argument("base", metavar="BASE.json", help="the reference run")
    p.add_argument("new", metavar="NEW.json", help="the run checked against it")
    p.add_argument("--max-throughput-drop", type=non_negative_float, metavar="PCT",
                   help="regression when NEW's throughput is more than PCT percent below BASE's")
    p.add_argument("--max-p99-rise", type=non_negative_float, metavar="PCT",
                   help="regression when NEW's p99 latency is more than PCT percent above "
                        "BASE's")
    p.add_argument("--max-error-rate-rise", type=non_negative_float, metavar="POINTS",
                   help="regression when NEW's error rate is more than POINTS percentage points "
                        "above BASE's (from 0%% to 1.5%% is 1.5 points)")
    p.add_argument("--json", metavar="PATH", dest="json_path",
                   help="write the comparison as JSON to PATH, or to stdout with '-' (the table "
                        "then goes to stderr)")
    p.add_argument("--html", metavar="PATH.html",
                   help="write the comparison as a self-contained HTML page")
    return p


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run_compare(argv: Sequence[str]) -> int:
    """``ticketbooth-load compare``: answer the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    out: IO[str] = sys.stderr if args.json_path == "-" else sys.stdout
    try:
        for path in (args.json_path, args.html):
            if path and path != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise CompareError(f"no such directory for {path!r}")
        base, new = load_result(args.base), load_result(args.new)
    except CompareError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result = compare(base, new, max_throughput_drop=args.max_throughput_drop,
                     max_p99_rise=args.max_p99_rise, max_error_rate_rise=args.max_error_rate_rise)
    print(format_compare(result, args.base, args.new), file=out)
    try:
        if args.json_path == "-":
            json.dump(result, sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif args.json_path:
            _write(args.json_path, json.dumps(result, indent=2) + "\n")
        if args.html:
            _write(args.html, render_html(result, args.base, args.new))
    except OSError as exc:
        print(f"{PROG}: error: cannot write the result: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return int(result["exit_status"])
