#!/usr/bin/env python3
"""Validates smtpgate's Kubernetes manifests and Helm chart without a cluster.

    deploy/tests/validate-manifests.py [--smtpgate PATH/TO/smtpgate]

Checks, each reported as passed or failed, then a closing "N passed, M failed"
line; exits non-zero if anything failed:

1. deploy/kubernetes/daemonset.yaml: every object has apiVersion, kind and
   metadata.name; the DaemonSet has what enforcement needs (hostNetwork, the
   four capabilities and no others, not privileged, the bpffs and read-only
   cgroup hostPaths, a hostPath state dir, probes on a declared port, every
   mount backed by a volume and every volume mounted); the ConfigMap, Secret
   and ServiceAccount it names exist; the PodMonitor selects its pods.
2. The same structural checks on the chart's DaemonSet template, parsed after
   template actions are blanked out (no helm binary is needed for that), and
   the chart's values: every `.Values.x.y` a template uses exists in
   values.yaml, and every key in values.yaml is used by some template;
   values.yaml matches values.schema.json and the schema refuses a list of
   bad values (jsonschema); metrics.port is the one source of the ConfigMap's
   [metrics] listen, the container port, the Service and the monitors.
3. Every config shipped (deploy/config/smtpgate.toml, the ConfigMap's, the
   chart's `config` value) is valid TOML, its metrics port matches the pod's,
   its cgroup attach path is inside a mounted path; with --smtpgate (or
   $SMTPGATE_BIN) each also passes `smtpgate check-config`.
4. deploy/prometheus/rules.yml: every alert has a runbook_url to its section
   of runbooks.md.
5. If installed: `helm lint` through the helm-sdkpy wheel (Helm's own Go code,
   with default values, with every toggle flipped, with an IPv6 metrics
   listener, and with a value the schema refuses, which must fail), and
   schema validation
   through kubernetes-validate. Under CI=true a missing one is a failure, so
   CI cannot pass by silently skipping them. Install them with:
       pip install kubernetes-validate==1.37.0 cffi jsonschema
       pip install --no-deps --ignore-requires-python helm-sdkpy==0.1.32
   (helm-sdkpy declares Python >= 3.12 but works on 3.11, which is what the
   CI machines have.)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

try:
    import yaml
except ImportError:
    sys.exit("validate-manifests: needs PyYAML: apt-get install python3-yaml, or pip install pyyaml")

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT / "deploy/kubernetes/daemonset.yaml"
CHART = ROOT / "deploy/kubernetes/helm/smtpgate"
EXAMPLE_CONFIG = ROOT / "deploy/config/smtpgate.toml"
CONTAINERFILE = ROOT / "deploy/container/Containerfile"
RULES = ROOT / "deploy/prometheus/rules.yml"
RUNBOOKS = ROOT / "deploy/prometheus/runbooks.md"

CAPS = {"BPF", "NET_ADMIN", "PERFMON", "NET_BIND_SERVICE"}
# Sections the manifests already use but the agent may not accept yet. If
# check-config rejects one of these as unknown, it is stripped and the rest
# checked; a note says so. Once the agent knows them, they are checked too.
PENDING_SECTIONS = ("metrics", "control", "relay")
NAMESPACED = {"ServiceAccount", "ConfigMap", "Secret", "DaemonSet", "PodMonitor",
              "ServiceMonitor", "Service"}


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok   {name}")
        else:
            self.failed += 1
            print(f"FAIL {name}{': ' + detail if detail else ''}")
        return ok

    def skip(self, name: str, why: str) -> None:
        # Under CI a validator that cannot run is a failure, not a skip.
        if os.environ.get("CI"):
            self.check(name, False, f"cannot run under CI: {why}")
        else:
            self.skipped += 1
            print(f"skip {name}: {why}")


def dig(obj, *path, default=None):
    for key in path:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and isinstance(key, int) and key < len(obj):
            obj = obj[key]
        else:
            return default
    return obj


# --- DaemonSet and friends ------------------------------------------------------

def check_daemonset(r: Report, ds: dict, where: str, templated: bool = False) -> dict:
    """Structural checks; returns facts other checks cross-reference."""
    facts: dict = {"mounts": {}, "metrics_port": None}
    spec = dig(ds, "spec", "template", "spec", default={})
    sel = dig(ds, "spec", "selector", "matchLabels", default={})
    labels = dig(ds, "spec", "template", "metadata", "labels", default={})
    if not templated:  # in the chart both come from one helper; checked textually
        r.check(f"{where}: selector matches the pod labels",
                bool(sel) and all(labels.get(k) == v for k, v in sel.items()),
                f"selector {sel}, labels {labels}")
    r.check(f"{where}: hostNetwork", spec.get("hostNetwork") is True)
    r.check(f"{where}: dnsPolicy ClusterFirstWithHostNet",
            spec.get("dnsPolicy") == "ClusterFirstWithHostNet")
    if not templated:
        r.check(f"{where}: nodeSelector picks gateway nodes",
                dig(spec, "nodeSelector", "smtpgate.io/gateway") == "true")
    containers = spec.get("containers") or []
    if not r.check(f"{where}: exactly one container", len(containers) == 1):
        return facts
    c = containers[0]
    image = c.get("image", "")
    r.check(f"{where}: image has a tag", bool(re.fullmatch(r"\S+:\S+", image)), repr(image))
    r.check(f"{where}: runs `smtpgate run --config /etc/smtpgate/smtpgate.toml`",
            c.get("args") == ["run", "--config", "/etc/smtpgate/smtpgate.toml"], str(c.get("args")))

    sc = c.get("securityContext") or {}
    r.check(f"{where}: not privileged", sc.get("privileged") is False)
    r.check(f"{where}: no privilege escalation", sc.get("allowPrivilegeEscalation") is False)
    r.check(f"{where}: read-only root filesystem", sc.get("readOnlyRootFilesystem") is True)
    r.check(f"{where}: drops ALL capabilities", dig(sc, "capabilities", "drop") == ["ALL"])
    added = set(dig(sc, "capabilities", "add", default=[]))
    r.check(f"{where}: adds exactly {sorted(CAPS)}", added == CAPS, str(sorted(added)))
    r.check(f"{where}: seccomp RuntimeDefault", dig(sc, "seccompProfile", "type") == "RuntimeDefault")

    ports = {p.get("name"): p for p in c.get("ports") or []}
    r.check(f"{where}: declares a metrics port", "metrics" in ports)
    facts["metrics_port"] = dig(ports, "metrics", "containerPort")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = dig(c, probe, "httpGet", default={})
        r.check(f"{where}: {probe} GET {path} on the metrics port",
                get.get("path") == path and get.get("port") in ("metrics", facts["metrics_port"]),
                str(get))

    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounts = c.get("volumeMounts") or []
    names = [m.get("name") for m in mounts]
    r.check(f"{where}: every mount has a volume", set(names) <= set(volumes),
            f"missing {sorted(set(names) - set(volumes))}")
    r.check(f"{where}: every volume is mounted", set(volumes) <= set(names),
            f"unmounted {sorted(set(volumes) - set(names))}")
    paths = [m.get("mountPath") for m in mounts]
    r.check(f"{where}: mount paths are unique", len(paths) == len(set(paths)))
    by_path = {m.get("mountPath"): (m, volumes.get(m.get("name"), {})) for m in mounts}
    facts["mounts"] = by_path

    def host(path_in_pod):
        m, v = by_path.get(path_in_pod, ({}, {}))
        return m, dig(v, "hostPath", "path")

    m, hp = host("/sys/fs/bpf")
    r.check(f"{where}: host bpffs at /sys/fs/bpf, writable",
            (templated or hp == "/sys/fs/bpf") and "hostPath" in by_path.get("/sys/fs/bpf", ({}, {}))[1]
            and not m.get("readOnly"), f"hostPath {hp}, mount {m}")
    cg = [(p, mv) for p, mv in by_path.items() if "hostPath" in mv[1]
          and (templated or dig(mv[1], "hostPath", "path") == "/sys/fs/cgroup")
          and "cgroup" in p]
    r.check(f"{where}: host cgroup tree mounted read-only",
            len(cg) == 1 and cg[0][1][0].get("readOnly") is True, str(cg))
    facts["cgroup_mount"] = cg[0][0] if cg else None
    _, state = by_path.get("/var/lib/smtpgate", ({}, {}))
    r.check(f"{where}: /var/lib/smtpgate (spool) is a hostPath, not an emptyDir", "hostPath" in state)
    cfg = by_path.get("/etc/smtpgate", ({}, {}))
    r.check(f"{where}: /etc/smtpgate mounted read-only", cfg[0].get("readOnly") is True)
    subpaths = [m for m in mounts if m.get("subPath")]
    r.check(f"{where}: no subPath mounts (they never see ConfigMap/Secret updates)", not subpaths)
    facts["config_sources"] = dig(cfg[1], "projected", "sources", default=[])
    return facts


def check_raw(r: Report, smtpgate: str | None) -> None:
    where = RAW.relative_to(ROOT)
    docs = [d for d in yaml.safe_load_all(RAW.read_text()) if d]
    for i, d in enumerate(docs):
        r.check(f"{where}[{i}]: apiVersion, kind, metadata.name",
                all([d.get("apiVersion"), d.get("kind"), dig(d, "metadata", "name")]))
        if d.get("kind") in NAMESPACED:
            r.check(f"{where}[{i}] {d.get('kind')}: in namespace smtpgate",
                    dig(d, "metadata", "namespace") == "smtpgate")
    kinds = {}
    for d in docs:
        kinds.setdefault(d.get("kind"), []).append(d)
    for kind in ("Namespace", "ServiceAccount", "ConfigMap", "Secret", "DaemonSet", "PodMonitor"):
        r.check(f"{where}: has one {kind}", len(kinds.get(kind, [])) == 1)
    ns = (kinds.get("Namespace") or [{}])[0]
    r.check(f"{where}: namespace enforces the privileged pod security level",
            dig(ns, "metadata", "labels", "pod-security.kubernetes.io/enforce") == "privileged")
    ds = (kinds.get("DaemonSet") or [None])[0]
    if ds is None:
        return
    facts = check_daemonset(r, ds, f"{where} DaemonSet")
    spec = dig(ds, "spec", "template", "spec", default={})
    sa = dig(kinds, "ServiceAccount", 0, "metadata", "name")
    r.check(f"{where}: DaemonSet uses the ServiceAccount", spec.get("serviceAccountName") == sa)
    cm = dig(kinds, "ConfigMap", 0, default={})
    secret = dig(kinds, "Secret", 0, default={})
    srcs = facts.get("config_sources") or []
    cm_ref = [s["configMap"] for s in srcs if "configMap" in s]
    sec_ref = [s["secret"] for s in srcs if "secret" in s]
    users_ref = [x for x in sec_ref if any(i.get("path") == "users.toml" for i in x.get("items", []))]
    tls_ref = [x for x in sec_ref if any(i.get("path") == "relay.key" for i in x.get("items", []))]
    r.check(f"{where}: config volume projects the ConfigMap's smtpgate.toml",
            len(cm_ref) == 1 and cm_ref[0].get("name") == dig(cm, "metadata", "name")
            and "smtpgate.toml" in (cm.get("data") or {}))
    r.check(f"{where}: config volume projects the Secret's users.toml",
            len(users_ref) == 1 and users_ref[0].get("name") == dig(secret, "metadata", "name")
            and "users.toml" in (secret.get("stringData") or secret.get("data") or {}))
    r.check(f"{where}: relay TLS Secret projected as relay.crt/relay.key, optional",
            len(tls_ref) == 1 and tls_ref[0].get("optional") is True)
    users = (secret.get("stringData") or {}).get("users.toml")
    if users is not None:
        try:
            tomllib.loads(users)
            r.check(f"{where}: Secret users.toml is valid TOML", True)
        except tomllib.TOMLDecodeError as e:
            r.check(f"{where}: Secret users.toml is valid TOML", False, str(e))
    pm = dig(kinds, "PodMonitor", 0, default={})
    pod_labels = dig(ds, "spec", "template", "metadata", "labels", default={})
    pm_sel = dig(pm, "spec", "selector", "matchLabels", default={})
    r.check(f"{where}: PodMonitor selects the DaemonSet's pods",
            bool(pm_sel) and all(pod_labels.get(k) == v for k, v in pm_sel.items()))
    r.check(f"{where}: PodMonitor scrapes the metrics port at /metrics",
            dig(pm, "spec", "podMetricsEndpoints", 0, "port") == "metrics"
            and dig(pm, "spec", "podMetricsEndpoints", 0, "path") == "/metrics")
    check_config(r, f"{where} ConfigMap smtpgate.toml", cm.get("data", {}).get("smtpgate.toml", ""),
                 smtpgate, facts)
    schema_validate(r, where, docs)


# --- Helm chart -----------------------------------------------------------------

ACTION = re.compile(r"{{-?(.*?)-?}}", re.S)


def skeleton(text: str) -> str:
    """The template's YAML with template actions blanked: a line that is only
    an action goes; an inline action becomes a placeholder scalar. Both sides
    of every `if` are kept (the templates use no `else`)."""
    out = []
    for line in text.splitlines():
        stripped = ACTION.sub("", line).strip()
        if not stripped and "{{" in line:
            continue
        out.append(ACTION.sub("PLACEHOLDER", line))
    return "\n".join(out)


def values_paths(values, prefix=()):
    if isinstance(values, dict) and values:
        for k, v in values.items():
            yield from values_paths(v, prefix + (k,))
    else:
        yield prefix


def check_chart(r: Report, smtpgate: str | None) -> None:
    where = CHART.relative_to(ROOT)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    r.check(f"{where}/Chart.yaml: apiVersion v2, name, semver version, appVersion",
            chart.get("apiVersion") == "v2" and chart.get("name") == "smtpgate"
            and bool(re.fullmatch(r"\d+\.\d+\.\d+(-[\w.]+)?", str(chart.get("version"))))
            and bool(chart.get("appVersion")))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    templates = sorted((CHART / "templates").iterdir())
    refs = set()
    for t in templates:
        for m in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", t.read_text()):
            refs.add(tuple(m.group(1)[1:].split(".")))
    missing = sorted(".".join(p) for p in refs if dig(values, *p, default=KeyError) is KeyError)
    r.check(f"{where}: every .Values reference exists in values.yaml", not missing, ", ".join(missing))
    unused = sorted(".".join(p) for p in values_paths(values)
                    if not any(p[:len(ref)] == ref for ref in refs))
    r.check(f"{where}: every values.yaml key is used by a template", not unused, ", ".join(unused))

    for t in templates:
        if t.suffix != ".yaml":
            continue
        try:
            docs = [d for d in yaml.safe_load_all(skeleton(t.read_text())) if d]
            ok = all(d.get("apiVersion") and d.get("kind") and dig(d, "metadata", "name") for d in docs)
            r.check(f"{where}/templates/{t.name}: YAML skeleton parses, has apiVersion/kind/name",
                    ok and len(docs) == 1)
        except yaml.YAMLError as e:
            r.check(f"{where}/templates/{t.name}: YAML skeleton parses", False, str(e).replace("\n", " "))
            continue
        if docs and docs[0].get("kind") == "DaemonSet":
            ds = docs[0]
            facts = check_daemonset(r, ds, f"{where}/templates/{t.name}", templated=True)
            ann = dig(ds, "spec", "template", "metadata", "annotations", default={})
            r.check(f"{where}/templates/{t.name}: checksum/config annotation", "checksum/config" in ann)
            ds_text = t.read_text()
            r.check(f"{where}/templates/{t.name}: selector and pod labels from smtpgate.selectorLabels",
                    re.search(r"matchLabels:\n\s+{{- include \"smtpgate.selectorLabels\" \. \| nindent 6 }}", ds_text)
                    is not None and re.search(r"labels:\n\s+{{- include \"smtpgate.selectorLabels\" \. \| nindent 8 }}",
                                              ds_text) is not None)
            r.check(f"{where}/templates/{t.name}: metrics port from .Values.metrics.port",
                    "containerPort: {{ .Values.metrics.port }}" in ds_text)
            facts["metrics_port"] = values.get("metrics", {}).get("port")
            check_config(r, f"{where} ConfigMap (values.config + [metrics] from metrics.*)",
                         chart_config(values), smtpgate, facts)
    check_metrics_port(r, where, values)
    check_schema(r, where, values)
    for flag, template in (("podMonitor", "podmonitor.yaml"), ("serviceMonitor", "servicemonitor.yaml")):
        text = (CHART / "templates" / template).read_text()
        r.check(f"{where}: {template} is behind monitoring.{flag}.enabled",
                text.lstrip().startswith(f"{{{{- if .Values.monitoring.{flag}.enabled }}}}"))
    helm_lint(r, values)


CONFIGMAP_LISTEN = 'listen = "{{ $addr }}:{{ .Values.metrics.port }}"'


def chart_config(values: dict) -> str:
    """The ConfigMap's smtpgate.toml as templates/configmap.yaml writes it
    (checked textually in check_metrics_port): values.config, then a
    [metrics] table from metrics.listenAddress and metrics.port."""
    m = values.get("metrics", {})
    addr = str(m.get("listenAddress", ""))
    if ":" in addr:
        addr = f"[{addr}]"
    return f'{values.get("config", "")}\n[metrics]\nlisten = "{addr}:{m.get("port")}"\n'


def check_metrics_port(r: Report, where, values: dict) -> None:
    """One value, metrics.port, for the listener in the ConfigMap, the
    container port (checked with the DaemonSet), the Service and the
    monitors (by the port's name)."""
    t = {n: (CHART / "templates" / n).read_text()
         for n in ("configmap.yaml", "service.yaml", "servicemonitor.yaml", "podmonitor.yaml")}
    r.check(f"{where}/templates/configmap.yaml: [metrics] listen from metrics.listenAddress and metrics.port",
            "[metrics]" in t["configmap.yaml"] and CONFIGMAP_LISTEN in t["configmap.yaml"])
    # The template refuses a [metrics] of the user's own; its regex (a Go
    # string literal) must catch what it claims to and nothing else.
    m = re.search(r'regexMatch "((?:[^"\\]|\\.)*)" \.Values\.config', t["configmap.yaml"])
    pattern = m and re.sub(r"\\(.)", r"\1", m.group(1))
    bad = ['[metrics]\nlisten = "0.0.0.0:1"', 'mode = "audit"\n  [ metrics ]\n', "[metrics.x]\n",
           'metrics.listen = "0.0.0.0:1"', "metrics = { enabled = false }"]
    good = [values.get("config", ""), '[relay]\n# metrics: see the chart\nenabled = true\n']
    r.check(f"{where}/templates/configmap.yaml: refuses a [metrics] of values.config's own",
            bool(pattern) and all(re.search(pattern, b) for b in bad)
            and not any(re.search(pattern, g) for g in good), f"pattern {pattern!r}")
    r.check(f"{where}: values.config has no [metrics] (the chart writes it)",
            bool(pattern) and not re.search(pattern, values.get("config", "")))
    r.check(f"{where}/templates/service.yaml: port from .Values.metrics.port, targetPort by name",
            "port: {{ .Values.metrics.port }}" in t["service.yaml"] and "targetPort: metrics" in t["service.yaml"])
    for n in ("servicemonitor.yaml", "podmonitor.yaml"):
        r.check(f"{where}/templates/{n}: scrapes the port named metrics",
                re.search(r"- port: metrics\n", t[n]) is not None)


# Values that values.schema.json must refuse, each with why it matters.
BAD_VALUES = [
    ("a misspelt top-level key", lambda v: v.update(logLevle="debug")),
    ("a misspelt nested key", lambda v: v["monitoring"]["podMonitor"].update(enabeld=True)),
    ("the metrics port as a string", lambda v: v["metrics"].update(port="9725")),
    ("a port above 65535", lambda v: v["metrics"].update(port=97250)),
    ("an unknown pull policy", lambda v: v["image"].update(pullPolicy="Sometimes")),
    ("a relative host path", lambda v: v["hostPaths"].update(state="var/lib/smtpgate")),
    ("a scrape interval without a unit", lambda v: v["monitoring"]["serviceMonitor"].update(interval="30")),
    ("a [metrics] table in config", lambda v: v.update(config=v["config"] + '\n[metrics]\nlisten = "0.0.0.0:1"\n')),
]


def check_schema(r: Report, where, values: dict) -> None:
    schema_path = CHART / "values.schema.json"
    if not r.check(f"{where}/values.schema.json exists", schema_path.exists()):
        return
    import json
    schema = json.loads(schema_path.read_text())
    try:
        import jsonschema
    except ImportError:
        r.skip(f"{where}: values.schema.json (jsonschema)", "python3 jsonschema is not installed")
        return
    validator = jsonschema.Draft7Validator(schema)
    r.check(f"{where}/values.schema.json: a valid draft-07 schema",
            not list(jsonschema.Draft7Validator(jsonschema.Draft7Validator.META_SCHEMA).iter_errors(schema)))
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(values)]
    r.check(f"{where}: values.yaml matches values.schema.json", not errors, "; ".join(errors))
    for what, mutate in BAD_VALUES:
        v = copy.deepcopy(values)
        mutate(v)
        r.check(f"{where}/values.schema.json refuses {what}", not validator.is_valid(v))


