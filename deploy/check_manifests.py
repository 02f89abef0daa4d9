"""Consistency checks of the deployment files beyond their schemas (run by scripts/check-deploy).

Fails (exit 1) when:
- k8s/kustomization.yaml lists a missing file, or a k8s/*.yaml file is not listed;
- a Secret is a committed resource, or a secretGenerator reads a file git does not ignore, has no
  committed `.example` beside it, or (on an operator's machine) that file lacks a key or a value;
- a pod template mounts the service account token (automountServiceAccountToken must be false), or an
  image is not pinned (`latest`, no tag, or a tag that is not an exact version; the project's own images
  take their tag or digest from kustomization.yaml `images:`);
- no default-deny NetworkPolicy (all pods, Ingress and Egress, no rule) exists, a policy or a peer in
  the namespace selects no pod, a port a policy opens is not one the pods it leads to declare, or the
  policies block a flow the system needs: ingress controller -> Ingress backends, Prometheus -> every
  scraped port, each binary -> the PostgreSQL, Redis, Kafka and JWKS addresses of its configuration,
  Kafka -> its controller quorum, KEDA -> the brokers (optional/), every pod -> DNS;
- an HPA targets a Deployment that does not exist, has minReplicas > maxReplicas, or its Deployment sets
  `replicas` (the HPA and `kubectl apply` would fight over it);
- a probe path is not a route of the binary it probes, a probe or Service port does not resolve to a
  container port, or a container port differs from the port the binary is configured with;
- a ConfigMap/Secret/compose variable is not one the configuration reads, or a required one is missing;
- a workload refers to a ConfigMap or Secret that does not exist, or the Ingress to a missing Service,
  or the Ingress publishes other paths than /api/v1/ and /openapi.json;
- the optional KEDA ScaledObject targets a missing Deployment, reads another broker, group or topic
  than the ConfigMap's, or authenticates with variables the worker does not have;
- the stages before the runtime differ between Dockerfile.api and Dockerfile.worker (they must be one
  build, so that building either image caches the other's);
- a docker-compose volume is not mounted where its image keeps its data (or an image that keeps data has
  no volume there), or a health check runs a command its image does not have.

`--self-test` feeds broken copies of the manifests to the checks and fails unless each is reported.
`--rendered FILE` checks the output of `kubectl kustomize k8s/`: every ConfigMap and Secret a pod
refers to is in it (under the name kustomize generated), and every image is pinned.
"""

import pathlib
import re
import subprocess
import sys
import urllib.parse

import yaml

from self_test import run as self_test_run

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# Variables a deployment must set: their defaults only suit a developer machine.
DEV_ISSUER = "highload-microservice-dev"
REQUIRED = ["AUTH_ISSUER", "AUTH_AUDIENCE", "DB_HOST", "DB_USER", "DB_PASSWORD", "DB_NAME", "REDIS_HOST", "KAFKA_BROKERS", "KAFKA_TOPIC",
            "KAFKA_GROUP_ID", "SERVER_PORT", "WORKER_HTTP_PORT", "LOG_FORMAT"]

# What the Ingress may publish (SPEC §8): the API and its document, never /metrics or the detailed /health.
PUBLIC_PATHS = {("/api/v1/", "Prefix"), ("/openapi.json", "Exact")}

