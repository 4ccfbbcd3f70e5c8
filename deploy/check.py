#!/usr/bin/env python3
"""Static checks of the files under deploy/ (no Docker, no cluster needed).

    python3 deploy/check.py [--sluice PATH/TO/sluice]

Needs Python 3.11+ and PyYAML (`pip install pyyaml`). Checks:

- every *.yml / *.yaml / *.json / *.toml under deploy/ parses;
- docker-compose.yml: the expected services, files it mounts exist, the
  sluice config it mounts is valid (below);
- the sluice configs (sluice.compose.toml, sluice.example.toml, the TOML in
  k8s/configmap.yaml): only fields the config schema knows (a mirror of
  src/config/mod.rs; `--sluice BIN` also runs `sluice check-config` on the
  compose and ConfigMap configs, which is the authority);
- the Grafana dashboard: every PromQL expression names only known metrics
  (the list below) with their own labels, `_bucket` series only inside
  histogram_quantile with `le` kept, counters only under rate/increase,
  legends only use kept labels, every listed metric has a panel;
- Kubernetes manifests: the fields kubectl requires, selectors that match,
  named ports that exist, the HPA target, probes on the ops port, and a
  termination grace period longer than preStop + drain_timeout;
- Prometheus and Grafana provisioning: the scrape target and datasource uids
  the dashboard uses.

Exits 1 and lists every problem when something is wrong; prints
"N passed, 0 failed" otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("deploy/check.py needs PyYAML: pip install pyyaml")

DEPLOY = Path(__file__).resolve().parent

# --------------------------------------------------------------------------
# The metrics sluice exports: name -> (type, labels).
METRICS: dict[str, tuple[str, set[str]]] = {
    "sluice_requests_total": ("counter", {"tenant", "model", "status", "layer"}),
    "gen_ai_server_time_to_first_token_seconds": ("histogram", {"tenant", "model"}),
    "gen_ai_server_time_per_output_token_seconds": ("histogram", {"tenant", "model"}),
    "gen_ai_server_request_duration_seconds": ("histogram", {"tenant", "model"}),
    "sluice_tokens_total": ("counter", {"tenant", "model", "type"}),
    "sluice_cost_usd_total": ("counter", {"tenant", "model"}),
    "sluice_plugin_call_seconds": ("histogram", {"tenant", "plugin", "hook"}),
    "sluice_plugin_faults_total": ("counter", {"tenant", "plugin", "fault"}),
    "sluice_plugin_rejections_total": ("counter", {"tenant", "plugin", "code"}),
    "sluice_limiter_rejections_total": ("counter", {"tenant", "plugin", "kind"}),
    "sluice_engine_attempts_total": ("counter", {"pool", "replica", "outcome"}),
    "sluice_engine_retries_total": ("counter", {"pool"}),
    "sluice_replica_healthy": ("gauge", {"pool", "replica"}),
    "sluice_replica_outstanding": ("gauge", {"pool", "replica"}),
    "sluice_inflight_requests": ("gauge", set()),
    "sluice_otel_spans_dropped_total": ("counter", set()),
}
# Labels Prometheus adds to every series (job, instance) and the compose
# scrape config's own `service`.
TARGET_LABELS = {"job", "instance", "service", "namespace", "pod"}
# Closed label value sets (checked when a matcher names literal values).
LABEL_VALUES = {
    "layer": {"none", "customer", "plugin", "gateway", "provider"},
    "type": {"input", "cached_input", "output", "reasoning"},
    "hook": {"on-request", "on-response-chunk", "on-response"},
    "kind": {"requests", "tokens"},
}

# --------------------------------------------------------------------------
# The sluice config schema (src/config/mod.rs): section -> allowed keys.
# A value of dict means a table with its own keys; "tables" are arrays of tables.
SCHEMA: dict = {
    "server": {"http": None, "https": {"listen", "cert", "key"}, "ops": None,
               "ops_tls": {"cert", "key"}},
    "limits": {"max_connections", "max_inflight_requests", "max_body_bytes",
               "max_header_bytes", "max_json_depth", "header_read_timeout",
               "body_read_timeout", "drain_timeout"},
    "plugin_host": {"timeout", "max_memory", "max_instances", "reuse_instances",
                    "max_response_retries"},
    "registry": {"data_dir", "redis_url", "redis_prefix", "poll_interval",
                 "store_timeout", "max_plugin_bytes", "max_versions", "check_timeout"},
    "admin": {"operator_keys"},
    "telemetry": {"otlp_endpoint", "otlp_protocol", "service_name", "export_queue",
                  "export_timeout"},
    "pools": {"name", "endpoints", "dialect", "models", "api_key_env", "connect_timeout",
              "ttft_timeout", "idle_timeout", "request_timeout", "retries", "eject_for"},
    "prices": {"model", "input_cache_hit_per_million", "input_cache_miss_per_million",
               "output_per_million"},
    "tenants": {"id", "deployment", "pool", "max_concurrent_requests", "api_keys",
                "admin_keys", "extra_pools", "plugins"},
}
KEY_FIELDS = {"id", "sha256"}
PLUGIN_FIELDS = {"builtin", "path", "config", "failure"}
ENUMS = {
    ("telemetry", "otlp_protocol"): {"http/protobuf", "grpc"},
    ("pools", "dialect"): {"vllm", "sglang", "openai", "deepseek"},
    ("tenants", "deployment"): {"serverless", "dedicated", "dedicated-gpu"},
}
DURATION = re.compile(r"^\s*(\d+\s*(ns|us|µs|ms|s|m|min|h|d)\s*)+$")


class Report:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.checks = 0

    def check(self, ok: bool, where: str, message: str) -> bool:
        self.checks += 1
        if not ok:
            self.problems.append(f"{where}: {message}")
        return ok


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(DEPLOY.parent))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------
# Parsing every file.

def load_all(r: Report) -> dict[Path, object]:
    docs: dict[Path, object] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix in (".yml", ".yaml"):
                docs[path] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            elif path.suffix == ".json":
                docs[path] = json.loads(path.read_text())
            elif path.suffix == ".toml":
                docs[path] = tomllib.loads(path.read_text())
            else:
                continue
            r.check(True, rel(path), "parses")
        except Exception as e:  # noqa: BLE001 - report any parse error
            r.check(False, rel(path), f"does not parse: {e}")
    return docs


# --------------------------------------------------------------------------
# sluice config.

def check_sluice_config(r: Report, where: str, cfg: dict) -> None:
    for section, value in cfg.items():
        at = f"{where}: [{section}]"
        if not r.check(section in SCHEMA, at, "unknown section"):
            continue
        allowed = SCHEMA[section]
        rows = value if isinstance(value, list) else [value]
        if section in ("pools", "prices", "tenants"):
            r.check(isinstance(value, list), at, "must be an array of tables ([[...]])")
        for i, row in enumerate(rows):
            if not r.check(isinstance(row, dict), at, "must be a table"):
                continue
            for key, v in row.items():
                kat = f"{at}[{i}].{key}" if isinstance(value, list) else f"{at}.{key}"
                r.check(key in allowed, kat, "unknown field (the config is strict)")
                if isinstance(allowed, dict) and isinstance(allowed.get(key), set):
                    r.check(isinstance(v, dict) and set(v) <= allowed[key], kat,
                            f"expects a table with {sorted(allowed[key])}")
                enum = ENUMS.get((section, key))
                if enum is not None:
                    r.check(v in enum, kat, f"{v!r} is not one of {sorted(enum)}")
                if key.endswith(("_timeout", "_interval", "eject_for")) or key == "timeout":
                    r.check(isinstance(v, str) and bool(DURATION.match(v)), kat,
                            f"{v!r} is not a duration like \"30s\"")
                if key in ("api_keys", "admin_keys", "operator_keys"):
                    for j, k in enumerate(v):
                        r.check(isinstance(k, dict) and set(k) == KEY_FIELDS, f"{kat}[{j}]",
                                "a key is { id, sha256 }")
                        h = str(k.get("sha256", "")) if isinstance(k, dict) else ""
                        r.check(bool(re.fullmatch(r"[0-9a-fA-F]{64}", h)), f"{kat}[{j}]",
                                "sha256 must be 64 hex digits")
                if key == "plugins":
                    for j, p in enumerate(v):
                        r.check(isinstance(p, dict) and set(p) <= PLUGIN_FIELDS, f"{kat}[{j}]",
                                f"a chain entry has only {sorted(PLUGIN_FIELDS)}")
    pools = {p.get("name") for p in cfg.get("pools", [])}
    models = {m for p in cfg.get("pools", []) for m in p.get("models", [])}
    for t in cfg.get("tenants", []):
        r.check(t.get("pool") in pools, f"{where}: tenant {t.get('id')}", "pool is not defined")
    for p in cfg.get("prices", []):
        r.check(p.get("model") in models, f"{where}: prices", f"no pool serves {p.get('model')!r}")
    has_admin = bool(cfg.get("admin", {}).get("operator_keys")) or any(
        t.get("admin_keys") for t in cfg.get("tenants", []))
    if has_admin or "registry" in cfg:
        r.check("registry" in cfg and "ops" in cfg.get("server", {}), where,
                "admin keys / [registry] need [registry] and server.ops")


def parse_duration_s(text: str) -> float:
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "min": 60,
             "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)\s*(ns|us|µs|ms|min|s|m|h|d)", text))


def sluice_check_config(r: Report, binary: str, where: str, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    out = subprocess.run([binary, "check-config", f.name], capture_output=True, text=True)
    Path(f.name).unlink()
    r.check(out.returncode == 0, where,
            f"sluice check-config failed:\n{out.stdout}{out.stderr}")


# --------------------------------------------------------------------------
# PromQL (enough of it for dashboards): selectors, their matchers, grouping
# labels and the function a range vector is handed to.

TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|s|m|h|d|w|y)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]])
""", re.X)
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left",
            "group_right", "by", "without", "on", "ignoring", "atan2"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
