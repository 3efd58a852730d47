#!/usr/bin/env bash
# GPU check of amalgam's CUDA backend (issue 5), in two halves:
#
#   scripts/gpu-check.sh build   # here (no GPU, no CUDA toolkit needed): release build with
#                                # --features cuda, stripped, copied to .gpu/amalgam
#   scripts/gpu-check.sh run     # on the GPU machine: finds libnvrtc/libcublas, prints the
#                                # device, runs `amalgam gpu-check`, logs to $OUT if set
#
# With the device tool (one call; `.gpu` is git-excluded, so it must be carried):
#   run(command="scripts/gpu-check.sh run", carry=[".gpu"], timeout_s=480)
#
# Extra arguments after `run` go to `amalgam gpu-check` (e.g. --reps 5 --e2e-layers 0).
#
#   scripts/gpu-check.sh emulate # here, after `build`: the `run` half on emulated devices
#                                # (crates/cuda/emu: the kernels and libcuda/cuBLAS/NCCL on the
#                                # CPU, 2 devices), small sizes, no CG timings or end-to-end
#                                # models: a check of this script and the binary before device
#                                # time is spent, not of a GPU (its figures mean nothing)
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-run}
shift || true

case "$mode" in
build)
    set -e
    cd "$here"
    cargo build --release -p amalgam-cli --features cuda
    mkdir -p .gpu
    cp target/release/amalgam .gpu/amalgam
    strip .gpu/amalgam
    # The split-MaTS family (base, ft1, ft2 with statistics files, mats.yaml) for the check of
    # split blocks solved by GPU workers, written by its test.
    rm -rf .gpu/mats
    AMALGAM_GPU_CHECK_MATS="$here/.gpu/mats" \
        cargo test -q --test tests cluster_mats::split_mats_family_for_the_gpu_check
    rm -rf .gpu/mats/dry
    ls -l .gpu/amalgam
    du -sh .gpu
    ;;
emulate)
    set -e
    cd "$here"
    emu=/tmp/amalgam-emu-driver
    AMALGAM_EMU_DRIVER_OUT=$emu \
        cargo test -q -p amalgam-cuda --lib emu::device_tests::driver_for_the_gpu_check
    nvrtc=${AMALGAM_NVRTC_DIR:-$HOME/.cache/amalgam-nvrtc}/nvidia/cu13/lib
    export AMALGAM_EMU_DEVICES=2 LD_LIBRARY_PATH="$emu:$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    exec "$0" run --elems 262144 --parity-elems 65536 --reps 2 --e2e-layers 0 --skip-cg "$@"
    ;;
