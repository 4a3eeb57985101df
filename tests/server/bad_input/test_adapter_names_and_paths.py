"""Bad names and paths for RegisterAdapter (traversal, absolute paths, symlinks out of the
adapter root or in a loop, NUL, over-long paths, names taken or malformed) and for
UnregisterAdapter."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from fixtures_bad_input import (
    BAD_NAMES, CONFIG_FILE, DENIED, EXISTS, INVALID, NOT_FOUND, TIMEOUT, WEIGHTS_FILE, Live, expect_refusal,
)

from loraquilt.server.adapter_admin import MAX_PATH_CHARS
from loraquilt.v1 import loraquilt_pb2 as pb


# -- RegisterAdapter: names and paths ---------------------------------------------------


def link_folder_outside(live: Live) -> str:
    (live.root / "escape-dir").symlink_to(live.outside, target_is_directory=True)
    return "escape-dir"


def link_file(name: str, target: Callable[[Live], Path]) -> Callable[[Live], str]:
    """A folder under the root holding the good adapter, but with `name` a symlink to `target`."""
    def setup(live: Live) -> str:
        folder = live.root / f"escape-{name.split('.')[0]}-{target(live).name}"
        shutil.copytree(live.good, folder)
        (folder / name).unlink()
        (folder / name).symlink_to(target(live))
        return folder.name
    return setup


def symlink_loop(live: Live) -> str:
    (live.root / "loop").symlink_to(live.root / "loop")
    return "loop"


def reg(case_id: str, path: str | Callable[[Live], str], code: grpc.StatusCode, needle: str):
    return pytest.param(path, code, needle, id=case_id)


OUTSIDE = "outside the adapter root"
PATH_CASES = [
    reg("dotdot", "../outside/adapter", DENIED, OUTSIDE),
    reg("dotdot-through-an-adapter", "adapter-0/../../outside/adapter", DENIED, OUTSIDE),
    reg("absolute-path-outside", lambda live: str(live.outside), DENIED, OUTSIDE),
    reg("absolute-etc", "/etc", DENIED, OUTSIDE),
    reg("symlinked-folder-escaping", link_folder_outside, DENIED, OUTSIDE),
    reg("symlinked-weights-escaping", link_file(WEIGHTS_FILE, lambda live: live.outside / WEIGHTS_FILE),
        DENIED, f"{WEIGHTS_FILE} in"),
    reg("symlinked-config-escaping", link_file(CONFIG_FILE, lambda live: live.outside / CONFIG_FILE),
        DENIED, f"{CONFIG_FILE} in"),
    reg("weights-linked-to-dev-zero", link_file(WEIGHTS_FILE, lambda live: Path("/dev/zero")),
        DENIED, f"{WEIGHTS_FILE} in"),
    reg("symlink-loop", symlink_loop, INVALID, "path: 'loop' cannot be resolved: symlink loop"),
    reg("empty-path", "", INVALID, "path: must be a non-empty path"),
    reg("path-with-nul", "adapter-0\x00", INVALID, "path: must be a non-empty path without NUL"),
    reg("path-10kB", "a/" * 5_000, INVALID, f"path: at most {MAX_PATH_CHARS} characters"),
    reg("path-10kB-outside", "../" * 3_400, INVALID, f"path: at most {MAX_PATH_CHARS} characters"),
    reg("path-component-too-long", "a" * 300, INVALID, "File name too long"),
    reg("missing-folder", "no-such-folder", INVALID, "does not exist"),
    reg("path-is-a-file", f"adapter-0/{CONFIG_FILE}", INVALID, "is not a folder"),
    reg("the-root-itself", ".", INVALID, f"has no {CONFIG_FILE}"),
]


@pytest.mark.parametrize("path, code, needle", PATH_CASES)
def test_register_refuses_path(live, request, path, code, needle):
    name = "x-" + request.node.callspec.id
    path = path(live) if callable(path) else path
    expect_refusal(lambda: live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, path=path),
                                                     timeout=TIMEOUT), code, needle)
    assert name not in live.adapter_names()
    live.assert_still_serving()


@pytest.mark.parametrize("name", [pytest.param(n, id=key) for key, n in {"empty": "", **BAD_NAMES}.items()])
def test_register_refuses_name(live, name):
    expect_refusal(lambda: live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, path="adapter-1"),
                                                     timeout=TIMEOUT), INVALID, "name: adapter names")
    assert sorted(live.adapter_names()) == ["a0", "a1"]
    live.assert_still_serving()


def test_register_refuses_a_taken_name(live):
    """a0 stays the adapter it was: the canary (on a0) is unchanged."""
    expect_refusal(lambda: live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name="a0", path="adapter-1"),
                                                     timeout=TIMEOUT), EXISTS, "'a0' is already registered")
    live.assert_still_serving()


# -- UnregisterAdapter ------------------------------------------------------------------


@pytest.mark.parametrize("name, code, needle", [
    pytest.param("ghost", NOT_FOUND, "'ghost' is not registered", id="unknown"),
    pytest.param("", INVALID, "name: adapter names", id="empty"),
    *[pytest.param(n, INVALID, "name: adapter names", id=key) for key, n in BAD_NAMES.items()],
])
def test_unregister_refuses(live, name, code, needle):
    expect_refusal(lambda: live.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(name=name), timeout=TIMEOUT),
                   code, needle)
