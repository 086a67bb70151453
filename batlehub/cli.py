"""The `batlehub` command line. Start-up problems become one readable message and exit code 1
here, and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from batlehub import __version__
from batlehub.accesslog import LOG_FORMATS
from batlehub.config import Settings
from batlehub.errors import ConfigError, StartupError

log = logging.getLogger("batlehub.server")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file (default: $BATLEHUB_CONFIG; none at all = the embedded default)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the embedded default keeps its data (default: $XDG_DATA_HOME/batlehub)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batlehub",
        description="BatleHub: a package registry hub that proxies, caches and hosts packages.",
        epilog="Any setting can be overridden by environment: BATLEHUB_<SECTION>__<KEY>,"
        " e.g. BATLEHUB_SERVER__PORT=9000.",
    )
    parser.add_argument("--version", action="version", version=f"batlehub {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("BATLEHUB_LOG_LEVEL", "INFO"), help="default: INFO")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("BATLEHUB_LOG_FORMAT", "text"),
        help="text (default), or json: one JSON object per line, for log shippers (also $BATLEHUB_LOG_FORMAT)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser("serve", help="run the server", description="Run the server (migrating the database first).")
    _add_config_args(serve)
    migrate = sub.add_parser(
        "migrate", help="apply database migrations and exit", description="Apply migrations and exit."
    )
    _add_config_args(migrate)
    check = sub.add_parser(
        "check-config",
        help="validate the configuration; exit 1 listing every problem",
        description="Validate the configuration against the installed plugins; exit 1 listing every problem.",
    )
    _add_config_args(check)
    sub.add_parser(
        "plugins",
        help="list installed plugins, versions and what each provides",
        description="List installed plugins with their distribution, version, hooks and what each provides.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_format not in LOG_FORMATS:  # from the environment, which argparse does not check
        parser.error(f"BATLEHUB_LOG_FORMAT: expected one of {', '.join(LOG_FORMATS)}, got {args.log_format!r}")
    _setup_logging(args.log_level, args.log_format)
    try:
        if args.command == "plugins":
            return _plugins()
        settings = _load_checked(args.config, args.data_dir)
        if args.command == "check-config":
            print(f"configuration is valid ({settings.source})")
            return 0
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        return _serve(settings, args.log_format)
    except ConfigError as exc:
        print(f"batlehub: configuration has {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except StartupError as exc:
        print(f"batlehub: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from batlehub.accesslog import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO), handlers=[handler])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _plugins() -> int:
    from batlehub.plugins import describe_plugins, get_plugin_manager

    pm = get_plugin_manager()
    for info in describe_plugins(pm):
        dist = f"{info.distribution} {info.version}" if info.distribution else "(not from a distribution)"
        print(f"{info.name}  [{dist}]")
        if info.provides:
            print(f"    provides: {', '.join(info.provides)}")
        print(f"    hooks: {', '.join(info.hooks) or '-'}")
    return 0


def _load_checked(config_file: str | None, data_dir: str | None) -> Settings:
    """The settings, with every problem of the core and of the installed plugins listed at once
    (a ConfigError), and the formats' default registries resolved when the config names none."""
    from batlehub.app import check_plugins_config, installed_types, with_default_registries
    from batlehub.config import parse_settings, read_raw
    from batlehub.plugins import get_plugin_manager

    types = installed_types(get_plugin_manager())
    raw, source = read_raw(config_file)  # a missing or unreadable file is the only problem to show
    try:
        settings = parse_settings(raw, data_dir=data_dir, source=source)
    except ConfigError as exc:
        # Add what the plugins say about the same file, so that one run lists every problem.
        raise ConfigError(exc.problems + check_plugins_config(None, types, raw)) from None
    settings = with_default_registries(settings, types)
    problems = check_plugins_config(settings, types)
    if problems:
        raise ConfigError(problems)
    return settings


async def _migrate(settings: Settings) -> int:
    from batlehub.db import create_database, schema_version

    db = create_database(settings)
    await db.connect()
    try:
        applied = await db.migrate(progress=lambda message: print(f"applying {message}", flush=True))
        version = await schema_version(db)
    finally:
        await db.close()
    print(f"database is at version {version} ({len(applied)} migration(s) applied)")
    return 0


def _serve(settings: Settings, log_format: str = "text") -> int:
    from batlehub import metrics

    workers = settings.server.workers
    if workers <= 1:
        return asyncio.run(_serve_one(settings, reuse_port=False, log_format=log_format))
    # Migrate once in the parent so the workers do not queue on the migration lock at start.
    asyncio.run(_migrate_quietly(settings))
    folder = metrics.prepare_worker_folder() if metrics.uses_workers(settings) else None
    try:
        return _serve_many(settings, workers, log_format)
    finally:
        if folder is not None:
            metrics.remove_worker_folder(folder)


async def _migrate_quietly(settings: Settings) -> None:
    from batlehub.db import create_database

    db = create_database(settings)
    await db.connect()
    try:
        await db.migrate(progress=lambda message: log.info("applying %s", message))
    finally:
        await db.close()


