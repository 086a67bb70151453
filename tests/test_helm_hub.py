"""Real hubs on what the Helm chart renders: the ConfigMap's TOML, with the environment Kubernetes
would give the container (the Secret's values put back through the chart's variables), passes
`batlehub check-config` and boots `batlehub serve` against PostgreSQL, Redis and S3, which then
serves npm publishes and installs.

When the tests run as root, each hub runs as the image's user (10001) in a mount namespace whose
root filesystem is read-only but for its data directory and its TMPDIR, as the chart's pod
(readOnlyRootFilesystem, emptyDirs on /var/lib/batlehub and /tmp): a write anywhere else fails."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
from batlehub_npm_testing.clients import make_package, npm_env, ok, run_npm
from helm_support import POSTGRES_URL, REDIS_URL, SCENARIOS, config_toml, container_env, objects

from batlehub.testing.hub import Hub, HubFactory, serve_env

IMAGE_UID = 10001  # deploy/Dockerfile's USER, the chart's runAsUser
ADMIN = "helm-admin-token-0123456789"
ALICE = "helm-alice-token-0123456789"
# What an operator keeps in the Secret named by secrets.existingSecret.
OPERATOR_SECRET = {
    "db": POSTGRES_URL,
    "redis": REDIS_URL,
    "s3-id": "AKIAEXAMPLE",
    "s3-secret": "secret",
    "admin-token": ADMIN,
}


def pod_env(objs: list[dict[str, Any]], config: Path, data_dir: Path) -> dict[str, str]:
    """The container's environment, with the chart's two paths (the mounted config and the data
    volume) pointing at this test's folders."""
    env = container_env(objs, {"hub-credentials": OPERATOR_SECRET})
    assert env["BATLEHUB_CONFIG"].endswith("/batlehub.toml")
    return {**env, "BATLEHUB_CONFIG": str(config), "BATLEHUB_DATA_DIR": str(data_dir)}


