"""Build the Dockerfile's cpu target with podman where no image registry is reachable.

    python3 deploy/docker/build_local.py [--tag loraquilt:cpu]

1. The base: a minimal Debian rootfs with python3, its venv module, gcc and CA certificates,
   made by `mmdebstrap` from Debian's package mirror, kept as a tarball under the user cache
   (`$XDG_CACHE_HOME/loraquilt/image-base`, keyed by suite, package list and mirror) and
   imported into podman as `localhost/loraquilt-base:<suite>-<key>`; both steps are skipped
   when their result exists.
2. `podman build --target cpu --build-arg CPU_BASE=<that base>`, with pip configured as on
   this machine: index, extra indexes, find-links folders and CA bundle are read from
   `pip config list` (environment included), passed as PIP_* build arguments, and every
   local folder or file among them is mounted read-only into the build at its own path.
   When a find-links folder holds a CPU torch wheel (`torch-*+cpu-*.whl`), the build takes
   torch from there (`TORCH_INDEX_URL=`) instead of the PyTorch CPU index.

`run_options()` gives the podman options that containers need on this host besides the
image (see its docstring); the image test (tests/deploy/test_image.py) uses both.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "gcc", "libc6-dev", "ca-certificates")
# what a server never reads: documentation, manual pages and translations
PATH_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
NPROC_CEILING = 32768  # rootful podman runs its runtime under at most this process limit


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "loraquilt" / "image-base"


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+ " + shlex.join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, **kwargs)


def image_exists(podman: str, tag: str) -> bool:
    return subprocess.run([podman, "image", "exists", tag], capture_output=True).returncode == 0


def base_image(podman: str = "podman", mirror: str | None = None, suite: str = SUITE,
               cache: Path | None = None) -> str:
    """The local base image's tag, made (mmdebstrap) and imported (podman) only when absent."""
    key_text = "\n".join([suite, mirror or "", *BASE_PACKAGES, *PATH_EXCLUDES])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    tag = f"localhost/loraquilt-base:{suite}-{key}"
    if image_exists(podman, tag):
        return tag
    cache = cache or cache_dir()
    tarball = cache / f"debian-{suite}-{key}.tar"
    if not tarball.exists():
        mmdebstrap = shutil.which("mmdebstrap")
        if mmdebstrap is None:
            raise BuildError("mmdebstrap is not installed (Debian: apt-get install mmdebstrap)")
        cache.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".tar.partial")
        command = [mmdebstrap, "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                   *(f"--dpkgopt=path-exclude={pattern}" for pattern in PATH_EXCLUDES),
                   "--format=tar", suite, str(partial)]
        if mirror:
            command.append(mirror)
        if _run(command).returncode != 0:
            partial.unlink(missing_ok=True)
            raise BuildError(f"mmdebstrap failed making the {suite} base")
        partial.rename(tarball)
    if _run([podman, "import", "--quiet", str(tarball), tag], stdout=subprocess.DEVNULL).returncode != 0:
        raise BuildError(f"podman import of {tarball} failed")
    return tag


# -- pip's settings on this machine ----------------------------------------------------------

PIP_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "cert")


def pip_settings() -> dict[str, str]:
    """pip's effective settings among PIP_KEYS, as `pip config list` reports them: an
    environment variable (`:env:.key`) over `install.key` over `global.key`."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True)
    found: dict[str, dict[str, str]] = {}
    for line in result.stdout.splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, key = name.rpartition(".")
        if key in PIP_KEYS:
            found.setdefault(key, {})[section] = value.strip().strip("'\"")
    settings = {}
    for key, by_section in found.items():
        for section in (":env:", "install", "global"):
            if by_section.get(section):
                settings[key] = by_section[section]
                break
    return settings


def _local_path(location: str) -> Path | None:
    if location.startswith("file:"):
        return Path(unquote(urlparse(location).path))
    if location.startswith("/"):
        return Path(location)
    return None


def build_options(settings: dict[str, str]) -> tuple[list[str], list[str], bool]:
    """(--build-arg options, --volume options, whether a local CPU torch wheel is among the
    find-links folders) for pip's settings."""
    args, mounts, local_torch = [], [], False
    mounted: set[Path] = set()
    for key in PIP_KEYS:
        value = settings.get(key)
        if not value:
            continue
        args += ["--build-arg", f"PIP_{key.upper().replace('-', '_')}={value}"]
        for location in value.split():
            path = _local_path(location)
            if path is None or not path.exists():
                continue
            if key == "find-links" and path.is_dir() and any(path.glob("torch-*+cpu-*.whl")):
                local_torch = True
            if key in ("find-links", "cert"):
                target = path
            else:  # a file:// index: mount the folder above `simple/`, where the files lie
                target = path.parent if path.name == "simple" else path
            if target not in mounted:
                mounted.add(target)
                mounts += ["--volume", f"{target}:{target}:ro"]
    return args, mounts, local_torch


