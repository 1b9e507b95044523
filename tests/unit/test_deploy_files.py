"""deploy/: the Compose file, the Kubernetes manifests and the systemd unit, checked
without Docker or Kubernetes (neither runs here): they parse, they have the structure
their READMEs promise, and every Shoal option they use exists (cross-checked against
``shoal run --help`` and node/config.py). The unit is checked by ``systemd-analyze
verify`` when it is installed (skipped otherwise), else by the parse test alone.
deploy/haproxy is tested by its own tests; here only its variables are matched with the
ones the Compose file sets."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from node.config import CONFIG_FILE_ENV, FIELDS, env_var, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "shoal.service"


def run_help() -> str:
    out = subprocess.run([sys.executable, "-m", "cluster", "run", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


HELP = None


def known_flags() -> set[str]:
    global HELP
    if HELP is None:
        HELP = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", run_help()))
    return HELP


def flags_in(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def assert_real_options(args: list[str], where: str) -> None:
    unknown = [f for f in flags_in(args) if f not in known_flags()]
    assert not unknown, f"{where}: options not in `shoal run --help`: {unknown}"


def assert_real_env(names, where: str) -> None:
    valid = {env_var(name) for name in FIELDS} | {CONFIG_FILE_ENV}
    unknown = sorted(n for n in names if n.startswith("SHOAL_") and n not in valid)
    assert not unknown, f"{where}: SHOAL_* variables that are no option: {unknown}"


def test_every_deploy_folder_has_a_readme():
    for sub in ("", "systemd", "compose", "kubernetes", "haproxy"):
        assert (DEPLOY / sub / "README.md").is_file() or sub == "haproxy", sub
    index = (DEPLOY / "README.md").read_text()
    for sub in ("haproxy/", "systemd/", "compose/", "kubernetes/"):
        assert sub in index, f"deploy/README.md does not point to {sub}"


# --------------------------------------------------------------------------- compose

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def shoal_services(doc: dict) -> dict:
    return {name: s for name, s in doc["services"].items() if name != "haproxy"}


def test_compose_has_three_shoal_nodes_and_haproxy():
    doc = compose()
    nodes = shoal_services(doc)
    assert sorted(nodes) == ["node1", "node2", "node3"]
    assert doc["services"]["haproxy"]["image"].startswith("haproxy:")
    dockerfile = COMPOSE.parent / nodes["node1"]["build"]["dockerfile"].replace(
        "deploy/compose/", "")
    assert dockerfile.is_file()
    assert (COMPOSE.parent / nodes["node1"]["build"]["context"]).resolve() == ROOT
    volumes, addresses, joins = set(), set(), set()
    for name, svc in nodes.items():
        cmd = svc["command"]
        assert cmd[0] == "run", name
        assert_real_options(cmd[1:], f"compose {name}")
        opts = dict(zip(cmd[1::2], cmd[2::2]))
        assert opts["--node-id"] == name
        # every node names all three by name, on the cluster port, and they form the
        # cluster together
        assert sorted(opts["--join"].split(",")) == [f"{o}:7000" for o in sorted(nodes)], name
        joins.add(opts["--join"])
        assert opts["--bootstrap-expect"] == "3", name
        env = svc["environment"]
        assert_real_env(env, f"compose {name}")
        assert "SHOAL_CLUSTER_SECRET" in env and env["SHOAL_CLUSTER_PORT"] == "7000"
        ip = svc["networks"]["shoal"]["ipv4_address"]
        assert opts["--advertise-host"] == ip
        addresses.add(ip)
        (vol,) = svc["volumes"]
        source, target = vol.split(":")[:2]
        assert target == "/var/lib/shoal" and source in doc["volumes"]
        volumes.add(source)
        # every node starts at once: no node waits for another
        assert not set(svc.get("depends_on") or ()) & set(nodes), name
    assert len(joins) == 1, f"the nodes' --join lists differ: {joins}"
    assert len(volumes) == 3 and len(addresses) == 3, "each node its own volume and address"
    # the values a node gets from the environment are valid option values
    env = dict(nodes["node1"]["environment"], SHOAL_CLUSTER_SECRET="x" * 24)
    cfg = load_config({}, env=env)
    assert cfg.cluster_port == 7000 and cfg.proxy_protocol is True


def test_compose_haproxy_uses_the_shared_config_and_sets_its_variables():
    doc = compose()
    hap = doc["services"]["haproxy"]
    mount = next(v for v in hap["volumes"] if "haproxy.cfg" in v)
    source, target = mount.split(":")[:2]
    cfg_path = (COMPOSE.parent / source).resolve()
    assert cfg_path == DEPLOY / "haproxy" / "haproxy.cfg"
    assert target == "/usr/local/etc/haproxy/haproxy.cfg"
    if not cfg_path.is_file():
        pytest.skip("deploy/haproxy/haproxy.cfg not written yet")
    text = cfg_path.read_text()
    used = set(re.findall(r"\$\{(SHOAL_[A-Z0-9_]+)\}", text))
    assert used, "haproxy.cfg uses no SHOAL_* variables"
    missing = used - set(hap["environment"])
    assert not missing, f"compose does not set {sorted(missing)} for haproxy.cfg"
    nodes = shoal_services(doc)
    for i, (name, svc) in enumerate(sorted(nodes.items()), 1):
        assert hap["environment"][f"SHOAL_NODE{i}_HOST"] == \
            svc["networks"]["shoal"]["ipv4_address"]
        assert hap["environment"][f"SHOAL_NODE{i}_MQTT"] == svc["environment"]["SHOAL_MQTT_PORT"]
        assert hap["environment"][f"SHOAL_NODE{i}_ADMIN"] == \
            svc["environment"]["SHOAL_ADMIN_PORT"]
        # with send-proxy-v2 in haproxy.cfg, the nodes expect PROXY headers from haproxy only
        if "send-proxy" in text:
            assert svc["environment"]["SHOAL_PROXY_PROTOCOL"] == "1"
            assert svc["environment"]["SHOAL_PROXY_PROTOCOL_TRUSTED"] == \
                hap["networks"]["shoal"]["ipv4_address"]


def test_dockerfile_builds_from_python_slim_and_runs_shoal():
    text = (COMPOSE.parent / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[1-9]-slim", text, re.M)
    assert "pip install" in text and 'ENTRYPOINT ["shoal"]' in text
    assert "/readyz" in text
    assert_real_env(re.findall(r"\b(SHOAL_[A-Z0-9_]+)=", text), "Dockerfile")


# --------------------------------------------------------------------------- kubernetes

def k8s_docs() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_kubernetes_manifests():
    docs = k8s_docs()
    assert all("namespace" not in d["metadata"] for d in docs.values()), "namespace-less"
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kust["resources"]) == {"services.yaml", "statefulset.yaml", "pdb.yaml"}

    sts = docs[("StatefulSet", "shoal")]
    spec = sts["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["replicas"] == 3
    # all pods start at once and form the cluster together
    assert spec["podManagementPolicy"] == "Parallel"

    headless = docs[("Service", spec["serviceName"])]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is True
    assert headless["selector"].items() <= labels.items()
    client = docs[("Service", "shoal")]["spec"]
    assert client.get("clusterIP") != "None" and client["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in client["ports"]] == ["mqtt"]

    pdb = docs[("PodDisruptionBudget", "shoal")]["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == 2
    assert pdb["selector"]["matchLabels"].items() <= labels.items()

    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["command"] == ["shoal", "run"]
    assert_real_options(c["args"], "statefulset args")
    args = dict(a[2:].split("=", 1) for a in c["args"])
    assert int(args["admin-port"]) == ports["admin"] and int(args["mqtt-port"]) == ports["mqtt"]
    assert int(args["cluster-port"]) == ports["cluster"] and ports["raft"] == ports["cluster"] + 1
    assert args["data-dir"] == next(m["mountPath"] for m in c["volumeMounts"]
                                    if m["name"] == "data")
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
    # --join: every pod's stable name under the headless Service, on the cluster port
    want = [f"{sts['metadata']['name']}-{i}.{spec['serviceName']}:{ports['cluster']}"
            for i in range(spec["replicas"])]
    assert args["join"].split(",") == want
    for svc_port in headless["ports"]:
        assert svc_port["targetPort"] in ports

    env = {e["name"]: e for e in c["env"]}
    assert_real_env(env, "statefulset env")
    assert env["SHOAL_BOOTSTRAP_EXPECT"]["value"] == str(spec["replicas"]) == "3"
    assert env["SHOAL_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["SHOAL_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ref = env["SHOAL_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]
    secret = docs[("Secret", ref["name"])]
    assert ref["key"] in secret["stringData"]

    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    leave = c["lifecycle"]["preStop"]["exec"]["command"]
    assert leave == ["shoal", "cluster", "leave", "--admin",
                     f"http://127.0.0.1:{ports['admin']}"]
    # the leave may take 60 s to move the sessions, then the voter removal and shutdown
    assert pod["terminationGracePeriodSeconds"] >= 90


def test_cluster_leave_takes_the_admin_option():
    out = subprocess.run([sys.executable, "-m", "cluster", "cluster", "leave", "--help"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert "--admin" in out.stdout


# --------------------------------------------------------------------------- systemd

def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_structure():
    u = unit()
    svc = u["Service"]
    assert svc["Type"] == "simple" and svc["User"] == "shoal"
    assert svc["Restart"] == "on-failure" and svc["StateDirectory"] == "shoal"
    assert svc["KillSignal"] == "SIGTERM" and int(svc["LimitNOFILE"]) >= 65536
    argv = svc["ExecStart"].split()
    assert argv[:2] == ["/usr/local/bin/shoal", "run"]
    assert_real_options(argv[2:], "ExecStart")
    config = argv[argv.index("--config") + 1]
    assert config == "/etc/shoal/shoal.toml"
    assert u["Install"]["WantedBy"] == "multi-user.target"
    # the example config is valid, names the StateDirectory as data_dir, and stops in time
    example = DEPLOY / "systemd" / "shoal.toml"
    cfg = load_config({"config": str(example)}, env={"SHOAL_CLUSTER_SECRET": "x" * 24})
    assert cfg.data_dir == "/var/lib/shoal" and cfg.cluster_port
    # the same join list on every node, naming all initial nodes (this one too), which form
    # the cluster together
    seeds = cfg.join.split(",")
    assert f"{cfg.advertise_host}:{cfg.cluster_port}" in seeds
    assert cfg.bootstrap_expect == len(seeds) == 3
    stop = int(svc["TimeoutStopSec"])
    assert cfg.shutdown_grace + 10 <= stop
    env_file = DEPLOY / "systemd" / "shoal.env"
    names = re.findall(r"^#?(SHOAL_[A-Z0-9_]+)=", env_file.read_text(), re.M)
    assert "SHOAL_CLUSTER_SECRET" in names and "SHOAL_JOIN" not in names
    assert_real_env(names, "shoal.env")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path):
    """systemd's own checker; ExecStart points at this venv's `shoal` (verify insists the
    binary exists) and nothing else changes. Warnings count as failures."""
    shoal = Path(sys.executable).parent / "shoal"
    if not shoal.exists():
        pytest.skip("no `shoal` script next to this Python")
    text = UNIT.read_text().replace("/usr/local/bin/shoal", str(shoal))
    (tmp_path / "shoal.service").write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "shoal.service")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), \
        out.stdout + out.stderr
