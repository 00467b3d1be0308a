# cryptdisk-csi image: one binary serving the controller, the node plugin and
# the KMS (the Helm chart's default image, deploy/helm/cryptdisk-csi).
#
#   docker build -t cryptdisk-csi:0.1.0 .
#
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

# Runtime: libcryptsetup for dm-crypt, and the tools the node plugin runs
# without a shell: mkfs/fsck/resize2fs (e2fsprogs), mkfs.xfs/xfs_growfs
# (xfsprogs), blkid and mount helpers (util-linux); CA certificates for the
# cloud APIs. The node plugin runs privileged as root (dm-crypt, loop devices,
# mounts); the controller and the KMS run as the users the chart sets.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libcryptsetup12 e2fsprogs xfsprogs util-linux mount ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/cryptdisk-csi /usr/local/bin/cryptdisk-csi
ENTRYPOINT ["/usr/local/bin/cryptdisk-csi"]
