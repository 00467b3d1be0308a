"""Validates Kubernetes manifests strictly, for hack/deploy-check.

Built-in kinds are checked against the strict JSON schemas that the
kubernetes-validate package ships for each Kubernetes version asked for; custom
resources against the openAPIV3Schema of the CRD files given, made strict the
way `kubeconform -strict` does: an object schema that lists its properties and
does not preserve unknown fields gets `additionalProperties: false`, so a
misspelt field fails. With --policy it also checks the chart's own rules
(resources, probes and securityContext on every container, StorageClass
parameters the driver knows, no master secret rendered) and, per file, the
rules that tie its objects together: the node plugin's projected token for the
KMS, the KMS's authorizer flags, and the KMS's and node plugin's RBAC.

    validate.py --k8s 1.35.0 --k8s 1.36.0 --crd a.yaml --crd b.yaml [--policy] FILE...

Prints each problem on its own line and exits 1 if there is any.
"""

import argparse
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

# The parameters the driver accepts (src/csi/params.rs; it refuses any other of
# its own prefix) and the backend keys the StorageClasses may use.
DRIVER_PARAMETERS = {
    "csi.storage.k8s.io/fstype",
    "cryptdisk.csi.io/integrity",
    "cryptdisk.csi.io/integrityJournal",
    "cryptdisk.csi.io/allowDiscards",
    "cryptdisk.csi.io/kernelWorkqueues",
    "skuName",
    "type",
    "replication-type",
}


