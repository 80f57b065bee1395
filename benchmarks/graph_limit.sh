#!/usr/bin/env bash
# Issue 19's capture-cost experiment: benchmarks/text_in.py (no sentence-transformers speed) once
# per CUDA-graph rule of the onnxruntime CUDA engine, in this order:
#   all: graphs for every chunk shape (the default when this was run; now 2048 is)
#   N:   graphs only for chunks of at most N padded tokens;  0: no graphs
#     ROWS=100000 benchmarks/graph_limit.sh OUT all 2048 0
# Each rule writes OUT/graphs-RULE/{text-in.json,text-in.md,log.txt}; engines are built once and
# shared (--engines), so later rules time the same engines.
set -u
out=$1; shift
for rule in "$@"; do
    dir="$out/graphs-$rule"; mkdir -p "$dir"
    export TRTFORGE_CUDA_GRAPH_MAX_TOKENS=$rule
    python3 benchmarks/text_in.py --out "$dir" --rows "${ROWS:-100000}" --no-st > "$dir/log.txt" 2>&1
    echo "rule $rule: exit $?"; tail -8 "$dir/text-in.md" 2>/dev/null
done
