#!/usr/bin/env python3
"""Offline renderer for the small subset of kustomize that deploy/k8s uses.

    render.py [--placeholder-secrets] [--json] DIR

prints what `kubectl kustomize DIR` would print (the same objects; the order is resources in
order, then generated objects, not kustomize's kind-sorted order), without kubectl or a cluster.

Supported, exactly as kustomize does them (anything else is refused, so the renderer can never
silently ignore a feature the manifests start to use):
- kustomization.yaml keys: apiVersion, kind, resources, configMapGenerator, secretGenerator,
  generatorOptions, patches, images;
- resources: YAML files (multi-document) and directories holding a kustomization (bases,
  overlays); no remote URLs;
- configMapGenerator / secretGenerator: name, files (`path` or `key=path`, inside the
  kustomization directory), literals (`KEY=VALUE`, surrounding quotes removed), secret `type`,
  behavior `create` only; ConfigMap file content that is not UTF-8 goes to binaryData;
- generatorOptions: disableNameSuffixHash (must be true: name hashes are not implemented) and
  labels;
- patches: JSON6902 patches (a YAML list of operations: add, remove, replace, test) from `path`
  or inline `patch`, with a target of group/version/kind/name (name taken literally); a target
  that matches nothing is an error here (kustomize ignores it);
- images: name, newName, newTag, digest, applied to containers and initContainers of pod
  templates (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob).
Transformers run after generators, patches before images, as in kustomize.

--placeholder-secrets: a secretGenerator file that does not exist (the real token is never in
the repository) is replaced by a fixed placeholder instead of failing; for offline checks only.

Only needs PyYAML.
"""

import argparse
import base64
import copy
import json
import os
import re
import sys

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "patches",
    "images",
}
PLACEHOLDER_SECRET = b"offline-render-placeholder-not-a-real-token"


class RenderError(Exception):
    """A kustomization that this renderer cannot render exactly (or that kustomize would refuse)."""


def _fail(where, msg):
    raise RenderError(f"{where}: {msg}")


def _check_keys(where, obj, allowed):
    if not isinstance(obj, dict):
        _fail(where, f"expected a mapping, got {type(obj).__name__}")
    extra = set(obj) - set(allowed)
    if extra:
        _fail(where, f"unsupported key(s) {sorted(extra)} (render.py implements {sorted(allowed)})")


def _load_docs(path):
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for i, d in enumerate(docs):
        where = f"{path} (document {i + 1})"
        if not isinstance(d, dict):
            _fail(where, "a resource must be a mapping")
        for key in ("apiVersion", "kind"):
            if not isinstance(d.get(key), str):
                _fail(where, f"missing {key}")
        if not isinstance(d.get("metadata"), dict) or not d["metadata"].get("name"):
            _fail(where, "missing metadata.name")
    return docs


def _inside(root, path):
    root = os.path.realpath(root)
    path = os.path.realpath(path)
    return path == root or path.startswith(root + os.sep)


def _kustomization_file(directory):
    for name in KUSTOMIZATION_NAMES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    _fail(directory, "no kustomization.yaml")


def _split_source(where, spec):
    if not isinstance(spec, str) or not spec:
        _fail(where, f"bad file source {spec!r}")
    if "=" in spec:
        key, path = spec.split("=", 1)
        if not key or not path:
            _fail(where, f"bad file source {spec!r}")
        return key, path
    return os.path.basename(spec), spec


def _unquote(value):
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _generate(directory, kind, spec, options, placeholder_secrets):
    where = f"{directory}: {kind} generator {spec.get('name')!r}"
    allowed = {"name", "files", "literals", "behavior"} | ({"type"} if kind == "Secret" else set())
    _check_keys(where, spec, allowed)
    if not spec.get("name"):
        _fail(where, "missing name")
    if spec.get("behavior", "create") != "create":
        _fail(where, "only behavior: create is implemented")
    entries = {}

    def put(key, value):
        if key in entries:
            _fail(where, f"duplicate key {key!r}")
        entries[key] = value

    for src in spec.get("files") or []:
        key, rel = _split_source(where, src)
        path = os.path.join(directory, rel)
        if not _inside(directory, path):
            _fail(where, f"file {rel!r} is outside the kustomization directory (kustomize's load restrictor refuses it)")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                put(key, f.read())
        elif kind == "Secret" and placeholder_secrets:
            print(f"render.py: {where}: {rel} missing, using a placeholder", file=sys.stderr)
            put(key, PLACEHOLDER_SECRET)
        else:
            _fail(where, f"file {rel!r} not found")
    for lit in spec.get("literals") or []:
        if not isinstance(lit, str) or "=" not in lit or lit.startswith("="):
            _fail(where, f"bad literal {lit!r} (want KEY=VALUE)")
        key, value = lit.split("=", 1)
        put(key, _unquote(value).encode("utf-8"))

    meta = {"name": spec["name"]}
    labels = options.get("labels")
    if labels:
        meta["labels"] = dict(labels)
    obj = {"apiVersion": "v1", "kind": kind, "metadata": meta}
    if kind == "ConfigMap":
        data, binary = {}, {}
        for k, v in entries.items():
            try:
                data[k] = v.decode("utf-8")
            except UnicodeDecodeError:
                binary[k] = base64.b64encode(v).decode("ascii")
        if data:
            obj["data"] = data
        if binary:
            obj["binaryData"] = binary
    else:
        obj["type"] = spec.get("type", "Opaque")
        if entries:
            obj["data"] = {k: base64.b64encode(v).decode("ascii") for k, v in entries.items()}
    return obj