def helm_lint(r: Report, values: dict) -> None:
    try:
        import helm_sdkpy
    except ImportError:
        r.skip("helm lint (helm-sdkpy)", "helm-sdkpy is not installed (see this script's docstring)")
        return
    flipped = copy.deepcopy(values)
    flipped["monitoring"]["podMonitor"]["enabled"] = True
    flipped["monitoring"]["serviceMonitor"]["enabled"] = True
    flipped["relayUsers"]["existingSecret"] = "my-users"
    flipped["appArmorUnconfined"] = False
    flipped["serviceAccount"]["create"] = False
    flipped["podAnnotations"] = {"example.com/a": "b"}
    flipped["podLabels"] = {"team": "mail"}
    flipped["imagePullSecrets"] = [{"name": "regcred"}]
    # Helm validates values against values.schema.json itself: a value the
    # schema refuses must fail the lint, not only the Python check above.
    bad = copy.deepcopy(values)
    bad["metrics"]["port"] = "9725"
    for name, vals in (("default values", None), ("every toggle flipped", flipped),
                       ("IPv6 metrics listener", {**copy.deepcopy(values),
                                                  "metrics": {"port": 9725, "listenAddress": "::"}}),
                       ("refuses metrics.port as a string", bad)):
        with tempfile.TemporaryDirectory() as tmp:
            chart = Path(tmp) / "smtpgate"
            shutil.copytree(CHART, chart)
            if vals is not None:
                (chart / "values.yaml").write_text(yaml.safe_dump(vals, sort_keys=False))
            try:
                config = helm_sdkpy.Configuration()
                result = asyncio.run(helm_sdkpy.Lint(config).run(str(chart)))
            except Exception as e:  # noqa: BLE001 - any failure of the linter is a failure
                r.check(f"helm lint ({name})", False, f"{type(e).__name__}: {e}")
                continue
            # Severity 3 is an error, 2 a warning; the Go error text does not
            # survive the JSON bridge, only the file it was found in.
            errs = [m for m in result.get("Messages") or [] if m.get("Severity", 0) >= 2]
            if vals is bad:
                r.check(f"helm lint ({name})",
                        any(m.get("Path") == "values.yaml" and m.get("Severity") == 3 for m in errs),
                        f"lint passed values the schema forbids: {result}")
                continue
            r.check(f"helm lint ({name})", not errs and not result.get("Errors"),
                    "; ".join(f"severity {m['Severity']} in {m['Path']} (run `helm lint` for the text)"
                              for m in errs))


