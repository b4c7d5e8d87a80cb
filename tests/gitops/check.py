"""How GitOps tools judge virtkube's resources, checked against the agent's own statuses.

The samples (tests/gitops/samples/*.json) are recorded from the real reconcilers by
controller/tests/status_samples.rs, as the in-memory API server stores the objects; where a
state needs the cluster controller, the test wrote the controller's part, and the sample's
`samples.virtkube.io/source` annotation says so. For each sample this checks:

- Argo CD: every health script in gitops/argocd/argocd-cm-health.yaml (one per kind, each
  identical to gitops/argocd/health.lua) run by a real Lua interpreter (`lua5.4`) gives the
  expected Healthy / Progressing / Degraded;
- kstatus (Flux's health checks, `kubectl wait`-style tools): the rules of
  sigs.k8s.io/cli-utils/pkg/kstatus, implemented below and cited rule by rule, give the
  expected Current / InProgress / Terminating;
- Flux's healthCheckExprs (gitops/flux/kustomizations.yaml), evaluated with cel-python, agree
  with Argo CD (Healthy -> Current, Progressing -> InProgress, Degraded -> Failed);
- every failure reason the agent's code writes (controller/src/agent) is classified, terminal
  (health.lua) or transient (TRANSIENT below), and Flux's expressions list the same terminal
  reasons as the Lua.

Run it with a Python that has PyYAML and cel-python, with lua5.4 on the PATH
(scripts/check-gitops sets that up). Prints one line per check and closes with
"gitops: N passed, N failed".
"""

import copy
import glob
import json
import os
import re
import subprocess
import sys

import celpy
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SAMPLES = os.path.join(ROOT, "tests", "gitops", "samples")
LUA = os.path.join(ROOT, "gitops", "argocd", "health.lua")
ARGO_CM = os.path.join(ROOT, "gitops", "argocd", "argocd-cm-health.yaml")
FLUX = os.path.join(ROOT, "gitops", "flux", "kustomizations.yaml")

# What each sample must be judged as: (Argo CD, kstatus). The samples are the agent's output;
# these are the test's claims about them.
EXPECTED = {
    "domain-ready": ("Healthy", "Current"),
    "domain-generation-not-observed": ("Progressing", "InProgress"),
    "domain-invalid-spec": ("Degraded", "InProgress"),
    "domain-host-path-refused": ("Degraded", "InProgress"),
    "domain-volume-missing": ("Progressing", "InProgress"),
    "domain-name-conflict": ("Degraded", "InProgress"),
    "domain-libvirt-unreachable": ("Progressing", "InProgress"),
    # Moves: approved by the controller (Pending), started by the holder (Running), failed in
    # libvirt, taken back by the user (Aborted), handed over to the target (Succeeded, the
    # target not converged yet), then converged on the target.
    "domain-move-pending": ("Progressing", "InProgress"),
    "domain-migrating": ("Progressing", "InProgress"),
    # After the failed migration the holder converges again and its planner refuses
    # spec.nodeName (another node) as InvalidSpec, a terminal reason: Degraded. That is what
    # the agent writes today (a defect reported to the Domain controller's owner: placement is
    # the claim's business, not the planner's); when it changes, this sample and this line do.
    "domain-migration-failed": ("Degraded", "InProgress"),
    "domain-migration-aborted": ("Healthy", "Current"),
    "domain-handed-over": ("Progressing", "InProgress"),
    "domain-migrated": ("Healthy", "Current"),
    # Written by the cluster controller (by the test in its place, see the samples'
    # annotation). kstatus sees neither: an unbound domain has no Ready condition and no
    # status.observedGeneration (kstatus: Current), and NodeUnreachable is not a condition
    # kstatus knows while the agent's last Ready=True stays. Argo CD (health.lua) and Flux's
    # healthCheckExprs see both.
    "domain-unschedulable": ("Progressing", "Current"),
    "domain-node-unreachable": ("Degraded", "Current"),
    "volume-ready": ("Healthy", "Current"),
    "volume-pool-missing": ("Progressing", "InProgress"),
    "network-ready": ("Healthy", "Current"),
    "network-invalid-spec": ("Degraded", "InProgress"),
    "storagepool-ready": ("Healthy", "Current"),
    "hypervisornode-ready": ("Healthy", "Current"),
    "hypervisornode-libvirt-unreachable": ("Degraded", "InProgress"),
    "hypervisornode-heartbeat-stale": ("Degraded", "InProgress"),
}
# Samples whose status only the cluster controller wrote (the agent never acts on an unbound
# domain): no Ready condition, no observedGeneration.
CONTROLLER_ONLY = {"domain-unschedulable"}
SOURCE = "samples.virtkube.io/source"
ARGO_TO_FLUX = {"Healthy": "Current", "Progressing": "InProgress", "Degraded": "Failed"}

