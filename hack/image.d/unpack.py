#!/usr/bin/env python3
"""Unpacks an OCI image archive (`buildah push IMAGE oci-archive:FILE`) into a
root filesystem directory, as a container runtime would: the manifest's layers
in order, with OCI whiteouts (`.wh.NAME` deletes NAME from the layers below,
`.wh..wh..opq` empties its directory). Writes the image's config JSON to a file.

    unpack.py ARCHIVE ROOTFS CONFIG_OUT

Run as root: ownership, device nodes and modes are kept as the layers say.
"""

import gzip
import io
import json
import os
import shutil
import sys
import tarfile


def blob(outer, digest):
    algo, hexdigest = digest.split(":", 1)
    return outer.extractfile(f"blobs/{algo}/{hexdigest}").read()


def remove(path):
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def inside(root, name):
    """The path of a layer member under root; refuses names that leave it."""
    path = os.path.normpath(os.path.join(root, name.lstrip("/")))
    if path != root and not path.startswith(root + os.sep):
        raise ValueError(f"layer member {name!r} leaves the root")
    return path


def apply_layer(root, data):
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as layer:
        members = []
        for m in layer.getmembers():
            base = os.path.basename(m.name.rstrip("/"))
            parent = inside(root, os.path.dirname(m.name.rstrip("/")))
            if base == ".wh..wh..opq":
                if os.path.isdir(parent):
                    for entry in os.listdir(parent):
                        remove(os.path.join(parent, entry))
            elif base.startswith(".wh."):
                victim = os.path.join(parent, base[len(".wh."):])
                if os.path.lexists(victim):
                    remove(victim)
            else:
                target = inside(root, m.name)
                # A layer replaces what a lower one had at the same path, unless
                # both are directories (then their contents merge).
                if os.path.lexists(target) and not (m.isdir() and os.path.isdir(target)):
                    remove(target)
                members.append(m)
        # Trusted input (our own build): keep modes, owners and device nodes.
        extra = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        layer.extractall(root, members=members, numeric_owner=True, **extra)


def main():
    archive, root, config_out = sys.argv[1:4]
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    with tarfile.open(archive) as outer:
        index = json.loads(outer.extractfile("index.json").read())
        manifests = index["manifests"]
        if len(manifests) != 1:
            sys.exit(f"unpack.py: expected one image in {archive}, found {len(manifests)}")
        manifest = json.loads(blob(outer, manifests[0]["digest"]))
        config = blob(outer, manifest["config"]["digest"])
        for layer in manifest["layers"]:
            apply_layer(root, blob(outer, layer["digest"]))
    with open(config_out, "wb") as f:
        f.write(config)


if __name__ == "__main__":
    main()
