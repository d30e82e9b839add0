"""Podman for the container test, set up the way that works on a registry-less Debian machine.

- The tools come from Debian's packages when podman is missing (`apt-get update` once, then
  `apt-get install`).
- Podman reads configuration files of its own, written into a cache folder (runc, cgroupfs, file
  events logger, overlay storage), so nothing global on the machine changes.
- No image registry can be reached, so the base image `python:3.11-slim` is made locally with
  debootstrap from the Debian mirror that apt is configured with, and imported under that name;
  the Dockerfile stays the one users build elsewhere. So is `debian:bookworm-slim`, on which
  stand-ins for the other images compose.yaml names (postgres:15, nginx:1.27-alpine) are built
  from the recipes in standins/. Each is cached in the podman storage of the cache folder,
  labelled with the recipe it was made from.

Run as a script to do only the install step: `python tests/container/podman_engine.py install`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[2]

T = TypeVar("T")

# Debian packages, keyed by a command each one provides (or its path, off the PATH).
DEBIAN_PACKAGES = {
    "podman": "podman",
    "buildah": "buildah",
    "runc": "runc",
    "fuse-overlayfs": "fuse-overlayfs",
    "newuidmap": "uidmap",
    "slirp4netns": "slirp4netns",
    "debootstrap": "debootstrap",
    "curl": "curl",
    # Compose's networks: bridges with DNS between containers, published ports to loopback.
    "/usr/lib/podman/netavark": "netavark",
    "/usr/lib/podman/aardvark-dns": "aardvark-dns",
    "iptables": "iptables",
}

BASE_SUITE = "bookworm"  # Debian 12, whose python3 is 3.11, as in the image's name.
BASE_RECIPE_LABEL = "org.ticketbooth.test.base-recipe"


@dataclass(frozen=True)
class BaseImage:
    """An official base image, stood in for by a Debian root made with debootstrap."""

    name: str
    packages: tuple[str, ...]
    changes: tuple[str, ...]  # `podman import --change` lines: the image's configuration
    recipe_text: str  # what the cache label is a hash of; change it to remake the image

    def recipe(self) -> str:
        return hashlib.sha256(self.recipe_text.encode()).hexdigest()[:16]


_PYTHON_PACKAGES = (
    "python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates",
)  # fmt: skip
# The Dockerfile's base. The real python:3.11-slim has a `python` command and lets pip install
# into the system: python-is-python3, and no EXTERNALLY-MANAGED marker (removed below).
PYTHON_BASE = BaseImage(
    name="docker.io/library/python:3.11-slim",
    packages=_PYTHON_PACKAGES,
    changes=("ENV LANG=C.UTF-8", 'CMD ["python3"]'),
    recipe_text=f"{BASE_SUITE} minbase {','.join(_PYTHON_PACKAGES)} no-externally-managed v1",
)
# The base of the stand-ins for postgres:15 and nginx (tests/container/standins/), as the real
# images are built on debian:bookworm-slim.
DEBIAN_BASE = BaseImage(
    name="docker.io/library/debian:bookworm-slim",
    packages=(),
    changes=(
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        'CMD ["bash"]',
    ),
    recipe_text=f"{BASE_SUITE} minbase path v1",
)

# The host's CA bundle, mounted read-only into the build so pip there trusts what the host does.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")

# Podman's complaints, on a machine without systemd or syslog, that change nothing.
SUPPRESSED_NOISE = ("unable to get systemd connection", "failed to connect to syslog")


class EngineUnavailable(RuntimeError):
    """No working container engine could be had; the reason is the message."""


def or_fail(headline: str, step: Callable[[], T]) -> T:
    """Run a set-up step of a test; when no engine can do it, fail the test loudly with the
    reason (never skip)."""
    import pytest  # only the tests use this; the install script runs without pytest

    try:
        return step()
    except EngineUnavailable as exc:
        reason = str(exc)
    pytest.fail(f"{headline}: {reason}", pytrace=False)  # outside except: no chained trace


def log(message: str) -> None:
    print(f"[container-test] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where podman's configuration, storage and the base image live between runs."""
    override = os.environ.get("TICKETBOOTH_CONTAINER_CACHE")
    return Path(override).resolve() if override else REPO / ".cache" / "container"


# --------------------------------------------------------------------------- install


def missing_packages() -> list[str]:
    return sorted({pkg for cmd, pkg in DEBIAN_PACKAGES.items() if shutil.which(cmd) is None})


