"""The Kubernetes manifests in k8s/, their pods run for real with `podman kube play` (docs/deployment.md
"Kubernetes"): the PostgreSQL pod, the uploader pod with its Secret and the evaluator pod, on a real tiny training,
with the images tools/images.sh builds on the local Debian base (the `images` fixture of test_containers).

podman 4.3 plays Pods and Deployments, not DaemonSets or StatefulSets, so each workload's pod template is played
as the `kind: Pod` its controller would make (`pod_of`): template.spec as it is, with what a cluster user edits
(the /data/work_dirs and /data/datasets folders, the images) and what podman 4.3 cannot do done by hand, each
named there. Skipped, with one line, where podman cannot run a container."""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, cli, offline_run, status
from tests.mmdet_run.fixtures import cached_dataset, cached_work_dir, copy_work_dir, require_mmdet
from tests.test_containers import images  # noqa: F401  (a pytest fixture: the images, or the skip line)
from tests.test_containers import (NUM, PROBE, VERSION, assert_uploaded, host_address, images_sh, podman,
                                   work_dir_evaluated)

# CI runs these in a stage of their own (`-m containers`); a cold `images` builds the evaluator image
pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

NODE = "kube-node-1"  # the node name the downward API would give the uploader
IMAGES = {  # the manifests' images -> the ones tools/images.sh built here (no registry, no GPU)
    "mmdet-wandb-uploader:0.1.0": f"localhost/mmdet-wandb-uploader:{VERSION}",
    "mmdet-wandb-evaluator:0.1.0": f"localhost/mmdet-wandb-evaluator-cpu:{VERSION}",
    "postgres:16": f"localhost/mmdet-wandb-postgres:{VERSION}",
}
OFFLINE = {  # the uploader's settings in the test: no W&B server here, and the tables of test_containers
    "WANDB_MODE": "offline", "MMDET_WANDB_LOG_CHECKPOINT": "1", "MMDET_WANDB_NUM_EVAL_IMAGES": str(NUM)}


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((REPO / "k8s" / name).read_text()) if doc]


def workload(name: str, kind: str) -> dict:
    (doc,) = [d for d in manifests(name) if d["kind"] == kind]
    return doc


def pod_of(doc: dict, name: str, folders: dict[str, str], state: Path, tag: str, env: dict[str, str] | None = None,
           args: dict[str, str] | None = None) -> dict:
    """The Pod a Deployment, DaemonSet or StatefulSet `doc` would make, as podman 4.3 plays it:
    - template.spec unchanged but for: `folders` (/data/work_dirs, /data/datasets: the node's folders, in the
      hostPath, the mount and the args alike, as the manifests' comments tell a cluster user to edit) and the
      state hostPath (/var/lib/mmdet-wandb) at `state`; the images by IMAGES; `args` replaced word by word;
    - `fieldRef: spec.nodeName` given literally (podman 4.3: "fieldPath spec.nodeName is either not valid or not
      supported"); `env` added;
    - emptyDir: podman 4.3 makes it a named volume of the volume's name, shared by every pod naming it and kept:
      each is given a name of its own (`tag`-pod-volume), removed with the pods;
    - a StatefulSet's volumeClaimTemplates: a persistentVolumeClaim each, which podman makes a named volume."""
    spec = json.loads(json.dumps(doc["spec"]["template"]["spec"]))
    text = json.dumps(spec)
    for old, new in folders.items():
        text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    spec = json.loads(text)
    for volume in spec.get("volumes", []):
        if volume.get("hostPath", {}).get("path") == "/var/lib/mmdet-wandb":
            volume["hostPath"]["path"] = str(state)
        if "emptyDir" in volume:
            volume.pop("emptyDir")
            volume["persistentVolumeClaim"] = {"claimName": f"{tag}-{name}-{volume['name']}"}
    for claim in doc["spec"].get("volumeClaimTemplates", []):
        volume = claim["metadata"]["name"]
        spec.setdefault("volumes", []).append(
            {"name": volume, "persistentVolumeClaim": {"claimName": f"{tag}-{name}-{volume}"}})
    for container in spec["containers"]:
        container["image"] = IMAGES[container["image"]]
        if args and "args" in container:
            container["args"] = [args.get(word, word) for word in container["args"]]
        for var in container.get("env", []):
            if var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
                var.pop("valueFrom")
                var["value"] = NODE
        container.setdefault("env", []).extend({"name": k, "value": v} for k, v in (env or {}).items())
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": doc["spec"]["template"]["metadata"]["labels"]}, "spec": spec}


def podman_secret(doc: dict) -> bytes:
    """A Secret as podman 4.3's secretKeyRef reads it: a JSON map of key -> base64 value. (A `kind: Secret` in the
    played YAML is stored as YAML, which that lookup then refuses: "secret mmdet-wandb is not valid JSON".)
    stringData is made data, as the API server does."""
    data = dict(doc.get("data", {}))
    data.update({k: base64.b64encode(v.encode()).decode() for k, v in doc.get("stringData", {}).items()})
    return json.dumps(data).encode()


