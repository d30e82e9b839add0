"""compose.yaml run the way a user runs it, with podman-compose on the podman of podman_engine.

podman-compose comes with the project's test extra. It makes for each project a network with
DNS (netavark and aardvark-dns, from Debian's packages with podman: service names, and one
address per replica, resolve between containers; published ports reach them from the host's
loopback), a pod without shared namespaces, and containers, volumes and the network labelled
`io.podman.compose.project=NAME`, which is how a test finds everything it made.

What podman-compose 1.6 does with the podman 4.3 of Debian 12, and so what a test has to do:
- `depends_on: condition: service_healthy` is ignored (it needs `podman wait --condition`, from
  podman 4.6), with a warning: dependents start at once, and a booth that finds no database
  yet exits and is restarted by its restart policy until PostgreSQL is up.
- Health checks run only when asked: podman runs them from systemd timers, and there is no
  systemd here. `wait_healthy` asks, as the timers would.
- The build options this machine needs (`podman_engine.build_args`: the host's network for pip,
  the host's CA bundle, the docker image format that keeps HEALTHCHECK) go in through
  podman-compose's own `--podman-build-args`; compose.yaml stays the file users run.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import podman_engine as engine

COMPOSE_FILE = engine.REPO / "compose.yaml"
PROJECT_LABEL = "io.podman.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def podman_compose() -> str:
    """The podman-compose of the test extra (beside this Python), else one on the PATH."""
    found = shutil.which("podman-compose", path=str(Path(sys.executable).parent))
    found = found or shutil.which("podman-compose")
    if not found:
        raise engine.EngineUnavailable(
            "podman-compose is missing: it comes with the test extra (pip install -e '.[test]')"
        )
    return found


@dataclass
class ComposeProject:
    """One compose project: compose.yaml with `profiles`, under the project name `name`, with
    `variables` for compose.yaml's ${...} (published ports, say)."""

    podman: engine.Podman
    name: str
    profiles: Sequence[str] = ()
    variables: Mapping[str, str] = field(default_factory=dict)
    # Volumes seen mounted in the project's containers, so that none outlives the test.
    mounted_volumes: set[str] = field(default_factory=set)

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> engine.Result:
        argv = [
            podman_compose(),
            "--project-name", self.name,
            "--file", str(COMPOSE_FILE),
            *[arg for profile in self.profiles for arg in ("--profile", profile)],
            *args,
        ]  # fmt: skip
        env = {**self.podman.env, **self.variables}
        return engine.run_command(argv, env, timeout=timeout, check=check, cwd=engine.REPO)

    def up(self) -> engine.Result:
        """`up --detach --build`, as a user runs it (plus this machine's build options)."""
        result = self.compose(
            "--podman-build-args", shlex.join(engine.build_args()),
            "up", "--detach", "--build",
            timeout=900,
        )  # fmt: skip
        self.note_volumes()
        return result

    def down(self) -> engine.Result:
        """`down --volumes`: containers, network, pod and volumes."""
        self.note_volumes()
        return self.compose("down", "--volumes", timeout=180)

    # ------------------------------------------------------------------- what the project has

    def short(self, container: str) -> str:
        """A container's name without the project's: booth_1."""
        return container.removeprefix(f"{self.name}_")

    def containers(self, service: str | None = None) -> list[str]:
        """Names of the project's containers (of one service), in name order."""
        filters = ["--filter", f"label={PROJECT_LABEL}={self.name}"]
        if service:
            filters += ["--filter", f"label={SERVICE_LABEL}={service}"]
        listed = self.podman.run("ps", "--all", *filters, "--format", "{{.Names}}")
        return sorted(listed.stdout.split())

    def note_volumes(self) -> None:
        for name in self.containers():
            mounts = self.podman.run(
                "inspect", "--format",
                '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}', name,
                check=False,
            )  # fmt: skip
            self.mounted_volumes.update(mounts.stdout.split())

    def leftovers(self) -> dict[str, list[str]]:
        """Everything of the project that still exists, by kind (empty lists when none)."""
        label = f"label={PROJECT_LABEL}={self.name}"
        volumes = self.podman.run("volume", "ls", "--filter", label, "--format", "{{.Name}}")
        networks = self.podman.run("network", "ls", "--filter", label, "--format", "{{.Name}}")
        pods = self.podman.run("pod", "ls", "--format", "{{.Name}}")
        existing = {
            name for name in sorted(self.mounted_volumes)
            if self.podman.run("volume", "exists", name, check=False).returncode == 0
        }  # fmt: skip
        return {
            "containers": self.containers(),
            "volumes": sorted(existing | set(volumes.stdout.split())),
            "networks": sorted(networks.stdout.split()),
            "pods": [pod for pod in pods.stdout.split() if pod == f"pod_{self.name}"],
        }

    def sweep(self) -> None:
        """Remove whatever of the project is left, whatever state it is in (after a failure)."""
        self.note_volumes()
        left = self.leftovers()
        for container in left["containers"]:  # --depend: also those that require it
            self.podman.run(
                "rm", "--force", "--depend", "--volumes", "--time", "0", container, check=False
            )
        for pod in left["pods"]:
            self.podman.run("pod", "rm", "--force", pod, check=False)
        for volume in left["volumes"]:
            self.podman.run("volume", "rm", "--force", volume, check=False)
        for network in left["networks"]:
            self.podman.run("network", "rm", "--force", network, check=False)


def sweep_projects(podman: engine.Podman, prefix: str) -> list[str]:
    """Sweep every project whose name starts with `prefix` (left by a run that was killed).
    Returns their names."""
    found: set[str] = set()
    label = f"label={PROJECT_LABEL}"
    template = f'{{{{index .Labels "{PROJECT_LABEL}"}}}}'
    for kind in (["ps", "--all"], ["volume", "ls"]):
        listed = podman.run(*kind, "--filter", label, "--format", template)
        found.update(listed.stdout.split())
    networks = podman.run("network", "ls", "--filter", label, "--format", "{{.Name}}")
    for network in networks.stdout.split():  # (network ls cannot show a label's value)
        found.add(podman.run("network", "inspect", "--format", template, network).stdout.strip())
    found = {name for name in found if name.startswith(prefix)}
    for name in sorted(found):
        ComposeProject(podman, name).sweep()
    return sorted(found)


def wait_healthy(
    podman: engine.Podman, containers: Sequence[str], timeout: float = 120
) -> dict[str, int]:
    """Run each container's health check until it passes, as podman's systemd timers would.
    Returns the attempts each took."""
    return {
        name: engine.wait_healthy(podman, name, timeout=timeout)[0] for name in containers
    }


def has_healthcheck(podman: engine.Podman, container: str) -> bool:
    test = podman.inspect(container, "{{json .Config.Healthcheck}}")
    return test not in ("", "null", "{}")
