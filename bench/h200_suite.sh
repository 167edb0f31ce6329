#!/usr/bin/env bash
# The performance runs still owed on one H200, in one device call (each under a time guard so one slow or
# hanging configuration cannot eat the rest): the compiled decode step, the 8B shape compiled with and without
# activation checkpointing. JSON goes to $OUT (or bench/results when $OUT is unset), logs beside it.
#   bash bench/h200_suite.sh            # ~8 minutes on an H200
set -u
cd "$(dirname "$0")"
out=${OUT:-results}
mkdir -p "$out"
run() {  # run NAME SECONDS ARGS...: one bench invocation, its log in $out/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" python3 "$@" > "$out/$name.log" 2>&1 || echo "   $name: exit $? (see $name.log)"
    grep -v -i warn "$out/$name.log" | tail -n 12
}
run gen2b_compile 200 generate_throughput.py --compile --batch-sizes 1,16,64 --out "$out/generate_2b_compile.json"
run gen8b_compile 150 generate_throughput.py --compile --preset internvl-8b --batch-sizes 16 \
    --out "$out/generate_8b_compile.json"
run train8b_compile_b1 150 train_throughput.py --preset internvl-8b --compile --batch 1 --checkpointing off \
    --steps 4 --warmup 2 --sides stitch --out "$out/train_8b_compile_b1.json"
run train8b_compile_ckpt 150 train_throughput.py --preset internvl-8b --compile --batch 4 --micro-batch 2 \
    --checkpointing on --steps 4 --warmup 2 --sides stitch --out "$out/train_8b_compile_ckpt.json"
