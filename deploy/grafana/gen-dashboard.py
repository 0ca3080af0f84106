#!/usr/bin/env python3
"""Generates smtpgate.json (the Grafana dashboard): edit this, then run
`deploy/grafana/gen-dashboard.py`. Metric names must exist in
agent/src/metrics/names.rs; xtask/tests/metrics.rs checks them against a
real scrape."""
import json
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job",instance=~"$instance"'
DENIED = 'verdict=~"dropped|rejected|redirected|audited"'
panels = []
pid = [0]
y = [0]
def nid():
    pid[0] += 1
    return pid[0]
def row(title):
    panels.append({"type": "row", "title": title, "id": nid(), "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y[0]}, "panels": []})
    y[0] += 1
def place(w, h, x):
    return {"h": h, "w": w, "x": x, "y": y[0]}
def ts(title, targets, x, w=12, h=8, unit="short", desc="", stack=False):
    p = {"type": "timeseries", "title": title, "id": nid(), "datasource": DS,
         "description": desc, "gridPos": place(w, h, x),
         "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10, "stacking": {"mode": "normal" if stack else "none"}}}, "overrides": []},
         "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]}, "tooltip": {"mode": "multi"}},
         "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l} for i, (e, l) in enumerate(targets)]}
    panels.append(p)
def stat(title, targets, x, w=6, h=4, unit="short", desc="", mappings=None, thresholds=None, instant=True):
    p = {"type": "stat", "title": title, "id": nid(), "datasource": DS, "description": desc,
         "gridPos": place(w, h, x),
         "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                      "thresholds": thresholds or {"mode": "absolute", "steps": [{"color": "green", "value": None}]}}, "overrides": []},
         "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "background", "graphMode": "none", "textMode": "auto"},
         "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l, "instant": instant} for i, (e, l) in enumerate(targets)]}
    panels.append(p)
def table(title, expr, x, w=12, h=8, desc="", exclude=()):
    ex = {k: True for k in ("Time", "__name__", "job") + tuple(exclude)}
    p = {"type": "table", "title": title, "id": nid(), "datasource": DS, "description": desc,
         "gridPos": place(w, h, x),
         "fieldConfig": {"defaults": {}, "overrides": []},
         "options": {"showHeader": True},
         "transformations": [{"id": "labelsToFields", "options": {}}, {"id": "organize", "options": {"excludeByName": ex}}],
         "targets": [{"refId": "A", "datasource": DS, "expr": expr, "instant": True, "format": "table", "legendFormat": ""}]}
    panels.append(p)
def nl(h):
    y[0] += h

RI = "$__rate_interval"
updown = [{"type": "value", "options": {"0": {"text": "NOT READY", "color": "red"}, "1": {"text": "READY", "color": "green"}}}]
row("Agent")
stat("Ready", [(f'min(smtpgate_ready{{{SEL}}})', "")], 0, desc="1 when every gateway selected has its programs attached and maps loaded.",
     mappings=updown, thresholds={"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]})
stat("Attach points down", [(f'count(smtpgate_attachment_up{{{SEL}}} == 0) or vector(0)', "")], 6,
     thresholds={"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}]})
stat("Allowlist entries", [(f'sum by (family) (smtpgate_allowlist_entries{{{SEL}}})', "{{family}}")], 12)
stat("Config reload failures (24h)", [(f'sum(increase(smtpgate_config_reloads_total{{{SEL},result="failure"}}[24h]))', "")], 18,
     thresholds={"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "orange", "value": 1}]})
nl(4)
table("Attach points", f'smtpgate_attachment_up{{{SEL}}}', 0, desc="Value 1: program attached; 0: configured but not attached.")
table("Loaded programs", f'smtpgate_program_info{{{SEL}}}', 12, w=6, desc="Kernel program ids: `bpftool prog show id <id>` on the gateway.", exclude=("Value",))
table("Versions", f'smtpgate_build_info{{{SEL}}}', 18, w=6, exclude=("Value",))
nl(8)
ts("Last config reload", [(f'time() - smtpgate_config_last_reload_timestamp_seconds{{{SEL}}} > 0 and smtpgate_config_last_reload_timestamp_seconds{{{SEL}}} > 0', "{{instance}}")], 0, w=12, h=6, unit="s",
   desc="Time since the last reload attempt (none plotted if never reloaded).")
ts("Config reloads", [(f'sum by (result) (increase(smtpgate_config_reloads_total{{{SEL}}}[{RI}]))', "{{result}}")], 12, w=12, h=6)
nl(6)

row("Port-25 egress")
ts("Connection attempts: allowed vs denied", [
    (f'sum(rate(smtpgate_egress_connections_total{{{SEL},verdict="allowed"}}[{RI}]))', "allowed"),
    (f'sum(rate(smtpgate_egress_connections_total{{{SEL},{DENIED}}}[{RI}]))', "denied"),
], 0, unit="cps", desc="SYNs without ACK, retransmits included (a dropped connect() counts about 3). Denied includes audited (would be denied in enforce mode).")
ts("Denied attempts by verdict", [(f'sum by (verdict) (rate(smtpgate_egress_connections_total{{{SEL},{DENIED}}}[{RI}]))', "{{verdict}}")], 12, unit="cps", stack=True)
nl(8)
ts("Denied attempts by reason", [(f'sum by (reason) (rate(smtpgate_egress_connections_total{{{SEL},{DENIED}}}[{RI}]))', "{{reason}}")], 0, unit="cps", stack=True)
ts("Denied attempts by family", [(f'sum by (family) (rate(smtpgate_egress_connections_total{{{SEL},{DENIED}}}[{RI}]))', "{{family}}")], 12, unit="cps", stack=True)
nl(8)
ts("Denied packets by reason", [(f'sum by (reason) (rate(smtpgate_egress_packets_total{{{SEL},{DENIED}}}[{RI}]))', "{{reason}}")], 0, unit="pps", stack=True,
   desc="Packets, not connections: fragment and header-chain evasion attempts mostly carry no SYN.")
ts("Packets by verdict", [(f'sum by (verdict) (rate(smtpgate_egress_packets_total{{{SEL}}}[{RI}]))', "{{verdict}}")], 12, unit="pps",
   desc="passed: non-first fragments whose first fragment got the verdict.")
nl(8)
ts("Denied attempts by gateway", [(f'sum by (instance) (rate(smtpgate_egress_connections_total{{{SEL},{DENIED}}}[{RI}]))', "{{instance}}")], 0, w=24, unit="cps",
   desc="Which gateway sees the refused attempts. The client behind it: `smtpgate top` on that gateway (addresses are never metric labels).")
nl(8)

row("Submission relay")
ts("Sessions", [
    (f'sum(smtpgate_relay_sessions_active{{{SEL}}})', "active"),
    (f'sum(rate(smtpgate_relay_sessions_total{{{SEL}}}[{RI}])) * 60', "new / min"),
    (f'sum(rate(smtpgate_relay_sessions_refused_total{{{SEL}}}[{RI}])) * 60', "refused / min"),
], 0, w=8)
ts("AUTH", [(f'sum by (result) (rate(smtpgate_relay_auth_total{{{SEL}}}[{RI}])) * 60', "{{result}} / min")], 8, w=8)
ts("Queue length", [(f'sum by (instance) (smtpgate_relay_queue_length{{{SEL}}})', "{{instance}}")], 16, w=8)
nl(8)
ts("Messages by outcome", [
    (f'sum by (outcome) (rate(smtpgate_relay_messages_total{{{SEL}}}[{RI}])) * 60', "{{outcome}} / min"),
    (f'sum(rate(smtpgate_relay_recipients_delivered_total{{{SEL}}}[{RI}])) * 60', "recipients delivered / min"),
], 0, w=8, desc="deferred counts delivery attempts that ended in a retry.")
ts("Delivery latency", [
    (f'histogram_quantile(0.5, sum by (le) (rate(smtpgate_relay_delivery_duration_seconds_bucket{{{SEL}}}[{RI}])))', "p50"),
    (f'histogram_quantile(0.95, sum by (le) (rate(smtpgate_relay_delivery_duration_seconds_bucket{{{SEL}}}[{RI}])))', "p95"),
    (f'sum(rate(smtpgate_relay_delivery_duration_seconds_sum{{{SEL}}}[{RI}])) / sum(rate(smtpgate_relay_delivery_duration_seconds_count{{{SEL}}}[{RI}]))', "mean"),
], 8, w=8, unit="s", desc="Queue entry to final delivery.")
ts("Spool group commit", [
    (f'sum(rate(smtpgate_relay_spool_committed_messages_total{{{SEL}}}[{RI}])) / sum(rate(smtpgate_relay_spool_commits_total{{{SEL}}}[{RI}]))', "messages per directory sync"),
], 16, w=8)
nl(8)

dash = {
    "title": "smtpgate",
    "uid": "smtpgate",
    "description": "Port-25 egress policy (eBPF) and submission relay on gateway hosts. Metrics: agent/src/metrics/names.rs.",
    "tags": ["smtpgate", "smtp", "ebpf"],
    "timezone": "utc",
    "editable": True,
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "graphTooltip": 1,
    "annotations": {"list": [
        {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
         "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"},
        {"datasource": DS, "enable": True, "iconColor": "orange", "name": "Config reloads",
         "expr": f'changes(smtpgate_config_reloads_total{{{SEL}}}[2m]) > 0', "step": "1m", "titleFormat": "config reload ({{result}})",
         "tagKeys": "instance,result"},
    ]},
    "templating": {"list": [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus", "current": {}, "hide": 0},
        {"type": "query", "name": "job", "label": "Job", "datasource": DS,
         "query": {"query": "label_values(smtpgate_build_info, job)", "refId": "job"},
         "definition": "label_values(smtpgate_build_info, job)", "refresh": 2, "includeAll": True, "multi": True,
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1},
        {"type": "query", "name": "instance", "label": "Gateway", "datasource": DS,
         "query": {"query": 'label_values(smtpgate_build_info{job=~"$job"}, instance)', "refId": "instance"},
         "definition": 'label_values(smtpgate_build_info{job=~"$job"}, instance)', "refresh": 2, "includeAll": True, "multi": True,
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1},
    ]},
    "panels": panels,
}
import os, sys
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "smtpgate.json")
json.dump(dash, open(out, "w"), indent=2)
open(out, "a").write("\n")
