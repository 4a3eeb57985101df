"""Imports go down the layers, never up.

Every module of the package (the folders pyproject.toml maps under `loraquilt`) is parsed
with `ast`; every `loraquilt` import it makes, at module level or inside a function,
absolute or relative, is resolved to a module and checked against the table below. The
CLI's subcommand table names modules as strings (imported when a subcommand runs): those
are not imports and are not checked.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]

# Bottom to top. A module is in the layer of the longest prefix that names it or a package
# above it; a server module not listed is a transport (so nothing below may import it
# until it is placed lower here).
LAYERS: dict[str, tuple[str, ...]] = {
    # the compute kernels, and what the machine is (host.py)
    "kernels": ("loraquilt.kernels",),
    # the transformer, weight loading, NF4 modules, the KV cache
    "model": ("loraquilt.server.model",),
    # requests in, tokens out, one step at a time: engine, scheduling, KV blocks, runner,
    # sampling, adapters, and the engine's helpers and configuration
    "engine": (
        "loraquilt.server.engine",
        "loraquilt.server.engine_args",
        "loraquilt.server.engine_config",
        "loraquilt.server.config_flags",
        "loraquilt.server.scheduler",
        "loraquilt.server.block_manager",
        "loraquilt.server.sequence",
        "loraquilt.server.request",
        "loraquilt.server.runner",
        "loraquilt.server.sampler",
        "loraquilt.server.structured_output",
        "loraquilt.server.logits_processing",
        "loraquilt.server.postprocess",
        "loraquilt.server.choices",
        "loraquilt.server.detokenizer",
        "loraquilt.server.tokenizer",
        "loraquilt.server.adapters",
        "loraquilt.server.cpu_contention",
        "loraquilt.server.torch_threads",
        "loraquilt.server.json_input",
        "loraquilt.server.metrics",
    ),
    # the one generation path every transport uses, the engine's thread, adapter admin
    "generation": (
        "loraquilt.server.generation",
        "loraquilt.server.engine_loop",
        "loraquilt.server.adapter_admin",
    ),
    # the wire contract (generated protobuf code)
    "wire": ("loraquilt.v1",),
    # the Python client: the wire contract only
    "client": ("loraquilt.client",),
    # gRPC, HTTP, the app, Ray Serve, the CLI and the tools it runs (bench, train)
    "transports": (
        "loraquilt",
        "loraquilt.server",
        "loraquilt.scaleout",
        "loraquilt.bench",
        "loraquilt.train",
    ),
}

STACK = ("kernels", "model", "engine", "generation")
MAY_IMPORT: dict[str, frozenset[str]] = {
    **{layer: frozenset(STACK[: index + 1]) for index, layer in enumerate(STACK)},
    "wire": frozenset({"wire"}),
    "client": frozenset({"wire", "client"}),
    "transports": frozenset(LAYERS),
}


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its `__init__.py`)."""
    modules: dict[str, Path] = {}
    for package in SETUPTOOLS["packages"]:
        folder = REPO / SETUPTOOLS["package-dir"][package]
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


MODULES = package_modules()


def layer_of(module: str) -> str:
    best, best_len = "", -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def imported_modules(module: str, path: Path) -> set[str]:
    """The package's modules `module` imports (`from a.b import c` is a.b.c where that is a
    module, else a.b)."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return {name for name in found if name == "loraquilt" or name.startswith("loraquilt.")}


def test_every_module_is_found():
    assert {"loraquilt.kernels.lora.dispatch", "loraquilt.server.model.llama", "loraquilt.server.engine",
            "loraquilt.server.generation", "loraquilt.server.service", "loraquilt.host"} <= set(MODULES)


def test_every_package_folder_is_a_listed_package():
    """A folder with an `__init__.py` under a mapped folder that pyproject.toml does not list
    would not be installed (nor walked here)."""
    listed = {(REPO / folder).resolve() for folder in SETUPTOOLS["package-dir"].values()}
    for folder in set(listed):
        for init in folder.rglob("__init__.py"):
            assert init.parent.resolve() in listed, f"{init.parent.relative_to(REPO)} is not in pyproject.toml"


def test_every_table_entry_names_a_module():
    packages = set(SETUPTOOLS["packages"])
    stale = [prefix for prefixes in LAYERS.values() for prefix in prefixes
             if prefix not in MODULES and prefix not in packages]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


@pytest.mark.parametrize("layer", list(LAYERS))
def test_no_upward_import(layer):
    upward = []
    for module, path in MODULES.items():
        if layer_of(module) != layer:
            continue
        for target in sorted(imported_modules(module, path)):
            target_layer = layer_of(target)
            if target_layer not in MAY_IMPORT[layer]:
                upward.append(f"{path.relative_to(REPO)} ({layer}) imports {target} ({target_layer})")
    assert not upward, ("imports against the layering (move the code down, or place the module "
                        "in its layer in tests/test_layering.py):\n" + "\n".join(upward))


def test_the_resolver_sees_relative_and_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from . import cpu\nfrom ..host import cpu_flags\n\n"
                     "def late():\n    from loraquilt.server import engine\n    import loraquilt.client\n")
    assert imported_modules("loraquilt.kernels.lora.probe", probe) == {
        "loraquilt.kernels.lora.cpu", "loraquilt.kernels.host", "loraquilt.server.engine", "loraquilt.client"}
    assert layer_of("loraquilt.server.engine") == "engine" and layer_of("loraquilt.server.service") == "transports"
    assert layer_of("loraquilt.host") == "transports" and layer_of("loraquilt.kernels.nf4.weight") == "kernels"
