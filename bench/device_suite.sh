#!/usr/bin/env bash
# Every GPU benchmark of the project in one call, most important first (the order below), each
# under its own time cap and all under one deadline (device time is scarce). Logs, and a
# jax.profiler trace of the 0.68 B config's training step (TensorBoard profile plugin / Perfetto),
# go to $OUT (or bench_out/); tar the folder to bring it back from a device machine.
#   bash bench/device_suite.sh [DEADLINE_S]        # SMALL=1: tiny config, CPU-sized smoke run
#   ONLY='restore_4096|train_mid' bash bench/device_suite.sh 240   # a subset, by step name
set -u
cd "$(dirname "$0")/.."
out="${OUT:-bench_out}"; mkdir -p "$out"
deadline=$(( $(date +%s) + ${1:-530} ))
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/zipir_jax_xla}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
py=${PYTHON:-python3}
# XLA's per-fusion autotuning cache: rows that share convolutions or matmuls (the frozen encoders
# of both DiT sizes, the two head layouts) autotune them once. Dropped if this XLA refuses the flag.
autotune="--xla_gpu_per_fusion_autotune_cache_dir=${AUTOTUNE_DIR:-/tmp/zipir_jax_autotune}"
if [[ "${SMALL:-0}" != 1 ]] && mkdir -p "${AUTOTUNE_DIR:-/tmp/zipir_jax_autotune}" &&
   XLA_FLAGS="${XLA_FLAGS:-} $autotune" $py -c "import jax; jax.numpy.ones(1).block_until_ready()" \
     >/dev/null 2>&1; then
  export XLA_FLAGS="${XLA_FLAGS:-} $autotune"
fi
echo "# XLA_FLAGS=${XLA_FLAGS:-}"
# Cold random initialisation compiles an unrolled threefry hash per parameter on GPU (the 3 B
# bundle: 354 draws; 165 s to initialise on the H200 on 2026-11-26). Where JAX's prebuilt threefry
# kernel gives the same bits and compiles faster (bench/rng_compile.py, printed here), every row
# uses it.
if [[ "${SMALL:-0}" != 1 ]]; then
  timeout -k 5 120 $py bench/rng_compile.py --draws=8 2>/dev/null | tail -1 | sed 's/^/# rng_compile: /'
  if (( PIPESTATUS[0] == 0 )); then export JAX_THREEFRY_GPU_KERNEL_LOWERING=1; fi
  echo "# JAX_THREEFRY_GPU_KERNEL_LOWERING=${JAX_THREEFRY_GPU_KERNEL_LOWERING:-0}"
fi

step() {  # step NAME CAP_S CMD...: runs CMD under min(CAP, time left), output to $out/NAME.log
  local name=$1 cap=$2; shift 2
  [[ -n "${ONLY:-}" && ! "$name" =~ ^(${ONLY})$ ]] && return
  local left=$(( deadline - $(date +%s) ))
  (( left < 20 )) && { echo "## $name: skipped, ${left}s left"; return; }
  (( cap > left )) && cap=$left
  echo "## $name (cap ${cap}s) $(date +%T): $*"
  local t0=$(date +%s)
  timeout -k 5 "$cap" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -v "^\s*$" "$out/$name.log" | grep -E "^\||^\{|^ |^#|^\[|Error|error|Traceback" | tail -40
  echo "## $name: rc=$rc in $(( $(date +%s) - t0 ))s"
}

if [[ "${SMALL:-0}" == 1 ]]; then
  big=configs/tiny.py; mid=configs/tiny.py; s1=64; s2=128; s4=256; s8=512; dt=float32; h72=2
else
  big=configs/zipir_3b.py; mid=configs/zipir_0p7b.py; s1=1024; s2=2048; s4=4096; s8=8192; dt=bfloat16
  h72=16  # the 0.68 B DiT's former layout, 16 heads of 72 (config_lib.ablation_dit: now 18 of 64)