RANGE_FUNCS = {"rate", "irate", "increase"}
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values", "group", "limitk", "limit_ratio"}


def grafana_vars(expr: str) -> tuple[str, set[str]]:
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expr))
    expr = expr.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m")
    expr = re.sub(r"\$__interval|\$\{__interval\}|\$__range|\$\{__range\}", "1m", expr)
    return expr, used


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 20]!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
    return out


def analyse(expr: str) -> dict:
    """Selectors (name, matchers, ranged, enclosing function), grouping labels."""
    toks = tokens(expr)
    selectors, grouping, stack = [], set(), []  # stack: function names of open parens
    pending = ""  # an aggregation waiting for its parenthesis: sum by (x) (...)
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "ident" and text in GROUPING and nxt == "(":
            j = i + 2
            while toks[j][1] != ")":
                if toks[j][0] == "ident":
                    grouping.add(toks[j][1])
                j += 1
            i = j + 1
            continue
        if kind == "ident" and nxt == "(" and text not in KEYWORDS:
            stack.append(text)
            pending = ""
            i += 2
            continue
        if kind == "ident" and text in AGGREGATIONS and nxt in GROUPING:
            pending = text
            i += 1
            continue
        if text == "(":
            stack.append(pending)
            pending = ""
        elif text == ")":
            stack.pop()
        elif kind == "ident" and text not in KEYWORDS or text == "{":
            name = text if text != "{" else None
            j = i + 1 if name else i
            matchers = []
            if j < len(toks) and toks[j][1] == "{":
                j += 1
                while toks[j][1] != "}":
                    if toks[j][1] == ",":
                        j += 1
                        continue
                    label, op, value = toks[j][1], toks[j + 1][1], toks[j + 2][1]
                    matchers.append((label, op, value[1:-1]))
                    j += 3
                j += 1
            ranged = j < len(toks) and toks[j][1] == "["
            if ranged:
                while toks[j][1] != "]":
                    j += 1
                j += 1
            selectors.append({"name": name, "matchers": matchers, "ranged": ranged,
                              "func": stack[-1] if stack else "", "funcs": list(stack)})
            i = j
            continue
        i += 1
    return {"selectors": selectors, "grouping": grouping}


