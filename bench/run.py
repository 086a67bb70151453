"""BatleHub benchmark: the hub side by side with Verdaccio and nginx, on the same data, in one run.

    .venv/bin/python bench/run.py [--quick] [--out bench/results/latest.json]

Starts every server it compares on free loopback ports in a scratch folder (installing wrk, nginx
and Verdaccio first if they are missing), loads the same packages into each, measures, prints a
table with the hub/peer ratios and PASS/FAIL against the targets of issue 7, and writes it all as
JSON. See bench/README.md for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import gzip
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import BenchError, packages, report
from benchkit.load import NPM_ABBREVIATED_ACCEPT, NPM_HEADERS, LoadResult, RssSampler, cpu_seconds, run_wrk
from benchkit.servers import (
    ADMIN_TOKEN,
    REPO,
    BenchHub,
    HubRegistry,
    child_pids,
    http_get,
    program_version,
    require_program,
    rss_bytes,
    start_static_nginx,
    start_verdaccio,
    verdaccio_version,
)
from benchkit.session import BenchSession

MIB = 1024 * 1024
HUGE_TARBALL_BYTES = 50 * MIB
FILTERED_POLICY = f"""[[registries.policy.block]]
package = "{packages.MANY_VERSIONS_NAME}"
versions = "3.9.9"
reason = "bench: one version withheld, so every packument is a filtered view"
"""
"""The `filtered` registry proxies the same upstream as `proxy` with one version of the 300
blocked (its `latest`): the same document, served through the policy path (issue 15's target:
at least 0.8x the unfiltered requests/s)."""
POLICY_ROUNDS = 5
"""Alternated runs of each side in the policy comparison (the best of each counts)."""


class Bench(BenchSession):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(prefix="batlehub-bench-", keep=args.keep)
        self.quick: bool = args.quick
        self.duration: float = args.duration or (2.0 if self.quick else 5.0)
        self.concurrencies: list[int] = args.concurrency or ([1, 64] if self.quick else [1, 16, 64])
        self.npm_repeats: int = args.npm_repeats or (1 if self.quick else 3)
        self.hub_env: dict[str, str] = _env_pairs(getattr(args, "hub_env", None))
        self.variant_env: dict[str, str] = _env_pairs(getattr(args, "variant_env", None))
        self.variant: BenchHub | None = None
        self.only: set[str] = set(getattr(args, "only", None) or ["load", "npm", "publish", "workers", "policy"])
        self.case_filter: set[str] = set(getattr(args, "case", None) or [])
        self.load_at_start = os.getloadavg()
        self.results: dict[str, Any] = {"load": [], "npm_install": {}, "publish": {}, "rss": {}}

    # --- orchestration ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            self._run()
        finally:
            self.close()
        return self.results

    def _run(self) -> None:
        self.setup()
        if "load" in self.only:
            self._load_matrix()
            time.sleep(2)
            self.results["rss"]["idle-after-load"] = self._mib_map(self.hub.rss())
            self.say(f"hub idle RSS after load: {self._fmt_rss(self.hub.rss())}")
        if "npm" in self.only:
            self._npm_installs()
        if "publish" in self.only:
            self._publish_huge()
        if "workers" in self.only:
            self._workers()
        if "policy" in self.only:
            self._policy_pair()
        self.results["meta"] = self._meta()

    def setup(self) -> None:
        """Tools, data, and every server loaded with the same packages (the proxy warmed)."""
        say = self.say
        say(f"scratch folder {self.scratch}; {os.cpu_count()} CPUs; {'quick' if self.quick else 'full'} run")
        self.wrk = require_program("wrk", "wrk")
        say(f"wrk: {self.wrk}")

        self.dataset = packages.build_dataset()
        ds = self.dataset
        say(
            f"generated {ds.release_count} versions of {ds.package_count} packages "
            f"(tree of {len(ds.tree)}, {len(ds.many_versions)} versions of {packages.MANY_VERSIONS_NAME}, "
            f"{len(ds.big_tarball.tarball)} byte tarball)"
        )

        say("starting Verdaccio (installing it first if needed)")
        self.verdaccio = start_verdaccio(self.scratch / "verdaccio")
        self.stoppers.append(self.verdaccio.process.stop)
        say(f"Verdaccio at {self.verdaccio.url}; publishing the data set")
        packages.publish_all(self.verdaccio.url, self.verdaccio.token, ds, progress=say)

        static = self.scratch / "static"
        target = static / ds.big_tarball.tarball_path
        target.parent.mkdir(parents=True)
        target.write_bytes(ds.big_tarball.tarball)
        self.nginx = start_static_nginx(self.scratch / "nginx", static)
        self.stoppers.append(self.nginx.stop)
        say(f"nginx at {self.nginx.url} serving the same tarball")

        self.hub = self._start_hub("hub", self.scratch / "hub", proxy=True, local=True)
        self.results["rss"]["idle-at-start"] = self._mib_map(self.hub.rss())
        say(f"hub at {self.hub.url}; idle RSS {self._fmt_rss(self.hub.rss())}; publishing the data set into 'local'")
        packages.publish_all(self.hub.registry_url("local"), ADMIN_TOKEN, ds, progress=say)
        self._warm_proxy(self.hub)
        time.sleep(1)
        self.results["rss"]["idle-after-warm"] = self._mib_map(self.hub.rss())
        say(f"hub idle RSS after data and warm-up: {self._fmt_rss(self.hub.rss())}")
        if self.variant_env:
            self.variant = self._start_hub(
                "hubx", self.scratch / "hubx", proxy=True, local=True, data_dir=self.hub.data_dir, env=self.variant_env
            )
            self._warm_proxy(self.variant)
            say(f"variant hub 'hubx' with {self.variant_env} at {self.variant.url} on the same data")

    # --- servers ------------------------------------------------------------------------------

    def _start_hub(self, label: str, root: Path, *, proxy: bool, local: bool, workers: int = 1, **kw: Any) -> BenchHub:
        registries = []
        if proxy:
            registries.append(HubRegistry("proxy", "proxy", (self.verdaccio.url,)))
            registries.append(HubRegistry("filtered", "proxy", (self.verdaccio.url,), policy=FILTERED_POLICY))
        if local:
            registries.append(HubRegistry("local", "local"))
        env = {**self.hub_env, **kw.pop("env", {})}
        hub = BenchHub(root, registries, workers=workers, label=label, env=env, **kw)
        hub.start()
        self.stoppers.append(hub.stop)
        return hub

    def _warm_proxy(self, hub: BenchHub) -> None:
        """Fetch every packument (both forms) and every tarball npm will ask for through the proxy,
        the way a busy hub would have them cached."""
        base = hub.registry_url("proxy")
        for name in (packages.MANY_VERSIONS_NAME, self.dataset.big_tarball.url_name):
            for accept in ("application/json", NPM_ABBREVIATED_ACCEPT):
                status, _, _ = http_get(hub.registry_url("filtered") + name, {"Accept": accept})
                if status != 200:
                    raise BenchError(f"warming {name} through the filtered proxy: HTTP {status}")

        def warm(name: str) -> int:
            releases = self.dataset.releases_by_name[name]
            quoted = releases[0].url_name
            status, _, _ = http_get(base + quoted, {"Accept": "application/json"})
            status2, _, body = http_get(base + quoted, {"Accept": NPM_ABBREVIATED_ACCEPT})
            if status != 200 or status2 != 200:
                raise BenchError(f"warming {name} through the hub proxy: HTTP {status}/{status2}")
            if len(releases) > 1:
                return 0  # the 300-version package: its tarballs are not part of any measurement
            doc = json.loads(body)
            for version in doc["versions"].values():
                status, _, data = http_get(version["dist"]["tarball"])
                if status != 200 or hashlib.sha1(data).hexdigest() != version["dist"]["shasum"]:
                    raise BenchError(f"warming the tarball of {name} through the hub proxy: HTTP {status}")
            return 1

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            tarballs = sum(pool.map(warm, self.dataset.releases_by_name))
        self.say(f"warmed the proxy: {len(self.dataset.releases_by_name)} packuments, {tarballs} tarballs")

    # --- HTTP load ------------------------------------------------------------------------------

    def _servers(self) -> dict[str, str]:
        servers = {
            "hub-proxy": self.hub.registry_url("proxy"),
            "hub-filtered": self.hub.registry_url("filtered"),
            "hub-local": self.hub.registry_url("local"),
        }
        if self.variant is not None:
            servers["hubx-proxy"] = self.variant.registry_url("proxy")
            servers["hubx-local"] = self.variant.registry_url("local")
        return {**servers, "verdaccio": self.verdaccio.url}

    def _pids(self, server: str) -> Callable[[], list[int]]:
        """The processes doing a server's work, for its RSS and CPU time."""
        if server.startswith("hubx") and self.variant is not None:
            return self.variant.server_pids
        if server.startswith("hub"):
            return self.hub.server_pids
        if server == "verdaccio":
            pid = self.verdaccio.process.proc.pid  # type: ignore[union-attr]
            return lambda: [pid]
        if server == "nginx":
            return lambda: child_pids(self.nginx.process.proc.pid)  # type: ignore[union-attr]
        return list

    def cases(self) -> list[tuple[str, str, str, dict[str, str]]]:
        """(case, server, url, headers) for every measurement, checked with one request first."""
        name = packages.MANY_VERSIONS_NAME
        big = self.dataset.big_tarball
        abbreviated = {**NPM_HEADERS, "Accept": NPM_ABBREVIATED_ACCEPT}
        full = {**NPM_HEADERS, "Accept": "application/json"}
        cases = []
        for server, base in self._servers().items():
            url = base + name
            etag = self._check_packument(server, url, abbreviated)
            self._check_packument(server, url, full)
            cases.append(("abbreviated", server, url, abbreviated))
            cases.append(("full", server, url, full))
            revalidate = {**abbreviated, "If-None-Match": etag}
            status, _, _ = http_get(url, revalidate)
            if status != 304:
                raise BenchError(f"{server}: If-None-Match with its own ETag answered {status}, not 304")
            cases.append(("revalidate-304", server, url, revalidate))
            # The tarball URL as each server advertises it, which is what npm downloads.
            _, _, body = http_get(base + big.url_name, abbreviated)
            tarball_url = json.loads(_decoded(body))["versions"][big.version]["dist"]["tarball"]
            cases.append(("tarball", server, self._check_tarball(server, tarball_url), {**NPM_HEADERS}))
        nginx_url = f"{self.nginx.url}/{big.tarball_path}"
        cases.append(("tarball", "nginx", self._check_tarball("nginx", nginx_url), {**NPM_HEADERS}))
        return cases

    def _check_packument(self, server: str, url: str, headers: dict[str, str]) -> str:
        status, answer, body = http_get(url, headers)
        if status != 200:
            raise BenchError(f"{server}: GET {url} answered {status}: {body[:300]!r}")
        doc = json.loads(_decoded(body) if answer.get("Content-Encoding") == "gzip" else body)
        expected = len(self.dataset.many_versions) - (1 if server == "hub-filtered" else 0)
        if len(doc.get("versions", {})) != expected:
            raise BenchError(f"{server}: {url} lists {len(doc.get('versions', {}))} versions, not {expected}")
        etag = answer.get("ETag")
        if not etag:
            raise BenchError(f"{server}: {url} sent no ETag")
        return etag

    def _check_tarball(self, server: str, url: str) -> str:
        status, answer, body = http_get(url, NPM_HEADERS)
        if answer.get("Content-Encoding") == "gzip":  # Verdaccio gzips even .tgz files when asked
            body = gzip.decompress(body)
        if status != 200 or body != self.dataset.big_tarball.tarball:
            raise BenchError(f"{server}: GET {url} answered {status} with {len(body)} bytes that differ")
        return url

    def _load_matrix(self) -> None:
        cases = [c for c in self.cases() if not self.case_filter or c[0] in self.case_filter]
        self.say(f"checked {len(cases)} URLs; warming each server up with 1s of load")
        for _case, _server, url, headers in cases:
            run_wrk(self.wrk, url, connections=16, duration=1, headers=headers)
        peak_hub = 0
        names = list(dict.fromkeys(c[0] for c in cases))
        for case in names:
            rows = [c for c in cases if c[0] == case]
            for i, conns in enumerate(self.concurrencies):
                # Rotate the order so no server always runs right after another one's load.
                rows = rows[i % len(rows) :] + rows[: i % len(rows)]
                for _, server, url, headers in rows:
                    duration = self.duration
                    while True:
                        result = run_wrk(
                            self.wrk,
                            url,
                            connections=conns,
                            duration=duration,
                            headers=headers,
                            pids=self._pids(server),
                        )
                        # A slow server may finish almost nothing in a short run (Verdaccio gzips
                        # each 1 MiB tarball): lengthen the run until rates and p99 mean something.
                        if result.requests >= 2 * conns or duration >= 8 * self.duration:
                            break
                        duration *= 3
                        self.say(f"{case} {server} c={conns}: only {result.requests} requests, rerunning {duration:g}s")
                    # A timeout or two under heavy load is a result (shown in the table); more is a broken setup.
                    if result.errors > 0.05 * (result.requests + result.errors):
                        raise BenchError(f"{server} {case} c={conns}: {result.errors} errors in {result.requests}")
                    if result.errors:
                        self.say(f"{case} {server} c={conns}: {result.errors} errors (timeouts/resets) recorded")
                    entry = {"case": case, "server": server, **result.as_dict()}
                    self.results["load"].append(entry)
                    if server.startswith("hub"):
                        peak_hub = max([peak_hub, *result.peak_rss.values()])
                    self.say(
                        f"{case:<15} {server:<10} c={conns:<3} {result.rps:>9.0f} req/s"
                        f"  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
                        f"  {result.bytes_per_sec / MIB:8.1f} MiB/s  {result.rps_per_cpu or 0:>8.0f} req/CPU-s"
                    )
        self.results["rss"]["under-load-peak"] = round(peak_hub / MIB, 1)

    # --- npm install ----------------------------------------------------------------------------

    def _npm_installs(self) -> None:
        from batlehub_npm_testing.clients import npm_env, run_npm

        project = self.scratch / "project"
        project.mkdir()
        manifest = {
            "name": "bench-project",
            "version": "1.0.0",
            "private": True,
            "dependencies": self.dataset.project_dependencies,
        }
        (project / "package.json").write_text(json.dumps(manifest, indent=2))

        def install(label: str, registry: str, server_pids: Callable[[], list[int]]) -> float:
            shutil.rmtree(project / "node_modules", ignore_errors=True)
            (project / "package-lock.json").unlink(missing_ok=True)
            env = npm_env(self.scratch / "npm", registry)
            pids = server_pids()
            server_cpu = cpu_seconds(pids)
            client_cpu = _children_cpu()
            started = time.perf_counter()
            result = run_npm(
                ["install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                project,
                env,
                timeout=600,
            )
            seconds = time.perf_counter() - started
            client_cpu = _children_cpu() - client_cpu
            server_cpu = cpu_seconds(pids) - server_cpu
            if result.returncode != 0:
                raise BenchError(f"npm install through {label} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
            installed = sum(1 for _ in (project / "node_modules").rglob("package.json"))
            if installed != len(self.dataset.tree):
                expected = len(self.dataset.tree)
                raise BenchError(f"npm install through {label} installed {installed} packages, not {expected}")
            self.results["npm_install"].setdefault(label, []).append(round(seconds, 3))
            detail = {
                "wall_s": round(seconds, 3),
                "npm_cpu_s": round(client_cpu, 2),
                "server_cpu_s": round(server_cpu, 2),
            }
            self.results.setdefault("npm_install_detail", {}).setdefault(label, []).append(detail)
            self.say(
                f"npm install ({installed} packages, fresh npm cache) through {label}: {seconds:.2f}s"
                f" (npm used {client_cpu:.2f} CPU-s, the server {server_cpu:.2f} CPU-s)"
            )
            return seconds

        verdaccio_pid = self.verdaccio.process.proc.pid  # type: ignore[union-attr]
        self.say("npm install: one priming run through the hub proxy (it is warm already; this primes npm itself)")
        install("priming", self.hub.registry_url("proxy"), self.hub.server_pids)
        self.results["npm_install"].pop("priming")
        self.results["npm_install_detail"].pop("priming")
        for i in range(self.npm_repeats):
            install("verdaccio", self.verdaccio.url, lambda: [verdaccio_pid])
            install("hub-warm", self.hub.registry_url("proxy"), self.hub.server_pids)
            install("hub-local", self.hub.registry_url("local"), self.hub.server_pids)
            cold = self._start_hub(f"hub-cold-{i}", self.scratch / f"hub-cold-{i}", proxy=True, local=False)
            # The cold hub's work includes Verdaccio's: count both.
            install("hub-cold", cold.registry_url("proxy"), lambda cold=cold: [*cold.server_pids(), verdaccio_pid])
            cold.stop()

    # --- big publish ------------------------------------------------------------------------------

    def _publish_huge(self) -> None:
        tarball_file = self.scratch / "huge.tgz"
        release = packages.write_huge_tarball(tarball_file, HUGE_TARBALL_BYTES)
        size = tarball_file.stat().st_size
        targets = [
            ("hub-local", self.hub.registry_url("local"), ADMIN_TOKEN, self.hub.pid),
            ("verdaccio", self.verdaccio.url, self.verdaccio.token, self.verdaccio.process.proc.pid),  # type: ignore[union-attr]
        ]
        for label, registry, token, pid in targets:
            body_file = self.scratch / f"huge-{label}.json"
            length = packages.stream_publish_body(registry, release, tarball_file, body_file)
            time.sleep(0.5)
            before = rss_bytes(pid)
            hwm_reset = _reset_peak_rss(pid)
            sampler = RssSampler(lambda pid=pid: {pid: rss_bytes(pid)}, interval=0.02)
            with sampler, open(body_file, "rb") as body:
                started = time.perf_counter()
                status, answer = packages.put(registry + release.url_name, token, body, length=length, timeout=600)
                seconds = time.perf_counter() - started
            if status not in (200, 201):
                raise BenchError(f"publishing {size} bytes to {label}: HTTP {status} {answer[:300]!r}")
            peak = sampler.peak.get(pid, before)
            hwm = _peak_rss(pid) if hwm_reset else None
            body_file.unlink()
            self._verify_download(label, registry, release)
            entry = {
                "tarball_bytes": size,
                "body_bytes": length,
                "seconds": round(seconds, 3),
                "rss_before": before,
                "rss_peak_sampled": peak,
                "rss_growth_sampled": max(0, peak - before),
                "rss_growth_hwm": None if hwm is None else max(0, hwm - before),
                "samples": sampler.samples,
            }
            self.results["publish"][label] = entry
            self.say(
                f"publish of a {size / MIB:.0f} MiB tarball ({length / MIB:.0f} MiB body) to {label}: "
                f"{seconds:.2f}s, peak RSS growth {entry['rss_growth_sampled'] / MIB:.1f} MiB sampled every 20 ms"
                + (f", {entry['rss_growth_hwm'] / MIB:.1f} MiB by VmHWM" if hwm is not None else "")
            )

    def _verify_download(self, label: str, registry: str, release: packages.Release) -> None:
        status, _, body = http_get(registry + release.url_name, {"Accept": NPM_ABBREVIATED_ACCEPT})
        if status != 200:
            raise BenchError(f"{label}: the published big package is not readable ({status})")
        url = json.loads(_decoded(body))["versions"][release.version]["dist"]["tarball"]
        status, _, data = http_get(url, timeout=120)
        if status != 200 or hashlib.sha512(data).digest() != hashlib.sha512(release.tarball).digest():
            raise BenchError(f"{label}: the published big tarball does not come back intact ({status})")

    # --- workers ------------------------------------------------------------------------------

    def _workers(self) -> None:
        hub2 = self._start_hub(
            "hub-2-workers", self.scratch / "hub-2w", proxy=False, local=True, workers=2, data_dir=self.hub.data_dir
        )
        self.results["rss"]["idle-2-workers"] = self._mib_map(hub2.rss())
        self.say(f"hub with 2 workers at {hub2.url}; idle RSS {self._fmt_rss(hub2.rss())}")
        url_path = "registries/local/" + packages.MANY_VERSIONS_NAME
        headers = {**NPM_HEADERS, "Accept": NPM_ABBREVIATED_ACCEPT}
        conns = max(self.concurrencies)
        for hub in (self.hub, hub2):  # both workers load their copy before measuring
            run_wrk(self.wrk, hub.url + url_path, connections=16, duration=1, headers=headers)
        # Alternate the two, twice, and keep each one's best run: the machine is shared and noisy.
        runs: dict[str, list[LoadResult]] = {"one": [], "two": []}
        for _round in range(2):
            for label, hub in (("one", self.hub), ("two", hub2)):
                url = hub.url + url_path
                result = run_wrk(
                    self.wrk, url, connections=conns, duration=self.duration, headers=headers, pids=hub.server_pids
                )
                runs[label].append(result)
        one, two = (max(runs[label], key=lambda r: r.rps) for label in ("one", "two"))
        for result in (one, two):
            if result.errors:
                raise BenchError(f"workers comparison: {result.errors} errors against {result.url}")
        self.results["workers"] = {
            "one": one.as_dict(),
            "two": two.as_dict(),
            "runs": {label: [r.rps for r in results] for label, results in runs.items()},
        }
        self.say(
            f"abbreviated packument c={conns}: 1 worker {one.rps:.0f} req/s ({one.rps_per_cpu} req/CPU-s),"
            f" 2 workers {two.rps:.0f} req/s ({two.rps_per_cpu} req/CPU-s): {two.rps / one.rps:.2f}x"
        )
        hub2.stop()

    def _policy_pair(self) -> None:
        """The same packument through the policy path (`filtered`: one version withheld) and
        without (`proxy`), alternated five times per case and concurrency, best run of each:
        the ratio that issue 15 sets a target on, as little disturbed by neighbours as one run
        on a shared machine can be."""
        name = packages.MANY_VERSIONS_NAME
        pairs: list[dict[str, Any]] = []
        for case, accept in (("abbreviated", NPM_ABBREVIATED_ACCEPT), ("full", "application/json")):
            headers = {**NPM_HEADERS, "Accept": accept}
            for conns in self.concurrencies:
                runs: dict[str, list[LoadResult]] = {"hub-proxy": [], "hub-filtered": []}
                for _round in range(POLICY_ROUNDS):
                    for server, registry in (("hub-proxy", "proxy"), ("hub-filtered", "filtered")):
                        url = self.hub.registry_url(registry) + name
                        result = run_wrk(
                            self.wrk,
                            url,
                            connections=conns,
                            duration=self.duration,
                            headers=headers,
                            pids=self.hub.server_pids,
                        )
                        runs[server].append(result)
                plain, filtered = (max(runs[s], key=lambda r: r.rps) for s in ("hub-proxy", "hub-filtered"))
                pair = {
                    "case": case,
                    "connections": conns,
                    "unfiltered_rps": round(plain.rps),
                    "filtered_rps": round(filtered.rps),
                    "ratio": round(filtered.rps / plain.rps, 3) if plain.rps else None,
                    "unfiltered_rps_per_cpu": plain.rps_per_cpu,
                    "filtered_rps_per_cpu": filtered.rps_per_cpu,
                    "runs": {s: [round(r.rps) for r in rs] for s, rs in runs.items()},
                }
                pairs.append(pair)
                self.say(
                    f"policy {case} c={conns}: unfiltered {plain.rps:.0f} req/s, filtered {filtered.rps:.0f} req/s"
                    f" ({pair['ratio']}x); req/CPU-s {plain.rps_per_cpu} vs {filtered.rps_per_cpu}"
                )
        self.results["policy"] = pairs

    # --- bookkeeping ----------------------------------------------------------------------------

    @staticmethod
    def _mib_map(rss: Mapping[int, int]) -> dict[str, float]:
        return {str(pid): round(value / MIB, 1) for pid, value in rss.items()}

    def _fmt_rss(self, rss: Mapping[int, int]) -> str:
        return ", ".join(f"{value / MIB:.0f} MiB" for value in rss.values()) or "?"

    def _meta(self) -> dict[str, Any]:
        def dist(name: str) -> str:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return "not installed"

        git = ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True)
        return {
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
            "load_average_at_start": self.load_at_start,
            "quick": self.quick,
            "duration_s": self.duration,
            "concurrencies": self.concurrencies,
            "npm_repeats": self.npm_repeats,
            "wrk_threads": 1,
            "git_commit": commit.stdout.strip() or "unknown",
            "hub_env": self.hub_env,
            "variant_env": self.variant_env,
            "versions": {
                "python": platform.python_version(),
                "batlehub": dist("batlehub"),
                "batlehub-npm": dist("batlehub-npm"),
                "aiohttp": dist("aiohttp"),
                "verdaccio": verdaccio_version(self.verdaccio.tools),
                "node": program_version([self.verdaccio.tools.node, "--version"]),
                "npm": program_version([self.verdaccio.tools.npm, "--version"]),
                "nginx": program_version([self.nginx.binary, "-v"]).removeprefix("nginx version: nginx/"),
                "wrk": program_version([self.wrk, "-v"]).split(" [")[0].removeprefix("wrk "),
            },
            "dataset": {
                "packages": self.dataset.package_count,
                "versions": self.dataset.release_count,
                "tree_packages": len(self.dataset.tree),
                "many_versions": len(self.dataset.many_versions),
                "big_tarball_bytes": len(self.dataset.big_tarball.tarball),
            },
        }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _env_pairs(items: list[str] | None) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bench: expected KEY=VALUE, got {item!r}")
        # Relative paths (e.g. PYTHONPATH=bench/prototypes) are meant from the checkout.
        if key == "PYTHONPATH" and not os.path.isabs(value):
            value = str((REPO / value).resolve())
        pairs[key] = value
    return pairs


def _decoded(body: bytes) -> bytes:
    return gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body


def _reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of a process, if we may (writing 5 to clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def print_report(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    load = results["load"]
    variants = ["hubx-proxy", "hubx-local"] if any(r["server"].startswith("hubx") for r in load) else []
    hub_and_verdaccio = ["hub-proxy", "hub-filtered", "hub-local", *variants, "verdaccio"]
    titles = {
        "abbreviated": "Abbreviated packument, 300 versions (Accept: application/vnd.npm.install-v1+json, gzip)",
        "full": "Full packument, 300 versions (Accept: application/json, gzip)",
        "revalidate-304": "Revalidation: If-None-Match with the current ETag (304)",
    }
    for case, title in titles.items():
        lines += ["", title, *report.load_table(load, case, hub_and_verdaccio, ["verdaccio"])]
    lines += [
        "",
        "1 MiB tarball download (filesystem storage)",
        *report.load_table(load, "tarball", [*hub_and_verdaccio, "nginx"], ["verdaccio", "nginx"]),
    ]
    cpu = report.cpu_table(load, [*hub_and_verdaccio, "nginx"])
    lines += ["", "Requests per CPU-second of the server's own processes", *cpu]
    installs = results["npm_install"]
    if installs:
        lines += ["", "npm install, 150 packages, fresh npm cache: wall seconds per run (CPU-s of npm / of the server)"]
    for label, runs in results.get("npm_install_detail", {}).items():
        cells = " ".join(f"{r['wall_s']:.2f} ({r['npm_cpu_s']:.1f}/{r['server_cpu_s']:.2f})" for r in runs)
        lines.append(f"  {label:<10} {cells}  best {min(r['wall_s'] for r in runs):.2f}")
    if results["publish"]:
        lines += ["", "Publish of a 50 MiB tarball"]
    for label, entry in results["publish"].items():
        hwm = entry["rss_growth_hwm"]
        lines.append(
            f"  {label:<10} {entry['seconds']:.2f}s, RSS growth {entry['rss_growth_sampled'] / MIB:.1f} MiB sampled"
            + (f" / {hwm / MIB:.1f} MiB peak (VmHWM)" if hwm is not None else "")
        )
    lines += ["", "RSS of the hub (MiB per serving process)"]
    for label, value in results["rss"].items():
        lines.append(f"  {label:<18} {value}")
    workers = results.get("workers")
    if workers:
        one, two = workers["one"], workers["two"]
        lines += [
            "",
            f"Workers: abbreviated packument, hub-local, c={one['connections']}: "
            f"1 worker {one['rps']:.0f} req/s (p99 {one['p99_ms']:.1f} ms), "
            f"2 workers {two['rps']:.0f} req/s (p99 {two['p99_ms']:.1f} ms); "
            f"req/CPU-s {one['rps_per_cpu']} vs {two['rps_per_cpu']}",
        ]
    pairs = results.get("policy") or []
    if pairs:
        lines += ["", "Packument through policies (one version withheld) vs without, best of 5 alternated runs"]
        for pair in pairs:
            lines.append(
                f"  {pair['case']:<12} c={pair['connections']:<3} unfiltered {pair['unfiltered_rps']:>6} req/s"
                f"  filtered {pair['filtered_rps']:>6} req/s  ratio {pair['ratio']}"
                f"  (req/CPU-s {pair['unfiltered_rps_per_cpu']} vs {pair['filtered_rps_per_cpu']})"
            )
    targets = report.evaluate_targets(results)
    results["targets"] = [t.as_dict() for t in targets]
    lines += ["", "Targets (issue 7)", *report.target_lines(targets)]
    meta = results["meta"]
    lines += [
        "",
        f"{meta['cpu_count']} CPUs ({meta['cpu_model']}), {meta['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"wrk: 1 thread, {meta['duration_s']:g}s per run; {meta['timestamp']}; commit {meta['git_commit']}",
    ]
    print("\n".join(lines), flush=True)
    return lines


def render_markdown(json_file: str) -> int:
    """`run.py --render-markdown results.json`: the Markdown tables of an earlier run."""
    print("\n".join(report.markdown(json.loads(Path(json_file).read_text()))))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--render-markdown":
        return render_markdown(sys.argv[2])
    args_in = sys.argv[1:] if argv is None else argv
    if "--suite" in args_in:  # `--suite scale`: issue 14's scenarios (bench/scale.py); `--suite load`: this
        at = args_in.index("--suite")
        suite = args_in[at + 1] if at + 1 < len(args_in) else ""
        rest = args_in[:at] + args_in[at + 2 :]
        if suite == "scale":
            import scale

            return scale.main(rest)
        if suite != "load":
            raise SystemExit(f"bench: unknown suite {suite!r} (expected load or scale)")
        argv = rest
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, concurrencies 1 and 64 (~3 minutes)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "latest.json"), help="JSON results file")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 5, quick 2)")
    parser.add_argument("--concurrency", type=int, action="append", help="repeatable (default 1 16 64, quick 1 64)")
    parser.add_argument("--npm-repeats", type=int, help="npm install runs per registry (default 3, quick 1)")
    parser.add_argument(
        "--hub-env",
        action="append",
        metavar="KEY=VALUE",
        help="extra environment for hub processes, e.g. PYTHONPATH=bench/prototypes (repeatable)",
    )
    parser.add_argument(
        "--variant-env",
        action="append",
        metavar="KEY=VALUE",
        help="also measure a second hub ('hubx-*') on the same data with this environment, e.g."
        " PYTHONPATH=bench/prototypes to try an optimization side by side (repeatable)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=["load", "npm", "publish", "workers", "policy"],
        help="run only these parts (repeatable; default all)",
    )
    parser.add_argument(
        "--case", action="append", help="load cases to run (abbreviated, full, revalidate-304, tarball; default all)"
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown (for the README)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, data) afterwards")
    args = parser.parse_args(argv)
    bench = Bench(args)
    try:
        results = bench.run()
    except BenchError as exc:
        print(f"\nbench: FAILED: {exc}", file=sys.stderr, flush=True)
        return 2
    lines = print_report(results)
    results["table"] = lines
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {out}", flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(report.markdown(results)) + "\n")
        print(f"Markdown tables written to {args.markdown}", flush=True)
    failed = [t for t in results["targets"] if not t["passed"]]
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
