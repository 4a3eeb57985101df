"""One server for the whole folder (fixtures_live), with symlinks out of its adapter root
to throw at the admin paths, and a watch on the files opened outside that root."""

from __future__ import annotations

import os
import shutil

import pytest
from fixtures_fuzz import OpenWatch
from fixtures_live import start_live, stop_live

from loraquilt.server.adapters.peft_folder import CONFIG_FILE, WEIGHTS_FILE


@pytest.fixture(scope="package")
def live(tmp_path_factory):
    live = start_live(tmp_path_factory.mktemp("fuzz"), seed=11)
    os.symlink(live.outside, live.root / "link-out")  # a link inside the root to a folder outside it
    os.symlink(live.outside / CONFIG_FILE, live.root / "config-link")
    mixed = live.root / "mixed-links"  # a folder inside whose config links outside
    mixed.mkdir()
    os.symlink(live.outside / CONFIG_FILE, mixed / CONFIG_FILE)
    shutil.copy(live.good / WEIGHTS_FILE, mixed / WEIGHTS_FILE)
    live.watch = OpenWatch(live.outside.parent)
    live.expected = live.adapter_names()
    yield live
    live.watch.armed = False
    stop_live(live)