# Ready=False reasons the agent writes that it retries on its own (Progressing). Every reason
# in controller/src/agent is either here or in health.lua's terminal table, never both, so a
# new reason fails this test until someone decides which it is.
TRANSIENT = {
    "Converging", "NotCreated", "NotActiveEverywhere", "LibvirtUnreachable",
    "VolumeMissing", "VolumeNotReady", "PoolMissing", "PoolNotRunning",
    "VolumeInUse", "NetworkInUse", "PoolInUse", "NodeNotConnected",
    "LibvirtError", "ReconcileFailed", "FinalizerFailed", "HandoverUnderway",
    "SourceNotReady", "PartitionTableFull",
}
AGENT = os.path.join(ROOT, "controller", "src", "agent")


def agent_reasons():
    """The condition reasons the agent's code writes for a failure or an unfinished state."""
    reasons = set()
    for path in glob.glob(os.path.join(AGENT, "*.rs")):
        text = open(path).read()
        reasons |= set(re.findall(r'reason:\s*"([A-Za-z]+)"', text))
        reasons |= set(re.findall(r'=> \("([A-Za-z]+)",', text))
        # The planner's notices (converge.rs): NoticeKind::Conflict => "NameConflict", …
        reasons |= set(re.findall(r'NoticeKind::[A-Za-z]+ => "([A-Za-z]+)"', text))
        reasons |= set(re.findall(r'_ => "([A-Za-z]+)",\n\s*\};\n\s*return Err\(Error::Unrealizable', text))
        reasons |= set(re.findall(r'Some\(\("([A-Za-z]+)"', text))
        # A disk pool's partition refusals (partition.rs): .map_err(refusal("PartitionMissing")).
        reasons |= set(re.findall(r'refusal\("([A-Za-z]+)"\)', text))
        # Ready=False reasons passed to the status builders' `set` as literals.
        for word in ("Converging", "NotCreated", "NotActiveEverywhere", "LibvirtUnreachable", "MigrationFailed"):
            if f'"{word}"' in text:
                reasons.add(word)
    return reasons


def lua_terminal(lua):
    """The reasons in health.lua's `terminal` table."""
    table = lua[lua.index("local terminal = {"):]
    table = table[: table.index("}")]
    return set(re.findall(r"^\s*([A-Za-z]+) = true,", table, re.M))

passed = 0
failed = 0


def check(name, problems):
    global passed, failed
    if problems:
        failed += 1
        print(f"gitops: {name:<66} FAIL")
        for p in problems:
            print(f"    {p}")
    else:
        passed += 1
        print(f"gitops: {name:<66} PASS")


# --- Argo CD: the Lua scripts, run by lua5.4 ---------------------------------------------------


