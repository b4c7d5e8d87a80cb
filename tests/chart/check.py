"""Checks of the rendered Helm chart that go beyond schema validation (run by scripts/check-chart).

Usage: check.py DEFAULT.yaml ALL_VALUES.yaml

Each check prints PASS or FAIL with the reason; the exit code is the number of failures.
"""

import os
import sys

import yaml

CHART = os.path.join(os.path.dirname(__file__), "..", "..", "charts", "virtkube")
ROLES = ("agent", "controller")
WORKLOADS = {"agent": "DaemonSet", "controller": "Deployment"}

failures = 0
passes = 0


def check(name, problems):
    """Records one check: `problems` is a list of strings, empty when it passed."""
    global failures, passes
    if problems:
        failures += 1
        print(f"chart: {name:<60} FAIL")
        for p in problems:
            print(f"    {p}")
    else:
        passes += 1
        print(f"chart: {name:<60} PASS")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def component(doc):
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def rules_file(role):
    with open(os.path.join(CHART, "rbac", f"{role}.yaml")) as f:
        return yaml.safe_load(f)


def leaves(tree, prefix=""):
    """Every leaf key path of a values tree. A map counts as a leaf when empty, and so does
    `resources` (one Kubernetes ResourceRequirements block, documented as one)."""
    if isinstance(tree, dict) and tree and not prefix.endswith("resources"):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, tree


def lookup(tree, path):
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return KeyError
        tree = tree[part]
    return tree