def make_strict(schema):
    """An openAPIV3Schema as JSON Schema that refuses unknown fields."""
    if isinstance(schema, list):
        return [make_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {k: make_strict(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = make_strict(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = make_strict(value)
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crds(paths):
    """(apiVersion, kind) -> a strict validator, from CustomResourceDefinitions."""
    validators = {}
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for version in spec["versions"]:
                    if not version.get("served", True):
                        continue
                    schema = make_strict(version["schema"]["openAPIV3Schema"])
                    # The API server sets and checks these itself; the schema
                    # only says "object".
                    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                    schema["additionalProperties"] = False
                    api_version = f"{spec['group']}/{version['name']}"
                    validators[(api_version, spec["names"]["kind"])] = jsonschema.Draft7Validator(schema)
    return validators


def where(error):
    return "/".join(str(p) for p in error.absolute_path) or "(root)"


def check_object(doc, versions, crds):
    """Problems with one object, as strings."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crds:
        return [f"{where(e)}: {e.message}" for e in crds[key].iter_errors(doc)]
    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"Kubernetes {version} has no schema for {key[0]} {key[1]}")
        except kubernetes_validate.ValidationError as e:
            problems.append(f"Kubernetes {version}: {where(e)}: {e.message}")
    return problems


def pod_spec(doc):
    if doc.get("kind") in ("Deployment", "DaemonSet", "StatefulSet"):
        return doc["spec"]["template"]["spec"]
    if doc.get("kind") == "Pod":
        return doc["spec"]
    return None


DRIVER_COMMANDS = ("controller", "node", "kms")
_help_texts = {}


def driver_help(binary, command):
    """`cryptdisk-csi COMMAND --help`, once per command."""
    if command not in _help_texts:
        out = subprocess.run([binary, command, "--help"], capture_output=True, text=True, check=True)
        _help_texts[command] = out.stdout
    return _help_texts[command]


def check_driver_flags(container, binary):
    """Every flag and CRYPTDISK_* variable the chart gives the driver must be one
    that the driver's subcommand accepts (its --help names each)."""
    args = container.get("args", [])
    if not args or args[0] not in DRIVER_COMMANDS:
        return []
    text = driver_help(binary, args[0])
    problems = []
    for arg in args[1:]:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and not re.search(re.escape(flag) + r"[ =,\n<]", text):
            problems.append(f"container {container['name']}: `{args[0]}` has no flag {flag}")
    for env in container.get("env", []):
        if env["name"].startswith("CRYPTDISK_") and f"env: {env['name']}=" not in text:
            problems.append(f"container {container['name']}: `{args[0]}` reads no {env['name']}")
    return problems


def check_policy(doc, binary=None):
    """The chart's own rules for one rendered object."""
    problems = []
    spec = pod_spec(doc)
    if spec is not None:
        for c in spec.get("initContainers", []) + spec["containers"]:
            name = c["name"]
            if binary:
                problems += check_driver_flags(c, binary)
            resources = c.get("resources", {})
            if "requests" not in resources or "memory" not in resources.get("limits", {}):
                problems.append(f"container {name}: needs resource requests and a memory limit")
            if "livenessProbe" not in c:
                problems.append(f"container {name}: needs a livenessProbe")
            if "securityContext" not in c:
                problems.append(f"container {name}: needs a securityContext")
            image = c["image"]
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"container {name}: image {image} is not pinned to a tag")
    if doc.get("kind") == "Deployment":
        for c in spec["containers"]:
            if c["name"] == "csi-snapshotter" and "--extra-create-metadata" in c.get("args", []):
                problems.append("csi-snapshotter must pass no parameters: the driver refuses any in CreateSnapshot")
    if doc.get("kind") == "VolumeSnapshotClass" and doc.get("parameters"):
        problems.append("the driver refuses snapshot parameters")
    if doc.get("kind") == "StorageClass":
        unknown = set(doc.get("parameters", {})) - DRIVER_PARAMETERS
        if unknown:
            problems.append(f"parameters the driver would refuse: {sorted(unknown)}")
    if doc.get("kind") == "Secret" and set(doc.get("data", {}) or {}) & {"master.key", "salt"}:
        # Helm keeps every rendered object in its release record.
        problems.append("a master secret is rendered into the release: the chart must only name kms.existingSecret")
    if doc.get("kind") == "DaemonSet":
        mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", [])]
        if not any(m.get("mountPropagation") == "Bidirectional" for m in mounts):
            problems.append("the node plugin needs a Bidirectional mount of the kubelet directory")
    return problems


# Where the node plugin reads its KMS token, and what the KMS may do through
# the API: the contract of issue 20 (node-scoped keys).
KMS_TOKEN_DIR = "/var/run/secrets/cryptdisk-kms"
KMS_RULES = {
    ("authentication.k8s.io", "tokenreviews"): {"create"},
    ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch"},
    ("", "persistentvolumes"): {"get", "list", "watch"},
}


def flag_values(container):
    """--flag=value arguments as a dict (a bare --flag maps to True)."""
    out = {}
    for arg in container.get("args", []):
        if arg.startswith("--"):
            flag, _, value = arg.partition("=")
            out[flag] = value if "=" in arg else True
    return out


def driver_container(spec, command):
    for c in spec["containers"]:
        if c.get("args", [None])[0] == command:
            return c
    return None


def granted(docs, namespace, account):
    """(apiGroup, resource) -> verbs that RBAC objects in docs give a ServiceAccount."""
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d.get("kind") in ("Role", "ClusterRole")}
    out = {}
    for b in docs:
        if b.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(
            s.get("kind") == "ServiceAccount" and s.get("name") == account and s.get("namespace") == namespace
            for s in b.get("subjects", [])
        ):
            continue
        role = roles.get((b["roleRef"]["kind"], b["roleRef"]["name"]))
        if role is None:
            out[("?", f"unrendered {b['roleRef']['kind']} {b['roleRef']['name']}")] = {"?"}
            continue
        for rule in role.get("rules", []):
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    out.setdefault((group, resource), set()).update(rule.get("verbs", []))
    return out


def show_rules(rules):
    return "; ".join(f"{g or 'core'}/{r}: {','.join(sorted(v))}" for (g, r), v in sorted(rules.items())) or "nothing"


def check_release(docs):
    """The rules of issue 20 that span objects of one rendered release: the node
    plugin sends a projected token that the KMS is set up to accept, and each
    of them is granted exactly what it uses."""
    problems = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)
    daemonsets = [d for d in by_kind.get("DaemonSet", []) if driver_container(pod_spec(d), "node")]
    kmses = [d for d in by_kind.get("Deployment", []) if driver_container(pod_spec(d), "kms")]
    drivers = by_kind.get("CSIDriver", [])
    if len(daemonsets) != 1 or len(kmses) != 1:
        return [f"expected one node DaemonSet and one KMS Deployment, found {len(daemonsets)} and {len(kmses)}"]
    node, kms = daemonsets[0], kmses[0]
    node_spec, kms_spec = pod_spec(node), pod_spec(kms)
    namespace = node["metadata"].get("namespace")
    node_account = node_spec.get("serviceAccountName")
    kms_account = kms_spec.get("serviceAccountName")
    kms_flags = flag_values(driver_container(kms_spec, "kms"))
    plugin = driver_container(node_spec, "node")
    node_flags = flag_values(plugin)

    # The projected token: audience and lifetime as the KMS expects.
    audience = kms_flags.get("--token-audience")
    tokens = [
        (v["name"], s["serviceAccountToken"])
        for v in node_spec.get("volumes", [])
        for s in v.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in s
    ]
    if len(tokens) != 1:
        problems.append(f"the node plugin needs one projected ServiceAccount token for the KMS, has {len(tokens)}")
    else:
        volume, token = tokens[0]
        if not audience or token.get("audience") != audience:
            problems.append(
                f"the node plugin's token has audience {token.get('audience')!r}, the KMS accepts {audience!r}"
            )
        if not 600 <= int(token.get("expirationSeconds", 3600)) <= 3600:
            problems.append(f"the node plugin's token lives {token.get('expirationSeconds')} s: keep it short (600)")
        mounts = [m for m in plugin.get("volumeMounts", []) if m["name"] == volume]
        if [m.get("mountPath") for m in mounts] != [KMS_TOKEN_DIR]:
            problems.append(f"the node plugin must mount its KMS token at {KMS_TOKEN_DIR}")
        if node_flags.get("--kms-token-file") != f"{KMS_TOKEN_DIR}/{token.get('path')}":
            problems.append(
                f"the node plugin reads --kms-token-file={node_flags.get('--kms-token-file')}, "
                f"its token is at {KMS_TOKEN_DIR}/{token.get('path')}"
            )

    # The KMS: the authorizer on, naming the node plugin's account and our driver.
    if kms_flags.get("--authorizer") != "kubernetes":
        problems.append(f"the KMS must run --authorizer=kubernetes, not {kms_flags.get('--authorizer')!r}")
    if kms_flags.get("--node-service-account") != f"{namespace}/{node_account}":
        problems.append(
            f"the KMS accepts tokens of {kms_flags.get('--node-service-account')!r}, "
            f"the node plugin runs as {namespace}/{node_account}"
        )
    if [d["metadata"]["name"] for d in drivers] != [kms_flags.get("--driver-name")]:
        problems.append(
            f"the KMS's --driver-name {kms_flags.get('--driver-name')!r} is not the CSIDriver "
            f"{[d['metadata']['name'] for d in drivers]}"
        )
    if kms_spec.get("automountServiceAccountToken") is not True:
        problems.append("the KMS needs its ServiceAccount token (TokenReview, watches)")

    # RBAC: the KMS exactly what its authorizer reads; the node plugin nothing.
    kms_rules = granted(docs, namespace, kms_account)
    if kms_rules != KMS_RULES:
        problems.append(f"the KMS is granted {show_rules(kms_rules)}; it needs exactly {show_rules(KMS_RULES)}")
    node_rules = granted(docs, namespace, node_account)
    if node_rules:
        problems.append(f"the node plugin's ServiceAccount is granted {show_rules(node_rules)}: it needs nothing")
    if node_spec.get("automountServiceAccountToken") is not False:
        problems.append("the node plugin must not mount an API token (only the KMS's projected one)")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k8s", action="append", required=True, help="Kubernetes version, e.g. 1.35.0")
    parser.add_argument("--crd", action="append", default=[], help="a file of CustomResourceDefinitions")
    parser.add_argument("--policy", action="store_true", help="also check the chart's own rules")
    parser.add_argument(
        "--binary",
        help="with --policy: the cryptdisk-csi binary whose --help must name every flag the chart passes",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="print one line per file, `ok   FILE` or `FAIL FILE`, its problems indented below",
    )
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    crds = load_crds(args.crd)
    failed = False
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        problems = [] if docs else ["no objects"]
        for doc in docs:
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            found = check_object(doc, args.k8s, crds)
            if args.policy:
                found += check_policy(doc, args.binary)
            problems += [f"{name}: {p}" for p in found]
        if args.policy and docs:
            problems += check_release(docs)
        failed = failed or bool(problems)
        if args.report:
            versions = ", ".join(args.k8s)
            print(f"{'FAIL' if problems else 'ok  '} {path} ({len(docs)} objects; Kubernetes {versions})")
            for p in problems:
                print(f"       {p}")
        else:
            for p in problems:
                print(f"{path}: {p}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
