"""The images and the compose stack, run for real with podman (docs/deployment.md "What was run"): the images
built by tools/images.sh on the local Debian base, docker-compose.yml with docker-compose.cpu.yml run by
podman-compose on a real tiny training, the hardening checked from inside the running containers, the `mmdet3`
profile on a 3.x training beside a 2.x one, and the PostgreSQL profile with two nodes' uploaders on the
Debian-made PostgreSQL image.
Skipped, with one line, where podman cannot run a container."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, offline_run
from tests.mmdet3_run.fixtures import cached_work_dir3, require_mmdet3
from tests.mmdet_run.fixtures import cached_dataset, cached_work_dir, copy_work_dir, require_mmdet

# CI runs these in a stage of their own (`-m containers`); a cold build installs torch into the evaluator image
pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

VERSION = "0.1.0"
BASE = "mmdet-wandb-debian:bookworm"
NUM = 6  # val images in the tables


def engine_env() -> dict[str, str]:
    """podman's environment: runc where it is installed (crun fails on cgroup v1 hosts), no default ulimits
    (runc may not raise them); a CONTAINERS_CONF the caller set wins."""
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env:
        conf = Path(tempfile.gettempdir()) / "mmdet-wandb-containers.conf"
        runtime = '[engine]\nruntime = "runc"\n' if shutil.which("runc") else ""
        conf.write_text(f"[containers]\ndefault_ulimits = []\n{runtime}")
        env["CONTAINERS_CONF"] = str(conf)
    return env


def podman(*args: str, check: bool = True, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], env={**engine_env(), **env}, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def images_sh(*args: str, timeout: float = 3000, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "tools" / "images.sh"), *args], env={**engine_env(), **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


@pytest.fixture(scope="session")
def images() -> None:
    """The local base, the uploader and the CPU evaluator images (each step cached by podman: a warm run only
    checks the layers); skips where podman cannot run a container."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman runc debootstrap): no container tests")
    info = podman("info", check=False)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {first_line(info.stderr)}")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        made = images_sh("base")
        assert made.returncode == 0, made.stderr[-4000:]
    ran = podman("run", "--rm", "--network", "none", BASE, "true", check=False)
    if ran.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {first_line(ran.stderr)}")
    built = images_sh("build", "uploader", "evaluator-cpu", BUILD_PIP_CONF="host", BASE="local")
    assert built.returncode == 0, (built.stdout + built.stderr)[-6000:]


