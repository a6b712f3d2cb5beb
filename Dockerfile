# One image with every kiroku binary; compose picks the command per service.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kiroku /src/target/release/kiroku-command \
     /src/target/release/kiroku-query /src/target/release/kiroku-projector /usr/local/bin/
USER 65534:65534
ENTRYPOINT []