def _run_apt(args: Sequence[str], timeout: float) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        proc = subprocess.run(
            ["apt-get", *args], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise EngineUnavailable(f"apt-get {' '.join(args)} took over {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise EngineUnavailable(
            f"apt-get {' '.join(args)} failed with exit {proc.returncode}:\n{tail}"
        )


def ensure_tools() -> float:
    """Install podman and friends from Debian's packages when any is missing.

    Returns the seconds spent installing (0 when nothing was missing). Raises
    EngineUnavailable, with the reason, when they cannot be installed.
    """
    missing = missing_packages()
    if not missing:
        return 0.0
    why = f"the container test needs Debian packages that are not installed: {' '.join(missing)}"
    if shutil.which("apt-get") is None:
        raise EngineUnavailable(f"{why}; there is no apt-get here to install them")
    if os.geteuid() != 0:
        raise EngineUnavailable(
            f"{why}; installing them needs root (apt-get install -y {' '.join(missing)})"
        )
    log(f"installing from Debian's packages: {' '.join(missing)}")
    started = time.perf_counter()
    _run_apt(["update", "-q"], timeout=300)
    _run_apt(["install", "-y", "-q", *missing], timeout=900)
    still = missing_packages()
    if still:
        raise EngineUnavailable(f"apt-get install finished, yet still missing: {' '.join(still)}")
    took = time.perf_counter() - started
    log(f"installed in {took:.1f} s")
    return took


# --------------------------------------------------------------------------- podman


def write_config(cache: Path) -> dict[str, str]:
    """Write podman's configuration into the cache folder; return the environment using it."""
    cache.mkdir(parents=True, exist_ok=True)
    for sub in ("storage", "run", "tmp"):
        (cache / sub).mkdir(exist_ok=True)
    containers_conf = cache / "containers.conf"
    containers_conf.write_text(
        "# Written by tests/container/podman_engine.py; only the container test uses it.\n"
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        "\n"
        "[engine]\n"
        # crun fails on this kind of host ("cgroups in hybrid mode not supported"); runc works.
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'events_logfile_path = "{cache / "events.log"}"\n'
        f'tmp_dir = "{cache / "tmp"}"\n'
    )
    storage_conf = cache / "storage.conf"
    storage_conf.write_text(
        "# Written by tests/container/podman_engine.py; only the container test uses it.\n"
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{cache / "storage"}"\n'
        f'runroot = "{cache / "run"}"\n'
    )
    registries_conf = cache / "registries.conf"
    registries_conf.write_text(
        "# Written by tests/container/podman_engine.py: short names mean Docker Hub's.\n"
        'unqualified-search-registries = ["docker.io"]\n'
        'short-name-mode = "permissive"\n'
    )
    return {
        **os.environ,
        "CONTAINERS_CONF": str(containers_conf),
        "CONTAINERS_STORAGE_CONF": str(storage_conf),
        "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
    }


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.args)}\nexit {self.returncode} after {self.seconds:.2f} s\n"
            f"--- stdout\n{self.stdout.strip()}\n--- stderr\n{self.stderr.strip()}"
        )


class CommandFailed(AssertionError):
    pass


@dataclass
class Timings:
    """What a container test measured: durations, and figures worth showing."""

    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def run_command(
    argv: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str],
    timeout: float = 120,
    check: bool = True,
    cwd: Path | None = None,
) -> Result:
    """Run a command of the container tools, bounded in time; CommandFailed when it fails
    (with check) or times out. Podman's harmless complaints are left out of stderr."""
    args = [str(arg) for arg in argv]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"$ {' '.join(args)}\ntimed out after {timeout:.0f} s") from exc
    stderr = "\n".join(
        line for line in proc.stderr.splitlines()
        if not any(noise in line for noise in SUPPRESSED_NOISE)
    )
    result = Result(args, proc.returncode, proc.stdout, stderr, time.perf_counter() - started)
    if check and proc.returncode != 0:
        raise CommandFailed(result.describe())
    return result


@dataclass
class Podman:
    env: dict[str, str]
    cache: Path

    def run(
        self,
        *args: str | os.PathLike[str],
        timeout: float = 120,
        check: bool = True,
    ) -> Result:
        return run_command(["podman", *args], self.env, timeout=timeout, check=check)

    def inspect(self, name: str, template: str) -> str:
        return self.run("inspect", "--format", template, name).stdout.strip()

    def image_label(self, image: str, label: str) -> str | None:
        if self.run("image", "exists", image, check=False).returncode != 0:
            return None
        return self.run(
            "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', image
        ).stdout.strip()


def podman_session() -> Podman:
    """Tools installed, configuration written, podman answering: or EngineUnavailable."""
    ensure_tools()
    cache = cache_dir()
    podman = Podman(env=write_config(cache), cache=cache)
    try:
        info = podman.run(
            "info", "--format", "{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}"
        )
    except CommandFailed as exc:
        raise EngineUnavailable(f"podman is installed but does not work here:\n{exc}") from exc
    log(f"podman ready: runtime and storage driver {info.stdout.strip()}")
    return podman


