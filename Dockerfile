# syntax=docker/dockerfile:1
# agentguard: a static binary on a distroless, non-root base.

FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
COPY charts/agentguard/crds ./charts/agentguard/crds
COPY charts/agentguard/templates/_helpers.tpl charts/agentguard/templates/webhook.yaml ./charts/agentguard/templates/
RUN cargo build --locked --release --target x86_64-unknown-linux-musl --bin agentguard \
 && cp target/x86_64-unknown-linux-musl/release/agentguard /agentguard

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /agentguard /agentguard
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/agentguard"]
