#!/usr/bin/env python3
"""Writes an SPDX 2.3 JSON SBOM of the image on stdout: the image itself (with
the archive's SHA-256), every Debian package its dpkg database lists (version,
source, architecture, a pkg:deb purl), the driver's binary, and the Rust crates
linked into it (from `cargo metadata` for the build target: normal
dependencies only, no build scripts' or proc macros' crates, each with its
declared license and Cargo.lock's checksum). Debian's packaging has no tool
that makes an SPDX or CycloneDX document from an image, so this reads the
sources such tools read.

    sbom.py ROOTFS ARCHIVE
"""

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys


def spdx_id(kind, name, version):
    return "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]", "-", f"{kind}-{name}-{version}")


def dpkg_status(root):
    """The installed packages of a dpkg status file, as dicts of its fields."""
    text = open(os.path.join(root, "var/lib/dpkg/status"), encoding="utf-8").read()
    for para in text.strip().split("\n\n"):
        fields, last = {}, None
        for line in para.splitlines():
            if line.startswith((" ", "\t")) and last:
                fields[last] += "\n" + line
            elif ":" in line:
                last, value = line.split(":", 1)
                fields[last] = value.strip()
        if fields.get("Status", "").endswith(" installed"):
            yield fields


def debian_version(root):
    try:
        return open(os.path.join(root, "etc/debian_version")).read().strip().split(".")[0]
    except OSError:
        return ""


def rust_crates():
    """The crates linked into the binary: (package, checksum) per crate."""
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--offline",
         "--filter-platform", "x86_64-unknown-linux-gnu"],
        check=True, capture_output=True, text=True).stdout)
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for dep in nodes[pid]["deps"]:
            if any(k["kind"] is None for k in dep["dep_kinds"]):
                kinds = {k for t in packages[dep["pkg"]]["targets"] for k in t["kind"]}
                if kinds != {"proc-macro"}:
                    todo.append(dep["pkg"])
    lock = open(os.path.join(meta["workspace_root"], "Cargo.lock"), encoding="utf-8").read()
    sums = {(m[0], m[1]): m[2] for m in re.findall(
        r'name = "([^"]+)"\nversion = "([^"]+)"\nsource = "[^"]+"\nchecksum = "([0-9a-f]+)"', lock)}
    return packages[root], [(packages[p], sums.get((packages[p]["name"], packages[p]["version"])))
                            for p in sorted(seen - {root})]


def license_expression(declared):
    """Cargo's license field as an SPDX expression (old manifests write `A/B`)."""
    if not declared:
        return "NOASSERTION"
    return re.sub(r"\s*/\s*", " OR ", declared)


def main():
    root, archive = sys.argv[1:3]
    digest = hashlib.sha256(open(archive, "rb").read()).hexdigest()
    me, crates = rust_crates()
    distro = debian_version(root)
    image_id = "SPDXRef-Image"
    binary_id = spdx_id("Binary", me["name"], me["version"])
    packages = [{
        "SPDXID": image_id,
        "name": f"{me['name']} image",
        "versionInfo": me["version"],
        "packageFileName": os.path.basename(archive),
        "primaryPackagePurpose": "CONTAINER",
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "checksums": [{"algorithm": "SHA256", "checksumValue": digest}],
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
    }, {
        "SPDXID": binary_id,
        "name": me["name"],
        "versionInfo": me["version"],
        "packageFileName": "/usr/local/bin/cryptdisk-csi",
        "primaryPackagePurpose": "APPLICATION",
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "checksums": [{"algorithm": "SHA256", "checksumValue": hashlib.sha256(
            open(os.path.join(root, "usr/local/bin/cryptdisk-csi"), "rb").read()).hexdigest()}],
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": license_expression(me.get("license")),
        "copyrightText": "NOASSERTION",
    }]
    rels = [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": image_id},
        {"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": binary_id},
    ]
    debs = {}
    for p in dpkg_status(root):
        name, version, arch = p["Package"], p["Version"], p.get("Architecture", "all")
        pid = spdx_id("Deb", name, version)
        debs[name] = pid
        purl = f"pkg:deb/debian/{name}@{version}?arch={arch}" + (f"&distro=debian-{distro}" if distro else "")
        pkg = {
            "SPDXID": pid,
            "name": name,
            "versionInfo": version,
            "supplier": "Organization: Debian",
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": purl}],
        }
        if "Source" in p:
            pkg["sourceInfo"] = f"built from the Debian source package {p['Source']}"
        packages.append(pkg)
        rels.append({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": pid})
    if "libcryptsetup12" in debs:
        rels.append({"spdxElementId": binary_id, "relationshipType": "DYNAMIC_LINK",
                     "relatedSpdxElement": debs["libcryptsetup12"]})
    for crate, checksum in crates:
        pid = spdx_id("Crate", crate["name"], crate["version"])
        pkg = {
            "SPDXID": pid,
            "name": crate["name"],
            "versionInfo": crate["version"],
            "downloadLocation": f"https://crates.io/api/v1/crates/{crate['name']}/{crate['version']}/download",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": license_expression(crate.get("license")),
            "copyrightText": "NOASSERTION",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:cargo/{crate['name']}@{crate['version']}"}],
        }
        if checksum:
            pkg["checksums"] = [{"algorithm": "SHA256", "checksumValue": checksum}]
        packages.append(pkg)
        rels.append({"spdxElementId": binary_id, "relationshipType": "STATIC_LINK", "relatedSpdxElement": pid})
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{me['name']}-{me['version']} image",
        "documentNamespace": f"https://cryptdisk.csi.io/spdx/{me['name']}-{me['version']}-{digest}",
        "creationInfo": {
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "creators": ["Tool: cryptdisk-csi-hack-image-sbom"],
        },
        "documentDescribes": [image_id],
        "packages": packages,
        "relationships": rels,
    }
    json.dump(doc, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
