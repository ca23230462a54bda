# syntax=docker/dockerfile:1
# agentguard: one statically linked binary on an empty base, non-root (numeric USER), no shell.
#
#   docker build .        builds the binary in a Rust image (stage `build`), then the image.
#   hack/image.sh         builds the binary on the host and only the final stage, from a context
#                         holding just that binary (--build-arg BINARY_FROM=context): for
#                         machines that cannot pull a Rust image.
ARG BINARY_FROM=build

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
COPY charts/agentguard/crds ./charts/agentguard/crds
COPY charts/agentguard/templates/_helpers.tpl charts/agentguard/templates/webhook.yaml ./charts/agentguard/templates/
# glibc, linked statically: no musl toolchain needed; agentguard resolves no host names (the
# API server is reached by the IP in KUBERNETES_SERVICE_HOST), so no NSS module is missed.
RUN RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --profile image \
      --target x86_64-unknown-linux-gnu --bin agentguard \
 && cp target/x86_64-unknown-linux-gnu/image/agentguard /agentguard

# A context holding only a binary built elsewhere (hack/image.sh).
FROM scratch AS context
COPY agentguard /agentguard

FROM ${BINARY_FROM} AS binary

FROM scratch
COPY --from=binary /agentguard /agentguard
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/agentguard"]
