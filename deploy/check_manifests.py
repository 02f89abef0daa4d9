"""Consistency checks of the deployment files beyond their schemas (run by scripts/check-deploy).

Fails (exit 1) when:
- k8s/kustomization.yaml lists a missing file, or a k8s/*.yaml file is not listed;
- an HPA targets a Deployment that does not exist, has minReplicas > maxReplicas, or its Deployment sets
  `replicas` (the HPA and `kubectl apply` would fight over it);
- a probe path is not a route of the binary it probes, a probe or Service port does not resolve to a
  container port, or a container port differs from the port the binary is configured with;
- a ConfigMap/Secret/compose variable is not one the configuration reads, or a required one is missing;
- a workload refers to a ConfigMap or Secret that does not exist, or the Ingress to a missing Service,
  or the Ingress publishes other paths than /api/v1/ and /openapi.json;
- the stages before the runtime differ between Dockerfile.api and Dockerfile.worker (they must be one
  build, so that building either image caches the other's);
- a docker-compose volume is not mounted where its image keeps its data (or an image that keeps data has
  no volume there), or a health check runs a command its image does not have.
"""

import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# Variables a deployment must set: their defaults only suit a developer machine.
DEV_ISSUER = "highload-microservice-dev"
REQUIRED = ["AUTH_ISSUER", "AUTH_AUDIENCE", "DB_HOST", "DB_USER", "DB_PASSWORD", "DB_NAME", "REDIS_HOST", "KAFKA_BROKERS", "KAFKA_TOPIC",
            "KAFKA_GROUP_ID", "SERVER_PORT", "WORKER_HTTP_PORT", "LOG_FORMAT"]

# What the Ingress may publish (SPEC §8): the API and its document, never /metrics or the detailed /health.
PUBLIC_PATHS = {("/api/v1/", "Prefix"), ("/openapi.json", "Exact")}

# Where each image of docker-compose.yml keeps its data, given the service's environment.
DATA_DIRS = {
    "postgres": lambda env: env.get("PGDATA", "/var/lib/postgresql/data"),
    # apache/kafka: any KAFKA_* variable replaces the stock configuration (log.dirs=/tmp/kraft-combined-logs)
    # as a whole, and then Kafka's own default applies.
    "apache/kafka": lambda env: env.get("KAFKA_LOG_DIRS", "/tmp/kafka-logs" if any(
        k.startswith("KAFKA_") for k in env) else "/tmp/kraft-combined-logs"),
}
# The commands each image has for a health check ("sh" for CMD-SHELL). The project's own images are
# distroless: no shell, no curl, nothing but the binary.
HEALTH_COMMANDS = {
    "postgres": {"sh", "pg_isready"},
    "redis": {"sh", "redis-cli"},
    "apache/kafka": {"sh", "/opt/kafka/bin/kafka-broker-api-versions.sh"},
    "highload-microservice/": set(),
}

errors = []


def fail(message):
    errors.append(message)


def config_variables():
    source = (ROOT / "common/src/config.rs").read_text()
    return set(re.findall(r'env\s*\.\w+(?:::<[^>]*>)?\(\s*"([A-Z][A-Z0-9_]+)"', source))


def routes(binary):
    if binary == "api":
        source = (ROOT / "api/src/routes.rs").read_text()
        table = source[source.index("const TABLE"):source.index("];", source.index("const TABLE"))]
        return set(re.findall(r'\(\s*"(/[^"]*)"', table))
    source = (ROOT / "worker/src/http.rs").read_text()
    return set(re.findall(r'"(/health/[a-z]+|/metrics)"', source))


