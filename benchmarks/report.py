"""Turn ``results.json`` into ``report.md`` (docs-ready tables) and PNG plots.

``python -m benchmarks.report [DIR]`` re-renders a results directory without re-running.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from worker.config import DEFAULT_MAX_BATCH_SIZE_CPU, DEFAULT_MAX_BATCH_SIZE_GPU

SERVER_ORDER = ("batchwire", "batchwire-count", "batchwire-msgpack", "guide", "guide-batching")
COLORS = {"batchwire": "tab:blue", "batchwire-count": "tab:green",
          "batchwire-msgpack": "tab:cyan", "guide": "tab:red", "guide-batching": "tab:orange"}
#: Colours for --bw-variant rows, in the order they appear.
EXTRA_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:gray")
#: The baseline of the token-aware batching table (issue 7).
COUNT_ROW = "batchwire-count"


def ordered_rows(servers: dict) -> list[str]:
    """Result rows in report order: batchwire's rows (its batching variants among them),
    then the guide's."""
    known = [s for s in SERVER_ORDER if s in servers]
    extra = [s for s in servers if s not in SERVER_ORDER]
    return ([s for s in known if s.startswith("batchwire")] + extra
            + [s for s in known if not s.startswith("batchwire")])


def _color(name: str, servers: dict) -> str | None:
    if name in COLORS:
        return COLORS[name]
    extra = [s for s in servers if s not in COLORS]
    return EXTRA_COLORS[extra.index(name) % len(EXTRA_COLORS)]


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _closed_points(server: dict) -> list[dict]:
    return [p for p in server.get("points", []) if p.get("mode") == "closed"]


def _point_at(server: dict | None, concurrency: int) -> dict | None:
    if not server:
        return None
    return next((p for p in _closed_points(server) if p["concurrency"] == concurrency), None)


def _statuses(point: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in point["statuses"].items())


def _ceiling_best(ceiling: dict | None) -> float | None:
    if not ceiling or "error" in ceiling:
        return None
    return ceiling.get("best_items_per_s")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


def machine_section(results: dict) -> list[str]:
    m = results["machine"]
    v = m.get("versions", {})
    versions = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    load = m.get("load_average")
    load_end = m.get("load_average_end")
    lines = [
        "| | |",
        "|---|---|",
        f"| command | `{results['command']}` |",
        f"| started | {results.get('started_at')} ({_fmt(results.get('elapsed_s'), 0)} s) |",
        f"| CPU | {m.get('cpu_model')}, {m.get('cpu_count')} logical cores "
        f"({m.get('cpus_usable')} usable) |",
        *([f"| GPU | {'; '.join(m['gpus'])} |"] if m.get("gpus") else []),
        f"| model device | {results.get('config', {}).get('device') or 'cpu'} (every server "
        "and the ceiling) |",
        f"| platform | {m.get('platform')}, Python {m.get('python')} |",
        f"| versions | {versions} |",
        f"| git | {m.get('git_commit')}{' (uncommitted changes)' if m.get('git_dirty') else ''} |",
    ]
    if load:
        lines.append(f"| load average (1, 5, 15 min) | start {', '.join(f'{x:.2f}' for x in load)}"
                     + (f"; end {', '.join(f'{x:.2f}' for x in load_end)}" if load_end else "")
                     + " |")
    cfg = results["config"]
    bw = cfg["batchwire"]
    lines.append(f"| per point | {cfg['warmup_s']} s warm-up, then {cfg['duration_s']} s or "
                 f"{cfg['max_requests']} requests, closed loop; {cfg['inputs']} distinct inputs |")
    max_batch = bw["max_batch_size"] or (f"default ({DEFAULT_MAX_BATCH_SIZE_CPU} on cpu, "
                                          f"{DEFAULT_MAX_BATCH_SIZE_GPU} on a GPU)")
    lines.append(f"| batchwire | {bw['workers']} worker(s), max batch {max_batch}, "
                 f"max delay {bw['max_delay_ms']} ms {bw.get('extra') or ''} |")
    variants = bw.get("variants") or {}
    if variants:
        lines.append("| batchwire batching variants | "
                     + "; ".join(f"`{name}`: + `{' '.join(flags)}`"
                                 for name, flags in variants.items()) + " |")
    threads = cfg.get("torch_threads")
    default = "each server's default (torch: one per core; batchwire: cores / workers)"
    lines.append(f"| torch threads | {threads or default}"
                 + (f"; environment {cfg['omp_env']}" if cfg.get("omp_env") else "") + " |")
    dtype = cfg.get("dtype") or "each checkpoint's own"
    lines.append(f"| model dtype | {dtype}, every server and the ceiling |")
    cap = cfg.get("guide_batching_max_batch_size")
    if cap is not None:
        lines.append(f"| guide batching variant | max batch "
                     f"{cap or 'unlimited (as in the guide)'} |")
    return lines


