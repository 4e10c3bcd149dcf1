"""deploy/ and the protocol/metrics docs: small checks that fail when they drift from the code.

Nothing here starts a server: the manifests are parsed, the ConfigMap's srv.conf goes through
``bin/modelsrv -t``, and the docs are compared with the names the code defines.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # PyYAML: a test dependency (pyproject's test extra)

from server.config import load_config, parse_time
from tests.conftest import BIN, REPO, fixture_path

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "modelsrv.service"
LOGROTATE = DEPLOY / "logrotate" / "modelsrv"
DOCKERFILE = DEPLOY / "Dockerfile"
INSTALL_DIR = "/opt/modelsrv"

def load_yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> dict[str, dict]:
    """kind -> the one object of that kind in deploy/kubernetes (kustomization excluded)."""
    found: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml(path):
            assert isinstance(doc, dict) and "kind" in doc, f"{path.name}: a document without a kind"
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def container() -> dict:
    (c,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


# -- Kubernetes ------------------------------------------------------------------------------------

def test_manifests_parse_and_hold_the_expected_objects() -> None:
    objects = manifests()
    assert {"ConfigMap", "Deployment", "Service"} <= set(objects)
    kustomization = load_yaml(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    deployment = objects["Deployment"]
    assert deployment["apiVersion"] == "apps/v1"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["conf"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    assert mounts[f"{INSTALL_DIR}/conf"] == "conf"


def test_probe_paths_are_routes_of_the_http_server() -> None:
    source = (REPO / "server" / "frontends" / "http.py").read_text()
    c = container()
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for kind, get in probes.items():
        assert f'path == "{get["path"]}"' in source, f"{kind}: {get['path']} is not a route in server/frontends/http.py"
        assert ports[get["port"]] == 8080, kind


def _configmap_conf() -> str:
    return manifests()["ConfigMap"]["data"]["srv.conf"]


def _localized(conf: str, tmp: Path) -> str:
    """The ConfigMap's srv.conf with its model paths on the test fixture and pid/logs under tmp."""
    tiny = fixture_path("densenet_tiny", "model")
    subs = [
        (r"(?m)^(\s*path\s+)[^;\s]+;", rf"\g<1>{tiny};", "path"),
        (r"(?m)^(\s*pid\s+)[^;\s]+;", rf"\g<1>{tmp}/run/modelsrv.pid;", "pid"),
        (r"(?m)^(\s*error_log\s+)[^;\s]+", rf"\g<1>{tmp}/logs/error.log", "error_log"),
        (r"(?m)^(\s*access_log\s+)[^;\s]+;", rf"\g<1>{tmp}/logs/access.log;", "access_log"),
        (r"(?m)^(\s*auth_token_file\s+)[^;\s]+;", rf"\g<1>{tmp}/tokens;", "auth_token_file"),
    ]
    (tmp / "tokens").write_text("a-token-from-the-mounted-secret\n")
    for pattern, repl, what in subs:
        conf, n = re.subn(pattern, repl, conf)
        assert n >= 1, f"the ConfigMap's srv.conf has no {what} directive to replace"
    return conf


