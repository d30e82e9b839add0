# ticketbooth: the HTTP ticket booth, served by waitress.
#
#   docker build -t ticketbooth .        (or: podman build --format docker -t ticketbooth .)
#   docker run -p 8000:8000 -v tickets:/data ticketbooth
#
# Stage 1 fetches a wheel of every dependency in requirements/run.txt, the lock file, each
# checked against its hash there, and builds ticketbooth's own wheel with the locked
# setuptools; stage 2 installs only those wheels on a fresh slim Python, with no build tools:
# the service, the PostgreSQL store's driver and the load generator, at the versions the
# suite passed with.

FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY requirements/run.txt /wheels/requirements.txt
RUN pip wheel --wheel-dir /wheels --require-hashes -r /wheels/requirements.txt \
    && pip install --no-index --find-links=/wheels --require-hashes -r /wheels/requirements.txt
COPY pyproject.toml README.md ./
COPY app ./app
COPY loadtest ./loadtest
RUN pip wheel --wheel-dir /wheels --no-deps --no-build-isolation .


FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Only the wheels cross over: no compiler, no source tree, no pip cache.
# (Not RUN --mount=from=builder: podman's buildah 1.28 reuses that step's cache even when
# the builder's wheels changed, so a rebuild could ship stale code.)
# The locked dependencies, their hashes checked again, then the project alone.
COPY --from=builder /wheels /wheels
RUN pip install --no-index --find-links=/wheels --require-hashes -r /wheels/requirements.txt \
    && pip install --no-index --no-deps /wheels/ticketbooth-*.whl \
    && rm -rf /wheels

# The volume's folder must exist and belong to the service's user before VOLUME,
# or a fresh named volume is not writable by it.
RUN mkdir -p /data && chown 10001:10001 /data

ENV TICKETBOOTH_HOST=0.0.0.0 \
    TICKETBOOTH_PORT=8000 \
    TICKETBOOTH_STORE=sqlite:////data/tickets.db

USER 10001:10001
WORKDIR /data
EXPOSE 8000
VOLUME /data

# Standard library only: the image has no curl. Follows TICKETBOOTH_PORT when it is overridden.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TICKETBOOTH_PORT', '8000'), timeout=4)"]

# Exec form: ticketbooth is PID 1 and gets SIGTERM itself (it stops gracefully, exit 0).
ENTRYPOINT ["ticketbooth"]
CMD ["serve"]
