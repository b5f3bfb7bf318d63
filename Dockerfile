# Container images of the call service and the business service, and of
# the Redis and HAProxy a cluster of call services runs with.
#
#   docker build --target call-service     -t videocall/call-service .
#   docker build --target business-service -t videocall/business-service .
#   docker build --target redis            -t videocall/redis .
#   docker build --target haproxy          -t videocall/haproxy .
#
# The builder stage compiles release binaries in the Rust image. Binaries
# already built on the host and placed in target/docker/ are used as they are
# instead (that is how the container test builds images on machines with no
# registry: see scripts/container-test.sh); the runtime stages are the same
# either way.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# Redis and HAProxy of the compose cluster (docker-compose.cluster.yml):
# Debian's packages, installed here unless the base already has them (the
# local base built by `scripts/docker-base.sh TAG redis-server haproxy`).
ARG OPS_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
# Lets the container test clean up this stage's leftovers.
LABEL videocall.stage=builder
WORKDIR /src
COPY . .
RUN set -eu; mkdir -p /out; \
    if [ -x target/docker/call-service ] && [ -x target/docker/business-service ]; then \
      cp target/docker/call-service target/docker/business-service /out/; \
    else \
      cargo build --release --locked -p call-service -p business-service --bins; \
      cp target/release/call-service target/release/business-service /out/; \
    fi

# What both services run on: Debian slim, an unprivileged user, a data dir.
FROM ${RUNTIME_IMAGE} AS runtime
RUN useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin videocall \
 && mkdir -p /var/lib/videocall \
 && chown videocall:videocall /var/lib/videocall
ENV LOG_FORMAT=json \
    RUST_LOG=info

FROM runtime AS call-service
COPY --from=builder /out/call-service /usr/local/bin/call-service
ENV CALL_SERVICE_CLIENT_ADDR=0.0.0.0:50051 \
    CALL_SERVICE_ADMIN_ADDR=0.0.0.0:50052 \
    CALL_SERVICE_METRICS_ADDR=0.0.0.0:9151 \
    CALL_SERVICE_DRAIN_TIME=5s
EXPOSE 50051 50052 9151 8080
USER videocall
HEALTHCHECK --interval=5s --timeout=4s --start-period=5s --retries=3 CMD ["call-service", "healthcheck"]
ENTRYPOINT ["call-service"]

FROM runtime AS business-service
COPY --from=builder /out/business-service /usr/local/bin/business-service
ENV BUSINESS_SERVICE_ADDR=0.0.0.0:50061 \
    BUSINESS_SERVICE_METRICS_ADDR=0.0.0.0:9161 \
    BUSINESS_SERVICE_DATABASE=/var/lib/videocall/call-records.db
EXPOSE 50061 9161
VOLUME /var/lib/videocall
USER videocall
HEALTHCHECK --interval=5s --timeout=4s --start-period=5s --retries=3 CMD ["business-service", "healthcheck"]
ENTRYPOINT ["business-service"]
CMD ["serve"]

# The shared store of a cluster: Debian's redis-server, append-only file on
# (a restart loses no call), in a volume at /data.
FROM ${OPS_IMAGE} AS redis
RUN command -v redis-server >/dev/null || { apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
      && rm -rf /var/lib/apt/lists/*; } \
 && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
VOLUME /data
HEALTHCHECK --interval=2s --timeout=2s --retries=5 CMD ["redis-cli", "ping"]
ENTRYPOINT ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", \
            "--appendonly", "yes", "--dir", "/data", "--save", ""]

# The load balancer in front of the nodes: Debian's HAProxy, layer 4, each
# node health-checked with gRPC health through `call-service healthcheck`.
FROM ${OPS_IMAGE} AS haproxy
RUN command -v haproxy >/dev/null || { apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy \
      && rm -rf /var/lib/apt/lists/*; }
COPY --from=builder /out/call-service /usr/local/bin/call-service
COPY deploy/grpc-health-check /usr/local/bin/grpc-health-check
COPY deploy/haproxy.cfg /etc/haproxy/haproxy.cfg
EXPOSE 50051 50052
USER haproxy
ENTRYPOINT ["haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