def base_metric(name: str) -> tuple[str | None, str]:
    if name in METRICS:
        return name, ""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and METRICS.get(name[: -len(suffix)], ("",))[0] == "histogram":
            return name[: -len(suffix)], suffix
    return None, ""


def check_promql(r: Report, where: str, expr: str, variables: set[str],
                 legend: str | None = None, series_only: bool = False) -> set[str]:
    """Checks one expression; returns the metrics it reads. `series_only`: a
    bare series selector (a variable's label_values), no rate needed."""
    plain, used = grafana_vars(expr)
    builtin = {"__rate_interval", "__interval", "__range", "__from", "__to"}
    for v in used - builtin:
        r.check(v in variables, where, f"uses ${v}, which is not a dashboard variable")
    try:
        a = analyse(plain)
    except (ValueError, IndexError) as e:
        r.check(False, where, f"PromQL not understood: {e}")
        return set()
    names, labels = set(), set(TARGET_LABELS)
    r.check(bool(a["selectors"]), where, "no metric selector")
    for s in a["selectors"]:
        if not r.check(s["name"] is not None, where, "selector without a metric name"):
            continue
        base, suffix = base_metric(s["name"])
        if not r.check(base is not None, where, f"unknown metric {s['name']!r}"):
            continue
        names.add(base)
        mtype, mlabels = METRICS[base]
        own = mlabels | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
        labels |= own
        for label, op, value in s["matchers"]:
            r.check(label in own, where, f"{s['name']} has no label {label!r}")
            if label in LABEL_VALUES and op in ("=", "=~") and "$" not in value:
                for v in value.split("|"):
                    r.check(v in LABEL_VALUES[label], where,
                            f"{label}={v!r} is not one of {sorted(LABEL_VALUES[label])}")
        if series_only:
            continue
        if mtype == "counter" or suffix in ("_bucket", "_sum", "_count"):
            r.check(s["ranged"] and s["func"] in RANGE_FUNCS, where,
                    f"{s['name']} is a counter: use it under rate()/increase() with a range")
        if suffix == "_bucket":
            r.check("histogram_quantile" in s["funcs"], where,
                    f"{s['name']} outside histogram_quantile")
            r.check("le" in a["grouping"], where, "histogram_quantile needs `le` kept (by (le, ...))")
        if mtype == "histogram" and not suffix:
            r.check(False, where, f"{base} is a histogram: use _bucket, _sum or _count")
        if mtype == "gauge":
            r.check(not s["ranged"], where, f"{base} is a gauge: no range/rate")
    for g in a["grouping"]:
        r.check(g in labels or g == "le", where, f"groups by {g!r}, which no metric here has")
    if legend:
        for l in re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend):
            kept = a["grouping"] if a["grouping"] else labels
            r.check(l in kept, where, f"legend uses {{{{{l}}}}}, which the query does not keep")
    return names


