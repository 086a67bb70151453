"""What metrics and tracing cost: hubs that differ only in `[metrics]` and `[otel]`, side by side.

    .venv/bin/python bench/observability.py [--quick] [--workers2] [--baseline-commit REV]

Issue 17's target: with metrics on, abbreviated packument requests/s drop by no more than 5 %; with
metrics and tracing off, nothing moves beyond noise. Every hub proxies the same local upstream
(Verdaccio with one 300-version package) and serves its cached abbreviated packument; `wrk` runs
against each in turn, round after round, in a rotating order, so slow phases of the shared machine
hit every hub alike. The hubs:

- `off`: `[metrics] enabled = false`, no `[otel]` (the reference);
- `off-2`: the same again, a second process: its ratio to `off` is the A/A spread, i.e. the noise;
- `metrics`: `[metrics] enabled = true`, scraped every `--scrape-interval` seconds (default 15, as
  Prometheus would) during the whole measurement;
- `metrics-w2` and `off-w2` (with `--workers2`): the same pair with `[server] workers = 2`
  (prometheus-client's multiprocess mode: memory-mapped files);
- `otel` (unless `--no-otel`): metrics off, `[otel] endpoint` set to a real OTLP/gRPC receiver in
  this process (`batlehub.testing.otlp`), every request traced and exported: reported, no target;
- `base` (with `--baseline-commit REV`; repeated: `base-1`, `base-2`...): the code at REV (e.g. the
  commit before metrics existed) on `PYTHONPATH`, with metrics off if that code has them.

Reported per hub and concurrency: median requests/s, median p99, median requests per server
CPU-second, and each hub's ratio to `off` (ratio of medians; and the range of the per-round ratios).
See bench/README.md, section "Metrics and tracing cost".
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import BenchError, packages
from benchkit.load import NPM_ABBREVIATED_ACCEPT, NPM_HEADERS, run_wrk
from benchkit.servers import ADMIN_TOKEN, REPO, HubRegistry, http_get, require_program, start_verdaccio
from benchkit.variants import ConfiguredHub, Scraper, code_at, median, metric_value, paired_ratios, summarize

TARGET = 0.95
"""metrics-on / metrics-off requests/s (issue 17)."""
METRICS_OFF = "[metrics]\nenabled = false\n"
METRICS_ON = "[metrics]\nenabled = true\n"


@dataclass
class Variant:
    name: str
    extra: str
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    base: str = "off"
    """The variant it is compared with."""
    target: bool = False
    """Whether its ratio to `base` must be >= TARGET."""
    hub: ConfiguredHub | None = None
    scraper: Scraper | None = None


class ObservabilityBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.duration: float = args.duration or (2.0 if self.quick else 4.0)
        self.rounds: int = args.rounds or (3 if self.quick else 6)
        self.concurrencies: list[int] = args.concurrency or ([64] if self.quick else [1, 64])
        self.scrape_interval: float = args.scrape_interval
        self.scratch = Path(tempfile.mkdtemp(prefix="batlehub-obsbench-"))
        self.started = time.monotonic()
        self.load_at_start = os.getloadavg()
        self.stoppers: list[Any] = []
        self.runs: list[dict[str, Any]] = []
        self.receiver: Any = None

    def say(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)

    # --- set-up -----------------------------------------------------------------------------------

    def variants(self) -> list[Variant]:
        found = [
            Variant("off", METRICS_OFF),
            Variant("off-2", METRICS_OFF),
            Variant("metrics", METRICS_ON, target=True),
        ]
        if self.args.workers2:
            found += [
                Variant("off-w2", METRICS_OFF, workers=2, base="off-w2"),
                Variant("metrics-w2", METRICS_ON, workers=2, base="off-w2", target=True),
            ]
        if not self.args.no_otel:
            found.append(Variant("otel", METRICS_OFF + "\n[otel]\nendpoint = OTLP\n"))
        for i, revision in enumerate(self.args.baseline_commit or []):
            pythonpath = code_at(revision, self.scratch / f"baseline-code-{i}")
            # Metrics off where that code has them (on by default), no [metrics] section where not.
            extra = METRICS_OFF if (pythonpath / "batlehub" / "metrics.py").exists() else ""
            name = "base" if len(self.args.baseline_commit) == 1 else f"base-{i + 1}"
            found.append(Variant(name, extra, env={"PYTHONPATH": str(pythonpath)}))
        return found

    def setup(self) -> list[Variant]:
        self.say(f"scratch folder {self.scratch}; {os.cpu_count()} CPUs; {'quick' if self.quick else 'full'} run")
        self.wrk = require_program("wrk", "wrk")
        dataset = packages.build_dataset(versions=self.args.versions, tree_size=2)
        self.say("starting Verdaccio (the upstream; installed first if needed)")
        self.verdaccio = start_verdaccio(self.scratch / "verdaccio")
        self.stoppers.append(self.verdaccio.process.stop)
        for release in dataset.many_versions:
            packages.publish_release(self.verdaccio.url, self.verdaccio.token, release)
        self.say(f"published {len(dataset.many_versions)} versions of {packages.MANY_VERSIONS_NAME} to Verdaccio")
        self.expected_versions = len(dataset.many_versions)

        variants = self.variants()
        if any(v.name == "otel" for v in variants):
            # grpc logs a line each time this process forks (every hub and wrk run): not news.
            os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
            from batlehub.testing.otlp import OtlpReceiver

            self.receiver = OtlpReceiver()
            self.receiver.__enter__()
            self.stoppers.append(lambda: self.receiver.__exit__(None, None, None))
        for variant in variants:
            extra = variant.extra.replace("OTLP", json.dumps(self.receiver.endpoint) if self.receiver else '""')
            hub = ConfiguredHub(
                self.scratch / variant.name,
                [HubRegistry("proxy", "proxy", (self.verdaccio.url,))],
                extra=extra,
                workers=variant.workers,
                label=variant.name,
                env=variant.env,
            )
            hub.start()
            self.stoppers.append(hub.stop)
            variant.hub = hub
            self.check(variant)
        return variants

    def url(self, variant: Variant) -> str:
        assert variant.hub is not None
        return variant.hub.registry_url("proxy") + packages.MANY_VERSIONS_NAME

    def check(self, variant: Variant) -> None:
        """Warm the hub's cache and check that it serves the packument, and that metrics are on or
        off as configured."""
        assert variant.hub is not None
        headers = {**NPM_HEADERS, "Accept": NPM_ABBREVIATED_ACCEPT}
        status, answer, body = http_get(self.url(variant), headers)
        if status != 200:
            raise BenchError(f"{variant.name}: GET {self.url(variant)} answered {status}: {body[:300]!r}")
        raw = gzip.decompress(body) if answer.get("Content-Encoding") == "gzip" else body
        doc = json.loads(raw)
        if len(doc.get("versions", {})) != self.expected_versions:
            raise BenchError(f"{variant.name}: the packument lists {len(doc.get('versions', {}))} versions")
        self.packument_bytes = (len(raw), len(body))
        status, _, _ = http_get(variant.hub.url + "metrics", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        metrics_on = "enabled = true" in variant.extra
        if (status == 200) != metrics_on:
            raise BenchError(
                f"{variant.name}: GET /metrics answered {status} with metrics {'on' if metrics_on else 'off'}"
            )
        self.say(
            f"{variant.name:<10} at {variant.hub.url} (workers {variant.workers}): abbreviated packument"
            f" {len(raw)} bytes, {len(body)} gzipped; /metrics {status}"
        )

    # --- measurement ------------------------------------------------------------------------------

    def measure(self, variants: list[Variant]) -> None:
        headers = {**NPM_HEADERS, "Accept": NPM_ABBREVIATED_ACCEPT}
        for variant in variants:
            run_wrk(self.wrk, self.url(variant), connections=16, duration=1, headers=headers)
        self.say("warmed every hub with 1 s of load")
        metrics_variants = [v for v in variants if "enabled = true" in v.extra]
        for i, variant in enumerate(metrics_variants):
            assert variant.hub is not None
            variant.scraper = Scraper(
                variant.hub.url + "metrics", self.scrape_interval, offset=i * self.scrape_interval / 2
            )
            variant.scraper.start()
        try:
            for conns in self.concurrencies:
                for rnd in range(self.rounds):
                    # Rotate the order each round: no hub always runs first, or right after another.
                    k = rnd % len(variants)
                    order = variants[k:] + variants[:k]
                    for variant in order:
                        self.one_run(variant, conns, rnd, headers)
        finally:
            for variant in metrics_variants:
                assert variant.scraper is not None
                variant.scraper.stop()

    def one_run(self, variant: Variant, conns: int, rnd: int, headers: dict[str, str]) -> None:
        assert variant.hub is not None
        result = run_wrk(
            self.wrk,
            self.url(variant),
            connections=conns,
            duration=self.duration,
            headers=headers,
            pids=variant.hub.server_pids,
        )
        if result.errors > 0.01 * (result.requests + result.errors):
            raise BenchError(f"{variant.name} c={conns}: {result.errors} errors in {result.requests} requests")
        self.runs.append({"variant": variant.name, "round": rnd, **result.as_dict()})
        self.say(
            f"c={conns:<3} round {rnd + 1}/{self.rounds} {variant.name:<10} {result.rps:>8.0f} req/s"
            f"  p99 {result.p99_ms:6.2f} ms  {result.rps_per_cpu or 0:>7.0f} req/CPU-s"
        )

    def profile(self, variants: list[Variant], seconds: float) -> dict[str, Any]:
        """py-spy samples of `metrics`, `off` and the baselines under c=64 load: the share of samples
        spent counting (prometheus-client, batlehub/metrics.py, the middleware's `_count`). A
        share of samples does not depend on how much CPU the busy machine gave the hub, unlike
        requests/s."""
        py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if py_spy is None:
            raise BenchError("py-spy is missing: .venv/bin/pip install py-spy")
        headers = {**NPM_HEADERS, "Accept": NPM_ABBREVIATED_ACCEPT}
        found: dict[str, Any] = {}
        for variant in variants:
            if variant.hub is None or not (variant.name in ("off", "metrics") or variant.name.startswith("base")):
                continue
            raw = self.scratch / f"profile-{variant.name}.txt"
            load = threading.Thread(
                target=run_wrk,
                args=(self.wrk, self.url(variant)),
                kwargs={"connections": 64, "duration": seconds + 2, "headers": headers},
            )
            load.start()
            time.sleep(1)
            spy_args = ["--pid", str(variant.hub.pid), "--duration", str(int(seconds)), "--rate", "250"]
            spy = subprocess.run(
                [py_spy, "record", *spy_args, "--format", "raw", "--nonblocking", "-o", str(raw)],
                capture_output=True,
                text=True,
            )
            load.join()
            if spy.returncode != 0:
                raise BenchError(f"py-spy failed: {spy.stdout}{spy.stderr}")
            shares = counting_share(raw.read_text())
            found[variant.name] = shares
            self.say(
                f"profile {variant.name}: {shares['samples']} samples, counting in"
                f" {100 * shares['counting']:.1f}% of them (prometheus-client {100 * shares['prometheus_client']:.1f}%)"
            )
        return found

    def verify_after(self, variants: list[Variant]) -> dict[str, Any]:
        """Evidence that the measured hubs did what they were configured to: the metrics hubs
        counted the requests, the tracing hub exported spans."""
        evidence: dict[str, Any] = {}
        for variant in variants:
            if variant.scraper is not None:
                body = variant.scraper.scrape()
                counted = metric_value(body, "batlehub_http_requests_total", registry="proxy", status="200")
                served = sum(r["requests"] for r in self.runs if r["variant"] == variant.name)
                if counted < served:
                    raise BenchError(f"{variant.name}: /metrics counts {counted:.0f} requests, wrk made {served}")
                evidence[variant.name] = {
                    "scrapes_during_load": variant.scraper.scrapes,
                    "scrape_failures": len(variant.scraper.failures),
                    "requests_counted": counted,
                    "requests_measured": served,
                }
                self.say(
                    f"{variant.name}: {variant.scraper.scrapes} scrapes during the load; /metrics counts"
                    f" {counted:.0f} proxy requests (wrk measured {served}, the rest are warm-up)"
                )
        if self.receiver is not None:
            time.sleep(6)  # the SDK's batch processor exports every 5 s by default
            spans = list(self.receiver.spans)
            served = sum(r["requests"] for r in self.runs if r["variant"] == "otel")
            if not spans:
                raise BenchError("otel: the OTLP receiver got no spans")
            evidence["otel"] = {"spans_received": len(spans), "requests_measured": served}
            self.say(
                f"otel: the receiver got {len(spans)} spans for {served} measured requests"
                " (the SDK's batch processor drops spans when its queue of 2048 is full)"
            )
        return evidence

    # --- orchestration ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            variants = self.setup()
            self.measure(variants)
            evidence = self.verify_after(variants)
            if self.args.profile:
                evidence["profile"] = self.profile(variants, self.args.profile)
        finally:
            for stop in reversed(self.stoppers):
                try:
                    stop()
                except Exception as exc:  # keep stopping the others
                    print(f"bench: stopping failed: {exc}", file=sys.stderr)
            if self.args.keep:
                self.say(f"scratch folder kept: {self.scratch}")
            else:
                shutil.rmtree(self.scratch, ignore_errors=True)
        return {
            "variants": [
                {"name": v.name, "workers": v.workers, "config": v.extra, "base": v.base, "target": v.target}
                for v in variants
            ],
            "runs": self.runs,
            "summary": self.summary(variants),
            "evidence": evidence,
            "meta": self.meta(),
        }

    def summary(self, variants: list[Variant]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for conns in self.concurrencies:
            rows = {}
            for v in variants:
                row = summarize(self.runs, v.name, conns)
                base = summarize(self.runs, v.base, conns)
                if v.name != v.base and row["rps"] and base["rps"]:
                    row["ratio"] = row["rps"] / base["rps"]
                    row["ratio_per_cpu"] = (
                        row["rps_per_cpu"] / base["rps_per_cpu"] if row["rps_per_cpu"] and base["rps_per_cpu"] else None
                    )
                    paired = paired_ratios(self.runs, v.name, v.base, conns)
                    row["paired_min"], row["paired_max"] = min(paired), max(paired)
                    row["paired_median"] = median(paired)
                rows[v.name] = row
            out[str(conns)] = rows
        return out

    def meta(self) -> dict[str, Any]:
        def dist(name: str) -> str:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return "not installed"

        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return {
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": commit.stdout.strip() or "unknown",
            "baseline_commit": self.args.baseline_commit,
            "cpu_count": os.cpu_count(),
            "load_average_at_start": self.load_at_start,
            "load_average_at_end": os.getloadavg(),
            "quick": self.quick,
            "duration_s": self.duration,
            "rounds": self.rounds,
            "concurrencies": self.concurrencies,
            "scrape_interval_s": self.scrape_interval,
            "packument_bytes": {"raw": self.packument_bytes[0], "gzipped": self.packument_bytes[1]},
            "versions": {n: dist(n) for n in ("batlehub", "aiohttp", "prometheus-client", "opentelemetry-sdk")}
            | {"python": platform.python_version()},
        }


def counting_share(collapsed: str) -> dict[str, Any]:
    """From py-spy's raw (collapsed) stacks: the share of samples with a metrics frame on the stack."""
    total = counting = prom = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        in_prom = "prometheus_client/" in stack
        prom += n if in_prom else 0
        if in_prom or "batlehub/metrics.py" in stack or "_count (batlehub/middleware.py" in stack:
            counting += n
    return {
        "samples": total,
        "counting": counting / total if total else 0.0,
        "prometheus_client": prom / total if total else 0.0,
    }


# --- report -----------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> tuple[list[str], bool]:
    """Markdown lines, and whether every target passed."""
    meta = results["meta"]
    variants = {v["name"]: v for v in results["variants"]}
    lines = []
    passed = True
    for conns, rows in results["summary"].items():
        lines += [
            "",
            f"**c={conns}** (median of {meta['rounds']} interleaved runs of {meta['duration_s']:g} s each)",
            "",
            "| hub | req/s | p99 ms | req/CPU-s | vs | ratio req/s | per-round ratios: median (range)"
            " | ratio req/CPU-s | target |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            v = variants[name]
            ratio = row.get("ratio")
            verdict = ""
            if ratio is not None and v["target"]:
                ok = ratio >= TARGET
                passed &= ok
                verdict = f"{'PASS' if ok else 'FAIL'} (≥ {TARGET})"
            elif name == "off-2":
                verdict = "A/A spread"
            elif ratio is not None:
                verdict = "report only"
            ratio_text = f"{ratio:.3f}" if ratio is not None else "—"
            paired_text = (
                f"{row['paired_median']:.3f} ({row['paired_min']:.2f} to {row['paired_max']:.2f})"
                if ratio is not None
                else "—"
            )
            per_cpu = f"{row['ratio_per_cpu']:.3f}" if row.get("ratio_per_cpu") else "—"
            lines.append(
                f"| {name} | {row['rps']:.0f} | {row['p99_ms']:.2f} | {row['rps_per_cpu'] or 0:.0f} |"
                f" {v['base'] if name != v['base'] else '—'} | {ratio_text} | {paired_text} | {per_cpu} | {verdict} |"
            )
    for conns, rows in results["summary"].items():
        spread = rows.get("off-2", {}).get("ratio")
        if spread is not None and abs(spread - 1) > 1 - TARGET:
            lines += [
                "",
                f"c={conns}: the A/A spread ({spread:.3f}) is wider than the margin of the target: at this"
                " noise level a PASS or FAIL by requests/s says little; py-spy's counting share (`--profile`)"
                " does not depend on the noise.",
            ]
    profile = results["evidence"].get("profile", {})
    if profile:
        lines.append("")
    for name, shares in profile.items():
        lines.append(
            f"py-spy, `{name}` at c=64: {shares['samples']} samples, {100 * shares['counting']:.1f}% of them"
            f" counting (prometheus-client {100 * shares['prometheus_client']:.1f}%)."
        )
    size = meta["packument_bytes"]
    lines += [
        "",
        f"Abbreviated packument: {size['raw']} bytes ({size['gzipped']} gzipped, as served); scrape every"
        f" {meta['scrape_interval_s']:g} s during the load; {meta['cpu_count']} CPUs, load average"
        f" {meta['load_average_at_start'][0]:.1f} at start, {meta['load_average_at_end'][0]:.1f} at end;"
        f" commit {meta['git_commit']}"
        + (f", baselines {', '.join(meta['baseline_commit'])}" if meta["baseline_commit"] else "")
        + f", {meta['timestamp']}.",
    ]
    return lines, passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s runs, 3 rounds, c=64 only (~2 minutes)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 4, quick 2)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per concurrency (default 6, quick 3)")
    parser.add_argument("--concurrency", type=int, action="append", help="repeatable (default 1 and 64, quick 64)")
    parser.add_argument(
        "--versions", type=int, default=175, help="versions of the package (175: a ~100 KB abbreviated packument)"
    )
    parser.add_argument("--scrape-interval", type=float, default=15.0, help="seconds between scrapes; 0: none")
    parser.add_argument("--workers2", action="store_true", help="also the pair with [server] workers = 2")
    parser.add_argument(
        "--profile",
        type=float,
        metavar="SECONDS",
        help="then py-spy 'metrics', 'off', 'base*' this long",
    )
    parser.add_argument("--no-otel", action="store_true", help="leave out the hub that exports traces")
    parser.add_argument(
        "--baseline-commit", metavar="REV", action="append", help="also a hub running the code at REV (repeatable)"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "observability.json"))
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (hub logs) afterwards")
    parser.add_argument("--render", metavar="JSON", help="only print the tables of an earlier run's JSON file")
    args = parser.parse_args(argv)
    if args.render:
        print("\n".join(report(json.loads(Path(args.render).read_text()))[0]))
        return 0
    try:
        results = ObservabilityBench(args).run()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    lines, passed = report(results)
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines).lstrip() + "\n")
    print(f"\nresults: {out}")
    return 1 if args.strict and not passed else 0


if __name__ == "__main__":
    raise SystemExit(main())
