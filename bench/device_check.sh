#!/usr/bin/env bash
# The first run of mae-jax on a GPU machine, in one command from the repository root (< 8 min on
# an H100 with CUDA jax already installed):
#
#     bash bench/device_check.sh [--out DIR] [--cpu]
#
#  1. install: if jax sees no GPU, pip install -e ".[test]" "jax[cuda12]==<installed jax>" (needs
#     the network); if jax sees one, nothing is installed: the scripts import the repository.
#  2. parity:    a mae-jax ViT-B checkpoint of random weights -> convert/orbax_to_pth.py (the
#                official layout) -> convert/pth_to_orbax.py -> convert/parity.py at float32 on the
#                GPU (torch on the GPU too, TF32 off); the same at bfloat16, reported only.
#  3. precision: the float32 model without any context computes as under "highest".
#  4. attention: cuDNN fused attention against the XLA path, bfloat16, every preset's shapes
#                (MAE encoder and decoder, classifier): forward, gradient, no NaN.
#  5. accel:     bench/bench_accel.py for ViT-B then ViT-L, few steps, beside torch AMP.
#  6. host:      bench/bench_host.py for ViT-B, L and H.
#  7. packing:   bench/bench_packing.py, ViT-B bfloat16 at 64: what the packed state (the loop's
#                layout on GPU) costs the step against one buffer per parameter.
#
# Every step's output goes to DIR/<step>.log; DIR/summary.txt holds one status line per step and
# the lines that matter (the parity verdict, the tables). A failed step does not stop the others;
# the exit status is 1 if any failed.
#
# --cpu (or DEVICE_CHECK_CPU=1): the same steps on the CPU with the tiny model and fewer steps, in
# about a minute; no install, no bfloat16 parity, bench_accel without torch.
# tests/test_accel_tools.py runs it so.
set -u

OUT_DIR="${TMPDIR:-/tmp}/mae_device_check"
CPU="${DEVICE_CHECK_CPU:-0}"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="$2"; shift 2 ;;
        --cpu) CPU=1; shift ;;
        *) echo "device_check.sh: unknown argument $1 (use --out DIR, --cpu)" >&2; exit 2 ;;
    esac
done
if [ ! -f bench/device_check.sh ]; then
    echo "device_check.sh: run it from the repository root" >&2
    exit 2
fi

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME PATTERN COMMAND...: COMMAND's output to NAME.log; a status line and the lines of the
# log that match PATTERN (grep -E) to the summary.
run() {
    local name="$1" pattern="$2"
    shift 2
    local start=$SECONDS rc
    echo "== $name: $*"
    "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        note "[ok]     $name ($((SECONDS - start)) s)"
    else
        note "[FAILED] $name ($((SECONDS - start)) s, status $rc; see $name.log)"
        FAILED=1
        tail -n 5 "$OUT_DIR/$name.log" | sed 's/^/    | /' | tee -a "$SUMMARY"
    fi
    grep -E "$pattern" "$OUT_DIR/$name.log" | grep -v "^E0000" | sed 's/^/    /' >>"$SUMMARY"
}

backend() { "$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -n 1; }

if [ "$CPU" = 1 ]; then
    export JAX_PLATFORMS=cpu
    PRESET=mae_vit_tiny_patch4
    SIZES=tiny
    ACCEL_ARGS=(--allow-cpu --sizes tiny --batch 8 --steps 2 --warmup 1 --skip-torch)
    HOST_ARGS=(--sizes tiny --calls 5 --bare-calls 20 --warmup 1)
    PACK_ARGS=(--size tiny --batch 8 --reps 2)
    note "device check, cpu mode (tiny model), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
else
    PRESET=mae_vit_base_patch16
    SIZES=base,large,huge
    ACCEL_ARGS=(--sizes base,large --steps 10 --warmup 3)
    HOST_ARGS=(--sizes base,large,huge --calls 30 --bare-calls 200)
    PACK_ARGS=(--size base --batch 64 --dtype bfloat16 --reps 10 --warmup 2)
    note "device check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if [ "$(backend)" != gpu ]; then
        version=$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null | tail -n 1)
        run install "Successfully installed|ERROR" "$PY" -m pip install -e ".[test]" \
            "jax[cuda12]${version:+==$version}"
    fi
    if [ "$(backend)" != gpu ]; then
        note "jax sees no GPU (backend: $(backend)); stopping. On a CPU-only machine use --cpu."
        exit 1
    fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$SUMMARY"
"$PY" -c 'import jax, flax, optax; d = jax.devices()[0]; print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}; {d.platform} {d.device_kind} x{len(jax.devices())}")' \
    2>/dev/null | tail -n 1 | sed 's/^/versions: /' | tee -a "$SUMMARY"

GENERATED="$OUT_DIR/generated_$PRESET"
PTH="$OUT_DIR/$PRESET.pth"
CKPT="$OUT_DIR/$PRESET"
rm -rf "$GENERATED" "$PTH" "$CKPT"
run weights "parameters" "$PY" bench/device_check.py checkpoint "$PRESET" "$GENERATED"
run export "^error" "$PY" convert/orbax_to_pth.py "$GENERATED" "$PTH"
run convert "^error" "$PY" convert/pth_to_orbax.py "$PTH" "$CKPT" --quiet
run parity "^devices|^(patch embedding|encoder|decoder|loss|mask)|parity:|FAILED" \
    "$PY" convert/parity.py "$CKPT" --pth "$PTH" --dtype float32
if [ "$CPU" != 1 ]; then  # bfloat16 on a CPU is slow and says nothing about a GPU
    run parity_bf16 "^(encoder output|decoder prediction|loss) " \
        "$PY" convert/parity.py "$CKPT" --pth "$PTH" --dtype bfloat16
fi
run precision "float32|DEFAULT" "$PY" bench/device_check.py precision --preset "$PRESET"
run attention "vs XLA|not available" "$PY" bench/device_check.py attention --sizes "$SIZES"
run accel "^device|^  [a-z]+ +[0-9]|jax: +failed|torch: +failed|MFU from" \
    "$PY" bench/bench_accel.py "${ACCEL_ARGS[@]}"
run host "^  [a-z]+ \(|machine:|calibration" "$PY" bench/bench_host.py "${HOST_ARGS[@]}"
run packing "^  (packed|per-param)" "$PY" bench/bench_packing.py "${PACK_ARGS[@]}"

note "total $SECONDS s; logs in $OUT_DIR"
exit $FAILED