# ---- JSON6902 ---------------------------------------------------------------------------------


def _pointer(where, path):
    if not isinstance(path, str) or not path.startswith("/"):
        _fail(where, f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(where, container, token, allow_end=False):
    if allow_end and token == "-":
        return len(container)
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        _fail(where, f"bad array index {token!r}")
    i = int(token)
    if i > len(container) or (i == len(container) and not allow_end):
        _fail(where, f"array index {i} out of range (length {len(container)})")
    return i


def _parent(where, doc, parts):
    cur = doc
    for token in parts[:-1]:
        if isinstance(cur, dict):
            if token not in cur:
                _fail(where, f"path component {token!r} does not exist")
            cur = cur[token]
        elif isinstance(cur, list):
            cur = cur[_index(where, cur, token)]
        else:
            _fail(where, f"cannot descend into a {type(cur).__name__} at {token!r}")
    return cur


def _apply_op(where, doc, op):
    _check_keys(where, op, {"op", "path", "value"})
    kind = op.get("op")
    if kind not in ("add", "remove", "replace", "test"):
        _fail(where, f"operation {kind!r} not implemented (add, remove, replace, test)")
    parts = _pointer(where, op.get("path"))
    if kind != "remove" and "value" not in op:
        _fail(where, f"{kind} needs a value")
    if parts == [""] and op["path"] == "/":
        _fail(where, "whole-document operations are not supported")
    parent = _parent(where, doc, parts)
    last = parts[-1]
    value = copy.deepcopy(op.get("value"))
    if isinstance(parent, dict):
        exists = last in parent
        if kind == "add":
            parent[last] = value
        elif not exists:
            _fail(where, f"{op['path']} does not exist")
        elif kind == "remove":
            del parent[last]
        elif kind == "replace":
            parent[last] = value
        elif parent[last] != value:
            _fail(where, f"test failed: {op['path']} is {parent[last]!r}, expected {value!r}")
    elif isinstance(parent, list):
        if kind == "add":
            parent.insert(_index(where, parent, last, allow_end=True), value)
        else:
            i = _index(where, parent, last)
            if kind == "remove":
                del parent[i]
            elif kind == "replace":
                parent[i] = value
            elif parent[i] != value:
                _fail(where, f"test failed: {op['path']} is {parent[i]!r}, expected {value!r}")
    else:
        _fail(where, f"{op['path']}: parent is a {type(parent).__name__}")


def _gvk(obj):
    api = obj["apiVersion"]
    group, version = api.split("/", 1) if "/" in api else ("", api)
    return group, version, obj["kind"]


def _patch(directory, resources, spec):
    where = f"{directory}: patch {spec.get('path') or '(inline)'}"
    _check_keys(where, spec, {"path", "patch", "target"})
    if ("path" in spec) == ("patch" in spec):
        _fail(where, "give exactly one of path, patch")
    if "path" in spec:
        path = os.path.join(directory, spec["path"])
        if not _inside(directory, path):
            _fail(where, "patch file outside the kustomization directory")
        with open(path, encoding="utf-8") as f:
            ops = yaml.safe_load(f)
    else:
        ops = yaml.safe_load(spec["patch"])
    if not isinstance(ops, list):
        _fail(where, "only JSON6902 patches (a list of operations) are implemented, not strategic-merge patches")
    target = spec.get("target")
    if not isinstance(target, dict) or not target.get("kind") or not target.get("name"):
        _fail(where, "a target with at least kind and name is required")
    _check_keys(where + " target", target, {"group", "version", "kind", "name"})
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", target["name"]):
        _fail(where, "target name must be a plain DNS label (kustomize treats it as a regex)")
    matched = 0
    for obj in resources:
        group, version, kind = _gvk(obj)
        if kind != target["kind"] or obj["metadata"]["name"] != target["name"]:
            continue
        if "group" in target and target["group"] != group:
            continue
        if "version" in target and target["version"] != version:
            continue
        matched += 1
        for i, op in enumerate(ops):
            _apply_op(f"{where} op {i + 1} on {kind}/{target['name']}", obj, op)
    if matched == 0:
        _fail(where, f"target {target} matches no resource")


# ---- images -----------------------------------------------------------------------------------


def _split_image(image):
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon + 1:]
    return image, tag, digest


