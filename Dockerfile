# podiam's images: `docker build --target server .` and `docker build --target agent .`
# The base images are build arguments, so a registry mirror or a locally made base works
# too (scripts/images does that with buildah, where public registries are out of reach).
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm
ARG SERVER_BASE=gcr.io/distroless/cc-debian12:nonroot
ARG AGENT_BASE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p podiam-server -p podiam-agent \
 && mkdir /out \
 && cp target/release/podiam-server target/release/podiam-agent /out/ \
 && rm -rf target

# The server: no shell, no package manager, not root.
FROM ${SERVER_BASE} AS server
COPY --from=build /out/podiam-server /usr/local/bin/podiam-server
USER 65532:65532
EXPOSE 8443 9620
ENTRYPOINT ["/usr/local/bin/podiam-server"]

# The agent: iptables (nft and legacy) and conntrack for the redirect; it runs as root
# with NET_ADMIN (and NET_RAW for the legacy backend) only.
FROM ${AGENT_BASE} AS agent
# Versions come from the base's release: pinning them here would go stale with every
# security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables conntrack ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/podiam-agent /usr/local/bin/podiam-agent
EXPOSE 8181 9620
ENTRYPOINT ["/usr/local/bin/podiam-agent"]
