"""Registrations that survive restarts: `serve --state-dir DIR` keeps the registered
adapters in DIR/adapters.json.

Every successful register/unregister rewrites the file before the call returns: written
to a temporary file in DIR, fsynced, renamed over the old one, and the folder fsynced, so
a SIGKILL at any moment leaves either the file before the call or the one after it. At
start the server registers the recorded adapters again (server/app.py). A file that is not
valid JSON, not in this layout, or of another version stops the start with an error that
names it, and is left as it is.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from loraquilt.server.json_input import JsonInputError, load_json

STATE_FILE = "adapters.json"
STATE_VERSION = 1


class StateFileError(RuntimeError):
    """A state file the server will not start with."""


@dataclass(frozen=True)
class RecordedAdapter:
    name: str
    path: str  # the folder, resolved (inside the adapter root when recorded)
    fingerprint: tuple | None  # the files as registered (registry.file_fingerprint)
    rank: int = 0  # what registration found in the folder, for listings before it is read again
    target_modules: tuple[str, ...] = ()
    size_bytes: int = 0


def _fingerprint_from_json(value) -> tuple | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, list) and all(isinstance(x, int) for x in item)
                                              for item in value):
        raise ValueError("fingerprint must be a list of integer lists")
    return tuple(tuple(item) for item in value)


class RegistrationState:
    """The state file of one server. `save` is safe from any thread; the last call wins,
    and it writes what the registry holds at that moment."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / STATE_FILE
        self._lock = threading.Lock()

    def load(self) -> list[RecordedAdapter]:
        """The recorded adapters; none when there is no file yet."""
        if not self.path.exists():
            return []
        how_to_go_on = "it is left as it is; move it away to start without the recorded adapters"
        try:
            data = load_json(self.path.read_bytes())
        except (OSError, JsonInputError) as error:
            raise StateFileError(f"state file {self.path} cannot be read as JSON ({error}); {how_to_go_on}") from None
        if not isinstance(data, dict) or "version" not in data:
            raise StateFileError(f"state file {self.path} is not a loraquilt state file; {how_to_go_on}")
        if data["version"] != STATE_VERSION:
            raise StateFileError(f"state file {self.path} has version {data['version']!r}; this loraquilt "
                                 f"reads version {STATE_VERSION}; {how_to_go_on}")
        try:
            adapters = [RecordedAdapter(entry["name"], entry["path"], _fingerprint_from_json(entry.get("fingerprint")),
                                        int(entry.get("rank", 0)), tuple(entry.get("target_modules", ())),
                                        int(entry.get("size_bytes", 0)))
                        for entry in data["adapters"]]
            if not all(isinstance(a.name, str) and isinstance(a.path, str) for a in adapters):
                raise ValueError("names and paths must be strings")
        except (KeyError, TypeError, ValueError) as error:
            raise StateFileError(f"state file {self.path} has a malformed adapter list ({error}); "
                                 f"{how_to_go_on}") from None
        return adapters

    def save(self, records) -> None:
        """Write these registrations (AdapterRecord-like: name, path, fingerprint, rank,
        target_modules, size_bytes) atomically."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            document = {"version": STATE_VERSION, "adapters": [
                {"name": r.name, "path": str(r.path),
                 "fingerprint": None if r.fingerprint is None else [list(item) for item in r.fingerprint],
                 "rank": r.rank, "target_modules": list(r.target_modules), "size_bytes": r.size_bytes}
                for r in sorted(records, key=lambda record: record.name)]}
            temporary = self.folder / f".{STATE_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=1)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
            folder = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself survives a crash
            finally:
                os.close(folder)
