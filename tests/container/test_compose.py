"""compose.yaml's scale-out profile, brought up for real with podman-compose (issue 7).

What a user runs, `compose --profile scale-out up -d --build`, then, through nginx's published
port only: buys succeed and land on both booth replicas (each replica's own /metrics and its
access log in `podman logs` count them), and the load generator buys the rest of the stock with
all its checks passing; then `down --volumes` leaves nothing behind.

No image registry can be reached here, so the images compose.yaml names are made locally and
tagged with those names (tests/container/podman_engine.py): python:3.11-slim and
debian:bookworm-slim with debootstrap, and stand-ins for postgres:15 and nginx:1.27-alpine from
the recipes in tests/container/standins/ (Debian's PostgreSQL 15 and nginx 1.22). All are cached
under .cache/container. See compose_project.py for what podman-compose does with Debian's
podman 4.3. All traffic stays on the host's loopback and the compose network the test makes.

`make container-test` runs it (`pytest -m container`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import podman_engine as engine
import pytest
import requests
from compose_project import ComposeProject, has_healthcheck, sweep_projects, wait_healthy

pytestmark = [pytest.mark.container, pytest.mark.timeout(1200)]

STOCK = 1000  # TICKETBOOTH_TICKETS of the booth service in compose.yaml
REPLICAS = 2  # deploy.replicas of the booth service
BUYS = 40  # single purchases through nginx before the load test
LOAD_BOOTHS = 10

# Lines of a booth's /metrics and its plain access log.
BUY_METRIC = re.compile(
    r'^ticketbooth_http_requests_total\{endpoint="/buy",method="POST",status="200"\} (\S+)$',
    re.MULTILINE,
)
SOLD_METRIC = re.compile(r"^ticketbooth_tickets_sold_total (\S+)$", re.MULTILINE)
BUY_LOG = re.compile(r'^\S+ "POST /buy(\?\S*)?" 200 ', re.MULTILINE)


@pytest.fixture(scope="module")
def images(podman: engine.Podman, timings: engine.Timings) -> None:
    """The images compose.yaml names, made here: bases with debootstrap, then the stand-ins."""
    for base in (engine.PYTHON_BASE, engine.DEBIAN_BASE):
        how, seconds = engine.or_fail(
            f"NO BASE IMAGE {base.name}", lambda base=base: engine.ensure_base_image(podman, base)
        )
        timings.seconds[f"base image {base.name.rpartition('/')[2]} ({how})"] = seconds
    for standin in (engine.POSTGRES_STANDIN, engine.NGINX_STANDIN):
        how, seconds = engine.or_fail(
            f"NO STAND-IN {standin.name}", lambda s=standin: engine.ensure_standin(podman, s)
        )
        timings.seconds[f"stand-in {standin.name.rpartition('/')[2]} ({how})"] = seconds


def project_prefix(podman: engine.Podman) -> str:
    """The start of this checkout's project names. Podman keeps networks machine-wide, not in
    the cache folder's storage: another checkout's test may be running on the same machine."""
    checkout = hashlib.sha256(str(podman.cache).encode()).hexdigest()[:6]
    return f"ticketbooth-compose-test-{checkout}-"


@pytest.fixture
def project(podman: engine.Podman, images: None) -> Iterator[ComposeProject]:
    """A compose project of its own name, its ports published on loopback only, on free ports
    (never 8000 or 8080). Whatever it made is removed afterwards, pass or fail."""
    prefix = project_prefix(podman)
    swept = sweep_projects(podman, prefix)  # left by a run of this checkout that was killed
    if swept:
        engine.log(f"removed projects left over by an earlier run: {' '.join(swept)}")
    single_port, nginx_port = engine.free_port(), engine.free_port()
    while nginx_port == single_port:
        nginx_port = engine.free_port()
    made = ComposeProject(
        podman,
        name=f"{prefix}{os.getpid()}-{secrets.token_hex(3)}",
        profiles=["scale-out"],
        variables={
            "TICKETBOOTH_HTTP_PORT": f"127.0.0.1:{single_port}",
            "TICKETBOOTH_SCALE_OUT_PORT": f"127.0.0.1:{nginx_port}",
        },
    )
    try:
        yield made
    finally:
        made.sweep()


def published_url(project: ComposeProject, service: str) -> str:
    container = project.containers(service)[0]
    port = project.podman.run("port", container, "8000/tcp").stdout.strip()
    assert port.startswith("127.0.0.1:"), f"{service} is published on {port!r}, not loopback"
    return f"http://{port}"


def wait_answering(url: str, timeout: float = 60) -> int:
    """Poll GET url until it answers 200 (nginx answers 502 until a replica is up).
    Returns the attempts."""
    started = time.perf_counter()
    last = "no answer"
    for attempt in range(1, int(timeout / 0.1) + 2):
        try:
            answer = requests.get(url, timeout=5)
            if answer.status_code == 200:
                return attempt
            last = f"HTTP {answer.status_code}: {answer.text[:200]}"
        except requests.RequestException as exc:
            last = str(exc)
        if time.perf_counter() - started > timeout:
            break
        time.sleep(0.1)  # poll interval, not synchronisation
    raise AssertionError(f"{url} did not answer 200 within {timeout} s: {last}")


def replica_metrics(podman: engine.Podman, replica: str) -> str:
    """The replica's own /metrics, read inside its container (replicas publish no port)."""
    fetch = (
        "import urllib.request; "
        "print(urllib.request.urlopen('http://127.0.0.1:8000/metrics', timeout=5).read().decode())"
    )
    return podman.run("exec", replica, "python", "-c", fetch).stdout