def rbac_checks(docs, label):
    problems = []
    for role in ROLES:
        want = rules_file(role)
        cluster = [d for d in of_kind(docs, "ClusterRole") if component(d) == role]
        namespaced = [d for d in of_kind(docs, "Role") if component(d) == role]
        if [d["rules"] for d in cluster] != ([want["clusterRules"]] if want["clusterRules"] else []):
            problems.append(f"{role}: ClusterRole rules differ from rbac/{role}.yaml")
        if [d["rules"] for d in namespaced] != ([want["namespaceRules"]] if want["namespaceRules"] else []):
            problems.append(f"{role}: Role rules differ from rbac/{role}.yaml")
    for d in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
        for rule in d["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                if "*" in rule.get(field, []):
                    problems.append(f"{d['metadata']['name']}: wildcard in {field}")
            if not rule.get("verbs"):
                problems.append(f"{d['metadata']['name']}: rule without verbs")
    check(f"{label}: RBAC from rbac/ROLE.yaml, no wildcards", problems)


def service_account_checks(docs, label):
    problems = []
    sas = {component(d): d["metadata"]["name"] for d in of_kind(docs, "ServiceAccount")}
    for role, kind in WORKLOADS.items():
        workloads = of_kind(docs, kind)
        if len(workloads) != 1:
            problems.append(f"{role}: {len(workloads)} {kind}s")
            continue
        sa = workloads[0]["spec"]["template"]["spec"]["serviceAccountName"]
        if sas.get(role) != sa:
            problems.append(f"{role}: runs as ServiceAccount {sa}, the chart's is {sas.get(role)}")
        bound = [
            b for b in of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding")
            if component(b) == role
        ]
        if not bound or any(s["name"] != sa for b in bound for s in b["subjects"]):
            problems.append(f"{role}: bindings do not name ServiceAccount {sa}")
    if len(set(sas.values())) != len(ROLES):
        problems.append(f"one ServiceAccount per role expected, got {sas}")
    check(f"{label}: one ServiceAccount per role, bound to its role", problems)


def security_checks(docs, label):
    problems = []
    for role, kind in WORKLOADS.items():
        for w in of_kind(docs, kind):
            pod = w["spec"]["template"]["spec"]
            if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{role}: pod seccompProfile is not RuntimeDefault")
            for c in pod["containers"]:
                sc = c.get("securityContext", {})
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{role}/{c['name']}: root filesystem not read-only")
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{role}/{c['name']}: privilege escalation allowed")
                if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                    problems.append(f"{role}/{c['name']}: capabilities not all dropped")
                if sc.get("capabilities", {}).get("add"):
                    problems.append(f"{role}/{c['name']}: capabilities added")
                res = c.get("resources", {})
                if not res.get("requests", {}).get("memory") or not res.get("limits", {}).get("memory"):
                    problems.append(f"{role}/{c['name']}: memory request or limit missing")
                if not c.get("livenessProbe") or not c.get("readinessProbe"):
                    problems.append(f"{role}/{c['name']}: probes missing")
            if role == "controller":
                psc = pod.get("securityContext", {})
                if psc.get("runAsNonRoot") is not True or psc.get("runAsUser", 0) == 0:
                    problems.append("controller: not runAsNonRoot with a non-zero UID")
            if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
                problems.append(f"{role}: host namespaces shared")
            host_paths = [v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v]
            if role == "controller" and host_paths:
                problems.append(f"controller: hostPath volumes {host_paths}")
            if role == "agent" and len(host_paths) != 1:
                problems.append(f"agent: expected exactly the libvirt socket directory, got {host_paths}")
    check(f"{label}: pod security (seccomp, read-only, no caps, non-root controller)", problems)


def controller_args_checks(docs, label, values):
    problems = []
    c = values["controller"]
    want = [
        "controller",
        f"--metrics-addr=0.0.0.0:{c['metricsPort']}",
        f"--log-format={c['logFormat']}",
        "--lease-namespace=$(POD_NAMESPACE)",
        f"--lease-name={c['leaseName']}",
        "--identity=$(POD_NAME)",
        f"--heartbeat-grace-seconds={c['heartbeatGraceSeconds']}",
        f"--max-migrations={c['maxMigrations']}",
        f"--max-migrations-per-node={c['maxMigrationsPerNode']}",
        f"--memory-reserve={c['memoryReserve']}",
    ] + c["extraArgs"]
    for d in of_kind(docs, "Deployment"):
        container = d["spec"]["template"]["spec"]["containers"][0]
        if container["args"] != want:
            problems.append(f"args {container['args']} != {want}")
        env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
        if env.get("POD_NAMESPACE") != "metadata.namespace" or env.get("POD_NAME") != "metadata.name":
            problems.append(f"POD_NAMESPACE/POD_NAME not from the downward API: {env}")
        if d["spec"]["replicas"] != c["replicas"]:
            problems.append(f"replicas {d['spec']['replicas']} != {c['replicas']}")
    pdbs = of_kind(docs, "PodDisruptionBudget")
    if (c["replicas"] > 1) != (len(pdbs) == 1):
        problems.append(f"{len(pdbs)} PodDisruptionBudgets with {c['replicas']} replica(s)")
    check(f"{label}: controller command line, replicas and PodDisruptionBudget", problems)


def metrics_checks(docs, label, values):
    problems = []
    services = of_kind(docs, "Service")
    if values["metrics"]["service"]["enabled"] and sorted(component(s) for s in services) != sorted(ROLES):
        problems.append(f"metrics Services for {[component(s) for s in services]}")
    monitors = of_kind(docs, "ServiceMonitor")
    if values["metrics"]["serviceMonitor"]["enabled"] != (len(monitors) == len(ROLES)):
        problems.append(f"{len(monitors)} ServiceMonitors with enabled={values['metrics']['serviceMonitor']['enabled']}")
    policies = of_kind(docs, "NetworkPolicy")
    if values["networkPolicy"]["enabled"] != (len(policies) == len(ROLES)):
        problems.append(f"{len(policies)} NetworkPolicies with enabled={values['networkPolicy']['enabled']}")
    check(f"{label}: metrics Services, ServiceMonitors, NetworkPolicies as configured", problems)


def all_values_set_every_option(defaults, all_values):
    problems = []
    for path, default in leaves(defaults):
        got = lookup(all_values, path)
        if got is KeyError:
            problems.append(f"{path}: not set in ci/all-values.yaml")
        elif got == default and not (isinstance(default, bool) and default):
            # `enabled: true` stays true (turning a role off would hide its objects).
            problems.append(f"{path}: ci/all-values.yaml keeps the default {default!r}")
    check("ci/all-values.yaml sets every value of values.yaml", problems)


def readme_documents_every_value(defaults):
    with open(os.path.join(CHART, "README.md")) as f:
        readme = f.read()
    missing = [path for path, _ in leaves(defaults) if f"`{path}`" not in readme]
    check("README.md documents every value", [f"{p}: not in README.md" for p in missing])


def main():
    default_docs, all_docs = load(sys.argv[1]), load(sys.argv[2])
    with open(os.path.join(CHART, "values.yaml")) as f:
        defaults = yaml.safe_load(f)
    with open(os.path.join(CHART, "ci", "all-values.yaml")) as f:
        overrides = yaml.safe_load(f)
    merged = merge(defaults, overrides)
    for docs, label, values in ((default_docs, "default", defaults), (all_docs, "all-values", merged)):
        rbac_checks(docs, label)
        service_account_checks(docs, label)
        security_checks(docs, label)
        controller_args_checks(docs, label, values)
        metrics_checks(docs, label, values)
    all_values_set_every_option(defaults, overrides)
    readme_documents_every_value(defaults)
    print(f"chart: {passes} passed, {failures} failed")
    return failures


def merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base.get(k), v) if k in base else v
        return out
    return over


if __name__ == "__main__":
    sys.exit(main())
