#!/usr/bin/env bash
# The GPU checks of the benchmark suite in one call, for a lent GPU machine
# that has no network and no Rust toolchain (docs/benchmarks.md, "Running the
# GPU checks").
#
#   bash xtask/bench/gpu-run.sh prepare [OFFICIAL_REPO]
#       Here, on the build machine: builds xtask with `--features cuda`, and
#       fills .gpu/ (ignored by git) with the compressed binary, the commit, the
#       fixtures of ../shared/fixtures and, if OFFICIAL_REPO (a checkout of
#       KwaiVGI/DiffMoE) is given, the official code's models/ and diffusion/
#       for xtask/bench/official_bench.py.
#
#   bash xtask/bench/gpu-run.sh device
#       There, from the repository root with .gpu/ carried: the bench of
#       DiT-S against DiffMoE-S-E16 and of DiT-L against DiffMoE-L-E16 at the
#       presets' 256 tokens per image, the official code on the same shapes,
#       and the parity report on the GPU. Each phase is a process of its own
#       with a time limit, in order of importance, and the whole stays within
#       BUDGET seconds (default 540). The tables come last, and are kept in
#       $OUT/summary.txt ($OUT is target/gpu-run without it); the logs, JSON
#       reports and each phase's GPU memory peak in $OUT/gpu-run.tar.gz (the
#       device tool returns at most 8 files).
#
# Environment: FEATURES (prepare; default cuda), DEVICE (device; default
# cuda) and BUDGET. A dry run of the script on the CPU: FEATURES=flex for
# prepare, then DEVICE=cpu and smaller cases for device, through S_PRESETS,
# L_PRESETS, S_BATCH, L_BATCH, REPEAT_S, REPEAT_L and SHAPE (extra bench
# arguments, e.g. "--image-size 8 --warmup 1").
set -uo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/../.."

# The absolute path of $1, a path relative to the caller's directory.
from_caller() {
  (cd "$CALLER_DIR" && cd "$1" && pwd)
}

prepare() {
  set -e
  local official=""
  [ -n "${1:-}" ] && official=$(from_caller "$1")
  local target=target
  [ -n "${CARGO_TARGET_DIR:-}" ] && target=$(from_caller "$CARGO_TARGET_DIR")
  CARGO_TARGET_DIR="$target" cargo build --release -p xtask --features "${FEATURES:-cuda}"
  rm -rf .gpu && mkdir -p .gpu/fixtures
  # Stripped and compressed (56 MB -> 11 MB): what travels is 64 MiB at most.
  strip -o .gpu/xtask "$target/release/xtask"
  gzip -9 .gpu/xtask
  git describe --always --dirty --abbrev=7 --exclude="*" > .gpu/commit
  for set in parity vae inception; do
    cp -r "../shared/fixtures/$set" ".gpu/fixtures/$set"
  done
  if [ -n "$official" ]; then
    mkdir -p .gpu/official
    if git -C "$official" rev-parse --git-dir >/dev/null 2>&1; then
      git -C "$official" archive HEAD models diffusion | tar -x -C .gpu/official
    else
      cp -r "$official/models" "$official/diffusion" .gpu/official/
    fi
  fi
  local bytes
  bytes=$(( $(git ls-files -z --cached --others --exclude-standard | xargs -0 cat | wc -c) + $(find .gpu -type f -print0 | xargs -0 cat | wc -c) ))
  echo "the working tree and .gpu: $((bytes / 1048576)) MiB (the device tool carries 64 MiB at most)"
  echo "next: the device tool's run, command 'bash xtask/bench/gpu-run.sh device', carry ['.gpu'], timeout_s 570"
}

# phase NAME SECONDS COMMAND...: runs COMMAND with its output in
# $WORK/NAME.log, under SECONDS or the time left before $DEADLINE, whichever
# is less (skipped when under 15 s are left), sampling the GPU's used memory.
phase() {
  local name="$1" limit="$2"
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped\t0 s\t-\n' "$name" >> "$WORK/phases.tsv"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local sampler=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$WORK/$name.memory" 2>/dev/null &
    sampler=$!
  fi
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  local peak="-"
  [ -s "$WORK/$name.memory" ] && peak="$(sort -n "$WORK/$name.memory" | tail -1) MiB"
  rm -f "$WORK/$name.memory"
  printf '%s\t%s\t%s s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$peak" >> "$WORK/phases.tsv"
  tail -2 "$WORK/$name.log"
}

# bench s|l WORKLOAD SECONDS: one workload of the S or the L pair.
bench() {
  local size="$1" workload="$2" limit="$3" presets batch repeat
  if [ "$size" = s ]; then
    presets=$S_PRESETS batch=$S_BATCH repeat=$REPEAT_S
  else
    presets=$L_PRESETS batch=$L_BATCH repeat=$REPEAT_L
  fi
  # shellcheck disable=SC2086 # SHAPE is a list of arguments
  phase "bench-$size-$workload" "$limit" "$BIN" bench --device "$DEVICE" --preset "$presets" --batch "$batch" \
    --repeat "$repeat" --workload "$workload" ${SHAPE} --json "$WORK/bench-$size-$workload.json"
}

