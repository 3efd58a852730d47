#!/usr/bin/env python3
"""Render kustomizations offline and validate every object against the Kubernetes JSON schemas.

    validate.py [--k8s-version 1.30]... [--root DEPLOY_K8S_DIR] [KUSTOMIZATION_DIR...]

Defaults: every kustomization under deploy/k8s (base and overlays), Kubernetes 1.30. Needs PyYAML
and kubernetes-validate (validate.sh installs both into a venv). Exit status 0 when everything is
valid, 1 with one line per problem otherwise.

Besides the schemas (strict: an unknown or misspelled field is an error), it checks what a schema
cannot: references between objects (ConfigMaps, Secrets, PVCs, volumes, Service selectors and
target ports), the security settings, and the amalgam command lines (the CLI flags and ports the
coordinator and workers must use; GPU only with --device cuda).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import commands  # noqa: E402
import render  # noqa: E402

try:
    import kubernetes_validate
except ImportError:  # pragma: no cover - validate.sh installs it
    print("validate.py: the PyPI package kubernetes-validate is missing (run tests/deploy/validate.sh)", file=sys.stderr)
    sys.exit(2)

COORDINATOR_FLAGS = {"--config", "--out", "--listen", "--etcd", "--job-id", "--token-file", "--tls-cert",
                     "--tls-key", "--tls-client-ca", "--metrics-listen", "--shard-size"}
WORKER_FLAGS = {"--coordinator", "--token-file", "--device", "--allow-root", "--tls-ca", "--tls-cert", "--tls-key"}


def kustomization_dirs(root):
    out = []
    for d, _, files in os.walk(root):
        if any(f in render.KUSTOMIZATION_NAMES for f in files):
            out.append(d)
    return sorted(out)


def flag_values(argv, flags, where, problems):
    """Parse `--flag value` pairs after the subcommand; unknown flags are problems."""
    values = {}
    i = 2
    while i < len(argv):
        a = argv[i]
        if a not in flags:
            problems.append(f"{where}: unknown or misplaced argument {a!r} (CLI flags: {sorted(flags)})")
            i += 1
            continue
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            problems.append(f"{where}: {a} needs a value")
            i += 1
            continue
        values.setdefault(a, []).append(argv[i + 1])
        i += 2
    return values


def semantic_checks(objs, label):
    problems = []
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o

    def has(kind, name):
        return name in by_kind.get(kind, {})

    workloads = [o for o in objs if render.pod_specs(o)]
    for o in workloads:
        where = f"{label}: {o['kind']}/{o['metadata']['name']}"
        tmpl = (o["spec"].get("template") or {})
        tlabels = (tmpl.get("metadata") or {}).get("labels") or {}
        ps = render.pod_specs(o)[0]
        sc = ps.get("securityContext") or {}
        if sc.get("runAsNonRoot") is not True or not isinstance(sc.get("runAsUser"), int) or sc["runAsUser"] == 0:
            problems.append(f"{where}: pod securityContext must set runAsNonRoot: true and a non-zero runAsUser")
        if o["kind"] == "Job":
            if ps.get("restartPolicy") not in ("OnFailure", "Never"):
                problems.append(f"{where}: a Job's restartPolicy must be OnFailure or Never")
            if not isinstance(o["spec"].get("backoffLimit"), int):
                problems.append(f"{where}: set backoffLimit explicitly")
        if o["kind"] == "StatefulSet":
            sel = (o["spec"].get("selector") or {}).get("matchLabels") or {}
            if any(tlabels.get(k) != v for k, v in sel.items()):
                problems.append(f"{where}: selector {sel} does not match the template labels {tlabels}")
            if not has("Service", o["spec"].get("serviceName", "")):
                problems.append(f"{where}: serviceName {o['spec'].get('serviceName')!r} is not a Service here")
        volumes = {v["name"]: v for v in ps.get("volumes") or []}
        claim_templates = {t["metadata"]["name"] for t in o["spec"].get("volumeClaimTemplates") or []}
        for v in volumes.values():
            if "configMap" in v and not has("ConfigMap", v["configMap"]["name"]):
                problems.append(f"{where}: volume {v['name']} uses missing ConfigMap {v['configMap']['name']}")
            if "secret" in v and not has("Secret", v["secret"]["secretName"]):
                problems.append(f"{where}: volume {v['name']} uses missing Secret {v['secret']['secretName']}")
            if "persistentVolumeClaim" in v and not has("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]):
                problems.append(f"{where}: volume {v['name']} uses missing PVC {v['persistentVolumeClaim']['claimName']}")
        for c in (ps.get("initContainers") or []) + (ps.get("containers") or []):
            cw = f"{where} container {c['name']}"
            csc = c.get("securityContext") or {}
            if csc.get("allowPrivilegeEscalation") is not False or csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: set allowPrivilegeEscalation: false and readOnlyRootFilesystem: true")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{cw}: drop ALL capabilities")
            if not (c.get("resources") or {}).get("requests"):
                problems.append(f"{cw}: no resource requests")
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes and m["name"] not in claim_templates:
                    problems.append(f"{cw}: volumeMount {m['name']} has no volume")
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    cm = by_kind.get("ConfigMap", {}).get(ref["name"])
                    if cm is None or ref["key"] not in (cm.get("data") or {}):
                        problems.append(f"{cw}: env {e['name']} refers to missing ConfigMap key {ref['name']}/{ref['key']}")

    for svc in by_kind.get("Service", {}).values():
        where = f"{label}: Service/{svc['metadata']['name']}"
        sel = svc["spec"].get("selector") or {}
        pods = [o for o in workloads
                if sel and all(((o["spec"].get("template") or {}).get("metadata") or {}).get("labels", {}).get(k) == v
                               for k, v in sel.items())]
        if not pods:
            problems.append(f"{where}: selector {sel} matches no pod template")
            continue
        port_names = {p.get("name") for o in pods for c in render.pod_specs(o)[0].get("containers") or []
                      for p in c.get("ports") or []}
        for p in svc["spec"].get("ports") or []:
            tp = p.get("targetPort")
            if isinstance(tp, str) and tp not in port_names:
                problems.append(f"{where}: targetPort {tp!r} is not a container port name of {sorted(port_names)}")

    # The amalgam command lines.
    rows = commands.commands(objs)
    amalgam = [r for r in rows if r["argv"][0] == "amalgam"]
    coord = [r for r in amalgam if len(r["argv"]) > 1 and r["argv"][1] == "coordinator"]
    workers = [r for r in amalgam if len(r["argv"]) > 1 and r["argv"][1] == "worker"]
    if len(coord) != 1 or len(workers) != 1:
        problems.append(f"{label}: want exactly one coordinator and one worker container, got {len(coord)} and {len(workers)}")
        return problems
    cw = f"{label}: coordinator argv"
    cv = flag_values(coord[0]["argv"], COORDINATOR_FLAGS, cw, problems)
    for flag, want in (("--listen", "0.0.0.0:7070"), ("--metrics-listen", "0.0.0.0:9090"),
                       ("--etcd", "http://etcd:2379"), ("--token-file", "/secrets/token"),
                       ("--config", "/config/merge.yaml"), ("--out", "/shared/output")):
        if cv.get(flag) != [want]:
            problems.append(f"{cw}: {flag} is {cv.get(flag)}, expected [{want!r}]")
    if not cv.get("--job-id") or "$(" in cv["--job-id"][0]:
        problems.append(f"{cw}: --job-id does not resolve to a value: {cv.get('--job-id')}")
    ww = f"{label}: worker argv"
    wv = flag_values(workers[0]["argv"], WORKER_FLAGS, ww, problems)
    for flag, want in (("--coordinator", "http://amalgam-coordinator:7070"), ("--token-file", "/secrets/token"),
                       ("--allow-root", "/shared")):
        if wv.get(flag) != [want]:
            problems.append(f"{ww}: {flag} is {wv.get(flag)}, expected [{want!r}]")
    device = (wv.get("--device") or [None])[0]
    if device not in ("cpu", "cuda"):
        problems.append(f"{ww}: --device must be cpu or cuda, got {device!r}")
    wobj = by_kind["Job"][workers[0]["name"]]
    wc = [c for c in render.pod_specs(wobj)[0]["containers"] if c["name"] == workers[0]["container"]][0]
    gpus = ((wc.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
    if (device == "cuda") != (gpus is not None):
        problems.append(f"{ww}: --device {device} with nvidia.com/gpu limit {gpus!r} (GPU limit iff cuda)")
    if device == "cuda" and "cuda" not in wc.get("image", ""):
        problems.append(f"{ww}: --device cuda needs the CUDA image, got {wc.get('image')!r}")
    if device == "cpu" and "cuda" in wc.get("image", ""):
        problems.append(f"{ww}: --device cpu on the CUDA image {wc.get('image')!r}")
    if wobj["spec"].get("completionMode") != "Indexed":
        problems.append(f"{label}: Job/{wobj['metadata']['name']}: completionMode must be Indexed")
    svc = by_kind.get("Service", {}).get("amalgam-coordinator")
    if svc is None or sorted(p["port"] for p in svc["spec"]["ports"]) != [7070, 9090]:
        problems.append(f"{label}: Service amalgam-coordinator must expose 7070 and 9090")
    return problems


IMAGE_UID = 10001


def check_dockerfile(repo, objs_by_dir):
    """deploy/Dockerfile against the manifests and the workspace: targets, user, entrypoint,
    package and feature names. Returns (problems, warnings)."""
    problems, warnings = [], []
    path = os.path.join(repo, "deploy", "Dockerfile")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return [f"deploy/Dockerfile: {e}"], warnings
    lines = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    stages, current = {}, None
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            parts = rest.split()
            current = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            stages[current] = []
        elif current is not None:
            stages[current].append((word.upper(), rest.strip()))
    names = list(stages)
    if not names or names[-1] != "cpu" or "cuda" not in stages:
        problems.append(f"deploy/Dockerfile: want stages `cuda` and `cpu` (cpu last = default target), got {names}")
    for name in ("cpu", "cuda"):
        instr = stages.get(name, [])
        if ("USER", f"{IMAGE_UID}:{IMAGE_UID}") not in instr:
            problems.append(f"deploy/Dockerfile stage {name}: want USER {IMAGE_UID}:{IMAGE_UID}")
        if ("ENTRYPOINT", '["amalgam"]') not in instr:
            problems.append(f"deploy/Dockerfile stage {name}: want ENTRYPOINT [\"amalgam\"]")
    if "-p amalgam-cli" not in text:
        problems.append("deploy/Dockerfile: does not build -p amalgam-cli")
    try:
        import tomllib

        with open(os.path.join(repo, "crates", "cli", "Cargo.toml"), "rb") as f:
            cli = tomllib.load(f)
        if cli.get("package", {}).get("name") != "amalgam-cli":
            problems.append("crates/cli/Cargo.toml: package is not named amalgam-cli")
        if not any(b.get("name") == "amalgam" for b in cli.get("bin", [])):
            problems.append("crates/cli/Cargo.toml: no [[bin]] named amalgam")
        if "cuda" not in cli.get("features", {}):
            warnings.append("crates/cli/Cargo.toml has no `cuda` feature yet: the CUDA image "
                            "(cargo build -p amalgam-cli --features cuda) will not build until it does")
    except (ImportError, OSError) as e:
        warnings.append(f"crates/cli/Cargo.toml not checked: {e}")
    for label, objs in objs_by_dir.items():
        for o in objs:
            for ps in render.pod_specs(o):
                uses_amalgam = any((c.get("command") or [None])[0] == "amalgam" for c in ps.get("containers") or [])
                if uses_amalgam and (ps.get("securityContext") or {}).get("runAsUser") != IMAGE_UID:
                    problems.append(f"{label}: {o['kind']}/{o['metadata']['name']}: runAsUser must be the image's "
                                    f"user {IMAGE_UID}")
    return problems, warnings


def compare_with_kubectl(kubectl, root, dirs):
    """Render each kustomization with `kubectl kustomize` too (on a copy with placeholder secret
    files) and require the same objects as render.py (kustomize sorts them; order is ignored)."""
    problems = []
    root = os.path.realpath(root)
    with tempfile.TemporaryDirectory() as tmp:
        copy_root = os.path.join(tmp, "k8s")
        shutil.copytree(root, copy_root)
        for d, _, files in os.walk(copy_root):
            kfile = next((f for f in files if f in render.KUSTOMIZATION_NAMES), None)
            if kfile is None:
                continue
            with open(os.path.join(d, kfile), encoding="utf-8") as f:
                k = render.yaml.safe_load(f) or {}
            for g in k.get("secretGenerator") or []:
                for src in g.get("files") or []:
                    path = os.path.join(d, src.split("=", 1)[-1])
                    if not os.path.exists(path):
                        with open(path, "wb") as f:
                            f.write(render.PLACEHOLDER_SECRET)
        for d in dirs:
            rel = os.path.relpath(os.path.realpath(d), root)
            copy = os.path.join(copy_root, rel)
            label = f"kubectl kustomize {rel}"
            r = subprocess.run([kubectl, "kustomize", copy], capture_output=True, text=True)
            if r.returncode != 0:
                problems.append(f"{label}: failed: {r.stderr.strip()}")
                continue
            theirs = [o for o in render.yaml.safe_load_all(r.stdout) if o is not None]
            try:
                mine = render.render(copy)
            except render.RenderError as e:
                problems.append(f"{label}: render.py failed where kubectl succeeded: {e}")
                continue

            def key(o):
                return (o["apiVersion"], o["kind"], o["metadata"]["name"])

            a = {key(o): o for o in mine}
            b = {key(o): o for o in theirs}
            if a.keys() != b.keys():
                problems.append(f"{label}: objects differ: render.py {sorted(a)} vs kubectl {sorted(b)}")
                continue
            diff = [k for k in a if a[k] != b[k]]
            if diff:
                problems.append(f"{label}: render.py and kubectl disagree on {diff}")
            else:
                print(f"{label}: {len(a)} objects, identical to render.py")
    return problems


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.join(here, "..", "..", "deploy", "k8s"))
    ap.add_argument("--k8s-version", action="append", default=None)
    ap.add_argument("--kubectl", help="also compare render.py with `KUBECTL kustomize` (needs no cluster)")
    ap.add_argument("dirs", nargs="*")
    a = ap.parse_args(argv)
    versions = a.k8s_version or ["1.30"]
    dirs = a.dirs or kustomization_dirs(a.root)
    dirs = [d for d in dirs if os.path.basename(os.path.normpath(d)) != "secrets"]
    if not dirs:
        print(f"validate.py: no kustomization under {a.root}", file=sys.stderr)
        return 1
    problems = []
    total = 0
    objs_by_dir = {}
    for d in dirs:
        label = os.path.relpath(d, os.path.join(a.root, "..", ".."))
        try:
            objs = render.render(d, placeholder_secrets=True)
        except (render.RenderError, OSError, render.yaml.YAMLError) as e:
            problems.append(f"{label}: render failed: {e}")
            continue
        # Only top-level kustomizations that are applied on their own get the cross checks;
        # every object is schema-checked.
        for o in objs:
            ident = f"{label}: {o['kind']}/{o['metadata']['name']}"
            for v in versions:
                try:
                    kubernetes_validate.validate(o, v, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = "/".join(str(p) for p in e.path) or "(top)"
                    problems.append(f"{ident}: invalid for Kubernetes {v} at {path}: {e.message}")
                except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
                    problems.append(f"{ident}: no schema for Kubernetes {v}: {e}")
            total += 1
        objs_by_dir[label] = objs
        try:
            problems += semantic_checks(objs, label)
        except (KeyError, TypeError, IndexError, render.RenderError) as e:
            problems.append(f"{label}: cross checks could not run ({type(e).__name__}: {e})")
        print(f"{label}: {len(objs)} objects rendered")
    if a.kubectl:
        problems += compare_with_kubectl(a.kubectl, a.root, dirs)
    repo = os.path.realpath(os.path.join(a.root, "..", ".."))
    if os.path.isfile(os.path.join(repo, "deploy", "Dockerfile")):
        p, w = check_dockerfile(repo, objs_by_dir)
        problems += p
        for x in w:
            print(f"WARNING {x}")
    if problems:
        for p in problems:
            print(f"INVALID {p}")
        print(f"validate.py: {len(problems)} problem(s)")
        return 1
    print(f"validate.py: {total} objects in {len(dirs)} kustomizations valid against Kubernetes "
          f"{', '.join(versions)} (strict schemas, kubernetes-validate {kubernetes_validate.__version__}) "
          f"and the cross checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