# --------------------------------------------------------------------------- base image


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    key = None
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields, key = {}, None
        elif line[0].isspace() and key is not None:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()


def _apt_sources() -> Iterator[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of every enabled `deb` source in apt's configuration."""
    for path in sorted(APT_SOURCES_DIR.glob("*.sources")):
        for stanza in _deb822_stanzas(path.read_text()):
            if stanza.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in stanza.get("types", "").split():
                continue
            suites = stanza.get("suites", "").split()
            components = stanza.get("components", "").split()
            for uri in stanza.get("uris", "").split():
                yield uri, suites, components
    one_line_files = [APT_SOURCES_LIST, *sorted(APT_SOURCES_DIR.glob("*.list"))]
    for path in one_line_files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            if words and words[0].startswith("["):  # [arch=amd64 signed-by=...]
                while words and not words[0].endswith("]"):
                    words = words[1:]
                words = words[1:]
            if len(words) >= 2:
                yield words[0], [words[1]], words[2:]


def debian_mirror() -> str:
    """The Debian mirror apt is configured with: the source of the main archive's suite."""
    codename = BASE_SUITE
    os_release = Path("/etc/os-release")
    if os_release.is_file():
        for line in os_release.read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                codename = line.partition("=")[2].strip().strip('"')
    candidates = list(_apt_sources())
    for wanted in (BASE_SUITE, codename):
        for uri, suites, components in candidates:
            if wanted in suites and "main" in components and uri.startswith(("http", "file:")):
                return uri.rstrip("/")
    raise EngineUnavailable(
        f"no Debian mirror for '{BASE_SUITE}' (or '{codename}') with component main "
        "found in apt's configuration; debootstrap needs one to make the base image"
    )


def _unmount_below(path: Path) -> None:
    """debootstrap mounts /proc and friends inside the root; never delete through a mount."""
    prefix = str(path.resolve())
    mounts = [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1] == prefix or line.split()[1].startswith(prefix + "/")
    ]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, timeout=30)


def _remove_tree(path: Path) -> None:
    if path.exists():
        _unmount_below(path)
        shutil.rmtree(path)


def ensure_base_image(podman: Podman, base: BaseImage = PYTHON_BASE) -> tuple[str, float]:
    """Make `base` from Debian's packages unless the cached one fits its recipe.

    Returns ("cached" or "built", seconds).
    """
    started = time.perf_counter()
    recipe = base.recipe()
    if podman.image_label(base.name, BASE_RECIPE_LABEL) == recipe:
        return "cached", time.perf_counter() - started

    mirror = debian_mirror()
    work = podman.cache / f"base-{recipe}"
    rootfs = work / "rootfs"
    tarball = work / "rootfs.tar"
    _remove_tree(work)
    work.mkdir(parents=True)
    log(f"making the base image {base.name} with debootstrap ({BASE_SUITE}; about a minute)")
    try:
        proc = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                *([f"--include={','.join(base.packages)}"] if base.packages else []),
                BASE_SUITE,
                str(rootfs),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise EngineUnavailable(f"debootstrap failed with exit {proc.returncode}:\n{tail}")
        _unmount_below(rootfs)
        # The real python:3.11-slim lets pip install into the system; so must the stand-in.
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / leftovers).glob("*"):
                if item.is_file():
                    item.unlink()
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."],
            check=True,
            timeout=300,
        )
        changes = [f"LABEL {BASE_RECIPE_LABEL}={recipe}", *base.changes]
        podman.run(
            "import",
            *[arg for change in changes for arg in ("--change", change)],
            tarball,
            base.name,
            timeout=600,
        )
    finally:
        _remove_tree(work)
    took = time.perf_counter() - started
    log(f"base image made in {took:.1f} s")
    return "built", took


# --------------------------------------------------------------------------- build and run


def build_args() -> list[str]:
    """The `podman build` options that build here as a user's build does elsewhere."""
    args = [
        "--format", "docker",  # HEALTHCHECK is kept only in the docker format
        "--network", "host",  # pip and apt reach their registries from the host's network
        "--pull=never",  # no registry: base images are the local ones
    ]  # fmt: skip
    if CA_BUNDLE.is_file():
        args += ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    return args


def build_image(
    podman: Podman,
    tag: str,
    context: Path = REPO,
    file: str = "Dockerfile",
    labels: Mapping[str, str] | None = None,
) -> float:
    """`podman build` a Dockerfile (the project's by default) as a user would."""
    label_args = [f"--label={key}={value}" for key, value in (labels or {}).items()]
    result = podman.run(
        "build", *build_args(), *label_args, "--tag", tag, "--file", context / file, context,
        timeout=900,
    )
    return result.seconds


