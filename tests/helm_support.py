"""Render `helm/batlehub` with Helm's own Go SDK (helm-python-sdk, no helm binary or cluster) and
read the result as Kubernetes would: the objects, and a container's environment with its Secret
and ConfigMap references and `$(VAR)` expansions resolved."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "batlehub"
RELEASE = "hub"
NAMESPACE = "registry"
FULLNAME = f"{RELEASE}-batlehub"

POSTGRES_URL = "postgresql://batlehub:pw@postgres:5432/batlehub"
REDIS_URL = "redis://redis:6379/0"
SHA256_TOKEN = "sha256:" + "ab" * 32

# The deployments an operator would write, one per shape the chart supports.
SCENARIOS: dict[str, dict[str, Any]] = {
    "embedded single replica": {},
    "embedded with persistence": {"persistence": {"enabled": True, "size": "20Gi", "storageClass": "fast"}},
    "three replicas on PostgreSQL, Redis and S3": {
        "replicaCount": 3,
        "database": {"type": "postgresql", "url": POSTGRES_URL},
        "cache": {"type": "redis", "url": REDIS_URL, "prefix": "hub:"},
        "storage": {
            "type": "s3",
            "s3": {
                "bucket": "packages",
                "region": "eu-west-1",
                "endpoint": "http://seaweedfs:8333",
                "forcePathStyle": True,
                "accessKeyId": "12345",
                "secretAccessKey": "secret/with+chars",
            },
        },
        "auth": {
            "tokens": [
                {"user_id": "admin", "role": "admin", "value": "admin-token-0123456789"},
                {"user_id": "ci", "role": "user", "value": SHA256_TOKEN},
            ]
        },
        "server": {"trustedProxies": ["10.0.0.0/8"]},
    },
    "autoscaling": {
        "autoscaling": {
            "enabled": True,
            "minReplicas": 2,
            "maxReplicas": 10,
            "targetMemoryUtilizationPercentage": 80,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
        "database": {"type": "postgresql", "url": POSTGRES_URL},
        "cache": {"type": "postgres"},
        "storage": {"type": "s3", "s3": {"bucket": "packages"}},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/hub"}},
    },
    "ingress with TLS": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"},
            "hosts": [{"host": "npm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "npm-tls", "hosts": ["npm.example.com"]}],
            "maxBodySize": "1g",
        },
    },
    "existing secret": {
        "replicaCount": 2,
        "database": {"type": "postgresql"},
        "cache": {"type": "redis"},
        "storage": {"type": "s3", "s3": {"bucket": "packages", "region": "us-east-1"}},
        "secrets": {
            "existingSecret": "hub-credentials",
            "existingSecretKeys": {
                "databaseUrl": "db",
                "cacheUrl": "redis",
                "s3AccessKeyId": "s3-id",
                "s3SecretAccessKey": "s3-secret",
            },
        },
        "auth": {"tokens": [{"user_id": "admin", "role": "admin", "secretKey": "admin-token"}]},
    },
    "shared filesystem volume": {
        "replicaCount": 2,
        "database": {"type": "postgresql", "url": POSTGRES_URL},
        "cache": {"type": "postgres"},
        "persistence": {"enabled": True, "accessModes": ["ReadWriteMany"], "existingClaim": "nfs-packages"},
        "podDisruptionBudget": {"maxUnavailable": "50%"},
    },
    "metrics and scheduling": {
        "metrics": {
            "serviceMonitor": {
                "enabled": True,
                "labels": {"release": "prom"},
                "tokenSecret": {"key": "auth-token-0"},
            },
            "dashboard": {"enabled": True},
        },
        "auth": {"tokens": [{"user_id": "prometheus", "role": "admin", "value": "metrics-token-0123456789"}]},
        "otel": {"endpoint": "http://otel-collector:4317"},
        "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "registry", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["registry"]}]}
                    ]
                }
            }
        },
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
        ],
        "extraEnv": [{"name": "BATLEHUB_LIMITS__MAX_DOCUMENT_BYTES", "value": "16777216"}],
        "extraConfig": {"ip_blocking": {"enabled": True}, "sweep": {"grace_secs": 7200}},
    },
}


def render(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every template's output by path, as `helm template` renders it (values schema included).
    Raises `helm_python.HelmError` with Helm's message when the chart refuses the values."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values=dict(values or {}), name=RELEASE, namespace=NAMESPACE)


def objects(values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The Kubernetes objects the chart renders (NOTES.txt and empty templates left out)."""
    found = []
    for path, text in render(values).items():
        if path.endswith("NOTES.txt"):
            continue
        found += [doc for doc in yaml.safe_load_all(text) if doc]
    return found


def notes(values: Mapping[str, Any] | None = None) -> str:
    return render(values)[f"{CHART.name}/templates/NOTES.txt"]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in matches]}"
    return matches[0]


def kinds(objs: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objs}


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = find(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def config_toml(objs: list[dict[str, Any]]) -> str:
    return str(find(objs, "ConfigMap", FULLNAME)["data"]["batlehub.toml"])


def secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's values as the pod sees them (`data` is base64, `stringData` plain)."""
    data = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, defined: Mapping[str, str]) -> str:
    """Kubernetes' expansion of an env value: `$(VAR)` of a variable defined before it is
    replaced, an undefined one is left as written, and `$$` stands for `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return defined.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, value)


def container_env(
    objs: list[dict[str, Any]], external_secrets: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, str]:
    """The environment the kubelet would give the BatleHub container: `envFrom`, then `env` in
    order, secretKeyRef/configMapKeyRef resolved from the rendered objects and `external_secrets`
    (Secrets the operator created, by name). A missing reference fails, as the pod would."""
    secrets = {o["metadata"]["name"]: secret_data(o) for o in objs if o["kind"] == "Secret"}
    secrets.update({name: dict(data) for name, data in (external_secrets or {}).items()})
    config_maps = {o["metadata"]["name"]: dict(o.get("data") or {}) for o in objs if o["kind"] == "ConfigMap"}
    spec = container(objs)
    env: dict[str, str] = {}
    for source in spec.get("envFrom") or []:
        if "secretRef" in source:
            env.update(secrets[source["secretRef"]["name"]])
        else:
            env.update(config_maps[source["configMapRef"]["name"]])
    for entry in spec.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = expand(str(entry["value"]), env)
            continue
        ref = entry["valueFrom"]
        store, key_ref = (
            (secrets, ref["secretKeyRef"]) if "secretKeyRef" in ref else (config_maps, ref["configMapKeyRef"])
        )
        source_data = store.get(key_ref["name"])
        assert source_data is not None, f"{entry['name']}: no object named {key_ref['name']!r}"
        assert key_ref["key"] in source_data, f"{entry['name']}: {key_ref['name']!r} has no key {key_ref['key']!r}"
        env[entry["name"]] = source_data[key_ref["key"]]
    return env


def value_paths(values: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every leaf of a values document (a list counts as a leaf)."""
    if isinstance(values, dict) and values:
        for key, value in values.items():
            yield from value_paths(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix
