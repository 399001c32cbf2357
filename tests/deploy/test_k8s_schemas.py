"""The Kubernetes manifests against Kubernetes' own OpenAPI schemas (kubernetes-validate, strict: an
unknown field is an error), for the Kubernetes version docs/deployment.md names."""
import copy
import re
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install 'shardps[dev]'")

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "k8s" / "shardps.yaml"


def documented_version() -> str:
    """The version in docs/deployment.md's "validated against ... Kubernetes X.Y" sentence."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    found = re.search(r"validated in CI against the schemas of Kubernetes (\d+\.\d+)", text)
    assert found, "docs/deployment.md must name the Kubernetes version the manifests are validated for"
    return found.group(1) + ".0"


@pytest.fixture(scope="module")
def manifests():
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]


def test_every_manifest_is_valid_for_the_documented_kubernetes_version(manifests):
    version = documented_version()
    assert version in kubernetes_validate.utils.all_versions()
    assert {d["kind"] for d in manifests} == {"Service", "Deployment", "StatefulSet", "Job", "PersistentVolumeClaim"}
    for doc in manifests:
        kubernetes_validate.validate(doc, version, strict=True)  # raises with the path of what is wrong


@pytest.mark.parametrize("spoil, where", [
    (lambda d: d["spec"].__setitem__("replica", 2), "replica"),  # a typo: strict validation catches it
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].__setitem__("containerPort", "7071"),
     "containerPort"),
])
def test_the_validator_catches_a_spoiled_statefulset(manifests, spoil, where):
    sts = copy.deepcopy(next(d for d in manifests if d["kind"] == "StatefulSet"))
    spoil(sts)
    with pytest.raises(kubernetes_validate.ValidationError) as info:
        kubernetes_validate.validate(sts, documented_version(), strict=True)
    assert where in str(info.value) + str(getattr(info.value, "path", ""))