# --------------------------------------------------------------------------- stand-in images

STANDINS_DIR = Path(__file__).resolve().parent / "standins"
STANDIN_RECIPE_LABEL = "org.ticketbooth.test.standin-recipe"


@dataclass(frozen=True)
class StandIn:
    """An official image that compose.yaml names, built here from the recipe in
    standins/FOLDER (a Containerfile on a debootstrapped Debian) and tagged with its name."""

    name: str
    folder: str
    base: BaseImage = DEBIAN_BASE

    @property
    def context(self) -> Path:
        return STANDINS_DIR / self.folder

    def recipe(self) -> str:
        """A hash of the base's recipe and every file of the folder, modes included."""
        digest = hashlib.sha256(self.base.recipe().encode())
        for path in sorted(self.context.rglob("*")):
            if path.is_file():
                mode = path.stat().st_mode & 0o777
                digest.update(f"\0{path.relative_to(self.context)}\0{mode:o}\0".encode())
                digest.update(path.read_bytes())
        return digest.hexdigest()[:16]


POSTGRES_STANDIN = StandIn("docker.io/library/postgres:15", "postgres")
NGINX_STANDIN = StandIn("docker.io/library/nginx:1.27-alpine", "nginx")


def ensure_standin(podman: Podman, standin: StandIn) -> tuple[str, float]:
    """Build the stand-in (and its base) unless the cached one fits the recipe.

    Returns ("cached" or "built", seconds), the base's making included.
    """
    started = time.perf_counter()
    recipe = standin.recipe()
    if podman.image_label(standin.name, STANDIN_RECIPE_LABEL) == recipe:
        return "cached", time.perf_counter() - started
    ensure_base_image(podman, standin.base)
    log(f"building the stand-in {standin.name} from {standin.context.relative_to(REPO)}")
    build_image(
        podman, standin.name, standin.context, file="Containerfile",
        labels={STANDIN_RECIPE_LABEL: recipe},
    )  # fmt: skip
    took = time.perf_counter() - started
    log(f"stand-in {standin.name} built in {took:.1f} s")
    return "built", took


def free_port() -> int:
    """A TCP port that is free on this host now (the container shares the host's network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_log(
    podman: Podman, name: str, text: str, occurrences: int = 1, timeout: float = 30
) -> str:
    """Poll the container's output until `text` shows `occurrences` times (logs add up across
    restarts); fail at once if the container stops, or when time runs out."""
    deadline = time.perf_counter() + timeout
    output = ""
    for _ in range(int(timeout / 0.05) + 1):
        logs = podman.run("logs", name)
        output = logs.stdout + logs.stderr
        if output.count(text) >= occurrences:
            return output
        state = podman.inspect(name, "{{.State.Status}}")
        if state not in ("running", "created", "configured", "initialized"):
            raise CommandFailed(f"container {name} is {state} before printing {text!r}:\n{output}")
        if time.perf_counter() > deadline:
            break
        time.sleep(0.05)  # poll interval, not synchronisation
    raise CommandFailed(f"container {name} did not print {text!r} within {timeout} s:\n{output}")


def remove_labelled(podman: Podman, label: str) -> None:
    """Remove containers, then volumes, that carry `label` (what a test made), whatever state."""
    containers = podman.run("ps", "--all", "--quiet", "--filter", f"label={label}", check=False)
    for cid in containers.stdout.split():
        podman.run("rm", "--force", "--volumes", "--time", "0", cid, check=False)
    volumes = podman.run("volume", "ls", "--quiet", "--filter", f"label={label}", check=False)
    for volume in volumes.stdout.split():
        podman.run("volume", "rm", "--force", volume, check=False)


def wait_healthy(podman: Podman, name: str, timeout: float = 30) -> tuple[int, float]:
    """Run the image's HEALTHCHECK until it passes. Returns (attempts, seconds)."""
    started = time.perf_counter()
    last: Result | None = None
    for attempt in range(1, int(timeout / 0.1) + 2):
        last = podman.run("healthcheck", "run", name, check=False, timeout=30)
        if last.returncode == 0:
            return attempt, time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            break
        time.sleep(0.1)  # poll interval, not synchronisation
    detail = last.describe() if last else ""
    raise CommandFailed(f"container {name} not healthy within {timeout} s:\n{detail}")


def main(argv: Sequence[str]) -> int:
    commands = {"install": ensure_tools}
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: {Path(__file__).name} install", file=sys.stderr)
        return 2
    try:
        commands[argv[0]]()
    except EngineUnavailable as exc:
        print(f"NO CONTAINER ENGINE: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