@dataclass
class Cluster:
    """The pods on this host: a network with DNS for the pod names, the Secrets, the pods' YAML files."""
    root: Path
    work_dir: Path
    state: Path
    tag: str
    network: str
    pods: dict[str, Path] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)

    def play(self, pod: dict, *networks: str) -> None:
        path = self.root / f"{pod['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(pod, sort_keys=False))
        self.pods[pod["metadata"]["name"]] = path
        podman("kube", "play", *(arg for net in networks for arg in ("--network", net)), str(path), timeout=120)

    def container(self, pod: str) -> str:
        (name,) = [c["name"] for c in yaml.safe_load(self.pods[pod].read_text())["spec"]["containers"]]
        return f"{pod}-{name}"

    def exec(self, pod: str, *cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.container(pod), *cmd, check=check, timeout=120)

    def logs(self, pod: str) -> str:
        proc = podman("logs", self.container(pod), check=False)
        return proc.stdout + proc.stderr

    def state_of(self, pod: str) -> dict:
        return json.loads(podman("inspect", self.container(pod), "--format",
                                 '{"Running": {{json .State.Running}}, "RestartCount": {{.RestartCount}}}').stdout)

    def status(self) -> dict | None:
        proc = self.exec(UPLOADER, "mmdet-wandb", "status", "--json")
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for pod in self.pods:
                state = self.state_of(pod)
                if not state["Running"] or state["RestartCount"]:
                    raise AssertionError(f"{pod} stopped while waiting for {what}: {state}\n{self.logs(pod)[-4000:]}")
            time.sleep(2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n"
                             + "\n".join(f"--- {pod}\n{self.logs(pod)[-3000:]}" for pod in self.pods))

    def down(self) -> None:
        for path in reversed(self.pods.values()):
            podman("kube", "down", str(path), check=False, timeout=180)
        volumes = podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split()
        for volume in (v for v in volumes if v.startswith(f"{self.tag}-")):
            podman("volume", "rm", "-f", volume, check=False)
        for secret in self.secrets:
            podman("secret", "rm", secret, check=False)
        podman("network", "rm", "-f", self.network, check=False)


DB = "mmdet-wandb-db"  # the Service's name: the Secret's db-url names it, and podman's DNS resolves a pod's name
UPLOADER = "mmdet-wandb-uploader"
EVALUATOR = "mmdet-wandb-evaluator"


@pytest.fixture(scope="module")
def cluster(images) -> Iterator[Cluster]:
    """The three pods on a copy of a real tiny training, until its model versions, the val table and a prediction
    table per checkpoint are uploaded; torn down (pods, volumes, secrets, network) after the module."""
    require_mmdet()
    built = images_sh("build", "postgres", timeout=600, BASE="local")
    assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
    root = Path(tempfile.mkdtemp(prefix="mmdet-wandb-kube-", dir="/var/tmp"))
    root.chmod(0o755)  # the pods run as uid 1000: they read the work_dirs as other users
    (root / "work_dirs").mkdir(mode=0o755)
    work_dir = copy_work_dir(cached_work_dir("retinanet_epoch"), root / "work_dirs")
    state = root / "state"  # the node's /var/lib/mmdet-wandb: the uploader (uid 1000) writes it
    state.mkdir()
    state.chmod(0o777)
    tag = f"mmdet-wandb-kube-{os.getpid()}"
    # The database and the evaluator on an internal network (no route out: what networkpolicy.yaml leaves the
    # evaluator), the uploader on it and on podman's default network (its way to W&B).
    cluster = Cluster(root, work_dir, state, tag, network=tag)
    folders = {"/data/work_dirs": str(root / "work_dirs"), "/data/datasets": str(cached_dataset().root)}
    try:
        podman("network", "create", "--internal", cluster.network)
        for doc in manifests("secret.example.yaml"):
            secret = root / f"{doc['metadata']['name']}.json"
            secret.write_bytes(podman_secret(doc))
            podman("secret", "create", doc["metadata"]["name"], str(secret))
            cluster.secrets.append(doc["metadata"]["name"])
        cluster.play(pod_of(workload("postgres.yaml", "StatefulSet"), DB, folders, state, tag), cluster.network)
        ready = workload("postgres.yaml", "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        cluster.wait_for(lambda: cluster.exec(DB, *ready["exec"]["command"]).returncode == 0, 120, "the database")
        cluster.play(pod_of(workload("uploader.yaml", "DaemonSet"), UPLOADER, folders, state, tag, env=OFFLINE),
                     cluster.network, "podman")
        cluster.play(pod_of(workload("evaluator.yaml", "Deployment"), EVALUATOR, folders, state, tag,
                            args={"cuda:0": "cpu"}), cluster.network)  # no GPU here: the CPU image, on the CPU

        def evaluated() -> bool:
            found = (cluster.status() or {"work_dirs": []})["work_dirs"]
            return len(found) == 1 and work_dir_evaluated(found[0], work_dir)

        cluster.wait_for(evaluated, 420, "the model versions, the val table and the predictions")
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


def test_the_pods_upload_the_training_and_evaluate_every_checkpoint_on_postgresql(cluster):
    (work_dir,) = cluster.status()["work_dirs"]
    assert work_dir["node"] == NODE and work_dir["path"] == str(cluster.work_dir)
    assert_uploaded(cluster.state, work_dir, cluster.work_dir, "mmdet2")
    url = cluster.exec(EVALUATOR, "sh", "-c", "echo $MMDET_WANDB_DB_URL", check=True).stdout
    assert url.startswith("postgresql+psycopg://") and f"@{DB}:5432/" in url, "the state is the PostgreSQL pod's"


def test_the_uploader_pod_writes_the_rows_a_venv_run_writes(cluster, tmp_path):
    """The history of the pod's offline run is the one a backfill of the same work_dir in the venv writes."""
    (work_dir,) = cluster.status()["work_dirs"]
    (run,) = work_dir["runs"]
    pod_rows = offline_run(cluster.state, run["wandb_id"]).history
    home = tmp_path / "venv-home"
    cli(home, "backfill", str(cluster.work_dir), "--no-progress")
    (venv_dir,) = status(home)["work_dirs"]
    (venv_run,) = venv_dir["runs"]
    venv_rows = offline_run(home, venv_run["wandb_id"]).history

    def rows(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "_runtime"} for row in history]

    assert len(pod_rows) == len(venv_rows) > 0
    assert rows(pod_rows) == rows(venv_rows)