# --------------------------------------------------------------------------
# Grafana.

def walk_panels(panels: list) -> list:
    out = []
    for p in panels:
        out.append(p)
        out.extend(walk_panels(p.get("panels", [])))
    return out


def check_dashboard(r: Report, path: Path, d: dict, datasource_uids: set[str]) -> None:
    where = rel(path)
    for key in ("title", "uid", "panels", "schemaVersion", "templating"):
        r.check(key in d, where, f"missing {key!r}")
    r.check(isinstance(d.get("schemaVersion"), int) and d["schemaVersion"] >= 36, where,
            "schemaVersion should be 36 or later")
    variables = {v["name"] for v in d.get("templating", {}).get("list", [])}
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query", {})
            q = q.get("query", "") if isinstance(q, dict) else q
            m = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_]+)\)", q.strip())
            if r.check(bool(m), f"{where}: variable {v['name']}", "expects label_values(metric, label)"):
                names = check_promql(r, f"{where}: variable {v['name']}", m.group(1), variables,
                                     series_only=True)
                r.check(any(m.group(2) in METRICS[n][1] for n in names),
                        f"{where}: variable {v['name']}", f"no label {m.group(2)!r}")
        if v.get("type") == "datasource":
            r.check(v.get("query") == "prometheus", f"{where}: variable {v['name']}",
                    "a Prometheus datasource variable")
    panels = walk_panels(d.get("panels", []))
    ids = [p.get("id") for p in panels]
    r.check(len(ids) == len(set(ids)), where, "panel ids must be unique")
    used: set[str] = set()
    for p in panels:
        pw = f"{where}: panel {p.get('title')!r}"
        r.check("gridPos" in p and {"h", "w", "x", "y"} <= set(p.get("gridPos", {})), pw,
                "needs gridPos h, w, x, y")
        gp = p.get("gridPos", {})
        r.check(gp.get("x", 0) + gp.get("w", 0) <= 24, pw, "wider than the 24-column grid")
        if p.get("type") in ("row", "text"):
            continue
        ds = p.get("datasource", {})
        r.check(ds.get("uid") in datasource_uids | {"${datasource}"}, pw,
                f"datasource uid {ds.get('uid')!r} is not provisioned")
        targets = p.get("targets", [])
        r.check(bool(targets), pw, "no queries")
        for t in targets:
            r.check(bool(t.get("expr")), pw, "query without expr")
            used |= check_promql(r, f"{pw} {t.get('refId')}", t.get("expr", ""), variables,
                                 t.get("legendFormat"))
        for link in p.get("fieldConfig", {}).get("defaults", {}).get("links", []):
            r.check(link.get("url", "").startswith("${jaeger_url}/"), pw,
                    "data links lead to Jaeger (${jaeger_url}/...)")
    missing = set(METRICS) - used
    r.check(not missing, where, f"metrics without a panel: {sorted(missing)}")


