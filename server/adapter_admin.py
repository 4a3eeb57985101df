"""Adapter management for every transport: register (path confined to the adapter root),
unregister, list. The gRPC service, the HTTP API's load/unload routes and the Ray Serve
replica call it; failures are raised for `generation.classify` to map."""

from __future__ import annotations

from pathlib import Path

from loraquilt.server.adapters.peft_folder import CONFIG_FILE, WEIGHTS_FILE
from loraquilt.server.adapters.registry import AdapterRecord
from loraquilt.server.generation import ErrorKind, GenerationError, check_adapter_name, shown
from loraquilt.server.request import RequestError

MAX_PATH_CHARS = 1024


class AdapterAdmin:
    def __init__(self, engine, adapter_root: Path | None):
        self.engine, self.adapter_root = engine, adapter_root

    def register(self, name: str, path: str) -> AdapterRecord:
        check_adapter_name(name)
        return self.engine.register_adapter(name, self.resolve_path(path))

    def unregister(self, name: str) -> None:
        check_adapter_name(name)
        self.engine.unregister_adapter(name)

    def records(self) -> list[AdapterRecord]:
        return sorted(self.engine.adapters.records(), key=lambda record: record.name)

    def resolve_path(self, path: str) -> Path:
        """`path` resolved inside the adapter root, or the error that refuses it."""
        root = self.adapter_root
        if root is None:
            raise GenerationError(ErrorKind.FAILED_PRECONDITION,
                                  "adapter registration is disabled: the server has no --adapter-root")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise RequestError("path", "must be a non-empty path without NUL characters")
        if len(path) > MAX_PATH_CHARS:
            raise RequestError("path", f"at most {MAX_PATH_CHARS} characters, got {len(path)}")
        real_root = root.resolve()
        try:  # symlinks and '..' resolved before the check, the folder's and its files'
            candidate = (real_root / path).resolve()
            files = {name: (candidate / name).resolve() for name in (CONFIG_FILE, WEIGHTS_FILE)}
        except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
            reason = error.strerror if isinstance(error, OSError) else "symlink loop"
            raise RequestError("path", f"{shown(path)!r} cannot be resolved: {reason}") from None
        if candidate != real_root and real_root not in candidate.parents:
            raise GenerationError(ErrorKind.PERMISSION_DENIED, f"path {shown(path)!r} resolves outside the adapter root")
        for name, target in files.items():
            if real_root not in target.parents:
                raise GenerationError(ErrorKind.PERMISSION_DENIED,
                                      f"{name} in {shown(path)!r} links outside the adapter root")
        return candidate
