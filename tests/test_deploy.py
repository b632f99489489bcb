"""deploy/: compose, Prometheus, Grafana and Kubernetes files, checked offline.

Fast (well under a second without the optional tools). When `promtool` (Debian
package `prometheus`) or `kubectl` is on PATH, the Prometheus config, every
dashboard query and both kustomizations are additionally checked by the real tools.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "adaras.json"
K8S = DEPLOY / "k8s"

YAML_FILES = sorted(p for ext in ("*.yml", "*.yaml") for p in DEPLOY.rglob(ext))

# --------------------------------------------------------------------------- metrics

COUNTERS = [
    "adaras_requests_total",
    "adaras_steering_decisions_total",
    "adaras_generation_tokens_total",
    "adaras_prompt_tokens_total",
    "adaras_errors_total",
    "adaras_client_disconnects_total",
]
HISTOGRAMS = [
    "adaras_failure_probability",
    "adaras_time_to_first_token_seconds",
    "adaras_time_per_output_token_seconds",
    "adaras_e2e_request_latency_seconds",
]
GAUGES = ["adaras_requests_running"]

ALLOWED_METRICS = (
    set(COUNTERS)
    | set(GAUGES)
    | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)

PROMQL_WORDS = {
    # aggregation operators and modifiers
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "atan2",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10", "minute",
    "month", "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort",
    "sort_desc", "sqrt", "time", "timestamp", "vector", "year",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
    "present_over_time",
    # literals
    "inf", "nan",
}

# Grafana template variables -> concrete values, for promtool.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "prometheus",
}


def strip_grafana_vars(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    expr = re.sub(r"\$\{(\w+)(:\w+)?\}", ".*", expr)  # ${model}, ${model:regex}
    return re.sub(r"\$(\w+)", ".*", expr)  # $model, $profile


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric-like identifiers of a PromQL expression (keywords and functions dropped)."""
    e = _STRING.sub('""', expr)
    e = re.sub(r"\{[^{}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\[\]]*\]", "", e)  # range / subquery selectors
    # label lists of by / without / on / ignoring / group_left / group_right
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r"\1", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)  # leftover Grafana variables
    e = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?([eE][+-]?\d+)?[smhdwy]?", "", e)  # numbers
    return {m for m in _IDENT.findall(e) if m.lower() not in PROMQL_WORDS}