def load_manifests():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    for name in listed:
        if not (K8S / name).exists():
            fail(f"kustomization.yaml lists missing {name}")
    for name in on_disk:
        if name not in listed:
            fail(f"k8s/{name} is not listed in kustomization.yaml")
    documents = []
    for name in listed:
        path = K8S / name
        if path.exists():
            documents += [(name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def by_kind(documents, kind):
    return {doc["metadata"]["name"]: (name, doc) for name, doc in documents if doc["kind"] == kind}


def build_stages(dockerfile):
    """The instructions before the runtime stage, without comments and blank lines."""
    lines = [line for line in (ROOT / dockerfile).read_text().splitlines() if line.strip() and not line.startswith("#")]
    end = next(i for i, line in enumerate(lines) if line.startswith("FROM ") and line.endswith(" AS runtime"))
    return lines[:end]


def image_family(image, table):
    return next((family for family in table if image.split(":")[0].startswith(family)), None)


def check_compose_images(compose):
    for name, service in compose["services"].items():
        image = service.get("image", "")
        environment = service.get("environment", {})
        family = image_family(image, DATA_DIRS)
        volumes = [v for v in service.get("volumes", []) if ":" in v]
        # Read-only files from the repository are configuration, not data; they must exist.
        for volume in volumes:
            if volume.endswith(":ro") and volume.startswith("./") and not (ROOT / volume.split(":")[0]).exists():
                fail(f"docker-compose.yml: {name} mounts {volume.split(':')[0]}, which does not exist")
        mounts = {v.split(":")[1] for v in volumes if not v.endswith(":ro")}
        if family:
            data_dir = DATA_DIRS[family](environment)
            if data_dir not in mounts:
                fail(f"docker-compose.yml: {name} keeps its data in {data_dir}, where no volume is mounted "
                     f"(volumes at {sorted(mounts) or 'none'})")
        elif mounts:
            fail(f"docker-compose.yml: {name} mounts {sorted(mounts)}, but where {image} keeps data is unknown")
        test = service.get("healthcheck", {}).get("test")
        if not test:
            continue
        family = image_family(image, HEALTH_COMMANDS)
        if family is None:
            fail(f"docker-compose.yml: {name}'s health check: the commands of {image} are unknown")
            continue
        kind, *command = test if isinstance(test, list) else ["CMD-SHELL", test]
        needed = {"sh", command[0].split()[0]} if kind == "CMD-SHELL" else {command[0]}
        for executable in sorted(needed - HEALTH_COMMANDS[family]):
            fail(f"docker-compose.yml: {name}'s health check runs {executable}, which {image} does not have")


def main():
    variables = config_variables()
    if len(variables) < 20:
        fail(f"found only {len(variables)} variables in common/src/config.rs; the parser is broken")
    documents = load_manifests()
    deployments = by_kind(documents, "Deployment")
    configmaps = by_kind(documents, "ConfigMap")
    secrets = by_kind(documents, "Secret")
    services = by_kind(documents, "Service")

    provided = {}
    for _, (file, cm) in configmaps.items():
        provided.update(cm.get("data", {}))
    for _, (file, secret) in secrets.items():
        provided.update(secret.get("stringData", {}) or {})
        provided.update(secret.get("data", {}) or {})
    for key in provided:
        if key not in variables:
            fail(f"ConfigMap/Secret key {key} is not a variable the configuration reads")
    for key in REQUIRED:
        if key not in provided:
            fail(f"required variable {key} is provided by no ConfigMap or Secret")
    # A cluster trusts a real issuer: never none, never the development issuer whose key is public.
    if provided.get("AUTH_MODE", "jwt") != "jwt":
        fail(f"the manifests set AUTH_MODE={provided['AUTH_MODE']}: every /api/v1/ route would be open")
    if provided.get("AUTH_ISSUER") == DEV_ISSUER or "AUTH_JWKS_FILE" in provided:
        fail("the manifests trust the development issuer (its key is public in dev/auth/)")
    if not (provided.get("AUTH_JWKS_URL") or "").startswith("https://"):
        fail("AUTH_JWKS_URL in the manifests must be an https:// URL")

    for name, (file, hpa) in by_kind(documents, "HorizontalPodAutoscaler").items():
        spec = hpa["spec"]
        target = spec["scaleTargetRef"]
        if target["kind"] != "Deployment" or target["name"] not in deployments:
            fail(f"{file}: HPA {name} targets {target['kind']}/{target['name']}, which does not exist")
        elif "replicas" in deployments[target["name"]][1]["spec"]:
            fail(f"Deployment {target['name']} sets replicas but is managed by HPA {name}")
        if spec.get("minReplicas", 1) > spec["maxReplicas"]:
            fail(f"{file}: HPA {name} has minReplicas > maxReplicas")

    for name, (file, deployment) in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            binary = container["image"].split("/")[-1].split(":")[0]
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            expected_port = int(provided.get("SERVER_PORT" if binary == "api" else "WORKER_HTTP_PORT", 0))
            if expected_port not in ports.values():
                fail(f"{file}: {name} exposes {sorted(ports.values())}, but {binary} listens on {expected_port}")
            for probe_kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container.get(probe_kind, {}).get("httpGet")
                if not probe:
                    continue
                if probe["path"] not in routes(binary):
                    fail(f"{file}: {name} {probe_kind} path {probe['path']} is not a route of {binary}")
                port = probe["port"]
                if (ports.get(port) if isinstance(port, str) else port) != expected_port:
                    fail(f"{file}: {name} {probe_kind} port {port} is not {binary}'s port {expected_port}")
            for source in container.get("envFrom", []):
                if "configMapRef" in source and source["configMapRef"]["name"] not in configmaps:
                    fail(f"{file}: {name} uses missing ConfigMap {source['configMapRef']['name']}")
                if "secretRef" in source and source["secretRef"]["name"] not in secrets:
                    fail(f"{file}: {name} uses missing Secret {source['secretRef']['name']}")

    for name, (file, service) in services.items():
        selector = service["spec"].get("selector", {})
        for _, (_, workload) in list(deployments.items()) + list(by_kind(documents, "StatefulSet").items()):
            if selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items():
                port_names = {p.get("name") for c in workload["spec"]["template"]["spec"]["containers"]
                              for p in c.get("ports", [])}
                for port in service["spec"]["ports"]:
                    if isinstance(port["targetPort"], str) and port["targetPort"] not in port_names:
                        fail(f"{file}: Service {name} targetPort {port['targetPort']} matches no container port")
                break
        else:
            fail(f"{file}: Service {name} selects no workload")

    for name, (file, ingress) in by_kind(documents, "Ingress").items():
        for rule in ingress["spec"]["rules"]:
            published = {(p["path"], p["pathType"]) for p in rule["http"]["paths"]}
            if published != PUBLIC_PATHS:
                fail(f"{file}: Ingress {name} publishes {sorted(published)}, not exactly {sorted(PUBLIC_PATHS)}")
            for path in rule["http"]["paths"]:
                if path["backend"]["service"]["name"] not in services:
                    fail(f"{file}: Ingress {name} routes to missing Service {path['backend']['service']['name']}")

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service_name in ("api", "worker", "migrate"):
        environment = compose["services"][service_name].get("environment", {})
        for key in environment:
            if key not in variables:
                fail(f"docker-compose.yml: {service_name} sets {key}, which the configuration does not read")
    check_compose_images(compose)
    if build_stages("Dockerfile.api") != build_stages("Dockerfile.worker"):
        fail("Dockerfile.api and Dockerfile.worker differ before their runtime stage")
    example = (ROOT / "env.example").read_text()
    for key in re.findall(r"^([A-Z][A-Z0-9_]+)=", example, re.M):
        if key not in variables:
            fail(f"env.example documents {key}, which the configuration does not read")
    for key in variables:
        if not re.search(rf"^{key}=", example, re.M):
            fail(f"env.example does not document {key}")

    keda = yaml.safe_load((K8S / "optional/worker-keda-scaledobject.yaml").read_text())
    if keda["spec"]["scaleTargetRef"]["name"] not in deployments:
        fail("optional KEDA ScaledObject targets a missing Deployment")

    for error in errors:
        print(f"FAIL {error}")
    print(f"manifest consistency: {len(errors)} problem(s) in {len(documents)} resources")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
