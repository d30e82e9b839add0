# ticketbooth: the HTTP ticket booth, served by waitress.
#
#   docker build -t ticketbooth .        (or: podman build --format docker -t ticketbooth .)
#   docker run -p 8000:8000 -v tickets:/data ticketbooth
#
# Stage 1 builds a wheel of the project and of everything it depends on, the PostgreSQL store's
# driver included; stage 2 installs only those wheels on a fresh slim Python, with no build tools.

FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY loadtest ./loadtest
RUN pip wheel --wheel-dir /wheels '.[postgres]'


FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Only the wheels cross over: no compiler, no source tree, no pip cache.
# (Not RUN --mount=from=builder: podman's buildah 1.28 reuses that step's cache even when
# the builder's wheels changed, so a rebuild could ship stale code.)
# /wheels holds exactly ticketbooth[postgres] and what it needs: install them all.
COPY --from=builder /wheels /wheels
RUN pip install --no-index --find-links=/wheels /wheels/*.whl \
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
