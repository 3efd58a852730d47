#!/usr/bin/env python3
"""Print the exact process argv of every container in the rendered manifests, one JSON object a line.

    commands.py [--raw] [--replace OLD=NEW]... [DIR]        (DIR defaults to deploy/k8s/base)

Each line: {"kind": "Job", "name": "amalgam-coordinator", "container": "coordinator",
            "argv": ["amalgam", "coordinator", "--config", "/config/merge.yaml", ...]}

argv is `command` + `args` as the kubelet runs them: `$(VAR)` references are expanded from the
container's env (literal values and configMapKeyRef/secretKeyRef entries, resolved from the
rendered ConfigMaps and Secrets), `$$` is a literal `$`, and a reference that cannot be resolved
is left as written (Kubernetes does the same). --raw prints command + args unexpanded.

A container without `command` would run its image's ENTRYPOINT, which this script cannot know:
it is an error (the deploy manifests always give `command`).

Substitution points for running the argv as local processes (use --replace, applied in order as
plain substring replacements on every argv element, or do it in the caller):
- hostnames: `etcd` (http://etcd:2379, the etcd Service) and `amalgam-coordinator`
  (http://amalgam-coordinator:7070, the coordinator Service);
- listen addresses: 0.0.0.0:7070 (gRPC), 0.0.0.0:9090 (metrics), 0.0.0.0:2379 / 127.0.0.1:2380
  (etcd client / peer);
- paths: /config (ConfigMap amalgam-config: merge.yaml), /shared (the shared volume: models
  under /shared/models, output /shared/output), /secrets (Secret amalgam-token: token),
  /var/lib/etcd (etcd data).
"""

import argparse
import base64
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def expand(s, env):
    """Kubernetes' $(VAR) expansion (k8s.io/kubernetes third_party/forked/golang/expansion)."""
    out = []
    i = 0
    while i < len(s):
        c = s[i]
        if c != "$" or i + 1 >= len(s):
            out.append(c)
            i += 1
            continue
        n = s[i + 1]
        if n == "$":
            out.append("$")
            i += 2
        elif n == "(":
            j = s.find(")", i + 2)
            if j == -1:
                out.append("$(")
                i += 2
            else:
                name = s[i + 2:j]
                out.append(env[name] if name in env else s[i:j + 1])
                i = j + 1
        else:
            out.append(c + n)
            i += 2
    return "".join(out)


def container_env(container, objs):
    """The env a container's $(VAR) references see (only the entries we can resolve offline)."""
    configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    env = {}
    for e in container.get("env") or []:
        name = e["name"]
        if "value" in e:
            env[name] = expand(str(e["value"]), env)
            continue
        src = e.get("valueFrom") or {}
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            cm = configmaps.get(ref.get("name"))
            if cm is not None and ref.get("key") in (cm.get("data") or {}):
                env[name] = cm["data"][ref["key"]]
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            sec = secrets.get(ref.get("name"))
            if sec is not None and ref.get("key") in (sec.get("data") or {}):
                env[name] = base64.b64decode(sec["data"][ref["key"]]).decode("utf-8", "replace")
    return env


def commands(objs, raw=False, replace=()):
    """One dict per container of every workload in `objs`."""
    rows = []
    for obj in objs:
        for ps in render.pod_specs(obj):
            for c in (ps.get("initContainers") or []) + (ps.get("containers") or []):
                where = f"{obj['kind']}/{obj['metadata']['name']} container {c.get('name')}"
                if not c.get("command"):
                    raise render.RenderError(f"{where}: no command (the image ENTRYPOINT is unknown here)")
                argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
                if not raw:
                    env = container_env(c, objs)
                    argv = [expand(a, env) for a in argv]
                for old, new in replace:
                    argv = [a.replace(old, new) for a in argv]
                rows.append({"kind": obj["kind"], "name": obj["metadata"]["name"], "container": c["name"], "argv": argv})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", nargs="?", default=os.path.join(REPO, "deploy", "k8s", "base"))
    ap.add_argument("--raw", action="store_true", help="do not expand $(VAR) references")
    ap.add_argument("--replace", action="append", default=[], metavar="OLD=NEW")
    a = ap.parse_args(argv)
    pairs = []
    for r in a.replace:
        if "=" not in r or r.startswith("="):
            ap.error(f"--replace wants OLD=NEW, got {r!r}")
        pairs.append(tuple(r.split("=", 1)))
    try:
        # The token's content never appears in an argv, so a missing token file does not matter.
        objs = render.render(a.directory, placeholder_secrets=True)
        rows = commands(objs, a.raw, pairs)
    except (render.RenderError, OSError, render.yaml.YAMLError) as e:
        print(f"commands.py: error: {e}", file=sys.stderr)
        return 1
    for row in rows:
        print(json.dumps(row, separators=(", ", ": ")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