# Who talks to the pods from other namespaces, as the README tells operators to adjust them
# (namespace labels, pod labels): the same guesses as k8s/network-policies.yaml.
INGRESS_CONTROLLER = ({"kubernetes.io/metadata.name": "ingress-nginx"}, {"app.kubernetes.io/name": "ingress-nginx"})
PROMETHEUS = ({"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "prometheus"})
CLUSTER_DNS = ({"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"})
KEDA_OPERATOR = ({"kubernetes.io/metadata.name": "keda"}, {"app.kubernetes.io/name": "keda-operator"})
# Which dependencies each workload's binary connects to (SPEC §1): the worker never uses Redis, the
# migration Job only PostgreSQL.
CLIENTS = {"highload-api": ["postgres", "redis", "kafka", "jwks"], "highload-worker": ["postgres", "kafka"],
           "highload-migrate": ["postgres"]}
# KEDA's name for each KAFKA_SASL_MECHANISM.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
# A pinned tag starts with an exact version (16.10-alpine, 7.4.6-alpine, 3.9.1), not a moving major.
PINNED_TAG = re.compile(r"^v?\d+\.\d+")

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


def read_env_file(path):
    """KEY=value lines as kustomize reads them (comments and blank lines skipped)."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def git_ignores(path):
    try:
        return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(path)]).returncode == 0
    except FileNotFoundError:
        return False


def generated_secrets(kustomization):
    """The Secrets kustomization.yaml generates, as documents whose keys are those of the committed
    `.example` files (the real files are the operator's, never committed)."""
    documents = []
    for generator in kustomization.get("secretGenerator", []):
        name = generator["name"]
        if generator.get("literals") or generator.get("files"):
            fail(f"kustomization.yaml: secretGenerator {name} has literals/files, which are committed values; use envs")
        data = {}
        for env in generator.get("envs", []):
            real, example = K8S / env, K8S / f"{env}.example"
            if not git_ignores(real):
                fail(f"kustomization.yaml: secretGenerator {name} reads k8s/{env}, which git does not ignore")
            if not example.exists():
                fail(f"kustomization.yaml: secretGenerator {name} reads k8s/{env}, but k8s/{env}.example does not exist")
                continue
            keys = read_env_file(example)
            data.update(keys)
            # On an operator's machine: the real file must carry every key the example names, with a value.
            if real.exists():
                values = read_env_file(real)
                for key in keys:
                    if not values.get(key):
                        fail(f"k8s/{env} has no value for {key} (see k8s/{env}.example)")
        documents.append(("kustomization.yaml", {"kind": "Secret", "metadata": {"name": name}, "stringData": data}))
    return documents


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
    return kustomization, documents


def load_optional():
    documents = []
    for path in sorted((K8S / "optional").glob("*.yaml")):
        documents += [(f"optional/{path.name}", doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def by_kind(documents, kind):
    return {doc["metadata"]["name"]: (name, doc) for name, doc in documents if doc["kind"] == kind}


def pod_templates(documents):
    """Every workload's pod template: name -> (file, template)."""
    return {doc["metadata"]["name"]: (file, doc["spec"]["template"]) for file, doc in documents
            if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")}


def containers(template):
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


def container_ports(template):
    """(name, number, protocol) of every port the pod's containers declare."""
    return [(p.get("name"), p["containerPort"], p.get("protocol", "TCP"))
            for c in template["spec"]["containers"] for p in c.get("ports", [])]


def build_stages(dockerfile):
    """The instructions before the runtime stage, without comments and blank lines."""
    lines = [line for line in (ROOT / dockerfile).read_text().splitlines() if line.strip() and not line.startswith("#")]
    end = next(i for i, line in enumerate(lines) if line.startswith("FROM ") and line.endswith(" AS runtime"))
    return lines[:end]


def image_family(image, table):
    return next((family for family in table if image.split(":")[0].startswith(family)), None)


def split_image(image):
    """(name, tag or None, digest or None)."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    if ":" in name[slash + 1:]:
        name, tag = name.rsplit(":", 1)
        return name, tag, digest or None
    return name, None, digest or None


def check_images(kustomization, templates):
    overrides = {entry["name"]: entry for entry in kustomization.get("images", [])}
    for name, entry in overrides.items():
        if not entry.get("digest") and entry.get("newTag", "latest") == "latest":
            fail(f"kustomization.yaml: image {name} is not pinned: set newTag to a release or a digest")
    for workload, (file, template) in templates.items():
        for container in containers(template):
            image_name, tag, digest = split_image(container["image"])
            if image_name in overrides or digest:
                continue
            if not tag or not PINNED_TAG.match(tag):
                fail(f"{file}: {workload} image {container['image']} is not pinned: name an exact version or a digest")


def check_pods(templates):
    for workload, (file, template) in templates.items():
        # The pods never call the Kubernetes API: a token mounted anyway is a credential for the taking.
        if template["spec"].get("automountServiceAccountToken") is not False:
            fail(f"{file}: {workload} does not set automountServiceAccountToken: false")


# --- NetworkPolicy evaluation --------------------------------------------------------------------------
# An endpoint is a pod template of the namespace ("pod"), a pod of another namespace ("remote"), or an
# address outside the cluster ("address"); a flow is allowed when a policy selecting its source lets it
# out (or none selects it for Egress) and one selecting its destination lets it in (or none for Ingress).


def pod_endpoint(name, template, namespace):
    return {"kind": "pod", "name": name, "namespace": namespace,
            "ns_labels": {"kubernetes.io/metadata.name": namespace},
            "labels": template["metadata"].get("labels", {}), "ports": container_ports(template)}


def remote_endpoint(name, identity):
    ns_labels, labels = identity
    return {"kind": "remote", "name": name, "namespace": ns_labels["kubernetes.io/metadata.name"],
            "ns_labels": ns_labels, "labels": labels, "ports": []}


def address_endpoint(name):
    return {"kind": "address", "name": name, "ports": []}


def selector_matches(selector, labels):
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if not {"In": lambda: labels.get(key) in values, "NotIn": lambda: labels.get(key) not in values,
                "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[operator]():
            return False
    return True


def peer_matches(peer, namespace, endpoint):
    if "ipBlock" in peer:
        # A CIDR cannot be matched to a host name offline: any block counts for an outside address.
        return endpoint["kind"] == "address"
    if endpoint["kind"] == "address":
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], endpoint["ns_labels"]):
            return False
    elif endpoint["namespace"] != namespace:
        return False
    return selector_matches(peer.get("podSelector"), endpoint["labels"])


def port_matches(rule_ports, number, protocol, destination):
    if not rule_ports:
        return True
    for port in rule_ports:
        if port.get("protocol", "TCP") != protocol:
            continue
        if "port" not in port:
            return True
        if isinstance(port["port"], str):
            # A named port means the destination pod's port of that name.
            if (port["port"], number, protocol) in destination["ports"]:
                return True
        elif port["port"] <= number <= port.get("endPort", port["port"]):
            return True
    return False


def policy_types(policy):
    spec = policy["spec"]
    return set(spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else [])))


def side_allows(policies, selected, direction, peer_endpoint, port_endpoint, number, protocol):
    """None when the policies of `selected` let the flow through in `direction`, else why not."""
    relevant = [(file, p) for file, p in policies
                if p["metadata"].get("namespace", selected.get("namespace")) == selected.get("namespace")
                and selector_matches(p["spec"]["podSelector"], selected["labels"]) and direction in policy_types(p)]
    if not relevant:
        return None
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for _, policy in relevant:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(peer_matches(peer, selected["namespace"], peer_endpoint) for peer in peers)) and \
                    port_matches(rule.get("ports"), number, protocol, port_endpoint):
                return None
    return f"no {direction.lower()} rule of {', '.join(sorted(p['metadata']['name'] for _, p in relevant))} allows it"


def check_flow(policies, source, destination, number, protocol="TCP"):
    for selected, direction, peer in ((source, "Egress", destination), (destination, "Ingress", source)):
        if selected["kind"] != "pod":
            continue
        why = side_allows(policies, selected, direction, peer, destination, number, protocol)
        if why:
            fail(f"NetworkPolicies block {source['name']} -> {destination['name']}:{number}/{protocol}: {why}")


def check_policies(policies, templates, namespace):
    pods = {name: pod_endpoint(name, template, namespace) for name, (_, template) in templates.items()}

    def selected(selector):
        return [pod for pod in pods.values() if selector_matches(selector, pod["labels"])]

    def declares(pod, port):
        protocol = port.get("protocol", "TCP")
        return "port" not in port or any(
            (name if isinstance(port["port"], str) else number) == port["port"] and proto == protocol
            for name, number, proto in pod["ports"])

    if not any(p["spec"]["podSelector"] in ({}, {"matchLabels": {}}) and {"Ingress", "Egress"} <= policy_types(p)
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for _, p in policies):
        fail("network-policies.yaml: no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)")
    for file, policy in policies:
        name = policy["metadata"]["name"]
        targets = selected(policy["spec"]["podSelector"])
        if not targets:
            fail(f"{file}: NetworkPolicy {name} selects no pod of the manifests")
        for rule in policy["spec"].get("ingress") or []:
            for port in rule.get("ports") or []:
                for pod in targets:
                    if not declares(pod, port):
                        fail(f"{file}: NetworkPolicy {name} opens port {port['port']}, which is not a port of {pod['name']}")
        for key, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(key) or []:
                for peer in rule.get(peers_key) or []:
                    if "ipBlock" in peer or "namespaceSelector" in peer:
                        continue
                    peers = selected(peer.get("podSelector"))
                    if not peers:
                        fail(f"{file}: NetworkPolicy {name} names {key} peer {peer.get('podSelector')}, which selects no pod")
                    if key == "egress":
                        for port in rule.get("ports") or []:
                            for pod in peers:
                                if not declares(pod, port):
                                    fail(f"{file}: NetworkPolicy {name} lets traffic out to port {port['port']}, "
                                         f"which is not a port of {pod['name']}")
    return pods


def resolve_address(host, port, services, templates, pods):
    """The endpoint and pod port behind host:port: a Service of the manifests (`svc`, `svc.ns.svc...`, or
    `pod.headless-svc` for a StatefulSet pod) or, failing that, an address outside the cluster."""
    labels = host.split(".")
    for candidate, headless in ((labels[0], False), (labels[1] if len(labels) > 1 else None, True)):
        if candidate not in services:
            continue
        service = services[candidate][1]
        if headless and service["spec"].get("clusterIP") != "None":
            continue
        for workload, (_, template) in templates.items():
            if selector_matches({"matchLabels": service["spec"].get("selector", {})}, template["metadata"].get("labels", {})):
                service_port = next((p for p in service["spec"]["ports"] if p["port"] == port), None)
                if service_port is None:
                    return pods[workload], None
                target = service_port.get("targetPort", port)
                if isinstance(target, str):
                    target = next((n for name, n, _ in pods[workload]["ports"] if name == target), None)
                return pods[workload], target
    return address_endpoint(host), port


def host_port(address, default_port):
    if "://" in address:
        url = urllib.parse.urlsplit(address)
        return url.hostname, url.port or {"https": 443, "http": 80}.get(url.scheme, default_port)
    host, _, port = address.rpartition(":")
    return (host, int(port)) if host else (address, default_port)


def check_flows(policies, documents, templates, pods, provided, keda_policies):
    """Every flow the system needs, resolved from the manifests, is allowed by the base's policies (and
    KEDA's by those plus optional/'s)."""
    services = by_kind(documents, "Service")
    dependencies = {
        "postgres": [(provided.get("DB_HOST", ""), int(provided.get("DB_PORT", 5432)))],
        "redis": [(provided.get("REDIS_HOST", ""), int(provided.get("REDIS_PORT", 6379)))],
        "kafka": [host_port(b.strip(), 9092) for b in provided.get("KAFKA_BROKERS", "").split(",") if b.strip()],
        "jwks": [host_port(provided["AUTH_JWKS_URL"], 443)] if provided.get("AUTH_JWKS_URL") else [],
    }

    def to(source, host, port, allowing=policies):
        destination, number = resolve_address(host, port, services, templates, pods)
        if number is None:
            fail(f"{source['name']} connects to {host}:{port}, which no port of Service {host.split('.')[0]} serves")
        else:
            check_flow(allowing, source, destination, number)

    for workload, needs in CLIENTS.items():
        if workload not in pods:
            fail(f"no workload {workload} in the manifests (deploy/check_manifests.py CLIENTS)")
            continue
        for dependency in needs:
            for host, port in dependencies[dependency]:
                to(pods[workload], host, port)
    for name, pod in pods.items():
        for protocol in ("UDP", "TCP"):
            check_flow(policies, pod, remote_endpoint("cluster DNS", CLUSTER_DNS), 53, protocol)
        template = templates[name][1]
        annotations = template["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            check_flow(policies, remote_endpoint("Prometheus", PROMETHEUS), pod, int(annotations["prometheus.io/port"]))
        # A KRaft broker reaches its controllers at the addresses of its quorum, its own included.
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"] == "KAFKA_CONTROLLER_QUORUM_VOTERS":
                    for voter in env["value"].split(","):
                        to(pod, *host_port(voter.split("@", 1)[1], 9093))
    for name, (file, ingress) in by_kind(documents, "Ingress").items():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                if backend["name"] not in services:
                    continue
                service = services[backend["name"]][1]
                port = next((p for p in service["spec"]["ports"]
                             if p.get("name") == backend["port"].get("name") or p["port"] == backend["port"].get("number")), None)
                if port:
                    to(remote_endpoint("ingress controller", INGRESS_CONTROLLER), backend["name"], port["port"])
    if keda_policies:
        keda = remote_endpoint("KEDA operator", KEDA_OPERATOR)
        for host, port in dependencies["kafka"]:
            to(keda, host, port, allowing=policies + keda_policies)


def check_keda(optional, deployments, provided):
    for file, scaled in by_kind(optional, "ScaledObject").values():
        target = scaled["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            fail("optional KEDA ScaledObject targets a missing Deployment")
            continue
        container_env = set()
        for container in deployments[target][1]["spec"]["template"]["spec"]["containers"]:
            container_env |= {env["name"] for env in container.get("env", [])}
            if any("configMapRef" in s or "secretRef" in s for s in container.get("envFrom", [])):
                container_env |= set(provided)
        authentications = by_kind(optional, "TriggerAuthentication")
        for trigger in scaled["spec"]["triggers"]:
            metadata = trigger["metadata"]
            for field, variable in (("bootstrapServers", "KAFKA_BROKERS"), ("consumerGroup", "KAFKA_GROUP_ID"),
                                    ("topic", "KAFKA_TOPIC")):
                if metadata.get(field) != provided.get(variable):
                    fail(f"{file}: the KEDA trigger's {field} {metadata.get(field)} is not {variable} {provided.get(variable)}")
            mechanism = provided.get("KAFKA_SASL_MECHANISM") if "SASL" in provided.get("KAFKA_SECURITY_PROTOCOL", "") else None
            if metadata.get("sasl", "none") != KEDA_SASL.get(mechanism, "none"):
                fail(f"{file}: the KEDA trigger's sasl {metadata.get('sasl')} does not match KAFKA_SASL_MECHANISM {mechanism}")
            reference = trigger.get("authenticationRef", {}).get("name")
            if mechanism and reference not in authentications:
                fail(f"{file}: the KEDA trigger logs in with SASL but names no TriggerAuthentication of optional/")
            if reference in authentications:
                for env in authentications[reference][1]["spec"].get("env", []):
                    if env["name"] not in container_env:
                        fail(f"{file}: TriggerAuthentication {reference} reads {env['name']}, which {target} does not have")


def check_pod_monitors(optional, templates):
    """Each optional PodMonitor selects the api's and the worker's pods, on a port they declare."""
    for file, monitor in by_kind(optional, "PodMonitor").values():
        selector = monitor["spec"]["selector"]
        selected = {name for name, (_, template) in templates.items() if selector_matches(selector, template["metadata"]["labels"])}
        for wanted in ("highload-api", "highload-worker"):
            if wanted not in selected:
                fail(f"{file}: PodMonitor {monitor['metadata']['name']} does not select {wanted}'s pods")
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for name in sorted(selected):
                if endpoint["port"] not in {port for port, _, _ in container_ports(templates[name][1])}:
                    fail(f"{file}: PodMonitor scrapes port {endpoint['port']}, which {name} does not declare")


def check_secrets_committed(documents):
    for file, _ in by_kind(documents, "Secret").values():
        if file != "kustomization.yaml":
            fail(f"k8s/{file} commits a Secret: generate it from an uncommitted file (kustomization.yaml secretGenerator)")


def check(model):
    """Every check over a loaded model; returns the problems found."""
    errors.clear()
    variables, kustomization, documents, optional, compose = (
        model["variables"], model["kustomization"], model["documents"], model["optional"], model["compose"])
    if len(variables) < 20:
        fail(f"found only {len(variables)} variables in common/src/config.rs; the parser is broken")
    known = variables
    namespace = kustomization.get("namespace", "default")
    deployments = by_kind(documents, "Deployment")
    configmaps = by_kind(documents, "ConfigMap")
    secrets = by_kind(documents, "Secret")
    services = by_kind(documents, "Service")
    templates = pod_templates(documents)
    check_secrets_committed(documents)

    # What the project's binaries read: the ConfigMaps and Secrets their containers take whole.
    provided = {}
    for _, template in templates.values():
        for container in template["spec"]["containers"]:
            if not container["image"].startswith("highload-microservice/"):
                continue
            for source in container.get("envFrom", []):
                if source.get("configMapRef", {}).get("name") in configmaps:
                    provided.update(configmaps[source["configMapRef"]["name"]][1].get("data", {}))
                if source.get("secretRef", {}).get("name") in secrets:
                    secret = secrets[source["secretRef"]["name"]][1]
                    provided.update(secret.get("stringData", {}) or {})
                    provided.update(secret.get("data", {}) or {})
    for key in provided:
        if key not in known:
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
            binary = container["image"].split("/")[-1].split(":")[0].split("@")[0]
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

    # Every ConfigMap and Secret a pod names exists, whichever way it names it.
    for name, (file, template) in templates.items():
        for container in containers(template):
            for source in container.get("envFrom", []):
                if "configMapRef" in source and source["configMapRef"]["name"] not in configmaps:
                    fail(f"{file}: {name} uses missing ConfigMap {source['configMapRef']['name']}")
                if "secretRef" in source and source["secretRef"]["name"] not in secrets:
                    fail(f"{file}: {name} uses missing Secret {source['secretRef']['name']}")
            for env in container.get("env", []):
                reference = env.get("valueFrom", {})
                if "configMapKeyRef" in reference:
                    ref = reference["configMapKeyRef"]
                    if ref["key"] not in configmaps.get(ref["name"], (None, {}))[1].get("data", {}):
                        fail(f"{file}: {name} env {env['name']} reads missing ConfigMap key {ref['name']}/{ref['key']}")
                if "secretKeyRef" in reference:
                    ref = reference["secretKeyRef"]
                    secret = secrets.get(ref["name"], (None, {}))[1]
                    if ref["key"] not in {**(secret.get("stringData") or {}), **(secret.get("data") or {})}:
                        fail(f"{file}: {name} env {env['name']} reads missing Secret key {ref['name']}/{ref['key']}")
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] not in configmaps:
                fail(f"{file}: {name} mounts missing ConfigMap {volume['configMap']['name']}")

    check_pods(templates)
    check_images(kustomization, templates)
    policies = [(file, doc) for file, doc in documents if doc["kind"] == "NetworkPolicy"]
    optional_policies = [(file, doc) for file, doc in optional if doc["kind"] == "NetworkPolicy"]
    pods = check_policies(policies + optional_policies, templates, namespace)
    check_flows(policies, documents, templates, pods, provided, keda_policies=optional_policies)

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

    for service_name in ("api", "worker", "migrate"):
        environment = compose["services"][service_name].get("environment", {})
        for key in environment:
            if key not in known:
                fail(f"docker-compose.yml: {service_name} sets {key}, which the configuration does not read")
    check_compose_images(compose)
    if build_stages("Dockerfile.api") != build_stages("Dockerfile.worker"):
        fail("Dockerfile.api and Dockerfile.worker differ before their runtime stage")
    example = model["env_example"]
    for key in re.findall(r"^([A-Z][A-Z0-9_]+)=", example, re.M):
        if key not in known:
            fail(f"env.example documents {key}, which the configuration does not read")
    for key in variables:
        if not re.search(rf"^{key}=", example, re.M):
            fail(f"env.example does not document {key}")

    check_keda(optional, deployments, provided)
    check_pod_monitors(optional, templates)
    return list(dict.fromkeys(errors))


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


def load_model():
    kustomization, documents = load_manifests()
    documents += generated_secrets(kustomization)
    return {"variables": config_variables(), "kustomization": kustomization, "documents": documents,
            "optional": load_optional(), "compose": yaml.safe_load((ROOT / "docker-compose.yml").read_text()),
            "env_example": (ROOT / "env.example").read_text()}


def check_rendered(path):
    """`kubectl kustomize k8s/` output: the references kustomize rewrote all land, every image is pinned."""
    documents = [("rendered", doc) for doc in yaml.safe_load_all(pathlib.Path(path).read_text()) if doc]
    names = {kind: set(by_kind(documents, kind)) for kind in ("ConfigMap", "Secret")}
    for workload, (_, template) in pod_templates(documents).items():
        references = []
        for container in containers(template):
            for source in container.get("envFrom", []):
                references += [("ConfigMap", source["configMapRef"]["name"])] if "configMapRef" in source else []
                references += [("Secret", source["secretRef"]["name"])] if "secretRef" in source else []
            for env in container.get("env", []):
                reference = env.get("valueFrom", {})
                references += [("ConfigMap", reference["configMapKeyRef"]["name"])] if "configMapKeyRef" in reference else []
                references += [("Secret", reference["secretKeyRef"]["name"])] if "secretKeyRef" in reference else []
            _, tag, digest = split_image(container["image"])
            if not digest and (not tag or not PINNED_TAG.match(tag)):
                fail(f"{path}: {workload} runs {container['image']}, which is not pinned")
        for volume in template["spec"].get("volumes", []):
            references += [("ConfigMap", volume["configMap"]["name"])] if "configMap" in volume else []
            references += [("Secret", volume["secret"]["secretName"])] if "secret" in volume else []
        for kind, name in references:
            if name not in names[kind]:
                fail(f"{path}: {workload} refers to {kind} {name}, which the build does not contain")
    return len(documents)


# --- self-test ---------------------------------------------------------------------------------------


def self_test():
    """Each broken copy of the real manifests must be reported, and the intact one must not be."""

    def doc(model, kind, name):
        return next(d for _, d in model["documents"] + model["optional"] if d["kind"] == kind and d["metadata"]["name"] == name)

    def rule_to(policy, label):
        return next(r for r in policy["spec"]["egress"] if r["to"][0].get("podSelector", {}).get("matchLabels", {}).get(
            "app.kubernetes.io/name") == label)

    def no_selector_match(m):
        doc(m, "NetworkPolicy", "highload-api")["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] = "highload-apl"

    def undeclared_ingress_port(m):
        doc(m, "NetworkPolicy", "redis")["spec"]["ingress"][0]["ports"][0]["port"] = "cache"

    def undeclared_egress_port(m):
        rule_to(doc(m, "NetworkPolicy", "highload-worker"), "postgres")["ports"][0]["port"] = 5433

    def token_mounted(m):
        del doc(m, "Deployment", "highload-worker")["spec"]["template"]["spec"]["automountServiceAccountToken"]

    def no_default_deny(m):
        m["documents"] = [(f, d) for f, d in m["documents"] if d["metadata"]["name"] != "default-deny"]

    def flow_blocked(m):
        policy = doc(m, "NetworkPolicy", "highload-api")
        policy["spec"]["egress"].remove(rule_to(policy, "redis"))

    def peer_selects_nothing(m):
        doc(m, "NetworkPolicy", "kafka")["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"][
            "app.kubernetes.io/name"] = "highload-wroker"

    def image_latest(m):
        doc(m, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["image"] = "redis:7-alpine"
        m["kustomization"]["images"][0]["newTag"] = "latest"

    def secret_committed(m):
        m["documents"].append(("secret.yaml", {"kind": "Secret", "metadata": {"name": "highload-secrets"},
                                               "stringData": {"DB_PASSWORD": "change-me"}}))

    def keda_unreachable(m):
        peer = doc(m, "NetworkPolicy", "kafka-from-keda")["spec"]["ingress"][0]["from"][0]
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] = "keda-system"

    def monitor_misses_worker(m):
        doc(m, "PodMonitor", "highload-microservice")["spec"]["selector"]["matchExpressions"][0]["values"] = ["highload-api"]

    def monitor_wrong_port(m):
        doc(m, "PodMonitor", "highload-microservice")["spec"]["podMetricsEndpoints"][0]["port"] = "metrics"

    cases = [
        (monitor_misses_worker, "does not select highload-worker's pods"),
        (monitor_wrong_port, "scrapes port metrics, which highload-api does not declare"),
        (no_selector_match, "NetworkPolicy highload-api selects no pod"),
        (undeclared_ingress_port, "opens port cache, which is not a port of redis"),
        (undeclared_egress_port, "lets traffic out to port 5433, which is not a port of postgres"),
        (token_mounted, "highload-worker does not set automountServiceAccountToken: false"),
        (no_default_deny, "no default-deny NetworkPolicy"),
        (flow_blocked, "NetworkPolicies block highload-api -> redis:6379/TCP"),
        (peer_selects_nothing, "names ingress peer"),
        (image_latest, "image redis:7-alpine is not pinned"),
        (image_latest, "image highload-microservice/api is not pinned"),
        (secret_committed, "k8s/secret.yaml commits a Secret"),
        (keda_unreachable, "NetworkPolicies block KEDA operator -> kafka:9092/TCP"),
    ]
    status = self_test_run(load_model(), check, cases, "manifest consistency")
    errors.clear()
    return status


def main(argv):
    if argv[1:2] == ["--self-test"]:
        return self_test()
    if argv[1:2] == ["--rendered"]:
        count = sum(check_rendered(path) for path in argv[2:])
        for error in errors:
            print(f"FAIL {error}")
        print(f"kustomize build: {len(errors)} problem(s) in {count} rendered resources")
        return 1 if errors else 0
    model = load_model()
    loading = list(errors)
    found = loading + check(model)
    for error in found:
        print(f"FAIL {error}")
    print(f"manifest consistency: {len(found)} problem(s) in {len(model['documents'])} resources "
          f"(+{len(model['optional'])} optional)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