def test_configmap_conf_passes_modelsrv_t(tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "srv.conf"
    conf.parent.mkdir()
    conf.write_text(_localized(_configmap_conf(), tmp_path))
    r = subprocess.run([str(BIN), "-c", str(conf), "-p", str(tmp_path), "-t"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "syntax is ok" in r.stderr and "test is successful" in r.stderr, r.stderr


def test_configmap_conf_listens_in_the_pod_and_matches_the_ports(tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "srv.conf"
    conf.parent.mkdir()
    conf.write_text(_localized(_configmap_conf(), tmp_path))
    cfg = load_config(conf, tmp_path)
    assert [(a.host, a.port) for a in cfg.http_listen] == [("0.0.0.0", 8080)]
    assert [(a.host, a.port) for a in cfg.zmq_listen] == [("0.0.0.0", 5555)]
    assert not cfg.daemon, "the master must stay in the foreground as the container's main process"
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": 8080, "zmq": 5555}
    service = {p["name"]: p for p in manifests()["Service"]["spec"]["ports"]}
    assert {n: (p["port"], p["targetPort"]) for n, p in service.items()} == {"http": (8080, "http"), "zmq": (5555, "zmq")}
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080" and annotations["prometheus.io/path"] == "/metrics"


def test_configmap_conf_is_the_image_conf() -> None:
    assert _configmap_conf() == (DEPLOY / "docker" / "srv.conf").read_text(), \
        "deploy/kubernetes/configmap.yaml and deploy/docker/srv.conf have drifted apart"


def test_termination_covers_the_graceful_drain(tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "srv.conf"
    conf.parent.mkdir()
    conf.write_text(_localized(_configmap_conf(), tmp_path))
    drain = load_config(conf, tmp_path).worker_shutdown_timeout
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    command = " ".join(container()["lifecycle"]["preStop"]["exec"]["command"])
    assert "QUIT" in command and "modelsrv.pid" in command, command
    sleeps = [float(s) for s in re.findall(r"\bsleep (\d+(?:\.\d+)?)", command)]
    assert sleeps, "the preStop hook should sleep before QUIT (endpoints removal)"
    # the master KILLs a worker 5 s after worker_shutdown_timeout; the grace period must cover it all
    assert spec["terminationGracePeriodSeconds"] > sleeps[0] + drain + 5
    limits = container()["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits  # the GPU request stays an example in a comment
    assert "nvidia.com/gpu" in (K8S / "deployment.yaml").read_text()


# -- systemd and logrotate -------------------------------------------------------------------------

def _unit() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"not a unit file line: {line!r}"
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def test_systemd_unit() -> None:
    u = _unit()
    one = {k: v[-1] for k, v in u.items()}
    assert one["Service.Type"] == "notify"  # the master speaks sd_notify (server/processes/sdnotify.py)
    assert one["Service.NotifyAccess"] == "all"  # the new master of a binary upgrade sends MAINPID=
    # start waits for READY=1, i.e. the models loaded: cover worker_load_timeout
    assert parse_time(one["Service.TimeoutStartSec"]) > load_config(
        REPO / "conf" / "srv.conf", Path(INSTALL_DIR), check_models=False).worker_load_timeout
    assert one["Service.ExecStart"] == f"{INSTALL_DIR}/bin/modelsrv -c {INSTALL_DIR}/conf/srv.conf"
    assert any("HUP" in r and "$MAINPID" in r for r in u["Service.ExecReload"])
    assert u["Service.ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert one["Service.KillSignal"] == "SIGQUIT"
    assert one["Service.KillMode"] in ("mixed",)
    assert one["Service.Restart"] == "on-failure"
    assert int(one["Service.LimitNOFILE"]) >= 4096
    # the unit's paths follow conf/srv.conf: daemon off, the pid file, a stop timeout covering the drain
    cfg = load_config(REPO / "conf" / "srv.conf", Path(INSTALL_DIR), check_models=False)
    assert not cfg.daemon
    assert one["Service.PIDFile"] == str(cfg.pid)
    assert parse_time(one["Service.TimeoutStopSec"]) > cfg.worker_shutdown_timeout + 5


def _verify_units(tmp_path: Path, dropin: bool) -> str:
    """``systemd-analyze verify`` of the unit (paths moved to this checkout); its complaints."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed: apt-get install -y systemd")
    unit = tmp_path / "modelsrv.service"
    unit.write_text(UNIT.read_text().replace(INSTALL_DIR, str(REPO)))
    if dropin:
        (tmp_path / "modelsrv.service.d").mkdir()
        shutil.copy(UNIT.parent / "notify-reload.conf", tmp_path / "modelsrv.service.d" / "notify-reload.conf")
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    if "Failed to initialize" in r.stderr or "Failed to set up" in r.stderr:
        pytest.skip(f"systemd-analyze verify cannot run here: {r.stderr.strip()[:200]}")
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "modelsrv" in line]
    return "\n".join(problems) if r.returncode == 0 else f"exit {r.returncode}: {r.stderr}"


def _systemd_version() -> int:
    r = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True, timeout=30)
    m = re.match(r"systemd (\d+)", r.stdout)
    return int(m.group(1)) if m else 0


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    assert _verify_units(tmp_path, dropin=False) == ""


def test_systemd_notify_reload_dropin(tmp_path: Path) -> None:
    text = (UNIT.parent / "notify-reload.conf").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == ["[Service]", "Type=notify-reload", "ReloadSignal=SIGHUP", "ExecReload="]
    if shutil.which("systemd-analyze") and _systemd_version() < 253:
        pytest.skip(f"systemd {_systemd_version()} here: Type=notify-reload needs systemd >= 253 to verify")
    assert _verify_units(tmp_path, dropin=True) == ""


def test_logrotate_reopens_with_usr1() -> None:
    text = LOGROTATE.read_text()
    script = re.search(r"postrotate\n(.*?)\n\s*endscript", text, re.S)
    assert script, "no postrotate ... endscript block"
    body = "\n".join(line for line in script.group(1).splitlines() if not line.strip().startswith("#"))
    assert "USR1" in body or "-s reopen" in body, body
    cfg = load_config(REPO / "conf" / "srv.conf", Path(INSTALL_DIR), check_models=False)
    assert str(cfg.pid) in body
    (pattern,) = re.findall(r"(?m)^(/\S+)\s*\{", text)
    assert fnmatch.fnmatch(str(cfg.error_log), pattern) and fnmatch.fnmatch(str(cfg.access_log), pattern)


# -- the image -------------------------------------------------------------------------------------

def test_dockerfile() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert "ARG TORCH_VERSION=2.13.0" in lines
    assert any(line.startswith("ARG TORCH_INDEX_URL=") and line.endswith("/whl/cpu") for line in lines)
    torch_at = next(i for i, line in enumerate(lines) if line.startswith("RUN") and "torch==${TORCH_VERSION}" in line)
    project_at = next(i for i, line in enumerate(lines) if line.startswith("RUN") and "pip install" in line and " ." in line)
    code_at = next(i for i, line in enumerate(lines) if line.startswith("COPY server"))
    assert torch_at < code_at < project_at, "torch is installed first, then the project"
    for line in lines:
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"COPY source {src} is missing"
    assert "STOPSIGNAL SIGQUIT" in lines
    assert set(next(line for line in lines if line.startswith("EXPOSE")).split()[1:]) == {"8080", "5555"}
    entry = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT"))[len("ENTRYPOINT"):])
    cmd = json.loads(next(line for line in lines if line.startswith("CMD"))[len("CMD"):])
    assert entry == [f"{INSTALL_DIR}/bin/modelsrv"] and cmd == ["-c", f"{INSTALL_DIR}/conf/srv.conf"]


# -- the docs follow the code ------------------------------------------------------------------------

def test_metrics_doc_names_every_metric() -> None:
    source = (REPO / "server" / "metrics.py").read_text()
    names = re.findall(r'\b(Counter|Gauge|Histogram)\(\s*"(\w+)"', source)
    assert len(names) >= 5
    doc = (REPO / "docs" / "METRICS.md").read_text()
    for kind, name in names:
        exposed = name + "_total" if kind == "Counter" else name
        assert f"`{exposed}`" in doc, f"docs/METRICS.md does not describe {exposed}"


def test_protocol_doc_names_every_route_op_and_status() -> None:
    doc = (REPO / "docs" / "PROTOCOL.md").read_text()
    http_source = (REPO / "server" / "frontends" / "http.py").read_text()
    routes = set(re.findall(r'"(/(?:v2|metrics)[^"]*)"', http_source))
    assert {"/v2/health/live", "/v2/health/ready", "/metrics"} <= routes
    for route in routes:
        assert f"`{route}`" in doc, f"docs/PROTOCOL.md does not list the route {route}"
    ops = set(re.findall(r'op == "(\w+)"', (REPO / "server" / "frontends" / "zeromq.py").read_text()))
    assert {"infer", "live", "ready", "models", "metadata"} <= ops
    for op in ops:
        assert f'`{op}`' in doc, f"docs/PROTOCOL.md does not describe the ZeroMQ op {op}"
    codes = set(re.findall(r"status = (\d{3})\b", (REPO / "server" / "errors.py").read_text()))
    codes |= set(re.findall(r"\b(\d{3}): \"", http_source)) - {"200"}
    for code in codes:
        assert re.search(rf"^\| {code} \|", doc, re.M), f"docs/PROTOCOL.md's status table lacks {code}"