def loadgen_section(results: dict) -> list[str]:
    lc = results.get("loadgen_ceiling")
    if not lc:
        return ["Not measured in this run (`--no-loadgen-ceiling`)."]
    if "error" in lc:
        return [f"Failed: {lc['error']}"]
    lat = lc["latency_ms"]
    server_cpu = lc.get("server_cpu_s")
    return [
        f"Against a trivial aiohttp server answering a constant (closed loop, "
        f"C={lc['concurrency']}, {lc['wall_s']:.1f} s): **{lc['throughput_rps']:,.0f} req/s**, "
        f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms; the generator used "
        f"{lc['loadgen_cpu_util']:.2f} cores"
        + (f" and the trivial server {server_cpu / lc['wall_s']:.2f}" if server_cpu else "")
        + ". Every server point below is far under that rate, and its `loadgen` CPU column "
        "shows what the generator took from the machine while measuring it.",
    ]


def ceiling_table(ceiling: dict | None) -> list[str]:
    if not ceiling:
        return ["Not measured in this run (`--no-ceiling`)."]
    if "error" in ceiling:
        return [f"Failed: {ceiling['error']}"]
    lists = any("items_per_s_as_lists" in row for row in ceiling["batch_sizes"])
    if lists:
        lines = ["| batch size | items/s (tensors) | ms per call | items/s as lists "
                 "(`tolist()`) | items/s incl. `tolist()` + `json.dumps` | JSON bytes per item |",
                 "|---:|---:|---:|---:|---:|---:|"]
    else:
        lines = ["| batch size | items/s | ms per call | items/s incl. `json.dumps` "
                 "| JSON bytes per item |",
                 "|---:|---:|---:|---:|---:|"]
    for row in ceiling["batch_sizes"]:
        best = " **(best)**" if row["batch_size"] == ceiling["best_batch_size"] else ""
        as_lists = f"{_fmt(row.get('items_per_s_as_lists'))} | " if lists else ""
        lines.append(f"| {row['batch_size']}{best} | {_fmt(row['items_per_s'])} | "
                     f"{_fmt(row['ms_per_call'])} | {as_lists}"
                     f"{_fmt(row.get('items_per_s_with_json'))} | "
                     f"{_fmt(row.get('json_bytes_per_item'), 0)} |")
    gain = _ratio(ceiling["best_items_per_s"], ceiling.get("unbatched_items_per_s"))
    lines += ["", f"Best: batch {ceiling['best_batch_size']}, "
              f"{ceiling['best_items_per_s']:,.1f} items/s"
              + (f", {gain:.2f} × the unbatched rate" if gain else "")
              + f" (torch threads: {ceiling.get('torch_threads')})."]
    if ceiling.get("best_items_per_s_with_json"):
        lines[-1] += (f" With `json.dumps` of the answers: best "
                      f"{ceiling['best_items_per_s_with_json']:,.1f} items/s.")
    if ceiling.get("outputs"):
        lines[-1] += f" Outputs timed: {ceiling['outputs']}."
    return lines