def _serve_many(settings: Settings, workers: int, log_format: str = "text") -> int:
    """N processes sharing the port through SO_REUSEPORT; SIGTERM is passed on to each."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise StartupError("server.workers > 1 needs SO_REUSEPORT, which this platform lacks")
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLevelName(logging.getLogger().level)
    procs = [
        ctx.Process(target=_worker_main, args=(settings, level, log_format), name=f"batlehub-worker-{i}")
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    log.info("started %d workers on %s:%d", workers, settings.server.host, settings.server.port)
    from batlehub.plugins import get_plugin_manager

    _log_guide(settings, get_plugin_manager())

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.pid and proc.is_alive():
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    for proc in procs:
        proc.join()
        code = code or (proc.exitcode or 0)
    return code


def _worker_main(settings: Settings, log_level: str, log_format: str = "text") -> None:
    # A spawned process starts with logging unconfigured: give it the parent's level and format.
    _setup_logging(log_level, log_format)
    raise SystemExit(asyncio.run(_serve_one(settings, reuse_port=True, log_format=log_format)))


async def _serve_one(settings: Settings, *, reuse_port: bool, log_format: str = "text") -> int:
    from aiohttp import web

    from batlehub import appkeys, memory, tracing
    from batlehub.accesslog import StreamAccessLog
    from batlehub.app import create_app
    from batlehub.server import make_runner, raise_open_file_limit

    tracing.configure_tracing(settings.otel)
    raise_open_file_limit()
    memory.tune()  # before the threads start: see batlehub.memory
    app = create_app(settings)
    if logging.getLogger("batlehub.access").isEnabledFor(logging.INFO):
        app[appkeys.ACCESS_LOG] = StreamAccessLog(sys.stderr, json_lines=log_format == "json")
    runner = make_runner(app, settings)
    try:
        await runner.setup()
    except BaseException:
        # Close what already opened (aiosqlite's thread, pools): left open, they keep the process
        # alive after the error instead of letting it exit for the orchestrator to restart.
        await runner.cleanup()
        raise
    site = web.TCPSite(runner, settings.server.host, settings.server.port, reuse_port=reuse_port or None, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot listen on {settings.server.host}:{settings.server.port}: {exc.strerror or exc}"
            " (change server.port or BATLEHUB_SERVER__PORT)"
        ) from exc
    try:
        metrics_runner = await _serve_metrics_port(settings, reuse_port=reuse_port)
    except StartupError:
        await runner.cleanup()
        raise
    log.info(
        "BatleHub %s listening on http://%s:%d (config: %s; data: %s)",
        __version__,
        settings.server.host,
        settings.server.port,
        settings.source,
        settings.data_dir,
    )
    if settings.server.workers <= 1:
        _log_guide(app[appkeys.SETTINGS], app[appkeys.PLUGIN_MANAGER])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    # Fail health first so a load balancer stops sending new requests, then stop accepting and
    # let in-flight requests finish (up to shutdown_timeout_secs) before closing the backends.
    app[appkeys.STATE].shutting_down = True
    log.info("shutting down: draining in-flight requests (up to %gs)", settings.server.shutdown_timeout_secs)
    for listening in list(runner.sites):
        await listening.stop()
    await _drain(app[appkeys.STATE], settings.server.shutdown_timeout_secs / 2)
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    app[appkeys.ACCESS_LOG].flush()
    tracing.shutdown()
    log.info("stopped")
    return 0


async def _serve_metrics_port(settings: Settings, *, reuse_port: bool) -> Any:
    """With `[metrics] port`, /metrics on that port (every worker listens; any answers for all)."""
    if not settings.metrics.enabled or not settings.metrics.port:
        return None
    from aiohttp import web

    from batlehub.metrics import metrics_only_app

    runner = web.AppRunner(metrics_only_app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.metrics.port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot listen on {settings.server.host}:{settings.metrics.port} for metrics: {exc.strerror or exc}"
            " (change metrics.port or BATLEHUB_METRICS__PORT)"
        ) from exc
    log.info("metrics on http://%s:%d/metrics", settings.server.host, settings.metrics.port)
    return runner


def _log_guide(settings: Settings, pm: Any) -> None:
    from batlehub.app import installed_types
    from batlehub.guide import startup_lines

    for line in startup_lines(settings, installed_types(pm).registries):
        log.info("%s", line)


async def _drain(state: Any, timeout_secs: float) -> None:
    """Wait until no request is in a handler (or `timeout_secs` passed), with the listener closed.

    Needed before `runner.cleanup()`: from that point aiohttp stops reading request bodies, so a
    publish still uploading through a load balancer would stall and fail instead of finishing.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_secs
    # Connections accepted just before the listener closed get to present their request first.
    await asyncio.sleep(0.1)
    while loop.time() < deadline:
        if state.in_flight == 0:
            return
        await asyncio.sleep(0.05)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