# --- Configs --------------------------------------------------------------------

def check_config(r: Report, where: str, text: str, smtpgate: str | None, facts: dict | None) -> None:
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        r.check(f"{where}: valid TOML", False, str(e))
        return
    r.check(f"{where}: valid TOML", True)
    if facts is not None:
        listen = dig(cfg, "metrics", "listen")
        port = int(listen.rsplit(":", 1)[1]) if listen else None
        r.check(f"{where}: [metrics] listen port matches the pod's metrics port",
                port is not None and port == facts.get("metrics_port"),
                f"listen {listen!r}, pod port {facts.get('metrics_port')}")
        relay = cfg.get("relay", {})
        # Left out, they are the relay's defaults (agent/paths), which are
        # these.
        users_file = relay.get("users_file", "/etc/smtpgate/users.toml")
        spool_dir = str(relay.get("spool_dir", "/var/lib/smtpgate/spool"))
        r.check(f"{where}: [relay] users_file and spool_dir are where the pod mounts them",
                users_file == "/etc/smtpgate/users.toml" and spool_dir.startswith("/var/lib/smtpgate/"),
                f"users_file {relay.get('users_file')!r}, spool_dir {relay.get('spool_dir')!r}")
        cg_mount = facts.get("cgroup_mount")
        for a in cfg.get("attach", []):
            if a.get("hook") == "cgroup":
                path = a.get("path")
                r.check(f"{where}: cgroup attach path {path} is inside the host cgroup mount",
                        bool(path and cg_mount and (path == cg_mount or path.startswith(cg_mount + "/"))),
                        f"mount {cg_mount}")
    if not smtpgate:
        r.skip(f"{where}: smtpgate check-config", "no --smtpgate binary given")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        res = subprocess.run([smtpgate, "check-config", f.name], capture_output=True, text=True)
        out = (res.stdout + res.stderr).strip()
        pending = [s for s in PENDING_SECTIONS if s in cfg and f"unknown field `{s}`" in out]
        if res.returncode != 0 and pending:
            stripped = {k: v for k, v in cfg.items() if k not in PENDING_SECTIONS}
            print(f"note {where}: this agent does not accept {pending} yet; checking the rest")
            f.seek(0)
            f.truncate()
            f.write(toml_dump(stripped))
            f.flush()
            res = subprocess.run([smtpgate, "check-config", f.name], capture_output=True, text=True)
            out = (res.stdout + res.stderr).strip()
        r.check(f"{where}: smtpgate check-config", res.returncode == 0, out)


