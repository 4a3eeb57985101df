"""Adapter management for every transport: register (path confined to the adapter root),
unregister, list, and, with a state file (`--state-dir`), every change recorded before the
call returns and the recorded adapters restored at start. The gRPC service, the HTTP API's
load/unload routes and the Ray Serve replica call it; failures are raised for
`generation.classify` to map."""

from __future__ import annotations

import threading
from pathlib import Path

from loraquilt.server.adapters.peft_folder import CONFIG_FILE, WEIGHTS_FILE
from loraquilt.server.adapters.registry import AdapterExists, AdapterRecord, UnknownAdapter, file_fingerprint
from loraquilt.server.adapters.state_file import RecordedAdapter, RegistrationState
from loraquilt.server.generation import ErrorKind, GenerationError
from loraquilt.server.request import RequestError, check_adapter_name, check_text, shown

MAX_PATH_CHARS = 1024


def base_id_taken(name: str) -> GenerationError:
    """The refusal of an adapter named like the served base model (over HTTP that name
    always means the base, so the adapter could never be reached)."""
    return GenerationError(ErrorKind.ALREADY_EXISTS, f"{name!r} is the served base model's id; "
                                                     "an adapter under it could never be reached over HTTP")


class AdapterAdmin:
    def __init__(self, engine, adapter_root: Path | None, state: RegistrationState | None = None,
                 resolve_on_first_use: bool = False, reserved_names: tuple[str, ...] = ()):
        """reserved_names: names no adapter may take (the base model's served id, which
        means the base over HTTP)."""
        self.engine, self.adapter_root, self.state = engine, adapter_root, state
        self.reserved_names = frozenset(reserved_names)
        self.resolve_on_first_use = resolve_on_first_use
        self._resolving = threading.Lock()

    def resolve(self, names) -> None:
        """With resolve_on_first_use: register each of `names` that is not registered yet
        from `<adapter root>/<name>`, validated and confined as RegisterAdapter does. First
        uses go one at a time, so concurrent callers for one name read it once. A name
        with no folder there stays unknown (the request then fails NOT_FOUND)."""
        if not self.resolve_on_first_use:
            return
        for name in names:
            if self._registered(name):
                continue
            with self._resolving:
                if self._registered(name):  # another caller registered it meanwhile
                    continue
                if not self.resolve_path(name).is_dir():  # PERMISSION_DENIED outside the root
                    raise UnknownAdapter(name)
                try:
                    self.register(name, name)
                except AdapterExists:
                    pass  # registered by a RegisterAdapter call meanwhile

    def _registered(self, name: str) -> bool:
        try:
            self.engine.adapters.get(name)
            return True
        except UnknownAdapter:
            return False

    def register(self, name: str, path: str) -> AdapterRecord:
        check_adapter_name(name)
        if name in self.reserved_names:
            raise base_id_taken(name)
        record = self.engine.register_adapter(name, self.resolve_path(path))
        self._record()
        return record

    def unregister(self, name: str) -> None:
        check_adapter_name(name)
        self.engine.unregister_adapter(name)
        self._record()

    def _record(self) -> None:
        if self.state is not None:
            self.state.save(self.engine.adapters.records())

    def restore(self, recorded: list[RecordedAdapter], log) -> list[str]:
        """Register the recorded adapters again, validated as registration validates them;
        one whose files changed since they were recorded (or that no longer validates) is
        skipped with a log line. Returns the names skipped."""
        skipped = []
        for entry in recorded:
            reason = None
            if entry.name in self.reserved_names:
                reason = "the name is now the served base model's id"
            elif file_fingerprint(Path(entry.path)) != entry.fingerprint:
                reason = "its files changed (or went away) since it was registered"
            else:
                try:
                    self.engine.register_adapter(entry.name, self.resolve_path(entry.path))
                except Exception as error:  # the same refusals as RegisterAdapter
                    reason = str(error)
            if reason is not None:
                skipped.append(entry.name)
                log(f"adapter {entry.name!r} ({entry.path}) not restored: {reason}; register it again "
                    "to serve the files there now")
        return skipped

    def records(self) -> list[AdapterRecord]:
        """What the listings show: the registered adapters, then the derived ones (merges)
        while their weights are in memory."""
        adapters = self.engine.adapters
        return sorted(adapters.records(), key=lambda record: record.name) + \
            sorted(adapters.resident_derived(), key=lambda record: record.name)

    def resolve_path(self, path: str) -> Path:
        """`path` resolved inside the adapter root, or the error that refuses it."""
        root = self.adapter_root
        if root is None:
            raise GenerationError(ErrorKind.FAILED_PRECONDITION,
                                  "adapter registration is disabled: the server has no --adapter-root")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise RequestError("path", "must be a non-empty path without NUL characters")
        check_text("path", path)
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
