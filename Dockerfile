# egress-sidecar image: one image for the sidecar (`egress-sidecar run`) and the injector
# (`egress-sidecar inject`). Stage 1 builds the wheel and installs it with its dependencies into
# a venv; stage 2 is the slim runtime with only that venv: no compiler, no pip, no source tree.
# Runs as 65532:65532 and writes nothing, so readOnlyRootFilesystem: true works.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# The venv gets no pip of its own; the build stage's pip installs into it (pip --python).
# uvloop, httptools and msgspec come as manylinux wheels: no compiler is needed.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/egress-sidecar \
 && python -m pip --python /opt/egress-sidecar/bin/python install --no-cache-dir --compile /wheels/egress_sidecar-*.whl

# `egress-sidecar lock` (the egress lock's init container) drives nft: its binary and the shared
# libraries it links, gathered here so the runtime stage gets them without a package manager run.
FROM python:3.11-slim-bookworm AS locktools
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables=1.0.6-2+deb12u2 \
 && mkdir -p /lockroot/usr/sbin \
 && cp /usr/sbin/nft /lockroot/usr/sbin/nft \
 && ldd /usr/sbin/nft | awk '/=> \// {print $3}' | xargs -I{} cp --parents -L {} /lockroot/ \
 && rm -rf /var/lib/apt/lists/*

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="egress-sidecar" \
      org.opencontainers.image.description="Kubernetes sidecar egress proxy and its injector" \
      org.opencontainers.image.licenses="Apache-2.0"
# pip, setuptools and wheel are build tools: the runtime has no use for them.
RUN python -m pip uninstall --yes pip setuptools wheel
COPY --from=build /opt/egress-sidecar /opt/egress-sidecar
COPY --from=locktools /lockroot/ /
# Bytecode was compiled at install time; never try to write it on a read-only root.
ENV PATH=/opt/egress-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A numeric non-root user, so runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
# 15001: data listener (127.0.0.1 inside the pod); 15090: admin (/healthz, /readyz, /metrics).
EXPOSE 15001 15090
ENTRYPOINT ["egress-sidecar"]
CMD ["run"]
