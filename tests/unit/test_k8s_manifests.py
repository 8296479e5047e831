"""The Kubernetes manifests in k8s/: every overlay renders and every object is sound.

Rendering: the tests render each overlay with `render_kustomization` below, a
small renderer of exactly the kustomize features the manifests use
(resources, namespace, labels without selectors, images, JSON 6902 patches);
it fails loudly on anything else. When a real kustomize is on PATH
(`kustomize` or `kubectl kustomize`) its output must equal ours object for
object, so the renderer cannot drift from kustomize unnoticed; without one
that comparison is skipped.

Validation: every object validates strictly (unknown fields are errors)
against the official Kubernetes 1.33 schemas (kubernetes-validate), and the
checks below look at what a schema cannot: references between objects,
placeholders, probes, resources, security contexts, RBAC scope, what the
NetworkPolicies let through (evaluated, not just read), MLflow's host
allow-list (with MLflow's own matcher) and Label Studio's SSRF ban list (the
script is run).
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from unifl.cluster.settings import GROUPS, load_cluster_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
K8S_VERSION = "1.33"
PIPELINE_POD = {"pipelines.kubeflow.org/v2_component": "true"}
TRAINING_POD = {"unifl.io/training-job": "true"}
PLACEHOLDER = re.compile(
    r"change[-_ ]?me|replace[-_ ]?me|\bTODO\b|\bFIXME\b|\bxxx+\b|example\.(com|org|net)"
    r"|<[A-Za-z][A-Za-z_ -]{2,40}>",
    re.IGNORECASE,
)
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# ---------------------------------------------------------------- rendering


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] in POD_TEMPLATE_KINDS:
        return [obj["spec"]["template"]["spec"]]
    return []


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        container
        for spec in _pod_specs(obj)
        for container in spec.get("initContainers", []) + spec["containers"]
    ]


def _json_pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_json6902(obj: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    for operation in operations:
        *parents, last = _json_pointer(operation["path"])
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        if op == "add" and isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(operation["value"]))
        elif op == "add":
            node[last] = copy.deepcopy(operation["value"])
        elif op == "replace":
            index = int(last) if isinstance(node, list) else last
            assert index in node if isinstance(node, dict) else index < len(node), operation
            node[index] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise AssertionError(f"unsupported JSON patch op {op!r}")


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """kustomize build, for the features the manifests use; anything else is an error."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text("utf-8"))
    supported = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
    unsupported = set(kustomization) - supported
    assert not unsupported, f"{directory}: the test renderer does not support {unsupported}"
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        objects += render_kustomization(path) if path.is_dir() else _load_documents(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, patch
        operations = yaml.safe_load((directory / patch["path"]).read_text("utf-8"))
        assert isinstance(operations, list), f"{patch['path']}: only JSON 6902 patches"
        targets = [
            obj
            for obj in objects
            if all(
                (obj["kind"] if key == "kind" else obj["metadata"].get(key)) == value
                for key, value in patch["target"].items()
            )
        ]
        assert targets, f"{patch['path']}: the target {patch['target']} matches nothing"
        for obj in targets:
            _apply_json6902(obj, operations)
    if namespace := kustomization.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
            for subject in obj.get("subjects", []) if obj["kind"] == "RoleBinding" else []:
                if subject["kind"] == "ServiceAccount" and subject.get("namespace") in (
                    None,
                    "default",
                ):
                    subject["namespace"] = namespace
    for entry in kustomization.get("labels", []):
        assert set(entry) == {"pairs"}, f"labels: only plain pairs are supported, got {entry}"
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, _, _ = container["image"].partition(":")
                if name == image["name"]:
                    tag = image.get("newTag", container["image"].partition(":")[2])
                    container["image"] = f"{image.get('newName', name)}:{tag}"
    return objects


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    metadata = obj["metadata"]
    return obj["kind"], metadata.get("namespace", ""), metadata["name"]


@functools.cache
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    objects = render_kustomization(K8S / "overlays" / overlay)
    keys = [_key(obj) for obj in objects]
    assert len(keys) == len(set(keys)), f"{overlay}: duplicate objects"
    return tuple(objects)


def _objects(overlay: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(overlay)))


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def _secret_templates() -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc for doc in _load_documents(K8S / "secrets" / "templates.yaml")
    }


