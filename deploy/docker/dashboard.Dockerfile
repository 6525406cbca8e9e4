# The dashboard service image. Build from the repository root (libs/common is installed as part
# of the tickmesh package, never copied in loose):
#   podman build --format docker -f deploy/docker/dashboard.Dockerfile -t localhost/tickmesh-dashboard .
# The front end is built here from its lockfile (npm ci, then the esbuild bundle) and lands in
# the package (services/dashboard/web/dist), so the image serves it with no network and no CDN.
ARG BASE_IMAGE=localhost/tickmesh-python:bookworm

FROM ${BASE_IMAGE} AS frontend
# Debian's node and npm (bookworm: node 18), only in this stage; NODE_EXTRA_CA_CERTS makes npm
# trust the base image's CA bundle (it holds the host's extra certificates).
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm \
    && rm -rf /var/lib/apt/lists/*
ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
WORKDIR /web
COPY services/dashboard/web/package.json services/dashboard/web/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY services/dashboard/web/build.mjs ./
COPY services/dashboard/web/src/ src/
RUN npm run build

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/src/constraints.txt
WORKDIR /src
RUN python3 -m venv /opt/tickmesh
# Dependencies (and the pinned build backend) first, in their own layer: rebuilt only when
# pyproject.toml or the pins change, so a code change reinstalls only tickmesh itself.
COPY pyproject.toml deploy/constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > requirements.txt \
    && /opt/tickmesh/bin/pip install -r requirements.txt setuptools
COPY libs/ libs/
COPY services/ services/
COPY --from=frontend /web/dist/ services/dashboard/web/dist/
# No build isolation: the backend is already here, pinned; then drop pip and setuptools.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/tickmesh/bin/pip install --no-deps --no-build-isolation . \
    && /opt/tickmesh/bin/pip uninstall --yes --quiet pip setuptools
COPY deploy/docker/healthcheck.py /opt/tickmesh/healthcheck.py

FROM ${BASE_IMAGE}
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tickmesh
COPY --from=build /opt/tickmesh /opt/tickmesh
ENV PATH=/opt/tickmesh/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
EXPOSE 9105
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "/opt/tickmesh/healthcheck.py", "dashboard"]
ENTRYPOINT ["python", "-m", "services.dashboard"]
CMD ["run"]
