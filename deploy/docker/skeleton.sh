#!/usr/bin/env bash
# Builds the dependency-caching skeleton of the workspace for deploy/Dockerfile.
#
#   skeleton.sh SRC DST
#
# Copies every Cargo.toml, Cargo.lock (and a rust-toolchain / .cargo config if present) from SRC
# to DST, and writes a stub `fn main() {}` at the path of every .rs file, so that every target
# a manifest names (lib.rs, main.rs, build.rs, a [[test]] path such as ../../tests/tests.rs)
# exists. `cargo build` on DST then compiles every dependency (build-dependencies included,
# because each build.rs has a stub) and nothing of ours. All mtimes are fixed, so DST's content
# and therefore the image layer that copies it change only when a manifest or the lockfile
# changes (or a source file is added or removed).
set -euo pipefail
src=${1:?usage: skeleton.sh SRC DST}
dst=${2:?usage: skeleton.sh SRC DST}
cd "$src"
mkdir -p "$dst"
prune=(-path ./target -o -path './target-*' -o -path ./.git -o -path ./deploy -o -name node_modules)
for f in Cargo.lock rust-toolchain rust-toolchain.toml .cargo/config.toml .cargo/config; do
  if [ -f "$f" ]; then
    mkdir -p "$dst/$(dirname "$f")"
    cp "$f" "$dst/$f"
  fi
done
find . \( "${prune[@]}" \) -prune -o -type f -name Cargo.toml -print | while read -r f; do
  mkdir -p "$dst/$(dirname "$f")"
  cp "$f" "$dst/$f"
done
find . \( "${prune[@]}" \) -prune -o -type f -name '*.rs' -print | while read -r f; do
  mkdir -p "$dst/$(dirname "$f")"
  echo 'fn main() {}' >"$dst/$f"
done
find "$dst" -exec touch -h -d @0 {} +
