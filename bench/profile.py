"""Where the hub spends its time under load: py-spy samples the hub while wrk drives one request
type, then the collapsed stacks are summarized (own and inclusive time per function).

    .venv/bin/python bench/profile.py [--case abbreviated] [--server hub-proxy] [--seconds 8]

Sets up the same servers and data as bench/run.py. Without --case/--server every hub case is
profiled in turn. Raw collapsed stacks (for flamegraph.pl or speedscope) are written next to the
summary in --out-dir.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import BenchError
from benchkit.servers import REPO
from run import Bench

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/batlehub/", "/batlehub_npm/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1] if marker.endswith("/") else marker.strip("/") + path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def summarize(raw: Path, top: int = 25) -> list[str]:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples", "", "own time (where the CPU is):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive time (what it is spent for):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", help="abbreviated, full, revalidate-304, tarball (repeatable)")
    parser.add_argument("--server", action="append", help="hub-proxy, hub-local (repeatable)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results" / "profile"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL (Python CPU, no waits)")
    parser.add_argument("--hub-env", action="append", metavar="KEY=VALUE", help="as for run.py (repeatable)")
    args = parser.parse_args(argv)

    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
        py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        print("profile: py-spy is missing and could not be installed (pip install py-spy)", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    bench = Bench(
        argparse.Namespace(
            quick=True, duration=None, concurrency=None, npm_repeats=None, keep=args.keep, hub_env=args.hub_env
        )
    )
    try:
        bench.setup()
        for case, server, url, headers in bench.cases():
            if not server.startswith("hub"):
                continue
            if (args.case and case not in args.case) or (args.server and server not in args.server):
                continue
            raw = out_dir / f"{case}-{server}-c{args.connections}.txt"
            bench.say(f"profiling {case} on {server} at c={args.connections} for {args.seconds:g}s")
            from benchkit.load import lua_quote

            script = out_dir / "headers.lua"
            script.write_text("\n".join(f"wrk.headers[{lua_quote(k)}] = {lua_quote(v)}" for k, v in headers.items()))
            wrk = subprocess.Popen(
                [bench.wrk, "-t1", f"-c{args.connections}", f"-d{int(args.seconds) + 2}s", "-s", str(script), url],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            time.sleep(1)
            spy = subprocess.run(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(bench.hub.pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "-o",
                    str(raw),
                ],
                capture_output=True,
                text=True,
            )
            output, _ = wrk.communicate(timeout=args.seconds + 60)
            if spy.returncode != 0:
                raise BenchError(f"py-spy failed: {spy.stdout}{spy.stderr}")
            rps = next((x for x in output.splitlines() if x.startswith("Requests/sec")), "Requests/sec: ?")
            summary = [f"{case} on {server}, c={args.connections}, {rps.strip()} (while sampled)", *summarize(raw)]
            (out_dir / f"{case}-{server}-c{args.connections}.summary.txt").write_text("\n".join(summary) + "\n")
            print("\n".join(summary) + "\n", flush=True)
    except BenchError as exc:
        print(f"\nprofile: FAILED: {exc}", file=sys.stderr)
        return 2
    finally:
        bench.close()
    print(f"collapsed stacks and summaries in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