# -- running containers here -----------------------------------------------------------------

_RUN_OPTIONS: list[str] | None = None


def _limit_options() -> list[str]:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = [min(value, NPROC_CEILING) if value != resource.RLIM_INFINITY else NPROC_CEILING
             for value in resource.getrlimit(resource.RLIMIT_NPROC)]
    nofile = [value if value != resource.RLIM_INFINITY else 1048576 for value in nofile]
    return ["--ulimit", f"nofile={nofile[0]}:{nofile[1]}", "--ulimit", f"nproc={nproc[0]}:{nproc[1]}"]


def run_options(podman: str, image: str) -> list[str]:
    """Options for `podman run`/`podman build` on this host, found by starting `true` in
    `image`: first with podman's defaults, then with the process limits this process has
    (podman's defaults raise them, which a root without CAP_SYS_RESOURCE may not), then also
    with runc (crun refuses hybrid cgroup v1/v2 hosts). Raises BuildError with the last error
    when nothing starts."""
    global _RUN_OPTIONS
    if _RUN_OPTIONS is not None:
        return list(_RUN_OPTIONS)
    candidates = [[], _limit_options()]
    if shutil.which("runc"):
        candidates.append(["--runtime", "runc", *_limit_options()])
    error = ""
    for options in candidates:
        result = subprocess.run([podman, "run", "--rm", "--network", "none", *options,
                                 "--entrypoint", "true", image],
                                capture_output=True, text=True)
        if result.returncode == 0:
            _RUN_OPTIONS = options
            return list(options)
        error = (result.stderr.strip().splitlines() or ["?"])[-1]
    raise BuildError(f"podman cannot start a container here: {error}")


def build(tag: str = "loraquilt:cpu", podman: str = "podman", mirror: str | None = None,
          context: Path = REPO, extra: list[str] = ()) -> str:
    """Build the cpu target as `tag`; returns the image id. The previous image of that tag
    is removed when the build replaced it (its shared layers stay as cache)."""
    started = time.monotonic()
    base = base_image(podman, mirror)
    print(f"base {base} ready in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    args, mounts, local_torch = build_options(pip_settings())
    if local_torch:
        args += ["--build-arg", "TORCH_INDEX_URL="]
    previous = subprocess.run([podman, "image", "inspect", "--format", "{{.Id}}", tag],
                              capture_output=True, text=True).stdout.strip()
    command = [podman, "build", "--target", "cpu", "--tag", tag, "--network", "host",
               *run_options(podman, base), "--build-arg", f"CPU_BASE={base}", *args, *mounts,
               *extra, "--file", str(context / "Dockerfile"), str(context)]
    if _run(command).returncode != 0:
        raise BuildError("podman build failed")
    image_id = subprocess.run([podman, "image", "inspect", "--format", "{{.Id}}", tag],
                              capture_output=True, text=True, check=True).stdout.strip()
    if previous and previous != image_id:
        subprocess.run([podman, "rmi", previous], capture_output=True)
    print(f"{tag} ({image_id[:12]}) built in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return image_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="loraquilt:cpu")
    parser.add_argument("--podman", default="podman")
    parser.add_argument("--mirror", help="Debian mirror for the base (default: mmdebstrap's)")
    parser.add_argument("--print-run-options", action="store_true",
                        help="print the options `podman run` needs here, after the build")
    args, extra = parser.parse_known_args(argv)
    if shutil.which(args.podman) is None:
        print(f"{args.podman} is not installed (Debian: apt-get install podman)", file=sys.stderr)
        return 1
    try:
        build(args.tag, args.podman, args.mirror, extra=extra)
        if args.print_run_options:
            print(shlex.join(run_options(args.podman, args.tag)))
    except BuildError as error:
        print(f"build_local: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