def test_a_build_without_the_pip_configuration_fails_in_one_line(images, tmp_path):
    proc = images_sh("build", "uploader", timeout=600, BASE="local", BUILD_FLAGS="--no-cache",
                     BUILD_PIP_CACHE=str(tmp_path / "empty-cache"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("image build:")]
    assert proc.returncode != 0
    assert len(lines) == 1 and "pip cannot fetch packages from its index" in lines[0] and "BUILD_PIP_CONF" in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


# --- the compose stack ----------------------------------------------------------------------------------------


def compose_files() -> list[str]:
    """docker-compose.yml for a node without a GPU; on podman 4 (no `subpath` mounts) the state DB on its own volume."""
    major = int(podman("version", "--format", "{{.Client.Version}}").stdout.split(".")[0])
    podman4 = ["docker-compose.podman4.yml", "docker-compose.podman4-mounts.yml"] if major < 5 else []
    return ["docker-compose.yml", "docker-compose.cpu.yml", *podman4]


@dataclass
class Stack:
    project: str
    work_dirs: Path
    work_dir: Path
    env: dict[str, str]
    more_files: tuple[str, ...] = ()  # after compose_files()
    profiles: tuple[str, ...] = ()
    services: tuple[str, ...] = ("uploader", "evaluator")  # the ones whose exit (a restart) fails a wait

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        files = [arg for name in (*compose_files(), *self.more_files) for arg in ("-f", name)]
        profiles = [arg for name in self.profiles for arg in ("--profile", name)]
        proc = subprocess.run(
            [sys.executable, "-m", "podman_compose", "-p", self.project, *files, *profiles, *args],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def exec(self, service: str, *cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.container(service), *cmd, check=check, timeout=120)

    @property
    def state(self) -> Path:
        return Path(podman("volume", "inspect", f"{self.project}_state", "--format", "{{.Mountpoint}}").stdout.strip())

    def status(self) -> dict | None:
        proc = self.exec("uploader", "mmdet-wandb", "status", "--json")
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def artifacts(self) -> list:
        found = []
        for work_dir in (self.status() or {"work_dirs": []})["work_dirs"]:
            for run in work_dir["runs"]:
                for segment in offline_run(self.state, run["wandb_id"]).segments:
                    found.extend(segment.artifacts)
        return found

    def restarts(self, service: str) -> int:
        """How often the restart policy restarted it (a service that exits is a failure here)."""
        proc = podman("inspect", self.container(service), "--format", "{{.RestartCount}}", check=False)
        return int(proc.stdout.strip() or 0)

    def logs(self, service: str) -> str:
        proc = podman("logs", self.container(service), check=False)
        return proc.stdout + proc.stderr


def wait_for(predicate, timeout: float, what: str, stack: Stack) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        restarted = [s for s in stack.services if stack.restarts(s)]
        if restarted:
            raise AssertionError(f"{restarted} exited while waiting for {what}\n{stack.logs(restarted[0])[-4000:]}")
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n"
                         + "\n".join(f"--- {s}\n{stack.logs(s)[-4000:]}" for s in stack.services))


def regular_checkpoints(work_dir: Path) -> list[str]:
    return sorted(p.name for p in work_dir.glob("epoch_*.pth"))


def evaluated(stack: Stack, *paths: Path) -> bool:
    """`status --json` lists the trainings at `paths` and no other, each evaluated (work_dir_evaluated)."""
    by_path = {w["path"]: w for w in (stack.status() or {"work_dirs": []})["work_dirs"]}
    return sorted(by_path) == sorted(map(str, paths)) and all(work_dir_evaluated(by_path[str(p)], p) for p in paths)


def work_dir_evaluated(work_dir: dict, path: Path) -> bool:
    """`status --json`'s entry of the work_dir at `path`: every checkpoint a model version, every one evaluated."""
    jobs = work_dir["eval_jobs"]
    models = [c for c in work_dir["checkpoints"] if c["aliases"]]
    return (sorted(j["checkpoint"] for j in jobs) == regular_checkpoints(path)
            and all(j["table_uploaded"] for j in jobs) and len(models) == len(work_dir["checkpoints"]) > 0)


def compose_env(work_dirs: Path, datasets: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in engine_env().items() if not k.startswith(("WANDB_", "MMDET_WANDB_"))}
    env.update(WORK_DIRS=str(work_dirs), DATASETS=str(datasets), WANDB_MODE="offline", MMDET_WANDB_LOG_CHECKPOINT="1",
               MMDET_WANDB_NUM_EVAL_IMAGES=str(NUM), MMDET_WANDB_NODE="container-test")
    env.update(extra)
    return env


def training_root(prefix: str) -> tuple[Path, Path]:
    """A folder of the test's under /var/tmp and its work_dirs, readable by the services (uid 1000: they read the
    work_dirs as other users)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    root.chmod(0o755)
    work_dirs = root / "work_dirs"
    work_dirs.mkdir(mode=0o755)
    return root, work_dirs


@contextmanager
def running(stack: Stack, root: Path, timeout: float) -> Iterator[Stack]:
    """The stack up until every training under its work_dirs is uploaded and evaluated; then torn down (with its
    volumes) and `root` removed."""
    trainings = sorted(p for p in stack.work_dirs.iterdir() if p.is_dir())
    try:
        stack.compose("up", "-d", "--no-build")
        wait_for(lambda: evaluated(stack, *trainings), timeout,
                 "every checkpoint's model version, the val table and the predictions", stack)
        yield stack
    finally:
        stack.compose("down", "-v", "-t", "30", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(images) -> Iterator[Stack]:
    """The stack up on a copy of a real tiny training, until the model versions, the val table and a prediction
    table per checkpoint are uploaded; torn down (with its volume) after the module."""
    require_mmdet()
    root, work_dirs = training_root("mmdet-wandb-compose-")
    work_dir = copy_work_dir(cached_work_dir("retinanet_epoch"), work_dirs)
    with running(Stack(f"mmdet-wandb-test-{os.getpid()}", work_dirs, work_dir,
                       compose_env(work_dirs, cached_dataset().root)), root, 420) as up:
        yield up


def assert_uploaded(state: Path, work_dir: dict, path: Path, stack_name: str) -> None:
    """What a venv run gives, in the offline run under `state` of `status --json`'s entry `work_dir` (the training at
    `path`): every checkpoint a model version, the val table, a prediction table of NUM rows per epoch checkpoint,
    and every eval job done by a worker of the stack `stack_name`."""
    (run,) = work_dir["runs"]
    arts = [a for segment in offline_run(state, run["wandb_id"]).segments for a in segment.artifacts]
    models = [a for a in arts if a.type == "model"]
    (val,) = [a for a in arts if a.type == "dataset"]
    preds = [a for a in arts if a.type == "evaluation"]
    assert sorted(e["path"] for a in models for e in a.entries) == sorted(p.name for p in path.glob("*.pth") if not p.is_symlink())
    assert val.name == "val" and [e for e in val.entries if e["path"] == "val_data.table.json"]
    assert sorted(a.metadata["checkpoint"] for a in preds) == regular_checkpoints(path)
    for pred in preds:
        (table,) = [e for e in pred.entries if e["path"] == "eval_data.table.json"]
        local = state / Path(table["local_path"]).relative_to("/var/lib/mmdet-wandb")  # a path in the container
        assert len(json.loads(local.read_text())["data"]) == NUM
    assert {(j["stack"], j["state"]) for j in work_dir["eval_jobs"]} == {(stack_name, "done")}, work_dir["eval_jobs"]


def test_the_stack_uploads_the_training_and_evaluates_every_checkpoint(stack):
    (work_dir,) = stack.status()["work_dirs"]
    assert_uploaded(stack.state, work_dir, stack.work_dir, "mmdet2")


PROBE = r"""
import errno, json, os, socket, sys
def write(path):
    try:
        with open(os.path.join(path, ".probe"), "w"):
            pass
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "written"
def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return type(exc).__name__
    return "connected"
caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
host, port, work_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print(json.dumps(dict(uid=os.getuid(), caps=caps, wandb=sorted(k for k in os.environ if k.startswith("WANDB_")),
                      root=write("/usr"), work_dir=write(work_dir), store=write("/var/lib/mmdet-wandb/store"),
                      tmp=write("/tmp"), connect=connect(host, port),
                      interfaces=sorted(name for _, name in socket.if_nameindex()))))
"""


def host_address() -> str:
    """An address of this host other than loopback (the one a default route leaves by)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: it picks the source address
        return probe.getsockname()[0]


def probe(stack: Stack, service: str, host: str, port: int) -> dict:
    proc = stack.exec(service, "python3", "-c", PROBE, host, str(port), str(stack.work_dir), check=True)
    return json.loads(proc.stdout)


def assert_evaluator_locked_down(found: dict) -> None:
    """An evaluator's probe: no network, no W&B secret, no capability, not root, and it writes nothing but /tmp."""
    assert found["connect"] != "connected" and found["interfaces"] == ["lo"], found
    assert found["wandb"] == [] and found["uid"] != 0 and int(found["caps"], 16) == 0, found
    assert found["root"] == "EROFS" and found["work_dir"] == "EROFS" and found["store"] == "EROFS", found
    assert found["tmp"] == "written", "HOME and the caches are the tmpfs /tmp"


def test_the_containers_are_locked_down_seen_from_inside(stack):
    with socket.create_server(("0.0.0.0", 0)) as listening:
        port = listening.getsockname()[1]
        evaluator = probe(stack, "evaluator", host_address(), port)
        uploader = probe(stack, "uploader", host_address(), port)
    assert_evaluator_locked_down(evaluator)
    assert uploader["work_dir"] == "EROFS" and uploader["root"] == "EROFS", uploader
    assert uploader["uid"] != 0 and int(uploader["caps"], 16) == 0, uploader
    assert uploader["connect"] == "connected", "the uploader keeps its network (W&B)"


def test_a_restarted_uploader_uploads_nothing_twice(stack):
    before = [(a.type, a.name, a.metadata.get("checkpoint")) for a in stack.artifacts()]
    started = podman("inspect", stack.container("uploader"), "--format", "{{.State.StartedAt}}").stdout
    podman("restart", "-t", "60", stack.container("uploader"))
    assert podman("inspect", stack.container("uploader"), "--format", "{{.State.StartedAt}}").stdout != started
    wait_for(lambda: stack.status() is not None and stack.exec("uploader", "mmdet-wandb", "health", "uploader").returncode == 0,
             180, "the restarted uploader's heartbeat", stack)
    wait_for(lambda: evaluated(stack, stack.work_dir), 60, "the state after the restart", stack)
    after = [(a.type, a.name, a.metadata.get("checkpoint")) for a in stack.artifacts()]
    assert sorted(after, key=str) == sorted(before, key=str), "nothing uploaded twice"