fi
# Cold, each training row compiles for 60-150 s (an H200 on 2026-11-26: the first rows hit a 110 s cap
# before printing; the same rows took 41-66 s once the persistent compilation cache held them).
remat=${REMAT:-dots_with_no_batch_dims_saveable}  # the DiT's remat policy in the training rows
train() {  # train NAME CONFIG RESOLUTION BATCH [overrides...]
  local name=$1 cfg=$2 res=$3 b=$4; shift 4
  step "$name" 170 $py bench/train_step.py --config=$cfg:dit --resolution=$res --batch=$b --steps=5 \
    --config.dit.remat_policy=$remat --out="$out/$name.json" "$@"
}
step env 30 $py -c "import jax, flax, optax, orbax.checkpoint as o, ml_collections; print('#', jax.__version__, flax.__version__, optax.__version__, jax.devices())"
# Open questions first: does the 8192² decode fit an H200 now (#4); the 0.68 B rows at 18 heads of
# 64, then at the former 16 of 72 and without remat for the side-by-side (#5); then the paper
# config and its remat split.
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -d ' ')
[[ "$mib" =~ ^[0-9]+$ ]] || mib=$(( 1 << 30 ))  # unknown: try it
if [[ "${SMALL:-0}" == 1 ]] || (( mib >= 120000 )); then  # 8192² needs an H200's memory
  # Encode and decode only: the 8192² DiT step ran on 2026-11-26 (2.89 s); the decode is open.
  parts8=($py bench/restore.py --config=$big --sizes=$s8 --dtype=$dt --repeats=1 --parts=encode,decode)
  step restore_${s8}_parts 300 "${parts8[@]}"
  if grep -qiE "RESOURCE_EXHAUSTED|out of memory" "$out/restore_${s8}_parts.log" 2>/dev/null; then
    # The eager tiled decode allocates and frees whole-image arrays of 16-32 GiB: in the preallocated
    # arena a fragmented free list can fail where the live bytes fit. Once more with plain
    # cudaMalloc/cudaFree (no arena); nvidia-smi's peak of memory.used is then the real footprint.
    smi="$out/restore_${s8}_parts_platform.smi"
    (command -v nvidia-smi >/dev/null &&
       exec nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$smi") &
    sampler=$!
    ONLY= XLA_PYTHON_CLIENT_ALLOCATOR=platform step restore_${s8}_parts_platform 300 "${parts8[@]}"
    kill $sampler 2>/dev/null
    echo "## restore_${s8}_parts_platform: nvidia-smi peak memory.used $(sort -n "$smi" 2>/dev/null |
      tail -1) MiB"
  fi
else
  echo "## restore_${s8}_parts: skipped, ${mib:-?} MiB on this card (an H200 has 143771)"
fi
train train_mid_$s1 $mid $s1 8
train train_mid_$s2 $mid $s2 2
train train_mid_${s1}_heads$h72 $mid $s1 8 --config.dit.num_heads=$h72
train train_mid_${s1}_no_remat $mid $s1 8 --config.dit.remat_policy=none  # 35 GiB with remat
train train_mid_${s2}_heads$h72 $mid $s2 2 --config.dit.num_heads=$h72
train train_big_$s1 $big $s1 8
train train_big_${s1}_nothing_saveable $big $s1 8 --config.dit.remat_policy=nothing_saveable
train train_big_$s2 $big $s2 2
step restore_$s4 220 $py bench/restore.py --config=$big --sizes=$s4 --dtype=$dt --repeats=2 --total_repeats=1
step restore_$s2 200 $py bench/restore.py --config=$big --sizes=$s2 --dtype=$dt --repeats=5 --total_repeats=3
step sampler_progress_$s2 150 $py bench/sampler_progress.py --config=$big --size=$s2 --dtype=$dt --steps=25 --repeats=3
step profile_mid_$s1 120 $py bench/train_step.py --config=$mid:dit --resolution=$s1 --batch=8 --steps=2 \
  --config.dit.remat_policy=$remat --profile_dir="$out/profile_mid_$s1"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