def check_grafana_provisioning(r: Report, docs: dict) -> set[str]:
    uids: set[str] = set()
    for path, content in docs.items():
        if "grafana/provisioning" not in path.as_posix():
            continue
        for doc in content:
            r.check(doc.get("apiVersion") == 1, rel(path), "apiVersion: 1")
            for ds in doc.get("datasources", []):
                for key in ("name", "type", "uid", "url"):
                    r.check(key in ds, rel(path), f"datasource needs {key!r}")
                r.check(ds.get("uid") not in uids, rel(path), f"duplicate uid {ds.get('uid')}")
                uids.add(ds.get("uid"))
            for prov in doc.get("providers", []):
                r.check(prov.get("type") == "file" and "path" in prov.get("options", {}),
                        rel(path), "a file provider with options.path")
    r.check("prometheus" in uids, "grafana/provisioning", "a datasource with uid prometheus")
    return uids


# --------------------------------------------------------------------------
# Compose and Prometheus.

def check_compose(r: Report, path: Path, doc: dict) -> None:
    where = rel(path)
    services = doc.get("services", {})
    for name in ("sluice", "engine", "jaeger", "prometheus", "grafana", "redis"):
        r.check(name in services, where, f"service {name!r} missing")
    for name, svc in services.items():
        r.check("image" in svc or "build" in svc, f"{where}: {name}", "needs image or build")
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith("."):
                r.check((path.parent / src).exists(), f"{where}: {name}", f"mounts missing {src}")
        for dep in svc.get("depends_on", []):
            r.check(dep in services, f"{where}: {name}", f"depends on unknown service {dep}")
        build = svc.get("build")
        if isinstance(build, dict):
            ctx = path.parent / build.get("context", ".")
            r.check((ctx / build.get("dockerfile", "Dockerfile")).is_file(), f"{where}: {name}",
                    "Dockerfile not found")
    jaeger = services.get("jaeger", {})
    r.check(str(jaeger.get("image", "")).startswith("jaegertracing/jaeger:2"), where,
            "Jaeger v2 (jaegertracing/jaeger:2.x)")
    ports = " ".join(map(str, jaeger.get("ports", [])))
    for port in ("4317", "4318", "16686"):
        r.check(port in ports, where, f"jaeger publishes {port}")
    r.check(services.get("engine", {}).get("command", [None])[0] == "sim-engine", where,
            "engine runs `sluice sim-engine`")
    declared = set(doc.get("volumes", {}) or {})
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else ""
            if src and not src.startswith((".", "/")):
                r.check(src in declared, f"{where}: {name}", f"named volume {src} not declared")


