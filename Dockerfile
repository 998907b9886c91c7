# distillguard sidecar image: `distillguard serve` (Admit / Protect / Settle over gRPC, health, reflection,
# Prometheus metrics, hot reload) and, with EXTRAS=kserve, `distillguard kserve-proxy`.
#
#   docker build -t distillguard:0.1.0 .
#   docker build --build-arg EXTRAS=kserve -t distillguard-kserve:0.1.0 .
#   docker run --rm -p 127.0.0.1:9464:9464 \
#       -v "$PWD/sidecar.yaml:/etc/distillguard/distillguard.yaml:ro" \
#       -v "$PWD/.distillguard/keys.yaml:/etc/distillguard/keys/keys.yaml:ro" \
#       -v distillguard-run:/run/distillguard distillguard:0.1.0
#
# The config must use paths that exist in the image: server.listen unix:/run/distillguard/sidecar.sock,
# state.uri sqlite:////var/lib/distillguard/state.db, metrics_host 0.0.0.0 to publish metrics (the one in
# examples/kubernetes/configmap.yaml does). `distillguard config check FILE` validates it first.
#
# What is inside: the `defense` library and `server_plugins` with only what the sidecar imports (numpy, scipy,
# PyYAML, prometheus-client, grpcio and its health/reflection services, protobuf, redis for a shared
# store, orjson for the Envoy front's JSON), and the fronts' compiled readers. torch, transformers, tokenizers and safetensors are left out on purpose: they serve the
# in-engine plugins, the model factory and the experiments, never the sidecar (tests/unit/test_deploy.py
# checks the list here against pyproject.toml). Keys are never baked in: mount a key file (mode 0400 or
# 0600, owned by the user the sidecar runs as) at $DISTILLGUARD_KEYS. Config: $DISTILLGUARD_CONFIG.
# examples/kubernetes/ runs it in a pod beside the model server and Envoy.

ARG PYTHON=3.11

FROM python:${PYTHON}-slim-bookworm AS build
# a C compiler for the HTTP fronts' logprob reader (server_plugins/openai/_lpscan.c) and the ext_proc message
# reader (server_plugins/envoy/_wire.c): the wheel carries them
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY defense ./defense
COPY server_plugins ./server_plugins
# --no-deps: the wheel's declared dependencies include torch; the runtime stage installs the sidecar's own
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:${PYTHON}-slim-bookworm
ARG EXTRAS=""
# the malloc settings match ./dev: glibc otherwise returns large buffers to the OS after every gRPC message
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_MMAP_THRESHOLD_=67108864 \
    MALLOC_TRIM_THRESHOLD_=134217728 \
    NUMBA_CACHE_DIR=/tmp/distillguard-numba \
    DISTILLGUARD_CONFIG=/etc/distillguard/distillguard.yaml \
    DISTILLGUARD_KEYS=/etc/distillguard/keys/keys.yaml
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir \
        "numpy>=1.24" "scipy>=1.10" "pyyaml>=6.0" "prometheus-client>=0.17" "numba>=0.60" \
        "grpcio>=1.81.1" "grpcio-health-checking>=1.81.1" "grpcio-reflection>=1.81.1" "protobuf>=6.33.5,<8" \
        "redis>=5.0" "orjson>=3.9" \
    && if [ "$EXTRAS" = "kserve" ]; then \
        pip install --no-cache-dir "tritonclient[grpc]==2.73.0" "googleapis-common-protos==1.76.0"; \
    elif [ -n "$EXTRAS" ]; then echo "EXTRAS must be empty or kserve, got $EXTRAS" >&2; exit 2; fi \
    && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin distillguard \
    && mkdir -p /run/distillguard /var/lib/distillguard /etc/distillguard/keys \
    && chown distillguard /run/distillguard /var/lib/distillguard
# the Unix socket (server.listen: unix:/run/distillguard/sidecar.sock) and the sqlite state
VOLUME ["/run/distillguard", "/var/lib/distillguard"]
EXPOSE 9464
USER 10001
ENTRYPOINT ["distillguard"]
CMD ["serve"]
