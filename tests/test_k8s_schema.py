"""Every manifest in k8s/ against the Kubernetes schemas that `kubernetes-validate` ships (offline, strict: a
misspelt field is an error, not a field the API server drops). Its CLI only warns, and exits 0, on a document whose
kind has no schema; here that fails too. The pods themselves run in tests/test_kube.py (podman)."""
from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

KUBERNETES = "1.37"  # the version docs/deployment.md names
MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))


def errors(path: Path) -> list[str]:
    """One line per document of `path` that does not validate, or whose kind has no schema."""
    found = []
    for doc in (d for d in yaml.safe_load_all(path.read_text()) if d is not None):
        name = f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            found.append(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            found.append(f"{name}: {exc.message}")
    return found


def test_there_are_manifests_to_validate():
    assert {p.name for p in MANIFESTS} >= {"uploader.yaml", "evaluator.yaml", "postgres.yaml", "networkpolicy.yaml",
                                          "secret.example.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_manifest_validates_against_the_kubernetes_schemas(path):
    assert errors(path) == []


def uploader_with(change) -> dict:
    (doc,) = yaml.safe_load_all((REPO / "k8s" / "uploader.yaml").read_text())
    broken = copy.deepcopy(doc)
    change(broken)
    return broken


BROKEN = {  # what is broken: (the change, what the error says)
    "a misspelt field": (lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(
        readOnlyRootFileSystem=True), "'readOnlyRootFileSystem' was unexpected"),
    "a wrong type": (lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="120"),
                     "terminationGracePeriodSeconds: '120' is not of type 'integer'"),
    "a missing required field": (lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
                                 "'name' is a required property"),
    "a kind with no schema": (lambda d: d.update(kind="DaemonSets"), "Couldn't find schema for kind DaemonSets"),
}


@pytest.mark.parametrize("what", BROKEN)
def test_a_broken_manifest_fails_the_check(what, tmp_path):
    change, said = BROKEN[what]
    path = tmp_path / "uploader.yaml"
    path.write_text(yaml.safe_dump(uploader_with(change)))
    (error,) = errors(path)
    assert error.startswith("uploader.yaml: ") and said in error, error