def assert_stops_cleanly(stack: Stack) -> None:
    """`stop` (SIGTERM, then the grace period) ends every service with exit status 0."""
    stack.compose("stop", "-t", "120")
    for service in stack.services:
        state = json.loads(podman("inspect", stack.container(service), "--format", "{{json .State}}").stdout)
        assert state["Status"] == "exited" and state["ExitCode"] == 0, (service, state, stack.logs(service)[-3000:])


def test_sigterm_stops_the_stack_cleanly(stack):
    assert_stops_cleanly(stack)


def test_a_compose_run_on_a_missing_work_dirs_path_fails_in_one_line(images, tmp_path):
    missing = tmp_path / "no-such-work_dirs"
    stack = Stack(f"mmdet-wandb-missing-{os.getpid()}", missing, missing, compose_env(missing, tmp_path))
    try:
        proc = stack.compose("up", "-d", "--no-build", "uploader", check=False, timeout=120)
        running = podman("ps", "--filter", f"name={stack.project}", "--format", "{{.Names}}").stdout.split()
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if str(missing) in line and "does not exist" in line]
        assert proc.returncode != 0 and not running, proc.stdout + proc.stderr
        assert errors and not missing.exists(), proc.stdout + proc.stderr
    finally:
        stack.compose("down", "-v", check=False, timeout=120)


# --- the PostgreSQL profile, two nodes ------------------------------------------------------------------------


def merged_service(stack: Stack, service: str) -> dict:
    """One service as compose resolves it from the repo's files (`config`), to copy for a second node."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, tag, node: None)  # `!reset` in the x- anchors: not read here
    return yaml.load(stack.compose("config").stdout, Loader=Loader)["services"][service]


B_HOME = "node-b"  # node-b's data dir in the state volume


def test_two_nodes_and_an_evaluator_share_one_postgresql(images):
    """docker-compose.postgres.yml on the PostgreSQL image tools/images.sh builds from Debian's package: the
    uploader of node-a, a second uploader (node-b, its own training) made from the same service, and the
    evaluator, all on one database; each node's training arrives once, every checkpoint of both evaluated."""
    require_mmdet()
    built = images_sh("build", "postgres", timeout=600, BASE="local")
    assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
    root = Path(tempfile.mkdtemp(prefix="mmdet-wandb-pg-", dir="/var/tmp"))
    root.chmod(0o755)
    paths = {node: root / node for node in ("node-a", "node-b")}
    trainings = {}
    for node, path in paths.items():
        path.mkdir(mode=0o755)
        trainings[node] = copy_work_dir(cached_work_dir("retinanet_epoch"), path)
    env = compose_env(paths["node-a"], cached_dataset().root, MMDET_WANDB_NODE="node-a", POSTGRES_PASSWORD="test-only",
                      POSTGRES_IMAGE=f"mmdet-wandb-postgres:{VERSION}")
    stack = Stack(f"mmdet-wandb-pg-{os.getpid()}", paths["node-a"], trainings["node-a"], env, ("docker-compose.postgres.yml",))
    second = root / "second-node.yml"
    try:
        uploader = json.loads(json.dumps(merged_service(stack, "uploader")).replace(str(paths["node-a"]), str(paths["node-b"]))
                              .replace("node-a", "node-b"))
        # Its own data dir (one uploader per data dir), in the state volume the evaluator reads the pins of both in.
        uploader["environment"]["MMDET_WANDB_HOME"] = f"/var/lib/mmdet-wandb/{B_HOME}"
        evaluator_sees_b = {"type": "bind", "source": str(paths["node-b"]), "target": str(paths["node-b"]), "read_only": True}
        second.write_text(json.dumps({"services": {"uploader-b": uploader, "evaluator": {"volumes": [evaluator_sees_b]}}}))
        stack.more_files += (str(second),)
        # podman-compose with podman 4.3 and no systemd runs no healthchecks, so `service_healthy` is not waited
        # for (the restart policy would cover it; the test counts restarts as failures): the database first.
        stack.compose("up", "-d", "--no-build", "db")
        wait_for(lambda: stack.exec("db", "pg_isready", "-U", "mmdet", "-d", "mmdet_wandb").returncode == 0, 120,
                 "the database", stack)
        stack.compose("up", "-d", "--no-build")

        def both_evaluated() -> bool:
            status = stack.status()
            by_node = {w["node"]: w for w in (status or {"work_dirs": []})["work_dirs"]}
            return sorted(by_node) == sorted(paths) and all(work_dir_evaluated(by_node[n], trainings[n]) for n in paths)

        wait_for(both_evaluated, 600, "both nodes' trainings uploaded and evaluated", stack)
        work_dirs = stack.status()["work_dirs"]
        assert sorted((w["node"], w["path"]) for w in work_dirs) == sorted((n, str(t)) for n, t in trainings.items())
        run_ids = [run["wandb_id"] for w in work_dirs for run in w["runs"]]
        assert len(run_ids) == len(set(run_ids)) == 2, work_dirs
        for work_dir in work_dirs:
            (run,) = work_dir["runs"]
            home = stack.state / (B_HOME if work_dir["node"] == "node-b" else "")
            arts = [a for segment in offline_run(home, run["wandb_id"]).segments for a in segment.artifacts]
            models = [e["path"] for a in arts if a.type == "model" for e in a.entries]
            preds = [a.metadata["checkpoint"] for a in arts if a.type == "evaluation"]
            training = trainings[work_dir["node"]]
            assert sorted(models) == sorted(p.name for p in training.glob("*.pth") if not p.is_symlink()), work_dir["node"]
            assert sorted(preds) == regular_checkpoints(training), work_dir["node"]
        url = stack.exec("uploader", "sh", "-c", "echo $MMDET_WANDB_DB_URL", check=True).stdout
        assert url.startswith("postgresql+psycopg://") and "@db:5432/" in url
    finally:
        stack.compose("down", "-v", "-t", "30", check=False)
        shutil.rmtree(root, ignore_errors=True)