def check_prometheus(r: Report, path: Path, doc: dict) -> None:
    jobs = doc.get("scrape_configs", [])
    names = [j.get("job_name") for j in jobs]
    r.check(len(names) == len(set(names)), rel(path), "job names must be unique")
    targets = [t for j in jobs for sc in j.get("static_configs", []) for t in sc.get("targets", [])]
    r.check("sluice:9090" in targets, rel(path), "scrapes sluice's ops listener sluice:9090")


# --------------------------------------------------------------------------
# Kubernetes.

def check_k8s(r: Report, objects: list[tuple[Path, dict]], binary: str | None) -> None:
    by_kind: dict[str, dict[str, dict]] = {}
    for path, o in objects:
        where = f"{rel(path)}: {o.get('kind')}/{o.get('metadata', {}).get('name')}"
        for key in ("apiVersion", "kind", "metadata"):
            r.check(key in o, where, f"missing {key}")
        r.check(bool(o.get("metadata", {}).get("name")), where, "metadata.name")
        if o.get("kind") != "Namespace":
            r.check(o.get("metadata", {}).get("namespace") == "sluice", where, "namespace sluice")
        by_kind.setdefault(o.get("kind"), {})[o["metadata"]["name"]] = o
    deployments = by_kind.get("Deployment", {})
    for name, d in deployments.items():
        where = f"Deployment/{name}"
        r.check(d.get("apiVersion") == "apps/v1", where, "apiVersion apps/v1")
        spec = d.get("spec", {})
        sel = spec.get("selector", {}).get("matchLabels", {})
        labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
        r.check(bool(sel) and sel.items() <= labels.items(), where,
                "selector.matchLabels must match the template's labels")
        pod = spec.get("template", {}).get("spec", {})
        containers = pod.get("containers", [])
        r.check(bool(containers), where, "containers")
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in containers:
            cw = f"{where} container {c.get('name')}"
            r.check(bool(c.get("name")) and bool(c.get("image")), cw, "name and image")
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                pr = c.get(probe)
                if not pr:
                    continue
                port = (pr.get("httpGet") or pr.get("tcpSocket") or {}).get("port")
                if port is not None:
                    r.check(port in ports or port in ports.values(), cw,
                            f"{probe} port {port!r} is not a container port")
            for m in c.get("volumeMounts", []):
                r.check(m.get("name") in volumes, cw, f"mounts unknown volume {m.get('name')}")
        if name == "sluice":
            c = containers[0]
            r.check(spec.get("replicas", 1) >= 2, where, "2 or more replicas")
            r.check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", where,
                    "readiness on /readyz")
            r.check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", where,
                    "liveness on /healthz")
            r.check(c.get("readinessProbe", {}).get("httpGet", {}).get("port") == "ops", where,
                    "probes on the ops port")
            env = {e["name"] for e in c.get("env", [])}
            r.check("OTEL_EXPORTER_OTLP_ENDPOINT" in env, where, "OTEL_EXPORTER_OTLP_ENDPOINT env")
            r.check(any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", [])), where,
                    "a secret reference")
            r.check("requests" in c.get("resources", {}), where, "resource requests (the HPA needs them)")
            pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            sleep = float(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0.0
            r.check(sleep > 0, where, "a preStop sleep so load balancers drain")
            cm_name = next((v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v), None)
            cm = by_kind.get("ConfigMap", {}).get(cm_name)
            if r.check(cm is not None, where, f"ConfigMap {cm_name} not found"):
                text = cm.get("data", {}).get("sluice.toml", "")
                try:
                    cfg = tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    r.check(False, f"ConfigMap/{cm_name}", f"sluice.toml does not parse: {e}")
                    cfg = {}
                check_sluice_config(r, f"ConfigMap/{cm_name} sluice.toml", cfg)
                if binary:
                    sluice_check_config(r, binary, f"ConfigMap/{cm_name}", text)
                drain = parse_duration_s(cfg.get("limits", {}).get("drain_timeout", "30s"))
                grace = pod.get("terminationGracePeriodSeconds", 30)
                r.check(grace > sleep + drain, where,
                        f"terminationGracePeriodSeconds {grace} <= preStop {sleep}s + drain_timeout {drain}s")
                redis = cfg.get("registry", {}).get("redis_url", "")
                host = re.sub(r"^redis://([^:/]+).*$", r"\1", redis)
                r.check(host in by_kind.get("Service", {}), where, f"redis_url host {host!r} is no Service")
    for name, s in by_kind.get("Service", {}).items():
        where = f"Service/{name}"
        sel = s.get("spec", {}).get("selector", {})
        targets = [d for d in deployments.values()
                   if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        if r.check(len(targets) == 1, where, "selector matches exactly one Deployment"):
            ports = {p.get("name") for c in targets[0]["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
            for p in s.get("spec", {}).get("ports", []):
                r.check("port" in p, where, "ports[].port")
                tp = p.get("targetPort", p.get("port"))
                r.check(isinstance(tp, int) or tp in ports, where, f"targetPort {tp!r} not a named port")
    r.check("sluice" in by_kind.get("Service", {}) and
            {p["name"] for p in by_kind["Service"]["sluice"]["spec"]["ports"]} >= {"http", "ops"},
            "Service/sluice", "API and ops ports")
    for name, h in by_kind.get("HorizontalPodAutoscaler", {}).items():
        where = f"HorizontalPodAutoscaler/{name}"
        r.check(h.get("apiVersion") == "autoscaling/v2", where, "autoscaling/v2")
        ref = h.get("spec", {}).get("scaleTargetRef", {})
        r.check(ref.get("kind") == "Deployment" and ref.get("name") in deployments, where,
                "scaleTargetRef names a Deployment here")
        spec = h.get("spec", {})
        r.check(spec.get("minReplicas", 1) >= 2 and spec.get("maxReplicas", 0) >= spec.get("minReplicas", 1),
                where, "minReplicas >= 2, maxReplicas >= minReplicas")
        r.check(any(m.get("resource", {}).get("name") == "cpu" for m in spec.get("metrics", [])), where,
                "scales on CPU")
    redis = deployments.get("sluice-redis")
    if r.check(redis is not None, "k8s", "Deployment/sluice-redis"):
        args = " ".join(redis["spec"]["template"]["spec"]["containers"][0].get("args", []))
        r.check("noeviction" in args, "Deployment/sluice-redis", "maxmemory-policy noeviction")


# --------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sluice", help="a sluice binary: also run `sluice check-config` on the configs")
    args = ap.parse_args()
    r = Report()
    docs = load_all(r)

    for path, cfg in docs.items():
        if path.suffix == ".toml":
            check_sluice_config(r, rel(path), cfg)
            # The example names certificate files that are not in the repository.
            if args.sluice and path.name != "sluice.example.toml":
                sluice_check_config(r, args.sluice, rel(path), path.read_text())

    compose = DEPLOY / "docker-compose.yml"
    if r.check(compose in docs, rel(compose), "exists"):
        check_compose(r, compose, docs[compose][0])
    prom = DEPLOY / "prometheus.yml"
    if r.check(prom in docs, rel(prom), "exists"):
        check_prometheus(r, prom, docs[prom][0])

    uids = check_grafana_provisioning(r, docs)
    dashboards = [p for p in docs if p.suffix == ".json" and "grafana/dashboards" in p.as_posix()]
    r.check(bool(dashboards), "grafana/dashboards", "a dashboard")
    for path in dashboards:
        check_dashboard(r, path, docs[path], uids)

    objects = [(p, o) for p, content in docs.items() if "k8s" in p.parts and p.name != "kustomization.yaml"
               for o in content]
    kinds = {o.get("kind") for _, o in objects}
    for kind in ("Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler"):
        r.check(kind in kinds, "k8s", f"a {kind}")
    check_k8s(r, objects, args.sluice)
    kust = DEPLOY / "k8s" / "kustomization.yaml"
    if kust in docs:
        listed = set(docs[kust][0].get("resources", []))
        present = {p.name for p, _ in objects}
        r.check(present <= listed, rel(kust), f"not listed: {sorted(present - listed)}")

    for p in r.problems:
        print(f"FAIL {p}")
    failed = len(r.problems)
    print(f"deploy: {r.checks - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
