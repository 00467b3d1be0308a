# cryptdisk-csi image: one binary serving the controller, the node plugin and
# the KMS (the Helm chart's default image, deploy/helm/cryptdisk-csi).
#
#   docker build -t cryptdisk-csi:0.1.0 .          (or podman build, buildah bud)
#
# builds the binary in the `build` stage and the image from the last stage.
# `hack/image` builds the same runtime stage with buildah from a binary built
# outside the container (`cargo build --release --locked`), where no registry
# serves the rust image:
#
#   buildah bud --target prebuilt -t cryptdisk-csi:0.1.0 .
#
# Stage order matters for that: builders that build every stage up to the
# target (buildah before 1.29, docker's legacy builder) then never reach the
# rust stage. BuildKit and newer buildah skip stages the target does not use.

# Runtime: libcryptsetup for dm-crypt, and the tools the node plugin runs
# without a shell: mkfs.ext4, e2fsck, resize2fs (e2fsprogs), mkfs.xfs and
# xfs_growfs (xfsprogs); util-linux and mount are essential in Debian and stay
# in any case. CA certificates for the cloud APIs. The node plugin runs
# privileged as root (dm-crypt, loop devices, mounts); the controller and the
# KMS run as the users the chart sets. `hack/image` checks that every tool the
# code starts is here.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libcryptsetup12 e2fsprogs xfsprogs util-linux mount ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
ENTRYPOINT ["/usr/local/bin/cryptdisk-csi"]

# The runtime with a binary built outside, taken from the build context
# (.dockerignore lets only this file of target/ in).
FROM runtime AS prebuilt
ARG BINARY=target/release/cryptdisk-csi
COPY ${BINARY} /usr/local/bin/cryptdisk-csi

# Build stage: libcryptsetup-rs generates its bindings with bindgen, so the
# build needs libcryptsetup's headers, libclang and pkg-config.
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends libcryptsetup-dev libclang-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY examples examples
COPY tests tests
RUN cargo build --release --locked --bin cryptdisk-csi \
    && install -D -m 0755 target/release/cryptdisk-csi /out/cryptdisk-csi

# The default target: the runtime with the binary from the build stage.
FROM runtime
COPY --from=build /out/cryptdisk-csi /usr/local/bin/cryptdisk-csi
