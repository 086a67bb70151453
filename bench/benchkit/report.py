"""Turning raw measurements into the ratio table and the PASS/FAIL list of issue 7's targets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    limit: float
    higher_is_better: bool
    unit: str = "x"
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def find(load: list[dict[str, Any]], case: str, server: str, connections: int) -> dict[str, Any] | None:
    return next(
        (r for r in load if r["case"] == case and r["server"] == server and r["connections"] == connections), None
    )


def load_table(load: list[dict[str, Any]], case: str, servers: list[str], peers: list[str]) -> list[str]:
    """Rows: concurrency; columns: rps and p99 per server (`!`: the run had errors, e.g. timeouts),
    then hub/peer ratios."""
    conns = sorted({r["connections"] for r in load if r["case"] == case})
    hubs = [s for s in servers if s.startswith("hub")]
    head = ["conc"] + [f"{s} rps" for s in servers] + [f"{s} p99ms" for s in servers]
    for hub in hubs:
        for peer in peers:
            head += [f"{hub}/{peer} rps", f"{peer}/{hub} p99"]
    rows = [head]
    for c in conns:
        row = [str(c)]
        results = {s: find(load, case, s, c) for s in servers}
        row += [(_fmt(r["rps"], 0) + ("!" if r.get("errors") else "")) if r else "—" for r in results.values()]
        row += [_fmt(r["p99_ms"], 2) if r else "—" for r in results.values()]
        for hub in hubs:
            for peer in peers:
                h, p = results.get(hub), results.get(peer)
                row.append(_fmt(_ratio(h and h["rps"], p and p["rps"])))
                row.append(_fmt(_ratio(p and p["p99_ms"], h and h["p99_ms"])))
        rows.append(row)
    return _align(rows)


def cpu_table(load: list[dict[str, Any]], servers: list[str]) -> list[str]:
    """Requests per CPU-second of the server's own processes: what each server makes of the CPU
    it got, which matters on a small shared machine where wrk and neighbours take their share."""
    rows = [["case", "conc", *servers]]
    cases = list(dict.fromkeys(r["case"] for r in load))
    for case in cases:
        for c in sorted({r["connections"] for r in load if r["case"] == case}):
            cells = []
            for server in servers:
                r = find(load, case, server, c)
                cells.append(_fmt(r.get("rps_per_cpu") if r else None, 0))
            rows.append([case, str(c), *cells])
    return _align(rows)


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _worst(values: Iterable[float | None], higher_is_better: bool) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return min(present) if higher_is_better else max(present)


def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    """Issue 7's targets. A load target must hold at every measured concurrency, so each is
    reported as its worst ratio across concurrencies (the per-concurrency values are in the table)."""
    load = results["load"]
    conns = sorted({r["connections"] for r in load})
    targets: list[Target] = []
    cases = {r["case"] for r in load}

    def ratios(case: str, hub: str, peer: str, key: str, invert: bool = False) -> list[float | None]:
        out = []
        for c in conns:
            h, p = find(load, case, hub, c), find(load, case, peer, c)
            if h is None or p is None:
                out.append(None)
                continue
            out.append(_ratio(p[key], h[key]) if invert else _ratio(h[key], p[key]))
        return out

    for hub in ("hub-proxy", "hub-local") if "abbreviated" in cases else ():
        rps = ratios("abbreviated", hub, "verdaccio", "rps")
        targets.append(
            Target(
                f"abbreviated packument rps, {hub} / verdaccio",
                _worst(rps, True),
                10,
                True,
                detail=" ".join(_fmt(v) for v in rps),
            )
        )
        p99 = ratios("abbreviated", hub, "verdaccio", "p99_ms", invert=True)
        targets.append(
            Target(
                f"abbreviated packument p99, verdaccio / {hub}",
                _worst(p99, True),
                5,
                True,
                detail=" ".join(_fmt(v) for v in p99),
            )
        )
    pairs = results.get("policy") or []
    for case in ("abbreviated", "full"):
        ratios_of = [p["ratio"] for p in pairs if p["case"] == case]
        if ratios_of:
            targets.append(
                Target(
                    f"{case} packument rps, filtered by a policy / unfiltered",
                    _worst(ratios_of, True),
                    0.8,
                    True,
                    detail=" ".join(_fmt(v) for v in ratios_of),
                )
            )
    for hub in ("hub-proxy", "hub-local") if "tarball" in cases else ():
        vs_verdaccio = ratios("tarball", hub, "verdaccio", "bytes_per_sec")
        vs_nginx = ratios("tarball", hub, "nginx", "bytes_per_sec")
        targets.append(
            Target(
                f"1 MiB tarball throughput, {hub} / verdaccio",
                _worst(vs_verdaccio, True),
                2,
                True,
                detail=" ".join(_fmt(v) for v in vs_verdaccio),
            )
        )
        targets.append(
            Target(
                f"1 MiB tarball throughput, {hub} / nginx",
                _worst(vs_nginx, True),
                0.6,
                True,
                detail=" ".join(_fmt(v) for v in vs_nginx),
            )
        )
    installs = results.get("npm_install", {})
    if not installs:
        return targets + _other_targets(results)
    verdaccio = _best(installs.get("verdaccio"))
    targets.append(
        Target(
            "npm install, hub warm / verdaccio (wall time)",
            _ratio(_best(installs.get("hub-warm")), verdaccio),
            0.9,
            False,
        )
    )
    targets.append(
        Target(
            "npm install, hub cold / verdaccio (wall time)",
            _ratio(_best(installs.get("hub-cold")), verdaccio),
            1.3,
            False,
        )
    )
    return targets + _other_targets(results)


def _other_targets(results: dict[str, Any]) -> list[Target]:
    targets: list[Target] = []
    publish = results.get("publish", {}).get("hub-local")
    if publish:
        growth = max(publish["rss_growth_sampled"], publish.get("rss_growth_hwm") or 0)
        targets.append(
            Target(
                "50 MiB publish, hub peak RSS growth / tarball size",
                growth / publish["tarball_bytes"],
                2,
                False,
                detail=f"{growth / MIB:.1f} MiB growth in {publish['seconds']:.2f}s",
            )
        )
    rss = results.get("rss", {})
    idle = [v for k, v in rss.items() if k.startswith("idle")]
    if idle:
        worst = max(max(v.values()) if isinstance(v, dict) else v for v in idle)  # already MiB
        targets.append(Target("idle RSS per process (MiB, worst seen)", worst, 100, False, unit=" MiB"))
    workers = results.get("workers")
    if workers:
        targets.append(
            Target(
                "packument rps, 2 workers / 1 worker",
                _ratio(workers["two"]["rps"], workers["one"]["rps"]),
                1.6,
                True,
                detail=f"abbreviated, hub-local, c={workers['one']['connections']}",
            )
        )
    return targets


def _best(times: list[float] | None) -> float | None:
    return min(times) if times else None


def target_lines(targets: list[Target]) -> list[str]:
    rows = [["target", "value", "need", "result", "per concurrency / detail"]]
    for t in targets:
        need = f"{'>=' if t.higher_is_better else '<='} {t.limit:g}{t.unit}"
        rows.append([t.name, _fmt(t.value), need, "PASS" if t.passed else "FAIL", t.detail])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def markdown(results: dict[str, Any]) -> list[str]:
    """The run as Markdown tables, for bench/README.md (`run.py --markdown FILE`)."""
    load = results["load"]
    out: list[str] = []
    titles = {
        "abbreviated": "Abbreviated packument (300 versions)",
        "full": "Full packument (300 versions)",
        "revalidate-304": "Revalidation, If-None-Match → 304",
        "tarball": "1 MiB tarball",
    }
    for case, title in titles.items():
        rows = [r for r in load if r["case"] == case]
        if not rows:
            continue
        known = ("hub-proxy", "hub-filtered", "hub-local", "verdaccio", "nginx")
        servers = [s for s in known if any(r["server"] == s for r in rows)]
        peers = [p for p in ("verdaccio", "nginx") if p in servers]
        head = ["conc", *[f"{s} req/s (p99 ms)" for s in servers]]
        head += [f"{h}/{p} req/s" for h in ("hub-proxy", "hub-local") for p in peers]
        head += [f"{p}/{h} p99" for h in ("hub-proxy", "hub-local") for p in peers if p == "verdaccio"]
        out += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in sorted({r["connections"] for r in rows}):
            got = {s: find(load, case, s, c) for s in servers}
            cells = [str(c)]
            cells += [f"{g['rps']:.0f} ({g['p99_ms']:.1f})" if g else "—" for g in got.values()]
            for h in ("hub-proxy", "hub-local"):
                for p in peers:
                    cells.append(_fmt(_ratio(got[h] and got[h]["rps"], got[p] and got[p]["rps"])))
            for h in ("hub-proxy", "hub-local"):
                for p in peers:
                    if p == "verdaccio":
                        cells.append(_fmt(_ratio(got[p] and got[p]["p99_ms"], got[h] and got[h]["p99_ms"])))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    cpu_servers = ["hub-proxy", "hub-filtered", "hub-local", "verdaccio", "nginx"]
    out += ["**Requests per CPU-second of the server's own processes** (highest concurrency)", ""]
    out += ["| case | " + " | ".join(cpu_servers) + " |", "|" + "---|" * (len(cpu_servers) + 1)]
    top = max((r["connections"] for r in load), default=0)
    for case in titles:
        cells = [_fmt((find(load, case, s, top) or {}).get("rps_per_cpu"), 0) for s in cpu_servers]
        if any(c != "—" for c in cells):
            out.append(f"| {case} | " + " | ".join(cells) + " |")
    out.append("")
    details = results.get("npm_install_detail", {})
    if details:
        title = "**npm install**, 150 packages, fresh cache, no lockfile: wall seconds (CPU-s of npm / of the server)"
        out += [title, ""]
        out += ["| registry | runs | best |", "|---|---|---|"]
        for label, runs in details.items():
            cells = ", ".join(f"{r['wall_s']:.2f} ({r['npm_cpu_s']:.1f}/{r['server_cpu_s']:.2f})" for r in runs)
            out.append(f"| {label} | {cells} | {min(r['wall_s'] for r in runs):.2f} |")
        out.append("")
    if results.get("publish"):
        out += ["**50 MiB publish**", "", "| server | seconds | RSS growth (sampled / VmHWM) |", "|---|---|---|"]
        for label, e in results["publish"].items():
            hwm = e.get("rss_growth_hwm")
            hwm_text = f"{hwm / MIB:.1f} MiB" if hwm is not None else "—"
            out.append(f"| {label} | {e['seconds']:.2f} | {e['rss_growth_sampled'] / MIB:.1f} MiB / {hwm_text} |")
        out.append("")
    workers = results.get("workers")
    if workers:
        one, two = workers["one"], workers["two"]
        out += [
            f"**Workers** (abbreviated, hub-local, c={one['connections']}): 1 worker {one['rps']:.0f} req/s"
            f" ({one['rps_per_cpu']:.0f} req/CPU-s), 2 workers {two['rps']:.0f} req/s"
            f" ({two['rps_per_cpu']:.0f} req/CPU-s)",
            "",
        ]
    rss = results.get("rss", {})
    if rss:
        out += ["**Hub RSS** (MiB): " + "; ".join(f"{k} {v}" for k, v in rss.items()), ""]
    targets = results.get("targets") or [t.as_dict() for t in evaluate_targets(results)]
    out += ["**Targets**", "", "| target | value | need | result |", "|---|---|---|---|"]
    for t in targets:
        need = f"{'≥' if t['higher_is_better'] else '≤'} {t['limit']:g}{t['unit']}"
        out.append(f"| {t['name']} | {_fmt(t['value'])} | {need} | {'PASS' if t['passed'] else 'FAIL'} |")
    meta = results.get("meta", {})
    if meta:
        versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
        out += [
            "",
            f"{meta.get('cpu_count')} CPUs ({meta.get('cpu_model')}),"
            f" load average {_loadavg(meta.get('load_average_at_start'))}"
            f" at start; {versions}; wrk 1 thread, {meta.get('duration_s')} s per run; {meta.get('timestamp')},"
            f" commit {meta.get('git_commit')}.",
        ]
    return out


def _loadavg(value: Any) -> str:
    return "/".join(f"{v:.1f}" for v in value) if isinstance(value, list | tuple) else "?"