def _validate(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(part) for part in exc.path)
        raise AssertionError(f"{_key(obj)} invalid at {path}: {exc.message[:300]}") from None


# ---------------------------------------------------------------- render and validate


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_like_kustomize(overlay: str) -> None:
    objects = _objects(overlay)
    assert {obj["kind"] for obj in objects} >= {
        "ConfigMap",
        "Deployment",
        "StatefulSet",
        "Service",
        "Job",
        "Ingress",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
        "ServiceAccount",
        "PersistentVolumeClaim",
    }
    assert all(obj["metadata"]["namespace"] == "unifl" for obj in objects)
    command = _kustomize_command()
    if command is None:
        pytest.skip("no kustomize or kubectl on PATH: compared with no real kustomize")
    output = subprocess.run(
        [*command, str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    theirs = {_key(obj): obj for obj in yaml.safe_load_all(output) if obj}
    ours = {_key(obj): obj for obj in objects}
    assert sorted(theirs) == sorted(ours)
    for key, obj in ours.items():
        assert json.loads(json.dumps(obj)) == json.loads(json.dumps(theirs[key])), key


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str) -> None:
    for obj in _objects(overlay):
        _validate(obj)


def test_crds_and_secret_templates_validate_strictly() -> None:
    documents = [doc for path in (K8S / "crds").glob("*.yaml") for doc in _load_documents(path)]
    assert {doc["spec"]["names"]["kind"] for doc in documents} == {"TrainJob", "PyTorchJob"}
    for doc in documents + list(_secret_templates().values()):
        _validate(doc)


def test_the_validator_catches_a_typo() -> None:
    """A guard that strict validation is really on."""
    deployment = copy.deepcopy(_by_kind(_objects("generic"), "Deployment")["mlflow"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(AssertionError, match="livenessProbes"):
        _validate(deployment)


# ---------------------------------------------------------------- secrets and references


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_objects_or_placeholders_in_overlays(overlay: str) -> None:
    objects = _objects(overlay)
    assert not [obj for obj in objects if obj["kind"] == "Secret"], (
        "Secrets are created with kubectl, never applied from the repository"
    )
    for obj in objects:
        text = yaml.safe_dump(obj)
        match = PLACEHOLDER.search(text)
        assert match is None, f"{_key(obj)}: placeholder {match.group(0)!r}"


def test_placeholders_only_in_secret_templates() -> None:
    templates = _secret_templates()
    assert PLACEHOLDER.search("value: changeme") and PLACEHOLDER.search("host: <YOUR_HOST>")
    for name, secret in templates.items():
        assert secret["metadata"]["annotations"]["unifl.io/secret-template"] == "true"
        assert secret["stringData"], name
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER.fullmatch(value), f"{name}.{key} holds a value, not a placeholder"
        assert "data" not in secret, f"{name}: base64 data in a template"
    for path in K8S.rglob("*.yaml"):
        if path.parent.name != "secrets":
            assert not PLACEHOLDER.search(path.read_text("utf-8")), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_between_objects_resolve(overlay: str) -> None:
    objects = _objects(overlay)
    config_maps = {name: set(obj["data"]) for name, obj in _by_kind(objects, "ConfigMap").items()}
    secrets = {name: set(obj["stringData"]) for name, obj in _secret_templates().items()}
    claims = set(_by_kind(objects, "PersistentVolumeClaim"))
    used_secret_keys: set[tuple[str, str]] = set()
    for obj in objects:
        for spec in _pod_specs(obj):
            template_claims = {
                template["metadata"]["name"]
                for template in obj["spec"].get("volumeClaimTemplates", [])
            }
            volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
            for volume in volumes.values():
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps, (_key(obj), volume)
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
            for container in spec.get("initContainers", []) + spec["containers"]:
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes or mount["name"] in template_claims, mount
                for env in container.get("env", []):
                    source = env.get("valueFrom", {})
                    if ref := source.get("configMapKeyRef"):
                        assert ref["key"] in config_maps.get(ref["name"], set()), (_key(obj), ref)
                    if ref := source.get("secretKeyRef"):
                        assert ref["key"] in secrets.get(ref["name"], set()), (_key(obj), ref)
                        assert not ref.get("optional"), ref
                        used_secret_keys.add((ref["name"], ref["key"]))
                for source in container.get("envFrom", []):
                    assert (
                        "configMapRef" not in source
                        or source["configMapRef"]["name"] in config_maps
                    )
                    assert "secretRef" not in source or source["secretRef"]["name"] in secrets
    # Every template key is used by a manifest or by the pipeline pods.
    from unifl.cluster.settings import (
        MLFLOW_CREDENTIAL_KEYS,
        MLFLOW_CREDENTIALS_SECRET,
        secret_env_sources,
    )

    used_secret_keys |= {
        (secret, key) for secret, keys in secret_env_sources(GROUPS).items() for key in keys
    }
    used_secret_keys |= {(MLFLOW_CREDENTIALS_SECRET, key) for key in MLFLOW_CREDENTIAL_KEYS}
    declared = {(name, key) for name, keys in secrets.items() for key in keys}
    assert declared == used_secret_keys


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_variable_references_are_defined(overlay: str) -> None:
    """$(VAR) in env values, command and args must name a variable defined before it."""
    for obj in _objects(overlay):
        for container in _containers(obj):
            defined: list[str] = []
            for env in container.get("env", []):
                for name in re.findall(
                    r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", env.get("value", "")
                ):
                    assert name in defined, f"{_key(obj)}: {env['name']} uses $({name}) too early"
                defined.append(env["name"])
            for word in container.get("command", []) + container.get("args", []):
                for name in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", word):
                    assert name in defined, f"{_key(obj)}: $({name}) is not defined"


# ---------------------------------------------------------------- containers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_probes_and_a_restricted_security_context(
    overlay: str,
) -> None:
    workloads = [obj for obj in _objects(overlay) if obj["kind"] in POD_TEMPLATE_KINDS]
    assert len(workloads) >= 5
    for obj in workloads:
        (spec,) = _pod_specs(obj)
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", _key(obj)
        assert spec.get("automountServiceAccountToken") is False, _key(obj)
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{_key(obj)} container {container['name']}"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: {kind}"
            if obj["kind"] == "Job":
                # A run-to-completion container has nothing to probe; it is bounded instead.
                assert obj["spec"]["activeDeadlineSeconds"] > 0 and obj["spec"]["backoffLimit"]
            else:
                assert "livenessProbe" in container and "readinessProbe" in container, where
            security = container.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            run_as_non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
            uid = security.get("runAsUser", pod_security.get("runAsUser"))
            assert run_as_non_root is True and uid and uid > 0, where
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), f"{where}: unpinned {image}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_ingress_reach_their_pods(overlay: str) -> None:
    objects = _objects(overlay)
    workloads = [obj for obj in objects if obj["kind"] in POD_TEMPLATE_KINDS]
    services = _by_kind(objects, "Service")
    for name, service in services.items():
        selector = service["spec"]["selector"]
        pods = [
            obj
            for obj in workloads
            if selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"service {name} selects {len(pods)} workloads"
        ports = {
            port.get("name"): port["containerPort"]
            for container in _containers(pods[0])
            for port in container.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"{name}: no port {target}"
    for statefulset in _by_kind(objects, "StatefulSet").values():
        assert services[statefulset["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    (ingress,) = _by_kind(objects, "Ingress").values()
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            service_ports = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
            assert backend["port"]["name"] in service_ports


# ---------------------------------------------------------------- RBAC


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_is_namespaced_and_least_privilege(overlay: str) -> None:
    objects = _objects(overlay)
    assert not [obj for obj in objects if obj["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = _by_kind(objects, "Role").values()
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    jobs = {"create", "get", "list", "watch", "delete"}
    expected = (
        {("trainer.kubeflow.org", "trainjobs", verb) for verb in jobs}
        | {("kubeflow.org", "pytorchjobs", verb) for verb in jobs}
        | {
            ("", resource, verb)
            for resource in ("pods", "pods/log")
            for verb in ("get", "list", "watch")
        }
        | {("argoproj.io", "workflowtaskresults", verb) for verb in ("create", "patch")}
    )
    assert granted == expected
    assert all("*" not in str(rule) for rule in role["rules"])
    (binding,) = _by_kind(objects, "RoleBinding").values()
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    service_accounts = _by_kind(objects, "ServiceAccount")
    for subject in binding["subjects"]:
        assert subject["kind"] == "ServiceAccount" and subject["name"] in service_accounts
        assert subject["namespace"] == role["metadata"]["namespace"]


# ---------------------------------------------------------------- network policies


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _ingress_allowed(
    policies: list[dict[str, Any]],
    target: dict[str, str],
    port: int,
    source: dict[str, str] | None = None,
    source_namespace: dict[str, str] | None = None,
    source_ip: str = "10.8.0.10",
) -> bool:
    """Whether NetworkPolicy semantics admit this connection (same namespace unless
    `source_namespace` gives the labels of another one)."""
    source = source or {}
    selecting = [
        policy
        for policy in policies
        if "Ingress" in policy["spec"]["policyTypes"]
        and _matches(policy["spec"]["podSelector"], target)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = [item["port"] for item in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            for peer in rule.get("from", []):
                if "ipBlock" in peer:
                    block = peer["ipBlock"]
                    inside = ipaddress.ip_address(source_ip) in ipaddress.ip_network(block["cidr"])
                    if inside and not any(
                        ipaddress.ip_address(source_ip) in ipaddress.ip_network(item)
                        for item in block.get("except", [])
                    ):
                        return True
                    continue
                if "namespaceSelector" in peer:
                    namespace_ok = source_namespace is not None and _matches(
                        peer["namespaceSelector"], source_namespace
                    )
                else:
                    namespace_ok = source_namespace is None
                pod_ok = "podSelector" not in peer or _matches(peer["podSelector"], source)
                if namespace_ok and pod_ok:
                    return True
    return False


def _pod_labels(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    for obj in objects:
        if obj["kind"] in POD_TEMPLATE_KINDS and obj["metadata"]["name"] == name:
            return obj["spec"]["template"]["metadata"]["labels"]
    raise KeyError(name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_only_pipeline_training_and_annotator_traffic(
    overlay: str,
) -> None:
    objects = _objects(overlay)
    policies = list(_by_kind(objects, "NetworkPolicy").values())
    mlflow = _pod_labels(objects, "mlflow")
    label_studio = _pod_labels(objects, "label-studio")
    postgres = _pod_labels(objects, "postgres")
    minio = _pod_labels(objects, "minio")
    random_pod = {"app": "something-else"}

    def allowed(target: dict[str, str], port: int, **source: Any) -> bool:
        return _ingress_allowed(policies, target, port, **source)

    assert allowed(mlflow, 5000, source=PIPELINE_POD)
    assert allowed(mlflow, 5000, source=TRAINING_POD)
    assert not allowed(mlflow, 5000, source=random_pod)
    assert not allowed(mlflow, 5000, source=PIPELINE_POD, source_namespace={"team": "other"})
    assert allowed(label_studio, 8080, source=PIPELINE_POD)
    assert not allowed(label_studio, 8080, source=TRAINING_POD)
    assert not allowed(label_studio, 8080, source=random_pod)
    assert allowed(postgres, 5432, source=mlflow) and allowed(postgres, 5432, source=label_studio)
    assert not allowed(postgres, 5432, source=PIPELINE_POD)
    assert allowed(minio, 9000, source=mlflow) and allowed(minio, 9000, source=label_studio)
    assert allowed(minio, 9000, source=_pod_labels(objects, "minio-buckets"))
    assert not allowed(minio, 9001, source=PIPELINE_POD), "the console is for port-forward only"
    assert not allowed(minio, 9000, source=random_pod)

    if overlay == "generic":
        controller = {"app.kubernetes.io/name": "ingress-nginx"}
        namespace = {"kubernetes.io/metadata.name": "ingress-nginx"}
        assert allowed(label_studio, 8080, source=controller, source_namespace=namespace)
        assert not allowed(mlflow, 5000, source=controller, source_namespace=namespace)
        assert not allowed(label_studio, 8080, source=controller, source_namespace={"x": "y"})
    if overlay == "gke":
        assert allowed(label_studio, 8080, source_namespace={}, source_ip="35.191.4.20")
        assert allowed(label_studio, 8080, source_namespace={}, source_ip="130.211.1.7")
        assert not allowed(mlflow, 5000, source_namespace={}, source_ip="35.191.4.20")
        assert not allowed(label_studio, 8080, source_namespace={}, source_ip="10.8.0.10")


# ---------------------------------------------------------------- MLflow and Label Studio


def _container(objects: list[dict[str, Any]], workload: str) -> dict[str, Any]:
    (container,) = [
        c for obj in objects if obj["metadata"]["name"] == workload for c in _containers(obj)
    ]
    return container


def test_mlflow_server_serves_s3_artifacts_and_accepts_its_in_cluster_names() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    objects = _objects("generic")
    container = _container(objects, "mlflow")
    args = container["command"] + container["args"]
    assert args[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in args
    assert (
        args[args.index("--artifacts-destination") + 1] == "s3://$(UNIFL_MLFLOW_ARTIFACTS_BUCKET)"
    )
    env = {item["name"]: item for item in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://mlflow:")
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].endswith("@postgres:5432/mlflow")
    allowed_hosts = args[args.index("--allowed-hosts") + 1].split(",")
    config_map = _by_kind(objects, "ConfigMap")["unifl-endpoints"]["data"]
    from urllib.parse import urlparse

    tracking = urlparse(config_map["MLFLOW_TRACKING_URI"])
    service = _by_kind(objects, "Service")["mlflow"]
    assert tracking.hostname == service["metadata"]["name"]
    assert tracking.port == service["spec"]["ports"][0]["port"]
    for host in (
        tracking.netloc,
        tracking.hostname,
        "mlflow.unifl.svc.cluster.local:5000",
        "mlflow.unifl.svc:5000",
        "localhost:5000",
    ):
        assert is_allowed_host_header(allowed_hosts, host), host
    for host in ("evil.example:5000", "mlflow.attacker.net", "10.0.0.7:5000"):
        assert not is_allowed_host_header(allowed_hosts, host), host
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"  # exempt from the Host check


def _banned_subnets_script(objects: list[dict[str, Any]]) -> str:
    return _by_kind(objects, "ConfigMap")["label-studio-ssrf"]["data"]["banned_subnets.py"]


def test_label_studio_ssrf_protection_is_on_and_admits_only_the_object_store(
    tmp_path: Path,
) -> None:
    objects = _objects("generic")
    container = _container(objects, "label-studio")
    env = {item["name"]: item for item in container["env"]}
    assert env["SSRF_PROTECTION_ENABLED"]["value"] == "true"
    assert env["USE_DEFAULT_BANNED_SUBNETS"]["value"] == "false"
    assert env["UNIFL_OBJECT_STORE_HOST"]["valueFrom"]["configMapKeyRef"]["key"] == (
        "UNIFL_OBJECT_STORE_HOST"
    )
    config_map = _by_kind(objects, "ConfigMap")["unifl-endpoints"]["data"]
    assert config_map["UNIFL_OBJECT_STORE_HOST"] in _by_kind(objects, "Service")
    assert _by_kind(objects, "Service")["minio"]["spec"].get("clusterIP") != "None"
    assert "USER_ADDITIONAL_BANNED_SUBNETS" in container["args"][0]
    assert "/etc/unifl/ssrf/banned_subnets.py" in container["args"][0]

    script = tmp_path / "banned_subnets.py"
    script.write_text(_banned_subnets_script(objects), encoding="utf-8")
    object_store_ip = "10.96.12.34"
    result = subprocess.run(
        [sys.executable, str(script), object_store_ip],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    banned = [ipaddress.ip_network(item) for item in result.stdout.strip().split(",")]

    def is_banned(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip.version == net.version and ip in net for net in banned)

    assert not is_banned(object_store_ip)
    for address in (
        "10.96.12.33",
        "10.96.12.35",
        "10.0.0.1",  # the Kubernetes API service on many clusters
        "127.0.0.1",
        "169.254.169.254",  # cloud metadata
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",
        "::1",
        "fd00::1",
        "fe80::1",
    ):
        assert is_banned(address), address
    assert not is_banned("8.8.8.8")
    unresolvable = subprocess.run(
        [sys.executable, str(script), "no-such-host.invalid"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unresolvable.returncode != 0 and "cannot resolve" in unresolvable.stderr


def test_postgres_creates_the_database_and_role_each_application_uses() -> None:
    objects = _objects("generic")
    init = _by_kind(objects, "ConfigMap")["postgres-init"]["data"]["10-create-databases.sh"]
    databases = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", init))
    roles = set(re.findall(r"CREATE ROLE (\w+) LOGIN", init))
    assert databases == {"mlflow": "mlflow", "labelstudio": "labelstudio"} and roles == {
        "mlflow",
        "labelstudio",
    }
    uri = {e["name"]: e for e in _container(objects, "mlflow")["env"]}["MLFLOW_BACKEND_STORE_URI"]
    user, database = re.fullmatch(
        r"postgresql\+psycopg2://(\w+):\$\(\w+\)@postgres:5432/(\w+)", uri["value"]
    ).groups()
    assert databases[database] == user
    ls_env = {e["name"]: e for e in _container(objects, "label-studio")["env"]}
    assert databases[ls_env["POSTGRE_NAME"]["value"]] == ls_env["POSTGRE_USER"]["value"]
    postgres_env = {e["name"] for e in _container(objects, "postgres")["env"]}
    assert {"MLFLOW_DB_PASSWORD", "LABEL_STUDIO_DB_PASSWORD"} <= postgres_env
    assert set(re.findall(r'"\$(\w+)"', init)) <= postgres_env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_gives_pipeline_pods_every_setting(overlay: str) -> None:
    config_map = _by_kind(_objects(overlay), "ConfigMap")["unifl-endpoints"]["data"]
    env = dict(config_map)
    for secret in _secret_templates().values():
        env.update({key: "test-value" for key in secret["stringData"]})
    env["UNIFL_NAMESPACE"] = "unifl"
    settings = load_cluster_settings(env, needs=GROUPS)
    assert settings.training is not None
    if overlay == "gke":
        assert settings.training.gpu_node_selector == {
            "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"
        }
    else:
        assert settings.training.gpu_node_selector == {"unifl.io/node-pool": "gpu"}
    assert settings.training.gpu_toleration_key == "nvidia.com/gpu"


def test_bucket_job_creates_the_buckets_the_services_use() -> None:
    objects = _objects("generic")
    container = _container(objects, "minio-buckets")
    env = {
        item["name"]: item["valueFrom"]["configMapKeyRef"]["key"]
        for item in container["env"]
        if "configMapKeyRef" in item.get("valueFrom", {})
    }
    assert env == {
        "S3_ENDPOINT": "AWS_ENDPOINT_URL_S3",
        "MLFLOW_BUCKET": "UNIFL_MLFLOW_ARTIFACTS_BUCKET",
        "TASKS_BUCKET": "UNIFL_TASK_IMAGES_BUCKET",
    }
    script = container["args"][0]
    assert 'for bucket in "$MLFLOW_BUCKET" "$TASKS_BUCKET"' in script
    assert "mb --ignore-existing" in script  # re-runnable
    assert 'admin policy attach store unifl-app --user "$AWS_ACCESS_KEY_ID"' in script


def test_gke_overlay_uses_gke_storage_ingress_and_accelerator_labels() -> None:
    objects = _objects("gke")
    for statefulset in _by_kind(objects, "StatefulSet").values():
        (template,) = statefulset["spec"]["volumeClaimTemplates"]
        assert template["spec"]["storageClassName"] == "standard-rwo"
    claims = _by_kind(objects, "PersistentVolumeClaim")
    assert claims["label-studio-data"]["spec"]["storageClassName"] == "standard-rwo"
    assert claims["unifl-checkpoints"]["spec"]["storageClassName"] == "standard-rwx"
    assert claims["unifl-checkpoints"]["spec"]["accessModes"] == ["ReadWriteMany"]
    ingress = _by_kind(objects, "Ingress")["label-studio"]
    assert ingress["metadata"]["annotations"]["kubernetes.io/ingress.class"] == "gce"
    generic = _by_kind(_objects("generic"), "Ingress")["label-studio"]
    assert generic["spec"]["ingressClassName"] == "nginx"
    assert all(
        "storageClassName" not in claim["spec"]
        for claim in _by_kind(_objects("generic"), "PersistentVolumeClaim").values()
    )
