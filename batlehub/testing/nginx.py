"""nginx for tests and the bench: one nginx in the foreground with its own prefix folder, config
and logs, and the shipped `deploy/nginx.conf` rendered to balance replicas on this machine (the HA
harness of a format's test kit puts its replicas behind it)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from batlehub.testing.services import LOOPBACK, ManagedProcess, ServiceStartError, free_port, port_open, wait_until

DEPLOY_NGINX_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
"""The load-balancer config the project ships (in a checkout; an installed wheel does not carry it)."""


def find_nginx() -> str:
    """The nginx binary (Debian installs it in /usr/sbin, often outside PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/local/nginx/sbin")
    if found is None:
        raise ServiceStartError(
            "nginx not found: install it with `apt-get install -y nginx` (./scripts/test does this)"
        )
    return found


def render_nginx_conf(template: str, *, listen_port: int, replica_ports: Sequence[int], prefix: Path) -> str:
    """`deploy/nginx.conf` with this machine's ports and paths: the `listen` port, one upstream
    `server` line per replica (keeping the template's parameters), and pid, logs and temp files
    inside `prefix`. Everything else (headers, retries, limits) is used exactly as shipped."""
    text = template
    text = re.sub(r"(?m)^\s*user\s+[^;]*;\n", "", text)
    text = re.sub(r"(?m)^(\s*)worker_processes\s+[^;]*;", r"\1worker_processes 2;", text)
    text = re.sub(r"(?m)^(\s*)pid\s+[^;]*;", lambda m: f"{m.group(1)}pid {prefix / 'nginx.pid'};", text)
    text = re.sub(
        r"(?m)^(\s*)error_log\s+[^;]*;", lambda m: f"{m.group(1)}error_log {prefix / 'error.log'} notice;", text
    )
    text = re.sub(r"(?m)^(\s*)access_log\s+\S+", lambda m: f"{m.group(1)}access_log {prefix / 'access.log'}", text)
    text, listens = re.subn(r"(?m)^(\s*)listen\s+[^;]*;", rf"\g<1>listen {LOOPBACK}:{listen_port};", text)
    upstream = re.search(r"(?s)upstream\s+\w+\s*\{.*?\}", text)
    if listens != 1 or upstream is None:
        raise ValueError("nginx.conf must have one `listen` and one `upstream` block")
    block = upstream.group(0)
    servers = list(re.finditer(r"(?m)^(\s*)server\s+\S+?(\s[^;]*)?;\n", block))
    if not servers:
        raise ValueError("the upstream block of nginx.conf has no `server` lines")
    indent, params = servers[0].group(1), servers[0].group(2) or ""
    lines = "".join(f"{indent}server {LOOPBACK}:{port}{params};\n" for port in replica_ports)
    new_block = block[: servers[0].start()] + lines + block[servers[-1].end() :]
    for other in servers[1:-1]:
        new_block = new_block.replace(other.group(0), "")
    text = text.replace(block, new_block)
    temp_paths = "".join(
        f"    {kind}_temp_path {prefix / 'temp' / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return re.sub(r"(?m)^http\s*\{\n", lambda m: m.group(0) + temp_paths, text, count=1)


class Nginx:
    """nginx in the foreground (`daemon off`), with its own prefix folder, config and logs.

    `config` is the whole nginx.conf, listening on `port` and keeping its pid, logs and temp files
    inside `root` (`error.log` and `access.log` there are where `error_log` and `access_log` look).
    `in_front_of` renders `deploy/nginx.conf` for replicas on this machine.
    """

    def __init__(self, root: Path, config: str, port: int, *, binary: str | None = None) -> None:
        self.root = root
        self.port = port
        self.binary = binary or find_nginx()
        root.mkdir(parents=True, exist_ok=True)
        (root / "temp").mkdir(exist_ok=True)
        # Worker processes may run as an unprivileged user when nginx starts as root.
        for folder in (root, root / "temp"):
            folder.chmod(0o755)
        self.conf = root / "nginx.conf"
        self.conf.write_text(config)
        found = re.search(r"fail_timeout=(\d+)s?\b", config)
        self.fail_timeout_secs = float(found.group(1)) if found else 10.0
        """How long nginx skips an upstream server after a failed attempt (its default: 10 s)."""
        argv = [self.binary, "-p", str(root), "-c", str(self.conf), "-e", str(self.error_log), "-g", "daemon off;"]
        self.process = ManagedProcess(argv, root / "nginx.out")

    @classmethod
    def in_front_of(
        cls, root: Path, replica_ports: Sequence[int], *, port: int | None = None, template: Path = DEPLOY_NGINX_CONF
    ) -> Nginx:
        """nginx with the shipped load-balancer config, its upstream being the replicas listening on
        `replica_ports` (see `render_nginx_conf`)."""
        port = port or free_port()
        config = render_nginx_conf(template.read_text(), listen_port=port, replica_ports=replica_ports, prefix=root)
        return cls(root, config, port)

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    @property
    def error_log(self) -> Path:
        return self.root / "error.log"

    def start(self, timeout: float = 20) -> None:
        self.process.start()
        wait_until(
            lambda: port_open(self.port), what="nginx", process=self.process, log=self.error_log, timeout=timeout
        )

    def stop(self) -> None:
        self.process.stop(timeout=5)