def server_table(workload: dict) -> list[str]:
    best = _ceiling_best(workload.get("ceiling"))
    lines = ["| server | load | req/s | × ceiling | p50 ms | p90 ms | p99 ms | max ms | "
             "mean batch | KB per answer | statuses | CPU server / loadgen / others | "
             "load avg 1 min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    servers = workload["servers"]
    for name in ordered_rows(servers):
        entry = servers[name]
        if not entry.get("points") and entry.get("error"):
            lines.append(f"| {name} | failed | | | | | | | | | "
                         f"{entry['error'].splitlines()[0]} | | |")
            continue
        for p in entry["points"]:
            load = f"C={p['concurrency']}" if p["mode"] == "closed" else f"{p['rate']:g}/s open"
            lat = p["latency_ms"]
            cpu = p.get("cpu_cores", {})
            kb = p["bytes_received"] / p["requests"] / 1000 if p.get("requests") else None
            la = p.get("load_average_1min")
            lines.append(
                f"| {name} | {load} | {_fmt(p['throughput_rps'])} | "
                f"{_fmt(_ratio(p['throughput_rps'], best), 2)} | {_fmt(lat['p50'])} | "
                f"{_fmt(lat['p90'])} | {_fmt(lat['p99'])} | {_fmt(lat['max'])} | "
                f"{_fmt(p.get('mean_batch_size'))} | {_fmt(kb)} | {_statuses(p)} | "
                f"{_fmt(cpu.get('server'), 2)} / {_fmt(cpu.get('loadgen'), 2)} / "
                f"{_fmt(cpu.get('others'), 2)} | "
                f"{' → '.join(f'{x:.2f}' for x in la) if la else '–'} |")
        if entry.get("error"):
            lines.append(f"| {name} | error | | | | | | | | | {entry['error'].splitlines()[0]} "
                         f"| | |")
    lines += ["", "× ceiling: the server's requests/s over the raw pipeline's items/s at its best "
              "batch size, in this run. CPU columns are in cores (CPU seconds per second): the "
              "server's whole process tree, the load generator, and everything else on the "
              "machine. Mean batch is batchwire's X-Batch-Size header (the guide's servers do "
              "not report it). Load average: the machine's 1-minute load before → after the "
              "point."]
    if any(p.get("decode", "none") != "none" for e in servers.values()
           for p in e.get("points", [])):
        lines[-1] += (" Every answer was parsed by the load generator (see each server's "
                      "request below) inside its timed request; `bad-answer` counts 200s that "
                      "did not parse or had the wrong shape.")
    requests = [(name, servers[name].get("request")) for name in ordered_rows(servers)
                if servers[name].get("request")]
    if requests:
        lines += [""] + [f"- `{name}`: {how}" for name, how in requests]
    return lines


def ratio_lines(workload: dict) -> list[str]:
    servers = workload["servers"]
    bw, guide = servers.get("batchwire"), servers.get("guide")
    best = _ceiling_best(workload.get("ceiling"))
    out = []
    cs = sorted({p["concurrency"] for s in servers.values() for p in _closed_points(s)})
    high = 64 if 64 in cs else (max(cs) if cs else None)
    if high is not None:
        b, g = _point_at(bw, high), _point_at(guide, high)
        if b and best:
            out.append(f"- C={high}: batchwire throughput = {b['throughput_rps'] / best:.2f} × "
                       f"the raw pipeline at its best batch size.")
        if b and g and g["throughput_rps"]:
            out.append(f"- C={high}: batchwire throughput = "
                       f"{b['throughput_rps'] / g['throughput_rps']:.2f} × the guide's server; "
                       f"p99 {b['latency_ms']['p99']:.1f} ms vs {g['latency_ms']['p99']:.1f} ms.")
    ceiling = workload.get("ceiling") or {}
    if high is not None and workload.get("answer") == "tokens":
        b, m, g = _point_at(bw, high), _point_at(servers.get("batchwire-msgpack"), high), \
            _point_at(guide, high)
        with_json = ceiling.get("best_items_per_s_with_json") if "error" not in ceiling else None
        def verdict(r: float, target: float) -> str:
            # The issue's targets are stated at C=64.
            if high != 64:
                return ""
            return f" (target ≥ {target:g} at C=64: {'met' if r >= target else 'not met'})"

        if b and g and g["throughput_rps"]:
            r = b["throughput_rps"] / g["throughput_rps"]
            out.append(f"- C={high}: batchwire JSON = {r:.2f} × the guide's server"
                       f"{verdict(r, 2)}.")
        if m and best:
            r = m["throughput_rps"] / best
            out.append(f"- C={high}: batchwire msgpack = {r:.2f} × the raw pipeline at its best "
                       f"batch size{verdict(r, 0.8)}.")
        if m and b and b["throughput_rps"]:
            out.append(f"- C={high}: batchwire msgpack = "
                       f"{m['throughput_rps'] / b['throughput_rps']:.2f} × batchwire JSON.")
        if with_json:
            for label, pt in (("batchwire JSON", b), ("the guide's server", g)):
                if pt:
                    out.append(f"- C={high}: {label} = {pt['throughput_rps'] / with_json:.2f} × "
                               f"the raw pipeline + `json.dumps` at its best batch size "
                               f"({with_json:,.1f} items/s).")
    if 1 in cs:
        b, g = _point_at(bw, 1), _point_at(guide, 1)
        if b and g and b["latency_ms"]["p50"] is not None and g["latency_ms"]["p50"] is not None:
            d = b["latency_ms"]["p50"] - g["latency_ms"]["p50"]
            out.append(f"- C=1: batchwire p50 {b['latency_ms']['p50']:.2f} ms vs the guide's "
                       f"{g['latency_ms']['p50']:.2f} ms ({d:+.2f} ms).")
    return out


def paired_lines(result: dict | None) -> list[str]:
    """The paired C=1 comparison (benchmarks/paired.py) as a table and a verdict."""
    if not result:
        return []
    if "error" in result:
        return [f"Failed: {result['error']}"]
    d, p = result["difference_ms"], result["p50_difference_ms"]
    low, high = p["95"]
    lines = ["| server | p50 ms | mean ms | requests |", "|---|---:|---:|---:|"]
    for name in result["servers"]:
        lines.append(f"| {name} | {result['p50_ms'][name]:.2f} | {result['mean_ms'][name]:.2f} "
                     f"| {result['requests_per_server']} |")
    # The issue's target: batchwire's p50 at most the guide's + 1 ms.
    verdict = ("met" if high <= 1.0 else "not met" if low > 1.0
               else "not settled: the interval straddles +1 ms")
    lines += ["", f"{p['of']}: **{p['value']:+.2f} ms** (95 % interval {low:+.2f} to "
              f"{high:+.2f}); target (≤ +1 ms): {verdict}. {d['of']}, request by request: "
              f"median {d['median']:+.2f} ms ({d['median_95'][0]:+.2f} to "
              f"{d['median_95'][1]:+.2f}), mean {d['mean']:+.2f} ms. "
              f"{result['inputs']} inputs in blocks of {result['block']}, "
              f"{result['rounds']} counted passes after a warm-up pass."]
    return lines


def interleaved_lines(results: list[dict] | None) -> list[str]:
    """The interleaved load points (benchmarks/interleaved.py) as one table."""
    if not results:
        return []
    ok = [r for r in results if "error" not in r]
    errors = [f"Failed: {r['error']}" for r in results if "error" in r]
    if not ok:
        return errors
    a, b = ok[0]["servers"]
    lines = [f"| C | {a} req/s | {b} req/s | {a} / {b} (95 %) | {a} p50 / p99 ms "
             f"| {b} p50 / p99 ms | rounds × slice |", "|---:|---:|---:|---:|---:|---:|---:|"]

    def lat(x: dict) -> str:
        p50, p99 = x["latency_ms"]["p50"], x["latency_ms"]["p99"]
        return "–" if p50 is None else f"{p50:.0f} / {p99:.0f}"

    for r in ok:
        ratio = r["throughput_ratio"]
        low, high = ratio["95"]
        lines.append(f"| {r['concurrency']} | {r[a]['throughput_rps']:.1f} | "
                     f"{r[b]['throughput_rps']:.1f} | **{ratio['value']:.2f}** ({low:.2f} to "
                     f"{high:.2f}) | {lat(r[a])} | {lat(r[b])} | {r['rounds']} × "
                     f"{r['slice_s']:g} s |")
    return lines + ([""] + errors if errors else [])


def _batching_rows(servers: dict) -> list[str]:
    """batchwire's JSON rows that differ in batching: ``batchwire`` and its variants."""
    return [s for s in ordered_rows(servers)
            if s == "batchwire" or s == COUNT_ROW or servers[s].get("variant_flags")]


def _batching_note(name: str, entry: dict) -> str:
    flags = entry.get("variant_flags")
    how = (f"the run's batchwire flags + `{' '.join(flags)}`" if flags
           else "batchwire's own batching (token-aware by default: a token budget and length "
           "buckets), with the run's batchwire flags")
    info = entry.get("batching")
    if info:
        settings = "; ".join(", ".join(f"{k} {v}" for k, v in w.items()) for w in info)
        how += f"; its workers report (`GET /info`): {settings}"
    return f"- `{name}`: {how}."


def batching_table(workload: dict) -> list[str]:
    """Token-aware (``batchwire``) against count-only (``batchwire-count``) batching, and
    the guide's rows, point by point on the same inputs: issue 7's comparison."""
    servers = workload["servers"]
    bw_rows = _batching_rows(servers)
    if "batchwire" not in servers or len(bw_rows) < 2:
        return []
    rows = bw_rows + [s for s in ("guide", "guide-batching") if s in servers]
    count, guide = servers.get(COUNT_ROW), servers.get("guide")
    cs = sorted({p["concurrency"] for name in rows for p in _closed_points(servers[name])})
    lines = ["| C | server | req/s | × count-only | × guide | p50 ms | p99 ms | "
             "p99 × count-only | mean batch | statuses |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in cs:
        base, g = _point_at(count, c), _point_at(guide, c)
        for name in rows:
            p = _point_at(servers[name], c)
            if p is None:
                error = servers[name].get("error")
                lines.append(f"| {c} | {name} | failed | | | | | | | "
                             f"{error.splitlines()[0] if error else 'not measured'} |")
                continue
            lat = p["latency_ms"]
            p99_ratio = (_ratio(lat["p99"], base["latency_ms"]["p99"])
                         if base and lat["p99"] is not None else None)
            lines.append(
                f"| {c} | {name} | {_fmt(p['throughput_rps'])} | "
                f"{_fmt(_ratio(p['throughput_rps'], base and base['throughput_rps']), 2)} | "
                f"{_fmt(_ratio(p['throughput_rps'], g and g['throughput_rps']), 2)} | "
                f"{_fmt(lat['p50'])} | {_fmt(lat['p99'])} | {_fmt(p99_ratio, 2)} | "
                f"{_fmt(p.get('mean_batch_size'))} | {_statuses(p)} |")
    lines += ["", "× count-only and × guide: this row's requests/s over `batchwire-count`'s "
              "and the guide's at the same concurrency, in this run; p99 × count-only below 1 "
              "is a lower tail. Mean batch: items per batch as batchwire reports it "
              "(X-Batch-Size). Batching of each batchwire row:", ""]
    lines += [_batching_note(name, servers[name]) for name in bw_rows]
    summary = []
    for c in cs:
        t, b, g = _point_at(servers["batchwire"], c), _point_at(count, c), _point_at(guide, c)
        if not t:
            continue
        parts = []
        if b and b["throughput_rps"]:
            parts.append(f"token-aware = {t['throughput_rps'] / b['throughput_rps']:.2f} × "
                         f"count-only throughput")
            if t["latency_ms"]["p99"] is not None and b["latency_ms"]["p99"]:
                parts.append(f"p99 {t['latency_ms']['p99']:.0f} vs "
                             f"{b['latency_ms']['p99']:.0f} ms "
                             f"({t['latency_ms']['p99'] / b['latency_ms']['p99']:.2f} ×)")
        if g and g["throughput_rps"]:
            parts.append(f"{t['throughput_rps'] / g['throughput_rps']:.2f} × the guide's "
                         f"throughput")
        if parts:
            summary.append(f"- C={c}: " + "; ".join(parts) + ".")
    if summary:
        lines += [""] + summary
    return lines


def plot_workload(workload: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator, ScalarFormatter

    servers = workload["servers"]
    if not any(_closed_points(s) for s in servers.values()):
        return None
    concurrencies = sorted({p["concurrency"] for s in servers.values()
                            for p in _closed_points(s)})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = (("throughput_rps", "throughput (requests/s)"), ("p50", "p50 latency (ms)"),
              ("p99", "p99 latency (ms)"))
    for ax, (key, title) in zip(axes, panels):
        for name in ordered_rows(servers):
            pts = _closed_points(servers[name])
            xs = [p["concurrency"] for p in pts]
            ys = [p[key] if key == "throughput_rps" else p["latency_ms"][key] for p in pts]
            pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pairs:
                ax.plot(*zip(*pairs), marker="o", label=servers[name].get("label", name),
                        color=_color(name, servers))
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if key != "throughput_rps":
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ceiling = workload.get("ceiling")
    if ceiling and "error" not in ceiling:
        axes[0].axhline(ceiling["best_items_per_s"], color="black", linestyle="--",
                        label=f"raw pipeline, best batch ({ceiling['best_batch_size']})")
        if ceiling.get("unbatched_items_per_s"):
            axes[0].axhline(ceiling["unbatched_items_per_s"], color="gray", linestyle=":",
                            label="raw pipeline, batch 1")
        if workload.get("answer") == "tokens" and ceiling.get("best_items_per_s_with_json"):
            axes[0].axhline(ceiling["best_items_per_s_with_json"], color="brown",
                            linestyle="-.", label="raw pipeline + json.dumps, best batch")
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{workload['name']}: {workload['description']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def profile_tables(workload: dict, top: int = 8) -> list[str]:
    """Per profiled point and process: the leaf frames and files its samples landed in."""
    lines: list[str] = []
    for name in ordered_rows(workload["servers"]):
        for point in _closed_points(workload["servers"][name]):
            for role, prof in (point.get("profile") or {}).items():
                head = f"**{name}, C={point['concurrency']}, {role}**"
                if "error" in prof:
                    lines += [f"{head}: not profiled ({prof['error']})", ""]
                    continue
                lines += [f"{head}: {prof['samples']} samples "
                          f"(collapsed stacks: `{prof.get('raw', '')}`)", "",
                          "| self time in function | % | self time in file | % |",
                          "| --- | ---: | --- | ---: |"]
                funcs, files = prof["self_by_function"][:top], prof["self_by_file"][:top]
                for i in range(max(len(funcs), len(files))):
                    f = funcs[i] if i < len(funcs) else ["", ""]
                    g = files[i] if i < len(files) else ["", ""]
                    lines.append(f"| `{f[0]}` | {f[1]} | `{g[0]}` | {g[1]} |".replace("``", ""))
                lines.append("")
    return lines[:-1] if lines else lines


def render_markdown(results: dict, plots: dict[str, Path]) -> str:
    lines = ["# batchwire benchmark results", "",
             "Generated by `benchmarks/run.py`. Ratios are between numbers measured in this "
             "one run on this machine; absolute numbers from different runs or machines are "
             "not comparable.", "", "## Machine and command", ""]
    if results.get("note"):
        lines += [f"Note: {results['note']}", ""]
    lines += machine_section(results)
    lines += ["", "## Load generator", ""] + loadgen_section(results)
    for w in results["workloads"]:
        m = w["model"]
        description = w["description"][:1].upper() + w["description"][1:]
        lines += ["", f"## {w['name']}", "", description + ".", "",
                  f"Model `{m['key']}`: {m['description']} ({m['task']}, "
                  f"max {m['max_tokens']} tokens). Inputs: {w['inputs']} distinct texts of "
                  f"{w['input_words']['min']}-{w['input_words']['max']} words "
                  f"(mean {w['input_words']['mean']}"
                  + (f"; {w['input_tokens']['min']}-{w['input_tokens']['max']} tokens with "
                     f"[CLS] and [SEP], mean {w['input_tokens']['mean']}"
                     if w.get("input_tokens") else "") + ")"
                  + (", sent raw to `POST /`." if w.get("answer", "fill-mask") == "fill-mask"
                     else "; requests as listed under the servers table."), "",
                  "### Ceiling: the raw pipeline in one process", ""]
        lines += ceiling_table(w.get("ceiling"))
        lines += ["", "### Servers", ""] + server_table(w)
        batching = batching_table(w)
        if batching:
            lines += ["", "### Token-aware vs count-only batching", ""] + batching
        pairs = paired_lines(w.get("paired_c1"))
        if pairs:
            lines += ["", "### C=1, paired: both servers up at once, the same inputs to each "
                      "in turn", ""] + pairs
        loads = interleaved_lines(w.get("interleaved"))
        if loads:
            lines += ["", "### Interleaved load: two servers up at once, loaded in "
                      "alternating slices", ""] + loads
        ratios = ratio_lines(w)
        if ratios:
            lines += ["", "### Ratios", ""] + ratios
        if w["name"] in plots:
            lines += ["", f"![{w['name']}]({plots[w['name']].name})"]
        profiles = profile_tables(w)
        if profiles:
            lines += ["", "### Profiles (py-spy, self time by leaf frame)", ""] + profiles
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path, *, plots: bool = True) -> list[Path]:
    out = Path(out)
    written: dict[str, Path] = {}
    if plots:
        for w in results["workloads"]:
            path = plot_workload(w, out / f"{w['name']}.png")
            if path is not None:
                written[w["name"]] = path
    report = out / "report.md"
    report.write_text(render_markdown(results, written))
    return [report, *written.values()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results"
    results = json.loads((out / "results.json").read_text())
    for path in write_report(results, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