# --- the mmdet3 profile: a 3.x training beside a 2.x one --------------------------------------------------------


@pytest.fixture(scope="module")
def images3(images) -> None:
    """The mmdet 3.x evaluator for a node without a GPU (mmcv 2.1.0 from pip's cache: ./dev.sh's .venv-mmdet3
    compiled it once)."""
    require_mmdet3()
    built = images_sh("build", "evaluator-mmdet3-cpu", BUILD_PIP_CONF="host", BASE="local")
    assert built.returncode == 0, (built.stdout + built.stderr)[-6000:]


@pytest.fixture(scope="module")
def stack3(images3) -> Iterator[Stack]:
    """The stack with `--profile mmdet3` on copies of a real tiny 2.x training and a real tiny 3.x one in the same
    work_dirs, until every checkpoint of both is a model version and evaluated; torn down after the module."""
    require_mmdet()
    root, work_dirs = training_root("mmdet-wandb-compose3-")
    copy_work_dir(cached_work_dir("retinanet_epoch"), work_dirs)
    work_dir3 = copy_work_dir(cached_work_dir3("retinanet3_epoch"), work_dirs)
    with running(Stack(f"mmdet-wandb-mmdet3-{os.getpid()}", work_dirs, work_dir3,
                       compose_env(work_dirs, cached_dataset().root), profiles=("mmdet3",),
                       services=("uploader", "evaluator", "evaluator-mmdet3")), root, 900) as up:
        yield up


def test_the_mmdet3_profile_evaluates_a_3x_training_beside_a_2x_one(stack3):
    by_path = {Path(w["path"]): w for w in stack3.status()["work_dirs"]}
    assert stack3.work_dir in by_path and len(by_path) == 2, sorted(by_path)
    for path, work_dir in by_path.items():
        assert_uploaded(stack3.state, work_dir, path, "mmdet3" if path == stack3.work_dir else "mmdet2")


def test_the_mmdet3_evaluator_is_locked_down_seen_from_inside(stack3):
    with socket.create_server(("0.0.0.0", 0)) as listening:
        found = probe(stack3, "evaluator-mmdet3", host_address(), listening.getsockname()[1])
    assert_evaluator_locked_down(found)


def test_sigterm_stops_the_mmdet3_stack_cleanly(stack3):
    assert_stops_cleanly(stack3)