def toml_dump(cfg: dict) -> str:
    """Just enough TOML for smtpgate's config shape (scalars, arrays, tables,
    arrays of tables), to write a config back after stripping sections."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(type(v))
    lines, tables = [], []
    for k, v in cfg.items():
        if isinstance(v, dict):
            tables.append((f"[{k}]", v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.extend((f"[[{k}]]", x) for x in v)
        else:
            lines.append(f"{k} = {val(v)}")
    for header, body in tables:
        lines.append(header)
        lines.extend(f"{k} = {val(v)}" for k, v in body.items())
    return "\n".join(lines) + "\n"


def schema_validate(r: Report, where, docs: list) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        r.skip(f"{where}: Kubernetes schemas (kubernetes-validate)", "kubernetes-validate is not installed")
        return
    for d in docs:
        name = f"{where}: {d.get('kind')}/{dig(d, 'metadata', 'name')} matches the Kubernetes 1.30 schema"
        if "monitoring.coreos.com" in d.get("apiVersion", ""):
            # CRDs are not in the built-in schemas; the structural checks above cover it.
            continue
        try:
            kubernetes_validate.validate(d, "1.30.0", strict=True)
            r.check(name, True)
        except Exception as e:  # noqa: BLE001 - the library raises several types
            r.check(name, False, str(e).splitlines()[0])


def check_containerfile(r: Report) -> None:
    """No container engine runs in CI, so at least: stages referenced by
    COPY --from exist, files copied from the context exist, and the image
    runs the same command as the DaemonSet."""
    where = CONTAINERFILE.relative_to(ROOT)
    lines, cont = [], ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            cont += line[:-1] + " "
            continue
        lines.append(cont + line)
        cont = ""
    stages = [m.group(1) for l in lines if (m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", l, re.I))]
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    r.check(f"{where}: multi-stage, final stage from debian:bookworm-slim",
            len(froms) >= 2 and "debian:bookworm-slim" in froms[-1])
    for l in lines:
        if not l.upper().startswith("COPY "):
            continue
        m = re.search(r"--from=(\S+)", l)
        args = [a for a in l.split()[1:] if not a.startswith("--")]
        if m:
            r.check(f"{where}: COPY --from={m.group(1)} names a stage", m.group(1) in stages)
        elif args[:-1] != ["."]:
            for src in args[:-1]:
                r.check(f"{where}: COPY source {src} exists", (ROOT / src).exists())
    entry = next((l for l in lines if l.startswith("ENTRYPOINT")), "")
    cmd = next((l for l in lines if l.startswith("CMD")), "")
    r.check(f"{where}: ENTRYPOINT smtpgate, CMD run --config /etc/smtpgate/smtpgate.toml",
            '"/usr/bin/smtpgate"' in entry and '"run", "--config", "/etc/smtpgate/smtpgate.toml"' in cmd)
    bootstrap = ROOT / "xtask/src/bootstrap.rs"
    m = re.search(r'BPF_LINKER_VERSION: &str = "([^"]+)"', bootstrap.read_text()) if bootstrap.exists() else None
    r.check(f"{where}: bpf-linker version matches xtask bootstrap's",
            m is not None and f"BPF_LINKER_VERSION={m.group(1)}" in CONTAINERFILE.read_text(),
            m.group(1) if m else "no BPF_LINKER_VERSION in xtask/src/bootstrap.rs")


def check_alerts(r: Report) -> None:
    """Every alert links its runbook the way Prometheus tooling expects
    (a `runbook_url` annotation, not free text), to a section of
    runbooks.md that exists."""
    where = RULES.relative_to(ROOT)
    rules = [rule for g in yaml.safe_load(RULES.read_text())["groups"] for rule in g["rules"]
             if "alert" in rule]
    # GitHub's anchors: the heading, lower-cased.
    anchors = {m.group(1).lower() for m in re.finditer(r"^## (\S+)\s*$", RUNBOOKS.read_text(), re.M)}
    r.check(f"{where}: has alerts", bool(rules))
    for rule in rules:
        ann = rule.get("annotations", {})
        url = ann.get("runbook_url", "")
        name = rule["alert"]
        r.check(f"{where}: {name} has runbook_url, no free-text runbook",
                bool(url) and "runbook" not in ann, str(sorted(ann)))
        page, _, anchor = url.partition("#")
        r.check(f"{where}: {name}'s runbook_url points at its section of {RUNBOOKS.name}",
                page.endswith("/deploy/prometheus/runbooks.md") and anchor == name.lower()
                and anchor in anchors, url)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smtpgate", default=os.environ.get("SMTPGATE_BIN"),
                   help="smtpgate binary for check-config (default: $SMTPGATE_BIN)")
    args = p.parse_args()
    r = Report()
    check_config(r, str(EXAMPLE_CONFIG.relative_to(ROOT)), EXAMPLE_CONFIG.read_text(), args.smtpgate, None)
    check_raw(r, args.smtpgate)
    check_chart(r, args.smtpgate)
    check_containerfile(r)
    check_alerts(r)
    skipped = f", {r.skipped} skipped" if r.skipped else ""
    print(f"validate-manifests: {r.passed} passed, {r.failed} failed{skipped}")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
