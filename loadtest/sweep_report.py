"""How the isolation sweep (loadtest/sweep.py) reads: terminal tables, and an HTML fragment
for the load test's report, from the sweep's JSON object."""

from __future__ import annotations

from html import escape
from typing import Any

from loadtest.http.svg import bar_chart, html_table

HEAD = ["variant", "median ms", "p99 ms", "cpu ms", "x bare", "x fastest bare", "vs full ms"]
LAYER_CAPTION = ("what each layer costs: the difference of two variants' medians, of the "
                 "host-side time (wall) and of the run's CPU time (cpu); noise can make a "
                 "small one negative")
KINDS = ("wall", "cpu")


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _rows(result: dict[str, Any], program: str) -> list[list[str]]:
    rows = []
    for key, v in result["variants"].items():
        f = v[program]
        rows.append([f"{key}: {v['label']}", _f(f["median_ms"]), _f(f["p99_ms"]),
                     _f(f["cpu_median_ms"]), f"{f['ratio_vs_bare']:.2f}x",
                     f"{f['ratio_vs_fastest_bare']:.2f}x",
                     _f(f["delta_vs_full_ms"], "+.3f")])
    return rows


def _caption(result: dict[str, Any], program: str) -> str:
    p = result["programs"][program]
    tight = "; ".join(f"{t['how']} {t['latency_ms']['p50']:.3f} ms"
                      for t in p["tight_bare"].values())
    return (f"{p['label']}: {p['rounds']} rounds, variants interleaved; median/p99 of the "
            "host-side time per run, cpu from the run's cgroup (rusage without one); "
            f"x bare: to the interleaved bare variant; x fastest bare: to the faster tight "
            f"bare loop, same run (median {tight})")


def _layer_rows(result: dict[str, Any]) -> list[list[str]]:
    costs = result["layer_cost_ms"]
    return [[f"{la['name']} ({la['with_it']} - {la['without']})",
             *(_f(costs[p][la["name"]][kind], "+.3f") for p in costs for kind in KINDS)]
            for la in result["layers"]]


def _layer_head(result: dict[str, Any]) -> list[str]:
    return ["layer: cost per run", *(f"{p} {kind} ms" for p in result["layer_cost_ms"]
                                     for kind in KINDS)]


def _text(head: list[str], rows: list[list[str]]) -> list[str]:
    rows = [head, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                      for i, c in enumerate(r)) for r in rows]


def _machine(result: dict[str, Any]) -> str:
    line = (f"kernel {result['kernel']}, {result['cpus']} cpus, cgroup "
            f"{result['cgroup_driver']}, id mapping {result['id_mapping']}")
    if result["cgroup_driver"] == "none":
        line += " (no cgroups here, so full has none either: run `sandboxd setup`)"
    return line


def table(result: dict[str, Any]) -> str:
    """The sweep as terminal text: one block per program, then the cost of each layer."""
    blocks = [f"sandboxd isolation sweep: {_machine(result)}"]
    blocks += ["\n".join([_caption(result, p), *_text(HEAD, _rows(result, p))])
               for p in result["programs"]]
    blocks.append("\n".join([LAYER_CAPTION, *_text(_layer_head(result),
                                                   _layer_rows(result))]))
    return "\n\n".join(blocks)


def section_html(result: dict[str, Any]) -> str:
    """An HTML fragment for the load-test report: tables and bar charts."""
    tables = "".join(f"<p>{escape(_caption(result, p))}</p>{html_table(HEAD, _rows(result, p))}"
                     for p in result["programs"])
    costs = result["layer_cost_ms"]
    warm_layers = [la["name"] for la in result["layers"] if la["warm"]]
    # A bar cannot go below the axis: a cost lost in noise (negative) is drawn as 0.
    # One chart per program: their scales differ a hundredfold.
    per_layer = "".join(
        bar_chart(f"overhead per isolation layer: {result['programs'][p]['label']}",
                  warm_layers, [(kind, [max(0.0, costs[p][name][kind] or 0.0)
                                        for name in warm_layers]) for kind in KINDS],
                  ylabel="ms per run (warm exec)") for p in costs)
    keys = list(result["variants"])
    ratios = bar_chart("each variant / bare (median)",
                       [k.replace("writable_", "rw ") for k in keys],  # labels fit 8 groups
                       [(p, [result["variants"][k][p]["ratio_vs_bare"] for k in keys])
                        for p in result["programs"]],
                       ylabel="ratio (1 = bare)", reference=1.0)
    layers = html_table(_layer_head(result), _layer_rows(result))
    return (f'<section id="isolation-sweep"><h2>Isolation sweep: what each layer costs</h2>'
            f"<p>In-process through the runtime (no HTTP); {escape(_machine(result))}. "
            f"vs full: the variant's median minus full's.</p>{tables}"
            f"<p>{escape(LAYER_CAPTION)}</p>{layers}{per_layer}{ratios}</section>")