def metric(pattern: re.Pattern[str], text: str) -> int:
    found = pattern.search(text)
    return int(float(found.group(1))) if found else 0


def replica_counts(project: ComposeProject, replicas: list[str]) -> dict[str, dict[str, int]]:
    """Per replica (by its short name, booth_1...): sales answered 200 by its /metrics, the
    same in its access log, and the tickets it sold."""
    counts = {}
    for replica in replicas:
        text = replica_metrics(project.podman, replica)
        logs = project.podman.run("logs", replica)
        counts[project.short(replica)] = {
            "buys (metrics)": metric(BUY_METRIC, text),
            "buys (access log)": len(BUY_LOG.findall(logs.stdout + logs.stderr)),
            "tickets sold": metric(SOLD_METRIC, text),
        }
    return counts


def test_scale_out_profile_sells_through_nginx_over_both_replicas(
    podman: engine.Podman, project: ComposeProject, timings: engine.Timings, tmp_path: Path
) -> None:
    # Up, as a user runs it.
    up = project.up()
    timings.seconds["compose up --build"] = up.seconds
    services = {
        service: project.containers(service)
        for service in ("postgres", "booth", "nginx", "ticketbooth")
    }
    assert {service: len(names) for service, names in services.items()} == {
        "postgres": 1, "booth": REPLICAS, "nginx": 1, "ticketbooth": 1,
    }, f"containers per service: {services}\n{up.describe()}"  # fmt: skip
    replicas = services["booth"]

    # Healthy: every health check passes (PostgreSQL's pg_isready, the booths' /healthz), and
    # nginx answers through its published port.
    started = time.perf_counter()
    checked = [name for name in project.containers() if has_healthcheck(podman, name)]
    assert set(checked) >= {*services["postgres"], *replicas}, f"health checks on {checked}"
    attempts = wait_healthy(podman, checked)
    url = published_url(project, "nginx")
    polls = wait_answering(f"{url}/healthz")
    timings.seconds["up to healthy"] = time.perf_counter() - started
    timings.notes["health check runs until healthy"] = json.dumps(
        {project.short(name): runs for name, runs in attempts.items()}
    )
    timings.notes["nginx /healthz polls until 200"] = str(polls)
    timings.notes["booth restarts while PostgreSQL started"] = json.dumps(
        {project.short(name): int(podman.inspect(name, "{{.RestartCount}}")) for name in replicas}
    )
    nginx_version = podman.run("exec", services["nginx"][0], "nginx", "-v")
    timings.notes["nginx stand-in"] = (nginx_version.stdout + nginx_version.stderr).strip()

    # PostgreSQL runs as a user of its own, and asks the network for the password compose.yaml
    # gives the booths: the right one works (every sale below), a wrong one is refused.
    top = podman.run("top", services["postgres"][0], "huser", "pid", "args").stdout.splitlines()
    pid1 = [line.split(None, 2) for line in top[1:] if line.split()[1:2] == ["1"]]
    assert pid1 and pid1[0][0] not in ("0", "root"), f"postgres runs as root:\n{top}"
    wrong = podman.run(
        "exec", "--env", "PGPASSWORD=wrong", replicas[0], "python", "-c",
        "import psycopg; psycopg.connect('postgresql://ticketbooth@postgres:5432/ticketbooth')",
        check=False,
    )  # fmt: skip
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr, (
        wrong.describe()
    )

    # Buys through nginx: every one sold, no serial twice, and both replicas served some.
    started = time.perf_counter()
    serials = []
    for _ in range(BUYS):
        answer = requests.post(f"{url}/buy", timeout=10)
        assert answer.status_code == 200, f"HTTP {answer.status_code}: {answer.text}"
        serials += [ticket["serial"] for ticket in answer.json()["tickets"]]
    timings.seconds[f"{BUYS} buys through nginx"] = time.perf_counter() - started
    assert len(serials) == len(set(serials)) == BUYS, serials
    assert requests.get(f"{url}/remaining", timeout=10).json() == {
        "remaining": STOCK - BUYS, "sold": BUYS, "held": 0, "total": STOCK,
    }  # fmt: skip
    counts = replica_counts(project, replicas)
    timings.notes[f"{BUYS} buys per replica"] = json.dumps(counts)
    for replica, count in counts.items():
        assert count["buys (metrics)"] > 0, f"no buy reached {replica}: {counts}"
        assert count["buys (metrics)"] == count["buys (access log)"], counts
    assert sum(count["buys (metrics)"] for count in counts.values()) == BUYS, counts
    assert sum(count["tickets sold"] for count in counts.values()) == BUYS, counts

    # The load generator, through nginx, until sold out: all its checks pass.
    report = tmp_path / "load.json"
    started = time.perf_counter()
    load = subprocess.run(
        [
            sys.executable, "-m", "loadtest", "--url", url, "--booths", str(LOAD_BOOTHS),
            "--quiet", "--json", str(report),
        ],
        cwd=engine.REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    timings.seconds["load test until sold out"] = time.perf_counter() - started
    assert load.returncode == 0, f"exit {load.returncode}:\n{load.stdout}{load.stderr}"
    result = json.loads(report.read_text())
    assert all(check["passed"] for check in result["checks"]), result["checks"]
    assert result["remaining_after"] == {"remaining": 0, "sold": STOCK, "held": 0,
                                         "total": STOCK}
    assert result["tickets_acknowledged"] == STOCK - BUYS, result["tickets_acknowledged"]
    assert result["error_rate"] == 0, result["errors"]
    timings.notes["load test"] = (
        f"{result['requests']} requests, {result['tickets_acknowledged']} tickets, "
        f"{result['throughput_rps']:.0f} req/s, p50 {result['latency_ms']['p50']:.1f} ms, "
        f"p99 {result['latency_ms']['p99']:.1f} ms, checks "
        + ", ".join(f"{check['name']} {'PASS' if check['passed'] else 'FAIL'}"
                    for check in result["checks"])
    )
    counts = replica_counts(project, replicas)
    timings.notes["after the load test, per replica"] = json.dumps(counts)
    assert sum(count["tickets sold"] for count in counts.values()) == STOCK, counts
    for replica, count in counts.items():
        assert count["tickets sold"] > 0, f"the load test sold nothing through {replica}"
        assert count["buys (metrics)"] == count["buys (access log)"], counts

    # Down, volumes and all: nothing of the project is left.
    down = project.down()
    timings.seconds["compose down --volumes"] = down.seconds
    assert project.leftovers() == {"containers": [], "volumes": [], "networks": [], "pods": []}
