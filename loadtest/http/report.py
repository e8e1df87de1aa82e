"""The report: a terminal table, and a self-contained HTML page (inline SVG, no script)."""

from __future__ import annotations

from html import escape
from typing import Any

from loadtest import sweep_report
from loadtest.http.svg import bar_chart, html_table, line_chart

SIDES = ("sandboxed", "bare")


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _sides(w: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(side, its summary, its ratios to bare) for sandboxed, bare and each peer that ran."""
    sides = [(side, w[side], w.get("overhead", {}) if side == "sandboxed" else {})
             for side in SIDES if side in w]
    return sides + [(peer, s, s.get("overhead", {})) for peer, s in w.get("peers", {}).items()
                    if "skipped" not in s]


def _tight_sides(w: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The tight bare loops (loadtest.baseline) as rows: (side, summary-shaped figures)."""
    return [(LOOP_SIDES[m], {"requests": t["runs"], "errors": 0,
                                  "throughput_per_s": t["runs_per_s"],
                                  "latency_ms": t["latency_ms"],
                                  "in_flight_mean": t["concurrency"]})
            for m, t in w.get("tight_bare", {}).items()]


def _rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, w in report["workloads"].items():
        sides = [*_sides(w), *((side, s, {}) for side, s in _tight_sides(w))]
        for side, s, ratio in sides:
            lat = s["latency_ms"]
            fast = s.get("vs_fastest_bare", {})
            rows.append([name, side, str(s["requests"]), str(s["errors"]),
                         _f(s["throughput_per_s"], 1), _f(lat.get("p50")), _f(lat.get("p90")),
                         _f(lat.get("p99")), _f(lat.get("p99_9")),
                         _f(ratio.get("p50")), _f(ratio.get("p99")),
                         _f(ratio.get("throughput")), _f(s.get("in_flight_mean")),
                         _f(fast.get("p50")), _f(fast.get("p99")),
                         _f(fast.get("throughput"))])
    return rows


LOOP_SIDES = {"fork_exec": "bare fork+exec loop", "posix_spawn": "bare posix_spawn loop"}
HEAD = ["workload", "side", "requests", "errors", "runs/s", "p50 ms", "p90 ms", "p99 ms",
        "p99.9 ms", "x p50", "x p99", "x runs/s", "in flight", "xf p50", "xf p99",
        "xf runs/s"]
LEGEND = ("x: sandboxed / bare, or peer / bare (bare: the same client loop posix_spawning "
          "from a thread); xf: the same against the fastest tight bare loop "
          "(loadtest.baseline: no event loop, a session of its own, the same concurrency); "
          "latency above 1 is slower, runs/s below 1 is fewer; in flight: requests at once "
          "on average (Little's law), sandboxed runs executing at once: running")


def _submissions(w: dict[str, Any]) -> list[str]:
    """The compile and per-case times of a workload whose requests are submissions."""
    lines = []
    for side in SIDES:
        sub = w.get(side, {}).get("submission")
        if sub:
            c, k = sub["compile_ms"], sub["case_ms"]
            lines.append(f"{side}: compile p50 {_f(c.get('p50'))} ms, p99 {_f(c.get('p99'))} "
                         f"ms; each of {sub['cases_per_submission']} cases p50 "
                         f"{_f(k.get('p50'))} ms, p99 {_f(k.get('p99'))} ms")
    return lines


def table(report: dict[str, Any]) -> str:
    rows = [HEAD, *_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    lines = ["  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                       for i, c in enumerate(r)) for r in rows]
    lines.append(LEGEND)
    for name, w in report["workloads"].items():
        s = w["sandboxed"]
        extra = f", pool {s['pool']}" if "pool" in s else ""
        extra += f", running {s['running_mean']}" if "running_mean" in s else ""
        lines.append(f"{name}: statuses {s['statuses']}, http {s['http']}{extra}")
        lines.extend(f"  {line}" for line in _submissions(w))
        for e in s["error_samples"]:
            lines.append(f"  error: {e}")
        lines += [f"  {side} error: {e}" for side, p, _ in _sides(w) if side != "sandboxed"
                  for e in p["error_samples"]]
    lines += [f"peer {n} skipped: {p['skipped']}" for n, p in report.get("peers", {}).items()
              if "skipped" in p]
    if "sweep" in report:
        lines += ["", sweep_report.table(report["sweep"])]
    return "\n".join(lines)


def _cdfs(report: dict[str, Any]) -> str:
    charts = []
    for name, w in report["workloads"].items():
        series = [(side, [(x, y) for x, y in w[side]["cdf_ms"]]) for side in SIDES if side in w]
        charts.append(line_chart(f"{name}: latency CDF", series, xlabel="latency (ms, log)",
                                 ylabel="fraction of requests", log_x=True, step=True))
    return "".join(charts)


def _timelines(report: dict[str, Any]) -> str:
    charts = []
    for name, w in report["workloads"].items():
        series = []
        for side in SIDES:
            if side in w:
                t = w[side]["timeline"]
                series.append((side, [(i * t["bucket_s"], v) for i, v in enumerate(t["per_s"])]))
        charts.append(line_chart(f"{name}: throughput over time", series, xlabel="time (s)",
                                 ylabel="runs per second", step=True))
    return "".join(charts)


def _overhead(report: dict[str, Any]) -> str:
    names = [n for n, w in report["workloads"].items() if "overhead" in w]
    if not names:
        return "<p>No bare baseline in this run (--no-bare).</p>"
    ws = report["workloads"]
    ratios = bar_chart("sandboxed / bare", names,
                       [(k, [ws[n]["overhead"][k] or 0.0 for n in names])
                        for k in ("p50", "p99", "throughput")],
                       ylabel="ratio (1 = bare)", reference=1.0)
    medians = bar_chart("median latency (ms)", names,
                        [(side, [ws[n][side]["latency_ms"].get("p50", 0.0) for n in names])
                         for side in SIDES], ylabel="ms")
    return ratios + medians


def _peers(report: dict[str, Any]) -> str:
    peers = report.get("peers")
    if not peers:
        return "<p>No peers in this run (--peers none).</p>"
    charts = []
    for name, w in report["workloads"].items():
        sides = _sides(w)
        if any(side in peers for side, _, _ in sides):
            lat = [s["latency_ms"] for _, s, _ in sides]
            charts.append(bar_chart(f"{name}: latency per side (ms)", [s for s, _, _ in sides],
                                    [(k, [x.get(k, 0.0) for x in lat]) for k in ("p50", "p99")],
                                    ylabel="ms"))
    rows = [[n, "skipped: " + p["skipped"] if "skipped" in p else p["command"]]
            for n, p in peers.items()]
    return ("".join(charts) + "<p>Each peer runs the same busybox command in the same rootfs "
            "(read-only), with /proc, /dev, a tmpfs /tmp, every namespace including the "
            "network, no capabilities and no new privileges; one process per request, "
            "spawned like the bare baseline. Its probe's command line:</p>"
            + html_table(["peer", "command, or why it was skipped"], rows))


def _metrics(report: dict[str, Any]) -> str:
    before, after = report["metrics_before"], report["metrics_after"]
    rows = [[k, _f(before.get(k)), _f(after.get(k)), _f(report["metrics_delta"].get(k, 0.0))]
            for k in sorted(set(before) | set(after))]
    return html_table(["series", "before", "after", "change"], rows)


def _statuses(report: dict[str, Any]) -> str:
    rows = []
    for name, w in report["workloads"].items():
        for side, s, _ in _sides(w):
            rows.append([name, side, str(s["statuses"]), str(s["http"]),
                         str(s.get("pool", "-")), "; ".join(s["error_samples"]) or "-"])
    return html_table(["workload", "side", "run statuses", "http", "warm pool", "errors"],
                       rows)


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}svg{margin:4px;border:1px solid #eee}
code{background:#f4f4f4;padding:1px 3px}"""


def _sweep(report: dict[str, Any]) -> str:
    if "sweep" in report:
        return sweep_report.section_html(report["sweep"])
    return ('<section id="isolation-sweep"><h2>Isolation sweep: what each layer costs</h2>'
            "<p>Not run: add <code>--sweep ROUNDS</code> (or run <code>python -m "
            "loadtest.sweep</code>) for the cost of seccomp, the network namespace, "
            "cgroups, a writable root and a cold container.</p></section>")


def html(report: dict[str, Any], command: str) -> str:
    mode = (f"open loop at {report['rate_per_s']:g} requests/s (latency from each "
            f"request's scheduled send time)" if report["mode"] == "open"
            else f"closed loop, {report['concurrency']} at once")
    bound = (f"{report['requests']} requests" if report["requests"]
             else f"{report['duration_s']:g} s")
    workloads = "".join(f"<li><b>{escape(n)}</b> ({escape(w['policy'])} policy): "
                        f"{escape(w['measures'])}<br><code>{escape(w['script'])}</code>"
                        + "".join(f"<br>{escape(line)}" for line in _submissions(w))
                        + "</li>" for n, w in report["workloads"].items())
    host = report["host"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sandboxd load test</title>
<style>{STYLE}</style></head><body>
<h1>sandboxd load test</h1>
<p><code>{escape(command)}</code></p>
<p>{escape(mode)}; {escape(bound)} per workload and side, after {report['warmup']} warm-up
runs. Service {escape(report['url'])}, image <code>{escape(report['image'])}</code>.
Kernel {escape(host['kernel'])}, Python {escape(host['python'])}, {host['cpus']} CPUs.
The bare baseline runs the same busybox and script as a local process (posix_spawn from a
thread, same concurrency), without isolation.</p>
<section id="summary"><h2>Summary</h2>{html_table(HEAD, _rows(report))}
<p>{escape(LEGEND)}.</p><ul>{workloads}</ul></section>
<section id="cdf"><h2>Latency CDF</h2>{_cdfs(report)}</section>
<section id="throughput"><h2>Throughput over time</h2>{_timelines(report)}</section>
<section id="overhead"><h2>Sandboxed vs bare</h2>{_overhead(report)}</section>
<section id="peers"><h2>Peers side by side</h2>{_peers(report)}</section>
<section id="statuses"><h2>Statuses and errors</h2>{_statuses(report)}</section>
<section id="metrics"><h2>Service metrics (/metrics) before and after</h2>{_metrics(report)}
</section>
{_sweep(report)}
</body></html>
"""