def brackets_balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in _STRING.sub('""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


def allowed_metric(name: str) -> bool:
    return name in ALLOWED_METRICS or name.startswith("vllm:")


def test_metric_name_extraction():
    expr = (
        'histogram_quantile(0.95, sum by (le, mode) (rate('
        'adaras_time_to_first_token_seconds_bucket{model=~"$model"}[$__rate_interval])))'
    )
    assert metric_names(expr) == {"adaras_time_to_first_token_seconds_bucket"}
    assert metric_names('max by (instance) (vllm:kv_cache_usage_perc or foo_total)') == {
        "vllm:kv_cache_usage_perc", "foo_total"}
    assert metric_names('sum(rate(x{a="b(c"}[5m])) or vector(0)') == {"x"}
    assert brackets_balanced('sum(rate(x{a="}"}[5m]))')
    assert not brackets_balanced("sum(rate(x[5m])")
    assert not brackets_balanced("sum(rate(x[5m)))")


# --------------------------------------------------------------------------- YAML


def load_yaml(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def test_yaml_files_found():
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    for required in (
        "docker-compose.yml",
        "prometheus/prometheus.yml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/dashboards.yml",
        "k8s/base/deployment.yaml",
        "k8s/base/service.yaml",
        "k8s/secret.example.yaml",
    ):
        assert required in names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path):
    docs = load_yaml(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


# --------------------------------------------------------------------------- compose


def _compose():
    (doc,) = load_yaml(COMPOSE)
    return doc


def _host_path(spec: str) -> Path | None:
    """Host side of a short-syntax bind mount relative to the compose file, else None."""
    src = spec.split(":", 1)[0]
    if src.startswith((".", "/")):
        return (COMPOSE.parent / src).resolve()
    return None  # named volume


def test_compose_services():
    doc = _compose()
    assert {"adaras", "prometheus", "grafana"} <= set(doc["services"])
    adaras = doc["services"]["adaras"]
    build = adaras["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile.cpu"
    assert "8000" in " ".join(map(str, adaras["ports"]))
    assert adaras["command"][:1] == ["serve"]
    hc = " ".join(adaras["healthcheck"]["test"])
    assert "/health" in hc and ":8000" in hc
    env = adaras["environment"]
    for key in ("ADARAS_API_KEY", "ADARAS_ADMIN_KEY", "ADARAS_MODEL", "ADARAS_CACHE"):
        assert key in env
    (cache,) = [v for v in adaras["volumes"] if v.endswith(":" + env["ADARAS_CACHE"])]
    assert _host_path(cache) is None  # a named volume: compile caches outlive the container
    assert doc["services"]["prometheus"]["image"].startswith("prom/prometheus")
    grafana = doc["services"]["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    genv = grafana["environment"]
    # no shipped password: compose refuses to start until one is set
    assert genv["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    # Prometheus' lifecycle API would let anyone on the port shut it down
    assert not any("enable-lifecycle" in str(a) for a in doc["services"]["prometheus"]["command"])
    assert genv["GF_AUTH_ANONYMOUS_ENABLED"].endswith(":-false}")  # off by default
    # named volumes are declared
    for svc in doc["services"].values():
        for spec in svc.get("volumes", []):
            if _host_path(spec) is None:
                assert spec.split(":", 1)[0] in doc["volumes"]


def test_compose_gpu_variant():
    text = COMPOSE.read_text()
    assert "dockerfile: Dockerfile" in text and "driver: nvidia" in text  # commented variant
    (gpu,) = load_yaml(COMPOSE_GPU)
    adaras = gpu["services"]["adaras"]
    assert (ROOT / adaras["build"]["dockerfile"]).is_file()
    assert "vllm/vllm-openai" in (ROOT / adaras["build"]["dockerfile"]).read_text()
    (dev,) = adaras["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert "--tensor-parallel-size" in adaras["command"]


def test_compose_referenced_files_exist():
    doc = _compose()
    grafana_targets = {}
    for name, svc in doc["services"].items():
        for spec in svc.get("volumes", []):
            host = _host_path(spec)
            if host is not None:
                assert host.exists(), f"{name}: {spec} -> {host} missing"
                grafana_targets[spec.split(":")[1]] = host
    # the dashboard provider path points inside a mounted directory holding adaras.json
    (prov,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/dashboards.yml")
    path = prov["providers"][0]["options"]["path"]
    assert grafana_targets[path] == DASHBOARD.parent
    assert grafana_targets["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    home = doc["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"


def test_grafana_datasource():
    (doc,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert ds["isDefault"] is True


# --------------------------------------------------------------------------- Prometheus


def _k8s_example_config() -> dict:
    """prometheus.yml with its commented Kubernetes example uncommented."""
    lines = PROMETHEUS.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "# BEGIN k8s-example")
    end = next(i for i, ln in enumerate(lines) if ln.strip() == "# END k8s-example")
    block = "\n".join(re.sub(r"^(\s*)# ", r"\1", ln) for ln in lines[start + 1:end])
    jobs = yaml.safe_load(block)
    (cfg,) = load_yaml(PROMETHEUS)
    cfg["scrape_configs"] += jobs
    return cfg


def test_prometheus_scrape_job():
    (cfg,) = load_yaml(PROMETHEUS)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["adaras"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "5s"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["adaras:8000"]


def test_prometheus_k8s_example():
    cfg = _k8s_example_config()
    job = cfg["scrape_configs"][-1]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    actions = [r.get("action", "replace") for r in job["relabel_configs"]]
    assert "keep" in actions


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
@pytest.mark.parametrize("variant", ["as-is", "k8s-example"])
def test_promtool_check_config(variant, tmp_path):
    path = PROMETHEUS
    if variant == "k8s-example":
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(_k8s_example_config()))
    r = subprocess.run(["promtool", "check", "config", str(path)],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    if variant == "k8s-example" and "field kubernetes_sd_configs not found" in out:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian)")
    assert r.returncode == 0, out


# --------------------------------------------------------------------------- dashboard


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def _exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every query variable."""
    out = [(p["title"], t["expr"]) for p in _panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
            assert m, f"variable {var['name']}: unexpected query {q!r}"
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def test_dashboard_structure():
    dash = _dashboard()
    assert dash["uid"] == "adaras"
    assert 36 <= dash["schemaVersion"] <= 41
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue  # rows group panels and have no queries
        assert p.get("targets"), f"panel {p['title']!r} has no target"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name in ("model", "profile"):
        q = variables[name]["query"]
        q = q["query"] if isinstance(q, dict) else q
        assert q.startswith("label_values(") and q.rstrip(")").endswith(name)


def test_dashboard_promql_metrics_and_brackets():
    for where, expr in _exprs(_dashboard()):
        assert brackets_balanced(expr), f"{where}: unbalanced brackets in {expr!r}"
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        bad = {n for n in names if not allowed_metric(n)}
        assert not bad, f"{where}: unknown metric(s) {bad} in {expr!r}"


def test_dashboard_promql_usage():
    for where, expr in _exprs(_dashboard()):
        if where.startswith("variable "):
            continue  # label_values() takes a bare series selector
        # histograms: quantiles only over rate() of _bucket series, aggregated keeping `le`
        for m in re.finditer(r"histogram_quantile\(\s*([0-9.]+)\s*,(.*)", expr):
            assert 0 < float(m.group(1)) < 1
            body = m.group(2)
            assert re.match(r"\s*sum by \(le\b[^)]*\) \(rate\(\w[\w:]*_bucket\{?", body), (where, expr)
        # counters (and histogram _bucket/_sum/_count) only inside rate()/increase()
        for name in metric_names(expr):
            if name.endswith(("_total", "_bucket", "_sum", "_count")):
                assert re.search(rf"(rate|increase)\({re.escape(name)}\b", expr), (where, expr)
        if "rate(" in expr:
            assert "[$__rate_interval]" in expr, (where, expr)


def _titles_and_exprs(dash: dict) -> list[tuple[str, str, str]]:
    return [
        (p["type"], p["title"].lower(), " ".join(t["expr"] for t in p["targets"]))
        for p in _panels(dash)
        if p["type"] != "row"
    ]


def test_dashboard_covers_topics():
    panels = _titles_and_exprs(_dashboard())

    def has(pred) -> bool:
        return any(pred(ty, title, expr) for ty, title, expr in panels)

    # request rate by mode
    assert has(lambda ty, t, e: "adaras_requests_total" in e and "by (mode)" in e)
    # steering decisions applied vs skipped, and the applied fraction
    assert has(lambda ty, t, e: "adaras_steering_decisions_total" in e and "by (decision)" in e)
    assert has(lambda ty, t, e: 'decision="applied"' in e and " / " in e and "fraction" in t)
    # p_fail: heatmap of buckets and p50/p90
    assert has(lambda ty, t, e: ty == "heatmap" and "adaras_failure_probability_bucket" in e)
    assert has(lambda ty, t, e: "histogram_quantile(0.5," in e and "histogram_quantile(0.9,"
               in e and "adaras_failure_probability_bucket" in e)
    # latency percentiles by mode
    for metric, qs in (
        ("adaras_time_to_first_token_seconds", ("0.5", "0.95", "0.99")),
        ("adaras_time_per_output_token_seconds", ("0.5", "0.95")),
        ("adaras_e2e_request_latency_seconds", ("0.5", "0.95", "0.99")),
    ):
        assert has(lambda ty, t, e, m=metric, qs=qs: f"{m}_bucket" in e and "le, mode" in e
                   and all(f"histogram_quantile({q}," in e for q in qs)), metric
    # tokens/s by mode, running requests, errors by type
    assert has(lambda ty, t, e: "rate(adaras_generation_tokens_total" in e and "by (mode)" in e)
    assert has(lambda ty, t, e: "adaras_requests_running" in e)
    assert has(lambda ty, t, e: "rate(adaras_errors_total" in e and "by (type)" in e)
    # vLLM engine row
    dash = _dashboard()
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert any("vllm" in r.lower() for r in rows)
    assert has(lambda ty, t, e: "vllm:num_requests_running" in e)
    assert has(lambda ty, t, e: "vllm:kv_cache_usage_perc" in e or "vllm:gpu_cache_usage_perc" in e)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_dashboard_promql_parses_with_promtool(tmp_path):
    """Each query (Grafana variables substituted) as a recording rule: promtool parses it."""
    rules = [
        {"record": f"adaras_dashboard:check_{i}", "expr": strip_grafana_vars(expr)}
        for i, (_, expr) in enumerate(_exprs(_dashboard()))
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- Kubernetes


def _k8s_objects() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in load_yaml(path):
            out.append((path, doc))
    return out


def _by_kind(kind: str) -> list[dict]:
    return [d for p, d in _k8s_objects() if d.get("kind") == kind and "patch" not in p.name]


def test_k8s_objects_well_formed():
    objects = _k8s_objects()
    assert objects
    for path, doc in objects:
        assert doc.get("apiVersion"), path
        assert doc.get("kind"), path
        if doc["kind"] == "Kustomization":
            for res in doc.get("resources", []):
                assert (path.parent / res).exists(), f"{path}: {res} missing"
            for patch in doc.get("patches", []):
                assert (path.parent / patch["path"]).is_file(), f"{path}: {patch} missing"
            continue
        assert doc["metadata"]["name"], path
        assert "namespace" not in doc["metadata"], f"{path}: manifests are namespace-free"
    kinds = {d["kind"] for _, d in objects}
    assert {"Deployment", "Service", "Secret", "Kustomization"} <= kinds


def _container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_k8s_deployment():
    (dep,) = _by_kind("Deployment")
    assert dep["apiVersion"] == "apps/v1"
    spec = dep["spec"]
    assert spec["replicas"] == 2
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    ann = spec["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == "8000"
    assert ann["prometheus.io/path"] == "/metrics"
    c = _container(dep)
    assert "cpu" in c["image"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    assert c["args"][:1] == ["serve"] and "8000" in c["args"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert get["port"] in ("http", 8000), probe
    assert c["readinessProbe"]["initialDelaySeconds"] >= 30
    assert c["livenessProbe"]["initialDelaySeconds"] >= 60
    assert c["resources"]["requests"] and c["resources"]["limits"]
    env = {e["name"]: e for e in c["env"]}
    (secret,) = _by_kind("Secret")
    for var, key in (("ADARAS_API_KEY", "api-key"), ("ADARAS_ADMIN_KEY", "admin-key")):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert key in secret["stringData"]
    cache = env["ADARAS_CACHE"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert mounts[cache] in volumes
    vol = volumes[mounts[cache]]
    # compile caches persist across pod restarts: a claim of the base, shared by the replicas
    claim = vol["persistentVolumeClaim"]["claimName"]
    (pvc,) = [d for p, d in _k8s_objects() if d.get("kind") == "PersistentVolumeClaim"
              and d["metadata"]["name"] == claim]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    base = load_yaml(K8S / "base" / "kustomization.yaml")[0]["resources"]
    assert any(d.get("metadata", {}).get("name") == claim for r in base
               for d in load_yaml(K8S / "base" / r))


def test_k8s_service():
    (svc,) = _by_kind("Service")
    (dep,) = _by_kind("Deployment")
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8000
    assert port["targetPort"] in ("http", 8000)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_gpu_overlay():
    (patch,) = load_yaml(K8S / "gpu" / "deployment-gpu.patch.yaml")
    c = _container(patch)
    assert c["name"] == _container(_by_kind("Deployment")[0])["name"]  # merges by name
    limits = c["resources"]["limits"]
    n = int(limits["nvidia.com/gpu"])
    tp = c["args"][c["args"].index("--tensor-parallel-size") + 1]
    assert int(tp) == n
    assert c["args"].index("--") < c["args"].index("--tensor-parallel-size")


def test_k8s_readme_topics():
    text = (K8S / "README.md").read_text()
    for needle in ("--tensor-parallel-size", "VLLM_CPU_OMP_THREADS_BIND", "Service",
                   "replica", "--profile", "ADARAS_PROFILES", "nvidia.com/gpu"):
        assert needle in text, needle


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", ["", "gpu"])
def test_kustomize_builds(overlay):
    r = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Service"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    c = _container(dep)
    if overlay == "gpu":
        assert c["image"].endswith(":gpu")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"  # kept from the base
        assert {e["name"] for e in c["env"]} >= {"ADARAS_API_KEY", "ADARAS_MODEL"}
    else:
        assert c["image"].endswith(":cpu")


# ---- images and pod security ---------------------------------------------------------

DOCKERFILES = (ROOT / "Dockerfile", DEPLOY / "Dockerfile.cpu")


def test_the_gpu_image_builds_on_a_vllm_the_plugin_accepts():
    from packaging.version import Version

    from adaras.engine.plugin import TESTED_VLLM

    image = re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v([0-9.]+)$",
                      (ROOT / "Dockerfile").read_text(), re.M)
    assert image, "the GPU image must name its vllm/vllm-openai base"
    low, high = TESTED_VLLM
    assert Version(low) <= Version(image[1]) < Version(high)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_non_root_user_with_one_writable_cache(path):
    text = path.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    cache = re.search(r"ADARAS_CACHE=(\S+)", text)[1]
    assert not cache.startswith("/root")
    assert f"chown adaras:adaras {cache}" in text
    for var in ("XDG_CACHE_HOME", "VLLM_CACHE_ROOT"):  # compile caches on the same volume
        assert re.search(rf"{var}={re.escape(cache)}/", text), var


def test_k8s_pods_run_unprivileged_on_a_read_only_root():
    (dep,) = _by_kind("Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    c = _container(dep)
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert {env["ADARAS_CACHE"], "/tmp", "/dev/shm"} <= mounts  # the writable paths