def check_config(config: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batlehub", "check-config"],
        env=serve_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def pod_root() -> Iterator[Path]:
    """A folder the image's user can reach (pytest's own are private to root)."""
    root = Path(tempfile.mkdtemp(prefix="batlehub-helm-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sandboxed() -> bool:
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in ("unshare", "setpriv"))


class Pod:
    """One replica's folders (data volume, /tmp) and how its hub is run."""

    def __init__(self, root: Path, name: str) -> None:
        self.data = root / name / "data"
        self.tmp = root / name / "tmp"
        for folder in (self.data, self.tmp):
            folder.mkdir(parents=True)
            if sandboxed():
                os.chown(folder, IMAGE_UID, IMAGE_UID)

    def command(self, program: list[str] | None = None) -> list[str] | None:
        """`program` (default: batlehub) run as the pod's container would; None when the tests
        cannot build that sandbox here and the hub runs as a plain process."""
        if not sandboxed():
            return None
        # The bind mounts keep the two folders writable once the root is read-only; setpriv
        # drops root for the image's user, as runAsUser does. It keeps the one capability to read
        # any file (never to write one): this machine's interpreter may live under root's home.
        script = (
            'data=$1 tmp=$2; shift 2; mount --bind "$data" "$data" && mount --bind "$tmp" "$tmp"'
            " && mount -o remount,bind,ro /"
            f" && exec setpriv --reuid {IMAGE_UID} --regid {IMAGE_UID} --clear-groups"
            ' --inh-caps +dac_read_search --ambient-caps +dac_read_search -- "$@"'
        )
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "pod",
            str(self.data),
            str(self.tmp),
            *(program or [sys.executable, "-m", "batlehub"]),
        ]

    async def start(self, factory: HubFactory, config: str, env: Mapping[str, str]) -> Hub:
        return await factory(config, env={**env, "TMPDIR": str(self.tmp)}, data_dir=self.data, command=self.command())


def npm(args: list[str], cwd: Path, registry: str, scratch: Path, token: str | None = None) -> str:
    return ok(run_npm(args, cwd=cwd, env=npm_env(scratch, registry, token)))


def consumer(root: Path, label: str, dependencies: dict[str, str]) -> Path:
    folder = root / label
    folder.mkdir(parents=True)
    manifest = {"name": f"consumer-{label}", "version": "1.0.0", "dependencies": dependencies}
    (folder / "package.json").write_text(json.dumps(manifest))
    return folder


def installed_version(folder: Path, name: str) -> str:
    return str(json.loads((folder / "node_modules" / name / "package.json").read_text())["version"])


# --- check-config on every shape --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_config_passes_check_config(scenario: str, tmp_path: Path) -> None:
    objs = objects(SCENARIOS[scenario])
    config = tmp_path / "batlehub.toml"
    config.write_text(config_toml(objs))
    result = check_config(config, pod_env(objs, config, tmp_path / "data"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_config_sees_the_secrets_the_pod_gets(tmp_path: Path) -> None:
    # Without the Secret's variables the same file is incomplete: the test above is not vacuous.
    objs = objects(SCENARIOS["three replicas on PostgreSQL, Redis and S3"])
    config = tmp_path / "batlehub.toml"
    config.write_text(config_toml(objs))
    result = check_config(config, {"BATLEHUB_CONFIG": str(config)})
    assert result.returncode == 1
    assert "database.url" in result.stderr + result.stdout
    assert "cache.url" in result.stderr + result.stdout


# --- real hubs ----------------------------------------------------------------------------------


@pytest.mark.skipif(not sandboxed(), reason="a read-only root filesystem needs root to mount (unshare, setpriv)")
def test_the_pod_sandbox_lets_the_hub_write_only_its_volumes(pod_root: Path) -> None:
    pod = Pod(pod_root, "pod0")
    probe = (
        "import os, sys\nfor path in sys.argv[1:]:\n    open(path, 'w').close()\n    print(path, os.stat(path).st_uid)"
    )
    command = pod.command([sys.executable, "-c", probe])
    assert command is not None
    writable = [str(pod.data / "file"), str(pod.tmp / "file")]
    result = subprocess.run([*command, *writable], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [writable[0], str(IMAGE_UID), writable[1], str(IMAGE_UID)]
    for outside in (pod_root / "file", Path(tempfile.gettempdir()) / f"batlehub-{uuid.uuid4().hex}"):
        result = subprocess.run([*command, str(outside)], capture_output=True, text=True, timeout=30)
        assert result.returncode != 0
        assert "Read-only file system" in result.stderr
        assert not outside.exists()


@pytest.mark.npm_cli
async def test_embedded_release_serves_npm_from_its_data_volume(pod_root: Path, tmp_path: Path) -> None:
    objs = objects({})
    factory = HubFactory(pod_root / "hubs")
    pod = Pod(pod_root, "pod0")
    try:
        env = pod_env(objs, pod_root / "unused.toml", pod.data)
        hub = await pod.start(factory, config_toml(objs), env)
        assert hub.admin_token, "the first start writes an admin token to the data volume"
        registry = f"{hub.url}/registries/npm/"

        name = f"helm-embedded-{uuid.uuid4().hex[:8]}"
        source = make_package(tmp_path / "src", name, "1.0.0")
        await asyncio.to_thread(npm, ["publish"], source, registry, tmp_path / "pub", hub.admin_token)
        project = consumer(tmp_path, "app", {name: "1.0.0"})
        await asyncio.to_thread(npm, ["install"], project, registry, tmp_path / "inst")
        assert installed_version(project, name) == "1.0.0"
        # SQLite and the stored tarball live on the data volume.
        assert (pod.data / "batlehub.db").exists()
        assert any((pod.data / "storage").rglob("*")), "no tarball under the data volume"
    finally:
        factory.stop_all()


@pytest.mark.npm_cli
async def test_ha_release_on_postgres_redis_and_s3_serves_npm_across_replicas(
    pod_root: Path,
    tmp_path: Path,
    fresh_postgres_url: str,
    redis_url: str,
    s3_config: dict[str, Any],
    verdaccio: Any,
) -> None:
    tag = uuid.uuid4().hex[:8]
    upstream_pkg, local_pkg = f"helm-upstream-{tag}", f"@helm-{tag}/private"
    await asyncio.to_thread(verdaccio.publish, make_package(tmp_path / "up", upstream_pkg, "2.1.0"))
    values = {
        "replicaCount": 3,
        "database": {"type": "postgresql", "url": fresh_postgres_url},
        "cache": {"type": "redis", "url": redis_url, "prefix": f"helm-{tag}:"},
        "storage": {
            "type": "s3",
            "s3": {
                "bucket": s3_config["bucket"],
                "region": s3_config["region"],
                "endpoint": s3_config["endpoint"],
                "forcePathStyle": True,
                "prefix": f"helm-{tag}",
                "accessKeyId": s3_config["access_key_id"],
                "secretAccessKey": s3_config["secret_access_key"],
            },
        },
        "auth": {
            "tokens": [
                {"user_id": "admin", "role": "admin", "value": ADMIN},
                {"user_id": "alice", "role": "user", "value": "sha256:" + hashlib.sha256(ALICE.encode()).hexdigest()},
            ]
        },
        "registries": [{"type": "npm", "name": "npm", "mode": "hybrid", "upstreams": [verdaccio.url]}],
    }
    objs = objects(values)
    config = config_toml(objs)
    # Nothing secret is in the file the replicas share.
    for secret in (fresh_postgres_url, redis_url, s3_config["secret_access_key"], ADMIN):
        assert secret not in config

    factory = HubFactory(pod_root / "hubs")
    try:
        env = pod_env(objs, pod_root / "unused.toml", pod_root / "unused")
        first = await Pod(pod_root, "pod0").start(factory, config, env)
        second = await Pod(pod_root, "pod1").start(factory, config, env)

        # Alice's token is configured only as its sha256; the admin's comes from the Secret.
        source = make_package(tmp_path / "src", local_pkg, "1.0.0", dependencies={upstream_pkg: "^2.0.0"})
        await asyncio.to_thread(npm, ["publish"], source, f"{first.url}/registries/npm/", tmp_path / "p", ALICE)
        whoami = await asyncio.to_thread(
            npm, ["whoami"], tmp_path, f"{second.url}/registries/npm/", tmp_path / "w", ADMIN
        )
        assert whoami.strip() == "admin"

        # The other replica serves what was published through the first, and proxies the upstream.
        project = consumer(tmp_path, "app", {local_pkg: "1.0.0"})
        await asyncio.to_thread(npm, ["install"], project, f"{second.url}/registries/npm/", tmp_path / "i")
        assert installed_version(project, local_pkg) == "1.0.0"
        assert installed_version(project, upstream_pkg) == "2.1.0"

        # The tarballs went to the bucket under the release's prefix, not to a pod's disk.
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_config["endpoint"],
            region_name=s3_config["region"],
            aws_access_key_id=s3_config["access_key_id"],
            aws_secret_access_key=s3_config["secret_access_key"],
        )
        listed = s3.list_objects_v2(Bucket=s3_config["bucket"], Prefix=f"helm-{tag}")
        assert len(listed.get("Contents", [])) >= 2
    finally:
        factory.stop_all()