# official s|l: the official code's train step, eval forward and sampling, per preset.
official() {
  local presets batch preset
  [ -d .gpu/official ] || return 0
  if [ "$1" = s ]; then presets=$S_PRESETS batch=$S_BATCH; else presets=$L_PRESETS batch=$L_BATCH; fi
  for preset in ${presets//,/ }; do
    phase "official-$preset" 60 python3 xtask/bench/official_bench.py .gpu/official "configs/$preset.toml" \
      --batch "$batch" --device "${DEVICE%%:*}" --json "$WORK/official-$preset.json"
  done
}

device() {
  OUT="${OUT:-target/gpu-run}"
  DEADLINE=$((SECONDS + ${BUDGET:-540}))
  BIN=/tmp/diffmoe-gpu-run/xtask
  DEVICE="${DEVICE:-cuda}"
  S_PRESETS="${S_PRESETS:-dense-dit-s-flow,diffmoe-s-e16-flow}" S_BATCH="${S_BATCH:-64}" REPEAT_S="${REPEAT_S:-10}"
  L_PRESETS="${L_PRESETS:-dense-dit-l-flow,diffmoe-l-e16-flow}" L_BATCH="${L_BATCH:-32}" REPEAT_L="${REPEAT_L:-5}"
  SHAPE="${SHAPE:-}"
  if [ ! -f .gpu/xtask.gz ]; then
    echo ".gpu/xtask.gz is missing: run 'bash xtask/bench/gpu-run.sh prepare' here and carry .gpu" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$BIN")" && gunzip -c .gpu/xtask.gz > "$BIN" && chmod +x "$BIN" || exit 1
  WORK="$OUT/work"
  rm -rf "$WORK" && mkdir -p "$WORK"
  : > "$WORK/phases.tsv"
  echo "commit $(cat .gpu/commit 2>/dev/null || echo '?')" | tee "$WORK/machine.txt"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$WORK/machine.txt"
  fi
  echo "cpu cores: $(nproc)" | tee -a "$WORK/machine.txt"

  # In order of importance: what a run cut short must still have comes first.
  bench s train-step 90
  bench s eval-forward 60
  bench l train-step 120
  bench l eval-forward 60
  official s
  official l
  bench s sample 45
  bench l sample 60
  bench s mlp-layer 45
  phase parity 120 "$BIN" parity .gpu/fixtures/parity .gpu/fixtures/vae .gpu/fixtures/inception \
    crates/diffmoe-train/tests/fixtures/official

  summary | tee "$OUT/summary.txt"
  tar -czf "$OUT/gpu-run.tar.gz" -C "$WORK" . && rm -rf "$WORK"
}

# The phases' outcomes, the parity failures and the bench tables.
summary() {
  echo "== phases (name, exit status, seconds, GPU memory peak)"
  cat "$WORK/phases.tsv"
  if [ -f "$WORK/parity.log" ]; then
    echo "== $(tail -1 "$WORK/parity.log")"
    grep ' FAIL ' "$WORK/parity.log" | head -20
  fi
  echo "== tables"
  python3 - "$WORK" <<'PY'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
names = [f"bench-{size}-{w}.json" for size in "sl" for w in ("train-step", "eval-forward", "sample", "mlp-layer")]
print("| preset | workload | variant | batch | median s | img/s | MFU | exp/tok | vs dense |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
peaks, ours = [], {}
for name in names:
    path = out / name
    if not path.exists():
        continue
    r = json.loads(path.read_text())
    peaks.append(f"{name}: {r['device']}, f32 matmul peak {r['matmul_peak_flops'] / 1e12:.2f} TFLOP/s")
    for x in r["rows"]:
        ept = "-" if x["experts_per_token"] is None else f"{x['experts_per_token']:.2f}"
        vs = "-" if x["vs_dense"] is None else f"{x['vs_dense']:.2f}"
        ours[(x["preset"], x["workload"], x["variant"])] = x["median_s"]
        print(f"| {x['preset']} | {x['workload']} | {x['variant']} | {x['batch']} | {x['median_s']:.4f} "
              f"| {x['images_per_s']:.1f} | {100 * x['mfu']:.1f}% | {ept} | {vs} |")
print("\n".join(peaks))
for path in sorted(out.glob("official-*.json")):
    r = json.loads(path.read_text())
    for x in r["rows"]:
        # The official eval forward routes DiffMoE dynamically.
        variant = "train" if x["workload"] == "train-step" else ("dynamic" if "diffmoe" in x["preset"] else "static")
        mine = ours.get((x["preset"], x["workload"], variant))
        ratio = f", ours / official {mine / x['median_s']:.2f}x" if mine else ""
        print(f"official (torch {r['torch']}) {x['preset']} {x['workload']} batch {x['batch']}: "
              f"{x['median_s']:.4f} s{ratio}")
PY
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  device) device ;;
  *) echo "usage: $0 prepare [OFFICIAL_REPO] | device" >&2; exit 2 ;;
esac