run)
    bin="$here/.gpu/amalgam"
    [ -x "$bin" ] || { echo "no $bin: run 'scripts/gpu-check.sh build' first and carry .gpu"; exit 2; }
    # NVRTC and cuBLAS: the toolkit's, else the pip wheels PyTorch ships.
    libs=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /opt /usr/local/lib -xdev \
        \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' \) 2>/dev/null |
        grep -v /stubs/ | xargs -r -n1 dirname | sort -u | tr '\n' ':')
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
    # NCCL: cudarc opens libnccl.so; a runtime-only install (PyTorch's nvidia-nccl wheel) has
    # libnccl.so.2 alone, so link it under the development name in a folder of our own.
    if ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so '; then
        nccl=$(find /usr /opt -xdev -name 'libnccl.so.2*' 2>/dev/null | head -1)
        if [ -n "$nccl" ]; then
            mkdir -p /tmp/amalgam-nccl
            ln -sf "$nccl" /tmp/amalgam-nccl/libnccl.so
            export LD_LIBRARY_PATH="/tmp/amalgam-nccl:$LD_LIBRARY_PATH"
        fi
    fi
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | awk 'NR <= 3'
    nproc; free -g | awk 'NR <= 2'
    work=${GPU_CHECK_DIR:-/tmp/amalgam-gpu-check}
    log=${OUT:-/tmp}/gpu-check.log
    set -o pipefail
    "$bin" gpu-check --dir "$work" "$@" 2>&1 | tee "$log"
    rc=$?
    echo "gpu-check exit code $rc"
    # The command line a user types, on the end-to-end check's generated models (when it ran):
    # `merge --device cuda` and a coordinator with one `worker --device cuda` process, both
    # compared byte for byte with a CPU merge.
    cfg="$work/bfloat16/ties.yaml"
    if [ -f "$cfg" ]; then
        (
            set -e
            o=/tmp/amalgam-cli-check
            rm -rf "$o"
            "$bin" merge "$cfg" --out "$o/cpu" --quiet
            "$bin" merge "$cfg" --out "$o/gpu" --device cuda --quiet
            echo secret-token >"$o/token"
            "$bin" coordinator --config "$cfg" --out "$o/cluster" --listen 127.0.0.1:7093 \
                --token-file "$o/token" --quiet &
            sleep 1
            "$bin" worker --coordinator http://127.0.0.1:7093 --token-file "$o/token" \
                --device cuda --quiet
            wait
            for f in "$o"/cpu/*.safetensors; do
                cmp "$f" "$o/gpu/$(basename "$f")"
                cmp "$f" "$o/cluster/$(basename "$f")"
            done
            echo "cli check: merge --device cuda and worker --device cuda byte-identical to the CPU merge"
            # The other methods with GPU kernels, through `merge --device cuda` (the engine's
            # accelerator path), against the CPU.
            for m in dare_ties breadcrumbs_ties della sce model_stock; do
                case $m in
                dare_ties) top=""; per="{weight: 1.0, density: 0.3}" ;;
                breadcrumbs_ties) top=""; per="{weight: 1.0, density: 0.3, gamma: 0.02}" ;;
                della) top=""; per="{weight: 1.0, density: 0.3, epsilon: 0.1}" ;;
                sce) top="parameters: {select_topk: 0.5}"; per="" ;;
                model_stock) top=""; per="" ;;
                esac
                c="$work/bfloat16/$m.yaml"
                {
                    echo "merge_method: $m"
                    echo "base_model: base"
                    if [ -n "$top" ]; then echo "$top"; fi
                    echo "models:"
                    for k in 1 2 3 4; do
                        echo "  - model: ft$k"
                        if [ -n "$per" ]; then echo "    parameters: $per"; fi
                    done
                } >"$c"
                "$bin" merge "$c" --out "$o/$m-cpu" --quiet
                "$bin" merge "$c" --out "$o/$m-gpu" --device cuda | tail -1
                for f in "$o/$m-cpu"/*.safetensors; do
                    cmp "$f" "$o/$m-gpu/$(basename "$f")"
                done
                echo "cli check: $m --device cuda byte-identical to the CPU merge"
            done
        ) 2>&1 | tee -a "$log" || rc=1
    fi
    # Split MaTS blocks (2 parts per MLP weight) on GPU workers: `merge --device cuda` solves
    # each block whole on the device; a coordinator with one `worker --device cuda` solves the
    # parts on the device, meeting through Reduce, then with `--collectives nccl` (NCCL when
    # the worker has a GPU per part, else the same Reduce after one vote round). Every run must
    # succeed; the bytes are compared with each other and with the CPU merge (the device sums
    # in another order than the CPU, and cuBLAS may round a part's rows otherwise than the
    # whole block's, so differences are reported, not failed).
    fam="$here/.gpu/mats"
    if [ -f "$fam/mats.yaml" ]; then
        (
            set -e
            o=/tmp/amalgam-mats-check
            rm -rf "$o"
            mkdir -p "$o"
            cp -r "$fam"/. "$o/"
            cd "$o"
            "$bin" merge mats.yaml --out cpu --quiet
            "$bin" merge mats.yaml --out gpu --device cuda --quiet
            echo secret-token >token
            port=7094
            fail=0
            for kind in grpc nccl; do
                "$bin" coordinator --config mats.yaml --out "worker-$kind" \
                    --listen 127.0.0.1:$port --token-file token --quiet &
                cpid=$!
                sleep 1
                # A failed worker must not leave the coordinator holding the log's pipe.
                if ! RUST_LOG=info "$bin" worker --coordinator http://127.0.0.1:$port \
                    --token-file token --device cuda --collectives $kind \
                    >"worker-$kind.log" 2>&1; then
                    echo "mats check: worker --collectives $kind FAILED"
                    tail -20 "worker-$kind.log"
                    kill "$cpid" 2>/dev/null || true
                    fail=1
                fi
                wait "$cpid" || fail=1
                grep -E 'NCCL' "worker-$kind.log" | head -5 || true
                port=$((port + 1))
            done
            [ "$fail" = 0 ]
            # compare REF NAME RUN...: each RUN's files against REF's.
            compare() {
                ref=$1
                name=$2
                shift 2
                for run in "$@"; do
                    for f in "$ref"/*.safetensors; do
                        if cmp -s "$f" "$run/$(basename "$f")"; then
                            echo "mats check: $run $(basename "$f") byte-identical to $name"
                        else
                            echo "mats check: $run $(basename "$f") differs from $name"
                        fi
                    done
                done
            }
            compare cpu "the CPU merge" gpu worker-grpc worker-nccl
            compare gpu "merge --device cuda" worker-grpc worker-nccl
            grep -h '"parts": *2' worker-grpc/solver_log.jsonl | head -3 || true
            echo "mats check: split blocks on a GPU worker ran (grpc and nccl)"
        ) 2>&1 | tee -a "$log" || rc=1
    fi
    exit $rc
    ;;
*)
    echo "usage: $0 build|run|emulate [gpu-check args]"
    exit 2
    ;;
esac