def lua_literal(value):
    """A Lua table constructor for a JSON value (what Argo CD hands the script as `obj`)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid Lua string literal for this data
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"


def run_lua(script, obj):
    """Runs an Argo CD health script on `obj` with lua5.4; returns (status, message)."""
    program = (
        f"obj = {lua_literal(obj)}\n"
        "local hs = (function()\n" + script + "\nend)()\n"
        'io.write(hs.status, "\\n", hs.message or "", "\\n")\n'
    )
    out = subprocess.run(["lua5.4", "-"], input=program, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    status, message = (out.stdout.split("\n", 1) + [""])[:2]
    return status, message.strip()


# --- kstatus, as sigs.k8s.io/cli-utils/pkg/kstatus/status computes it for a custom resource ----


def kstatus(obj):
    """kstatus's Compute() for a kind without built-in rules:
    1. metadata.deletionTimestamp set -> Terminating (generic.go, checkGenericProperties);
    2. status.observedGeneration present and != metadata.generation -> InProgress
       (generic.go, checkGeneration: "LatestGenerationNotObserved");
    3. a Reconciling=True condition -> InProgress, a Stalled=True condition -> Failed
       (generic.go: the abnormal-true standard conditions);
    4. otherwise the Ready condition: True -> Current, False -> InProgress (README.md, "The
       Ready Condition": a Ready=False resource cannot be told doomed from progressing);
    5. no known condition -> Current (status.go, Compute).
    """
    meta = obj.get("metadata", {})
    status = obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    if "generation" in meta and "observedGeneration" in status:
        if status["observedGeneration"] != meta["generation"]:
            return "InProgress"
    conditions = status.get("conditions") or []
    for c in conditions:
        if c.get("type") == "Reconciling" and c.get("status") == "True":
            return "InProgress"
        if c.get("type") == "Stalled" and c.get("status") == "True":
            return "Failed"
    for c in conditions:
        if c.get("type") == "Ready":
            return "Current" if c.get("status") == "True" else "InProgress"
    return "Current"


# --- Flux healthCheckExprs, evaluated with cel-python ------------------------------------------


def flux_exprs():
    with open(FLUX) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    exprs = {}
    for d in docs:
        for e in d["spec"].get("healthCheckExprs", []):
            exprs[e["kind"]] = e
    return exprs


def flux_status(exprs, obj):
    """Flux's decision: inProgress, then failed, then current; none true -> InProgress. The
    object's top-level fields are the expression's variables."""
    env = celpy.Environment()
    activation = {k: celpy.json_to_cel(v) for k, v in obj.items()}
    for key, result in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if key not in exprs:
            continue
        program = env.program(env.compile(exprs[key]))
        value = program.evaluate(activation)
        if isinstance(value, Exception):
            raise RuntimeError(f"{key}: {value}")
        if bool(value):
            return result
    return "InProgress"


def main():
    with open(LUA) as f:
        lua = f.read()
    with open(ARGO_CM) as f:
        cm = yaml.safe_load(f)
    samples = {
        os.path.basename(p)[: -len(".json")]: json.load(open(p))
        for p in sorted(glob.glob(os.path.join(SAMPLES, "*.json")))
    }
    check(
        "every sample has an expectation and every expectation a sample",
        [f"{n}: no expectation" for n in samples if n not in EXPECTED]
        + [f"{n}: no sample (run the status_samples test)" for n in EXPECTED if n not in samples],
    )

    problems = []
    for name, obj in samples.items():
        source = obj["metadata"].get("annotations", {}).get(SOURCE, "")
        if not source.startswith("recorded"):
            problems.append(f"{name}: no {SOURCE} annotation saying how it was recorded")
        if name in CONTROLLER_ONLY and "controller's place" not in source:
            problems.append(f"{name}: listed as controller-only, not annotated as such")
    check("every sample says who wrote its status", problems)

    kinds = sorted({s["kind"] for s in samples.values()})
    scripts = {}
    problems = []
    for kind in kinds:
        key = f"resource.customizations.health.virtkube.io_{kind}"
        script = cm["data"].get(key)
        if script is None:
            problems.append(f"{key} missing")
        elif script.strip() != lua.strip():
            problems.append(f"{key} differs from gitops/argocd/health.lua")
        scripts[kind] = script or lua
    check("argocd-cm-health.yaml holds health.lua for every kind", problems)

    exprs = flux_exprs()
    terminal = lua_terminal(lua)
    written = agent_reasons()
    problems = [f"{r}: written by the agent, neither terminal (health.lua) nor transient (TRANSIENT)"
                for r in sorted(written - terminal - TRANSIENT)]
    problems += [f"{r}: both terminal and transient" for r in sorted(terminal & TRANSIENT)]
    problems += [f"{r}: classified but not written by the agent any more"
                 for r in sorted((terminal | TRANSIENT) - written)]
    check(f"every reason the agent writes ({len(written)}) is terminal or transient", problems)
    problems = []
    for kind, e in sorted(exprs.items()):
        # `c.reason in ['A', 'B']` (Domain, Volume) or `matches('^(A|B):')` (per-node kinds).
        in_list = re.search(r"c\.reason in\s*\[([^\]]*)\]", e["failed"])
        in_regex = re.search(r"\^\(([A-Za-z|]+)\)", e["failed"])
        listed = set()
        if in_list:
            listed |= set(re.findall(r"'([A-Za-z]+)'", in_list.group(1)))
        if in_regex:
            listed |= set(in_regex.group(1).split("|"))
        if listed != terminal:
            problems.append(f"{kind}: failed lists {sorted(listed ^ terminal)} unlike health.lua")
    check("Flux's failed expressions list exactly health.lua's terminal reasons", problems)
    for name, obj in samples.items():
        argo_want, kstatus_want = EXPECTED.get(name, (None, None))
        problems = []
        try:
            got, message = run_lua(scripts[obj["kind"]], obj)
            if got != argo_want:
                problems.append(f"Argo CD: {got} ({message}), expected {argo_want}")
        except RuntimeError as e:
            problems.append(f"lua5.4: {e}")
        got = kstatus(obj)
        if got != kstatus_want:
            problems.append(f"kstatus: {got}, expected {kstatus_want}")
        if obj["kind"] in exprs:
            try:
                got = flux_status(exprs[obj["kind"]], obj)
                if got != ARGO_TO_FLUX[argo_want]:
                    problems.append(f"Flux healthCheckExprs: {got}, expected {ARGO_TO_FLUX[argo_want]}")
            except RuntimeError as e:
                problems.append(f"Flux healthCheckExprs: {e}")
        check(f"{name}: Argo CD {argo_want}, kstatus {kstatus_want}", problems)

    # Variants of real samples a GitOps tool also meets.
    fresh = copy.deepcopy(samples["domain-ready"])
    del fresh["status"]
    problems = []
    got, _ = run_lua(scripts["Domain"], fresh)
    if got != "Progressing":
        problems.append(f"Argo CD: {got}, expected Progressing")
    check("a Domain without status yet: Argo CD Progressing", problems)

    # The migration alone (the generation already observed) keeps a Domain Progressing.
    migrating = copy.deepcopy(samples["domain-migrating"])
    migrating["metadata"]["generation"] = migrating["status"]["observedGeneration"]
    problems = []
    got, message = run_lua(scripts["Domain"], migrating)
    if got != "Progressing" or "migration" not in message:
        problems.append(f"Argo CD: {got} ({message}), expected Progressing for the migration")
    got = flux_status(exprs["Domain"], migrating)
    if got != "InProgress":
        problems.append(f"Flux healthCheckExprs: {got}, expected InProgress")
    check("a running migration alone: Argo CD Progressing, Flux InProgress", problems)

    # A spec edit no agent acted on yet: per-node kinds carry status.observedGeneration too.
    problems = []
    for name in ("network-ready", "storagepool-ready"):
        edited = copy.deepcopy(samples[name])
        edited["metadata"]["generation"] += 1
        if kstatus(edited) != "InProgress":
            problems.append(f"{name} edited: kstatus {kstatus(edited)}")
        got, _ = run_lua(scripts[edited["kind"]], edited)
        if got != "Progressing":
            problems.append(f"{name} edited: Argo CD {got}")
    check("a Network or StoragePool edited, not acted on: kstatus InProgress, Argo CD Progressing", problems)

    deleting = copy.deepcopy(samples["domain-ready"])
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    check(
        "a Domain being deleted: kstatus Terminating",
        [] if kstatus(deleting) == "Terminating" else [f"kstatus: {kstatus(deleting)}"],
    )

    # kstatus-compatible: every kind the agent reconciles carries status.observedGeneration
    # (Networks and StoragePools too: each node applies it with its entry) and a Ready
    # condition with its own observedGeneration, so kstatus sees an unobserved generation and
    # `kubectl wait --for=condition=Ready` works.
    problems = []
    for name, obj in samples.items():
        if name in CONTROLLER_ONLY:
            continue
        status = obj["status"]
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        if len(ready) != 1:
            problems.append(f"{name}: {len(ready)} Ready conditions")
            continue
        for field in ("type", "status", "reason", "message", "lastTransitionTime"):
            if field not in ready[0]:
                problems.append(f"{name}: Ready condition without {field}")
        if obj["kind"] != "HypervisorNode" and "observedGeneration" not in status:
            problems.append(f"{name}: no status.observedGeneration")
        if obj["kind"] != "HypervisorNode" and "observedGeneration" not in ready[0]:
            problems.append(f"{name}: Ready condition without observedGeneration")
    check("statuses are kstatus-compatible (Ready condition, observedGeneration)", problems)

    print(f"gitops: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
