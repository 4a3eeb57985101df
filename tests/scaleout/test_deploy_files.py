"""The Kubernetes manifests and the Dockerfile agree with the code (checked without a cluster)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from loraquilt.scaleout.config import ReplicaConfig

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO / "deploy").glob("rayservice-*.yaml"))


def test_there_is_a_cpu_and_a_gpu_manifest():
    assert {path.name for path in MANIFESTS} == {"rayservice-cpu.yaml", "rayservice-gpu.yaml"}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.name)
def test_manifest_application_matches_the_code(manifest):
    document = yaml.safe_load(manifest.read_text())
    assert document["apiVersion"] == "ray.io/v1" and document["kind"] == "RayService"
    serve_config = yaml.safe_load(document["spec"]["serveConfigV2"])
    for function in serve_config["grpc_options"]["grpc_servicer_functions"]:
        module, _, name = function.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name)), function
    (application,) = serve_config["applications"]
    module, _, builder = application["import_path"].partition(":")
    assert module == "loraquilt.scaleout.app"
    tree = ast.parse((REPO / "scaleout" / "app.py").read_text())  # without importing Ray
    assert builder in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    args = dict(application["args"])
    args.pop("replicas"), args.pop("admin_token_file")
    args["adapter_root"] = Path(args["adapter_root"])
    config = ReplicaConfig(**args)  # every other key is a ReplicaConfig field, with a valid value
    assert config.metrics_port == 9464
    workers = document["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert float(workers["rayStartParams"]["num-cpus"]) >= config.threads
    if "gpu" in manifest.name:
        assert config.num_gpus == 1 and workers["rayStartParams"]["num-gpus"] == "1"
    image = workers["template"]["spec"]["containers"][0]["image"]
    assert image.endswith("-ray")


def test_replica_config_fields_are_plain_data():
    names = {field.name for field in dataclasses.fields(ReplicaConfig)}
    assert {"model", "adapter_root", "max_adapters_per_replica", "threads", "num_gpus", "metrics_port"} <= names


def test_dockerfile_copies_every_package_folder():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = set(re.findall(r"^COPY (\S+) \./", (REPO / "Dockerfile").read_text(), flags=re.M))
    assert folders <= copied, folders - copied
    assert "ray" in pyproject["project"]["optional-dependencies"]