def pod_specs(obj):
    """The pod specs of a workload object (empty for other kinds)."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return [spec]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"):
        return [((spec.get("template") or {}).get("spec")) or {}]
    if kind == "CronJob":
        return [(((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}]
    return []


def _images(directory, resources, entries):
    for e in entries:
        _check_keys(f"{directory}: images entry", e, {"name", "newName", "newTag", "digest"})
        if not e.get("name"):
            _fail(directory, "images entry without name")
    for obj in resources:
        for ps in pod_specs(obj):
            for c in (ps.get("initContainers") or []) + (ps.get("containers") or []):
                if not isinstance(c.get("image"), str):
                    continue
                name, tag, digest = _split_image(c["image"])
                for e in entries:
                    if e["name"] != name:
                        continue
                    new = e.get("newName") or name
                    if e.get("digest"):
                        new += "@" + str(e["digest"])
                    elif e.get("newTag") is not None:
                        new += ":" + str(e["newTag"])
                    elif digest:
                        new += "@" + digest
                    elif tag:
                        new += ":" + tag
                    c["image"] = new
                    break


# ---- driver -----------------------------------------------------------------------------------


def render(directory, placeholder_secrets=False, _stack=()):
    """Render the kustomization in `directory` to a list of objects."""
    directory = os.path.realpath(directory)
    if directory in _stack:
        _fail(directory, "kustomization cycle")
    kpath = _kustomization_file(directory)
    with open(kpath, encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    _check_keys(kpath, k, KUSTOMIZATION_KEYS)
    if k.get("apiVersion", "kustomize.config.k8s.io/v1beta1") != "kustomize.config.k8s.io/v1beta1":
        _fail(kpath, f"apiVersion {k['apiVersion']!r}")
    if k.get("kind", "Kustomization") != "Kustomization":
        _fail(kpath, f"kind {k['kind']!r}")

    resources = []
    for r in k.get("resources") or []:
        if not isinstance(r, str) or re.match(r"^[a-z]+://|^github\.com/", r):
            _fail(kpath, f"resource {r!r}: only local files and directories are implemented")
        p = os.path.join(directory, r)
        if os.path.isdir(p):
            resources += render(p, placeholder_secrets, _stack + (directory,))
        elif os.path.isfile(p):
            if not _inside(directory, p):
                _fail(kpath, f"resource file {r!r} outside the kustomization directory")
            resources += _load_docs(p)
        else:
            _fail(kpath, f"resource {r!r} not found")

    options = k.get("generatorOptions") or {}
    _check_keys(f"{kpath} generatorOptions", options, {"disableNameSuffixHash", "labels"})
    generators = [("ConfigMap", g) for g in k.get("configMapGenerator") or []]
    generators += [("Secret", g) for g in k.get("secretGenerator") or []]
    if generators and options.get("disableNameSuffixHash") is not True:
        _fail(kpath, "generators need generatorOptions.disableNameSuffixHash: true (name hashes are not implemented)")
    for kind, g in generators:
        resources.append(_generate(directory, kind, g, options, placeholder_secrets))

    seen = set()
    for obj in resources:
        ident = (_gvk(obj), obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if ident in seen:
            _fail(kpath, f"duplicate resource {obj['kind']}/{obj['metadata']['name']}")
        seen.add(ident)

    for p in k.get("patches") or []:
        _patch(directory, resources, p)
    if k.get("images"):
        _images(directory, resources, k["images"])
    return resources


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the embedded merge.yaml stays readable)."""


def _str(dumper, value):
    style = "|" if "\n" in value and not re.search(r"[ \t]\n|[^\x20-\x7e\n]", value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(objs, stream):
    """Write objects as a multi-document YAML stream."""
    yaml.dump_all(objs, stream, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory")
    ap.add_argument("--placeholder-secrets", action="store_true")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of YAML documents")
    a = ap.parse_args(argv)
    try:
        objs = render(a.directory, a.placeholder_secrets)
    except (RenderError, OSError, yaml.YAMLError) as e:
        print(f"render.py: error: {e}", file=sys.stderr)
        return 1
    if a.json:
        json.dump(objs, sys.stdout, indent=2)
        print()
    else:
        dump_yaml(objs, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
