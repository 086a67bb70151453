"""The Helm chart (`helm/batlehub`), rendered and linted by Helm's own Go SDK and every object
checked against the Kubernetes API schemas: what it deploys for each supported shape, the
combinations it refuses, the config it writes, and that every value is documented.

tests/test_helm_hub.py boots real hubs on what it renders."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from helm_support import (
    CHART,
    FULLNAME,
    POSTGRES_URL,
    REDIS_URL,
    SCENARIOS,
    SHA256_TOKEN,
    config_toml,
    container,
    container_env,
    find,
    kinds,
    notes,
    objects,
    render,
    value_paths,
)

ROOT = CHART.parent.parent
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest the schema
# package knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
HA = SCENARIOS["three replicas on PostgreSQL, Redis and S3"]
HEALTH = "/api/v1/admin/health"
SHARED = {
    "database": {"type": "postgresql", "url": POSTGRES_URL},
    "cache": {"type": "redis", "url": REDIS_URL},
    "storage": {"type": "s3", "s3": {"bucket": "b"}},
}


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def refused(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    return str(caught.value)


# --- lint and Kubernetes schemas ---------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_is_clean(scenario: str) -> None:
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace="registry")
    assert report["errors"] == []
    # Severity 1 is information (an icon is recommended); 2 warning, 3 error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_helm_lint_is_not_vacuous() -> None:
    # Lint checks the values and templates; it logs a template's `fail` without failing (Helm's
    # lint mode), so the refusals are tested by rendering, below.
    report = helm.lint(CHART, {"replicaCount": "3"}, strict=True)
    assert any("/replicaCount" in error for error in report["errors"]), report


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_matches_the_kubernetes_api_schema(scenario: str, version: str) -> None:
    checked = set()
    for obj in objects(SCENARIOS[scenario]):
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: no schema in the Kubernetes API (checked in test_service_monitor)
        # strict: an unknown or misspelt field fails instead of being dropped by the API server.
        kubernetes_validate.validate(obj, version, strict=True)
        checked.add(obj["kind"])
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= checked


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("embedded single replica", {"Deployment", "Service", "ConfigMap", "ServiceAccount"}),
        (
            "embedded with persistence",
            {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PersistentVolumeClaim"},
        ),
        (
            "three replicas on PostgreSQL, Redis and S3",
            {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Secret", "PodDisruptionBudget"},
        ),
        (
            "autoscaling",
            {
                "Deployment",
                "Service",
                "ConfigMap",
                "ServiceAccount",
                "Secret",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
            },
        ),
        ("ingress with TLS", {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Ingress"}),
        ("existing secret", {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget"}),
        (
            "shared filesystem volume",
            {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Secret", "PodDisruptionBudget"},
        ),
        (
            "metrics and scheduling",
            {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Secret", "ServiceMonitor"},
        ),
    ],
)
def test_each_shape_renders_its_objects(scenario: str, expected: set[str]) -> None:
    assert kinds(objects(SCENARIOS[scenario])) == expected


# --- the Deployment: updates, probes, drain, security ----------------------------------------------


def test_rolling_update_keeps_every_replica_serving() -> None:
    deployment = find(objects(HA), "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }


def test_probes_use_health_which_fails_while_draining() -> None:
    spec = container(objects(HA))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["httpGet"] == {"path": HEALTH, "port": "http"}
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in spec["ports"]
    # Liveness gives up much later than readiness: a database outage takes pods out of the Service,
    # it does not restart them all.
    readiness, liveness = spec["readinessProbe"], spec["livenessProbe"]
    assert (
        readiness["periodSeconds"] * readiness["failureThreshold"]
        < liveness["periodSeconds"] * liveness["failureThreshold"]
    )


@pytest.mark.parametrize(("shutdown", "sleep", "grace"), [(30, 5, 40), (120, 10, 135), (7.5, 0, 13)])
def test_grace_period_covers_the_pre_stop_sleep_and_the_drain(shutdown: float, sleep: int, grace: int) -> None:
    values = {"server": {"shutdownTimeoutSecs": shutdown}, "lifecycle": {"preStopSleepSeconds": sleep}}
    objs = objects(values)
    pod = find(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == grace
    if sleep:
        assert container(objs)["lifecycle"] == {"preStop": {"sleep": {"seconds": sleep}}}
    else:
        assert "lifecycle" not in container(objs)
    assert tomllib.loads(config_toml(objs))["server"]["shutdown_timeout_secs"] == shutdown


def test_pod_runs_as_the_images_user_on_a_read_only_root() -> None:
    objs = objects()
    pod = find(objs, "Deployment")["spec"]["template"]["spec"]
    spec = container(objs)
    image_user = next(c.value[0] for c in dockerfile.parse_file(str(ROOT / "deploy" / "Dockerfile")) if c.cmd == "USER")
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == image_user
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["capabilities"] == {"drop": ["ALL"]}

    # What it writes (its data directory and /tmp) is a volume; the config a read-only one.
    mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = container_env(objs)
    assert set(mounts) == {env["BATLEHUB_DATA_DIR"], "/tmp", str(Path(env["BATLEHUB_CONFIG"]).parent)}
    assert mounts[str(Path(env["BATLEHUB_CONFIG"]).parent)]["readOnly"] is True
    assert volumes[mounts[env["BATLEHUB_DATA_DIR"]]["name"]] == {"name": "data", "emptyDir": {}}
    assert volumes[mounts["/tmp"]["name"]] == {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}
    assert volumes["config"]["configMap"]["name"] == FULLNAME
    assert Path(env["BATLEHUB_CONFIG"]).name == "batlehub.toml"
    assert set(find(objs, "ConfigMap", FULLNAME)["data"]) == {"batlehub.toml"}
    # The image's own data directory is the one the chart mounts.
    image_env = " ".join(
        " ".join(c.value) for c in dockerfile.parse_file(str(ROOT / "deploy" / "Dockerfile")) if c.cmd == "ENV"
    )
    assert f"BATLEHUB_DATA_DIR {env['BATLEHUB_DATA_DIR']}" in image_env


def test_persistence_mounts_a_claim_on_the_data_directory() -> None:
    objs = objects(SCENARIOS["embedded with persistence"])
    claim = find(objs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in find(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}

    existing = objects(SCENARIOS["shared filesystem volume"])
    volumes = {v["name"]: v for v in find(existing, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "nfs-packages"}


def test_autoscaling_owns_the_replica_count() -> None:
    objs = objects(SCENARIOS["autoscaling"])
    assert "replicas" not in find(objs, "Deployment")["spec"]
    hpa = find(objs, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["metrics"]}
    assert targets == {"cpu": 70, "memory": 80}
    assert hpa["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 300}}
    assert find(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_a_single_replica_gets_no_disruption_budget_that_would_block_node_drains() -> None:
    assert "PodDisruptionBudget" not in kinds(objects())
    one = merged(SHARED, {"autoscaling": {"enabled": True, "minReplicas": 1}})
    assert "PodDisruptionBudget" not in kinds(objects(one))


def test_scheduling_values_reach_the_pod() -> None:
    values = SCENARIOS["metrics and scheduling"]
    objs = objects(values)
    pod = find(objs, "Deployment")["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints"):
        assert pod[key] == values[key]
    assert container(objs)["resources"] == values["resources"]
    # Without affinity of their own, replicas prefer different nodes.
    default = find(objects(HA), "Deployment")["spec"]["template"]["spec"]["affinity"]
    term = default["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"


def test_a_config_or_secret_change_rolls_the_pods() -> None:
    def checksums(values: dict[str, Any]) -> dict[str, str]:
        annotations = find(objects(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    base = checksums(HA)
    config_changed = checksums(merged(HA, {"server": {"workers": 2}}))
    secret_changed = checksums(merged(HA, {"database": {"url": POSTGRES_URL + "2"}}))
    assert config_changed["checksum/config"] != base["checksum/config"]
    assert config_changed["checksum/secret"] == base["checksum/secret"]
    assert secret_changed["checksum/secret"] != base["checksum/secret"]


# --- configuration and secrets ------------------------------------------------------------------


def test_config_is_toml_with_whole_numbers_as_integers() -> None:
    config = tomllib.loads(config_toml(objects(HA)))
    assert config["server"] == {
        "host": "0.0.0.0",
        "port": 8080,
        "shutdown_timeout_secs": 30,
        "workers": 1,
        "trusted_proxies": ["10.0.0.0/8"],
    }
    assert isinstance(config["server"]["port"], int)
    assert config["database"] == {"type": "postgresql", "max_connections": 10}
    assert config["cache"] == {"type": "redis", "prefix": "hub:"}
    assert config["storage"] == {
        "type": "s3",
        "bucket": "packages",
        "region": "eu-west-1",
        "endpoint": "http://seaweedfs:8333",
        "force_path_style": True,
        "redirect_downloads": False,
    }
    assert config["registries"] == [{"type": "npm", "name": "npm", "mode": "hybrid", "upstreams": []}]
    assert "auth" not in config


def test_secrets_stay_out_of_the_config_map_and_reach_the_pod_from_the_secret() -> None:
    objs = objects(HA)
    secret_values = ["pw@postgres", "redis://redis", "12345", "secret/with+chars", "admin-token-0123456789"]
    plain = yaml.safe_dump([o for o in objs if o["kind"] != "Secret"])
    for value in secret_values:
        assert value not in plain
    assert all(
        "valueFrom" in e or e["name"] in {"BATLEHUB_CONFIG", "BATLEHUB_DATA_DIR", "BATLEHUB_AUTH"}
        for e in container(objs)["env"]
    )

    env = container_env(objs)
    assert env["BATLEHUB_DATABASE__URL"] == POSTGRES_URL
    assert env["BATLEHUB_CACHE__URL"] == REDIS_URL
    # Through the AWS credential chain: a key that reads as a TOML number stays a string.
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("12345", "secret/with+chars")
    # BATLEHUB_AUTH is TOML, as BatleHub parses an environment value.
    assert tomllib.loads(f"auth = {env['BATLEHUB_AUTH']}")["auth"] == [
        {
            "type": "token",
            "tokens": [
                {"user_id": "admin", "role": "admin", "value": "admin-token-0123456789"},
                {"user_id": "ci", "role": "user", "value": SHA256_TOKEN},
            ],
        }
    ]
    # Helper variables carry no BATLEHUB_ prefix: BatleHub would read them as settings.
    settings = {name for name in env if name.startswith("BATLEHUB_")}
    assert settings == {
        "BATLEHUB_CONFIG",
        "BATLEHUB_DATA_DIR",
        "BATLEHUB_DATABASE__URL",
        "BATLEHUB_CACHE__URL",
        "BATLEHUB_AUTH",
    }


def test_existing_secret_supplies_every_secret_and_the_chart_renders_none() -> None:
    objs = objects(SCENARIOS["existing secret"])
    assert "Secret" not in kinds(objs)
    operator_secret = {
        "db": POSTGRES_URL,
        "redis": REDIS_URL,
        "s3-id": "AKIA",
        "s3-secret": "s3cr3t",
        "admin-token": 'token-with-"quotes"-and-\\',
    }
    env = container_env(objs, {"hub-credentials": operator_secret})
    assert env["BATLEHUB_DATABASE__URL"] == POSTGRES_URL
    assert env["BATLEHUB_CACHE__URL"] == REDIS_URL
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("AKIA", "s3cr3t")
    tokens = tomllib.loads(f"auth = {env['BATLEHUB_AUTH']}")["auth"][0]["tokens"]
    assert tokens == [{"user_id": "admin", "role": "admin", "value": operator_secret["admin-token"]}]
    # A key the operator's Secret lacks keeps the pod from starting.
    with pytest.raises(AssertionError, match="has no key 'admin-token'"):
        container_env(objs, {"hub-credentials": {k: v for k, v in operator_secret.items() if k != "admin-token"}})


def test_extra_config_adds_any_table_and_values_survive_as_toml() -> None:
    tricky = 'quote " backslash \\ newline \n tab \t unicode é ✓ <html> & $(NOT_EXPANDED)'
    extra = {
        "limits": {"max_artifact_size_bytes": 1073741824, "header_timeout_secs": 2.5},
        "ip_blocking": {"enabled": True, "trigger_on_status": [401, 403]},
        "sweep": {"enabled": False},
        "server": {"cors_allowed_origins": ["https://ui.example.com"]},
        "odd": {
            "key with spaces": tricky,
            "a.b": {"nested": [{"x": 1}, {"x": 2}]},
            "empty": [],
            "inline": [[1, 2], ["a"]],
        },
    }
    config = tomllib.loads(config_toml(objects({"extraConfig": extra})))
    assert config["limits"] == extra["limits"]
    assert config["ip_blocking"] == extra["ip_blocking"]
    assert config["sweep"] == {"enabled": False}
    assert config["server"]["cors_allowed_origins"] == ["https://ui.example.com"]
    assert config["server"]["port"] == 8080
    assert config["odd"] == extra["odd"]


def test_public_url_follows_the_ingress_host_and_its_tls() -> None:
    def public_url(values: dict[str, Any]) -> str | None:
        return tomllib.loads(config_toml(objects(values)))["server"].get("public_url")

    with_tls = SCENARIOS["ingress with TLS"]
    assert public_url(with_tls) == "https://npm.example.com"
    assert public_url(merged(with_tls, {"ingress": {"tls": []}})) == "http://npm.example.com"
    assert public_url(merged(with_tls, {"server": {"publicUrl": "https://registry.corp"}})) == "https://registry.corp"
    assert public_url({}) is None


# --- ingress, metrics ---------------------------------------------------------------------------


def test_ingress_streams_large_publishes_through() -> None:
    objs = objects(SCENARIOS["ingress with TLS"])
    ingress = find(objs, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "1g"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "npm-tls", "hosts": ["npm.example.com"]}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": FULLNAME, "port": {"name": "http"}}
    # The operator's own annotation wins over the chart's.
    mine = {"ingress": {"annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "50m"}}}
    annotations = find(objects(merged(SCENARIOS["ingress with TLS"], mine)), "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "50m"
    plain = merged(SCENARIOS["ingress with TLS"], {"ingress": {"nginxAnnotations": False}})
    assert find(objects(plain), "Ingress")["metadata"]["annotations"] == {
        "cert-manager.io/cluster-issuer": "letsencrypt"
    }


def test_service_monitor_scrapes_metrics_on_the_service_port() -> None:
    objs = objects(SCENARIOS["metrics and scheduling"])
    monitor = find(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    service = find(objs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # The token it sends is one the hub accepts: a key of the Secret the pod reads its tokens from.
    credentials = endpoint["authorization"]["credentials"]
    secret = find(objs, "Secret", credentials["name"])
    assert credentials["key"] in secret["data"]


def test_metrics_settings_reach_the_config() -> None:
    assert tomllib.loads(config_toml(objects(HA)))["metrics"] == {"enabled": True, "require_token": True, "port": 0}
    closed = tomllib.loads(config_toml(objects({"metrics": {"enabled": False}})))
    assert closed["metrics"]["enabled"] is False


def test_metrics_on_their_own_port_are_scraped_there_without_a_token() -> None:
    values = merged(SCENARIOS["metrics and scheduling"], {"metrics": {"port": 9100}})
    objs = objects(values)
    assert tomllib.loads(config_toml(objs))["metrics"]["port"] == 9100
    service = find(objs, "Service")
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", 8080, "http"),
        ("metrics", 9100, "metrics"),
    ]
    (container,) = find(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    (endpoint,) = find(objs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and "authorization" not in endpoint
    for obj in objs:
        if obj["apiVersion"] != "monitoring.coreos.com/v1":
            kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)


def test_prometheus_rule_carries_the_shipped_alerts() -> None:
    objs = objects({"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}})
    rule = find(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prom"
    shipped = yaml.safe_load((CHART / "rules" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]
    # Prometheus's own templates in the annotations pass through Helm untouched.
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}
    assert "{{ $labels.origin }}" in alerts["BatleHubUpstreamDown"]["annotations"]["summary"]


def test_dashboard_is_valid_grafana_json() -> None:
    objs = objects({"metrics": {"dashboard": {"enabled": True}}})
    dashboard = find(objs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    document = json.loads(dashboard["data"]["batlehub.json"])
    assert document["uid"] == "batlehub"
    assert isinstance(document["panels"], list)


# --- refused combinations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, 'replicaCount is 2, but database.type is "sqlite"'),
        (
            {"replicaCount": 3, "database": SHARED["database"], "storage": SHARED["storage"]},
            'replicaCount is 3, but cache.type is "memory", a cache inside each process',
        ),
        (
            {"autoscaling": {"enabled": True}, "database": SHARED["database"], "storage": SHARED["storage"]},
            'autoscaling is enabled (up to 6 replicas), but cache.type is "memory"',
        ),
        (
            {"replicaCount": 2, "database": SHARED["database"], "cache": SHARED["cache"]},
            'storage.type is "filesystem" on a volume that is not shared',
        ),
        (
            {
                "replicaCount": 2,
                "database": SHARED["database"],
                "cache": SHARED["cache"],
                "persistence": {"enabled": True, "accessModes": ["ReadWriteOnce"]},
            },
            'storage.type is "filesystem" on a volume that is not shared',
        ),
        (
            {"autoscaling": {"enabled": True}, "persistence": {"enabled": True, "accessModes": ["ReadWriteMany"]}},
            'database.type is "sqlite"',
        ),
        ({"server": {"workers": 4}}, 'server.workers is 4, but cache.type is "memory"'),
        ({"database": {"type": "postgresql"}}, 'database.type is "postgresql" but there is no database URL'),
        ({"cache": {"type": "redis"}}, 'cache.type is "redis" but there is no Redis URL'),
        ({"storage": {"type": "s3"}}, "storage.s3.bucket is empty"),
        ({"storage": {"type": "s3", "s3": {"bucket": "b", "accessKeyId": "x"}}}, "give both S3 keys"),
        (
            {"lifecycle": {"terminationGracePeriodSeconds": 20}},
            "terminationGracePeriodSeconds is 20, shorter than"
            " lifecycle.preStopSleepSeconds + server.shutdownTimeoutSecs (35)",
        ),
        ({"extraConfig": {"server": {"port": 9000}}}, "extraConfig.server.port is written by the chart"),
        ({"extraConfig": {"registries": []}}, "extraConfig.registries replaces what the chart writes"),
        ({"extraConfig": {"auth": [{"type": "token"}]}}, "extraConfig.auth would put a secret into the ConfigMap"),
        ({"extraConfig": {"database": {"url": POSTGRES_URL}}}, "extraConfig.database would put a secret"),
        ({"extraConfig": {"storage": {"secret_access_key": "k"}}}, "extraConfig.storage would put a secret"),
        (
            {"secrets": {"existingSecret": "mine"}, "database": {"type": "postgresql", "url": POSTGRES_URL}},
            'database.url is set in the values while secrets.existingSecret is "mine"',
        ),
        (
            {"secrets": {"existingSecret": "mine"}, "auth": {"tokens": [{"user_id": "a", "value": "plaintext-token"}]}},
            "auth.tokens[0].value is a plaintext token while secrets.existingSecret",
        ),
        (
            {"auth": {"tokens": [{"user_id": "a", "secretKey": "k"}]}},
            "auth.tokens[0].secretKey needs secrets.existingSecret",
        ),
    ],
)
def test_unsafe_or_contradictory_values_fail_with_what_to_change(values: dict[str, Any], message: str) -> None:
    assert message in refused(values)


def test_a_shared_backend_set_up_renders_for_many_replicas() -> None:
    for values in (
        merged(SHARED, {"replicaCount": 5}),
        merged(SHARED, {"autoscaling": {"enabled": True}, "cache": {"type": "postgres", "url": ""}}),
        merged(SHARED, {"replicaCount": 2, "server": {"workers": 2}}),
    ):
        assert "Deployment" in kinds(objects(values))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "3"}, "at '/replicaCount': got string, want integer"),
        ({"replicas": 3}, "additional properties 'replicas' not allowed"),
        ({"database": {"type": "mysql"}}, "/database/type"),
        ({"database": {"type": "postgresql", "url": "mysql://x"}}, "/database/url"),
        ({"auth": {"tokens": [{"user_id": "a", "role": "root", "value": "12345678"}]}}, "/auth/tokens/0/role"),
        ({"auth": {"tokens": [{"user_id": "a", "value": "it's-a-token"}]}}, "/auth/tokens/0/value"),
        ({"storage": {"s3": {"bukket": "b"}}}, "additional properties 'bukket' not allowed"),
        ({"ingress": {"hosts": [{"host": "h", "paths": [{"path": "no-slash"}]}]}}, "/ingress/hosts/0/paths/0/path"),
    ],
)
def test_values_schema_names_the_bad_value(values: dict[str, Any], message: str) -> None:
    assert message in refused(values)


# --- notes and documentation --------------------------------------------------------------------


def test_notes_tell_how_to_reach_it() -> None:
    text = notes(SCENARIOS["ingress with TLS"])
    assert "https://npm.example.com/registries/npm/" in text
    assert "npm config set registry https://npm.example.com/registries/npm/" in text

    text = notes()
    assert f"kubectl --namespace registry port-forward service/{FULLNAME} 8080:8080" in text
    assert "http://127.0.0.1:8080/registries/npm/" in text
    assert "cat /var/lib/batlehub/admin.token" in text
    assert "lost when the pod is deleted" in text

    text = notes(HA)
    assert "admin.token" not in text
    assert "lost when" not in text


def test_every_value_is_documented_in_the_chart_readme() -> None:
    readme = (ROOT / "helm" / "README.md").read_text()
    table = readme.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(value_paths(values)) - documented == set()
    assert documented - set(value_paths(values)) == set(), "README documents values that do not exist"


def test_readme_links_the_chart_documentation() -> None:
    assert "(helm/README.md)" in (ROOT / "README.md").read_text()