def test_the_pods_are_locked_down_seen_from_inside(cluster):
    with socket.create_server(("0.0.0.0", 0)) as listening:
        port = listening.getsockname()[1]
        probes = {pod: json.loads(cluster.exec(pod, "python3", "-c", PROBE, host_address(), str(port),
                                               str(cluster.work_dir), check=True).stdout)
                  for pod in (EVALUATOR, UPLOADER)}
    evaluator, uploader = probes[EVALUATOR], probes[UPLOADER]
    assert evaluator["connect"] != "connected", evaluator
    assert evaluator["wandb"] == [] and evaluator["uid"] == 1000 and int(evaluator["caps"], 16) == 0, evaluator
    assert evaluator["root"] == "EROFS" and evaluator["work_dir"] == "EROFS" and evaluator["store"] == "EROFS", evaluator
    assert evaluator["tmp"] == "written", "HOME and the caches are the emptyDir /tmp"
    assert uploader["work_dir"] == "EROFS" and uploader["root"] == "EROFS", uploader
    assert uploader["uid"] == 1000 and int(uploader["caps"], 16) == 0, uploader
    assert uploader["wandb"] == ["WANDB_API_KEY", "WANDB_MODE"], "the Secret's key: the uploader's alone"
    assert uploader["connect"] == "connected", "the uploader keeps its network (W&B)"


GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).status)"


def test_the_probes_answer_in_the_pods(cluster):
    """What the kubelet would ask (podman 4.3 runs no probes without systemd, docs/deployment.md): the uploader's
    httpGet probes on its named port, the evaluator's exec probe, as the manifests write them."""
    (uploader,) = workload("uploader.yaml", "DaemonSet")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in uploader["ports"]}
    for probe in (uploader["livenessProbe"], uploader["readinessProbe"]):
        url = f"http://127.0.0.1:{ports[probe['httpGet']['port']]}{probe['httpGet']['path']}"
        got = cluster.exec(UPLOADER, "python3", "-c", GET, url)
        assert got.returncode == 0 and got.stdout.strip() == "200", (url, got.stdout, got.stderr)
    (evaluator,) = workload("evaluator.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    got = cluster.exec(EVALUATOR, *evaluator["livenessProbe"]["exec"]["command"])
    assert got.returncode == 0, got.stdout + got.stderr


def test_sigterm_ends_the_pods_containers_cleanly(cluster):
    """SIGTERM to each app container while its pod (the network) stays, as the kubelet does, within the manifests'
    terminationGracePeriodSeconds: both exit 0. Last: the pods stay stopped. (`podman pod stop` is not this:
    podman 4.3 stops the infra container at once, see docs/deployment.md.)"""
    for pod, name in ((UPLOADER, "uploader.yaml"), (EVALUATOR, "evaluator.yaml")):
        (doc,) = [d for d in manifests(name) if d["kind"] in ("DaemonSet", "Deployment")]
        grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        podman("stop", "-t", str(grace), cluster.container(pod), timeout=grace + 60)
        state = json.loads(podman("inspect", cluster.container(pod), "--format", "{{json .State}}").stdout)
        assert state["Status"] == "exited" and state["ExitCode"] == 0, (pod, state, cluster.logs(pod)[-3000:])
