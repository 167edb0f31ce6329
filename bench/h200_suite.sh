#!/usr/bin/env bash
# Performance runs on one H200 grouped to fit one device call each (<= 10 minutes), every run under a time guard
# so one slow or hanging configuration cannot eat the rest. JSON goes to $OUT (or bench/results when $OUT is
# unset), one log per run beside it (torch.compile recompiles are logged there).
#   bash bench/h200_suite.sh train        # packed 2B compiled vs HF; 8B compiled: ViT-only checkpointing batch 3, none batch 2
#   bash bench/h200_suite.sh packed       # packed 2B compiled vs HF over 10 timed steps, rows of 8k and 16k tokens
#   bash bench/h200_suite.sh train-more   # 2B compiled batch 12; 8B compiled batch 1/2 without checkpointing
#   bash bench/h200_suite.sh generate     # compiled decode: 2B batch 1/16/64, 8B batch 16
#   bash bench/h200_suite.sh attention    # SDPA backends: steady time and cost of a new shape; one packed step profiled
#   bash bench/h200_suite.sh dp2          # data-parallel scaling on two GPUs (bench/dp_scaling.py)
#   bash bench/h200_suite.sh serving      # second turn about one image (prefix cache); serving under Poisson load
set -u
cd "$(dirname "$0")"
out=${OUT:-results}
mkdir -p "$out"
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
run() {  # run NAME SECONDS ARGS...: one bench invocation, its log in $out/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" python3 "$@" > "$out/$name.log" 2>&1 || echo "   $name: exit $? (see $name.log)"
    grep -v -i -e warn -e recompil -e "guard failure" -e "^ *- " "$out/$name.log" | tail -n 12
}
case ${1:-train} in
train)
    run train2b_packed_compile 250 train_throughput.py --packed --batch 16 --micro-batch 4 --compile \
        --checkpointing off --warmup 6 --steps 4 --out "$out/train_2b_packed_compile.json"
    run train8b_compile_ckpt_vision 120 train_throughput.py --preset internvl-8b --compile --batch 3 \
        --checkpointing vision --steps 4 --warmup 3 --sides stitch --out "$out/train_8b_compile_ckpt_vision.json"
    run train8b_compile_b2 100 train_throughput.py --preset internvl-8b --compile --batch 2 --checkpointing off \
        --steps 4 --warmup 3 --sides stitch --out "$out/train_8b_compile.json"
    ;;
packed)
    run train2b_packed_compile_long 250 train_throughput.py --packed --batch 16 --micro-batch 4 --compile \
        --checkpointing off --warmup 5 --steps 10 --out "$out/train_2b_packed_compile_long.json"
    run train2b_packed_compile_16k 250 train_throughput.py --packed --batch 16 --micro-batch 4 --compile \
        --checkpointing off --warmup 5 --steps 10 --row-tokens 16384 --out "$out/train_2b_packed_compile_16k.json"
    ;;
attention)
    run attention_backends 120 attention_backends.py --out "$out/attention_backends.json"
    run train2b_packed_profile 200 train_throughput.py --packed --batch 16 --compile --checkpointing off --warmup 5 \
        --steps 2 --sides stitch --profile "$out/profile" --out "$out/train_2b_packed_profiled.json"
    ;;
train-more)
    run train2b_compile_b12 130 train_throughput.py --compile --batch 12 --checkpointing off --sides stitch \
        --warmup 3 --steps 5 --out "$out/train_2b_compile_b12.json"
    run train8b_compile 160 train_throughput.py --preset internvl-8b --compile --batch 1 2 --checkpointing off \
        --steps 5 --warmup 3 --sides stitch --out "$out/train_8b_compile.json"
    ;;
dp2)  # on nvidia-h200-x2: `stitch train` on one GPU and on two (torchrun, parallel.dp=2), same work per GPU
    run dp_scaling_2 600 dp_scaling.py --nproc 2 --steps 20 --out "$out/dp_scaling_h200x2.json"
    ;;
generate)
    run gen2b_compile 260 generate_throughput.py --compile --batch-sizes 1,16,64 --out "$out/generate_2b_compile.json"
    run gen8b_compile 200 generate_throughput.py --compile --preset internvl-8b --batch-sizes 16 \
        --out "$out/generate_8b_compile.json"
    ;;
serving)
    run second_turn 150 second_turn.py --device cuda --out "$out/second_turn_nvidia-h200.json"
    run serve_load 420 serve_load.py --device cuda ${STITCH_TEST_TOKENIZER:+--tokenizer "$STITCH_TEST_TOKENIZER"} --out "$out/serve_load_nvidia-h200.json"
    ;;
*) echo "usage: $0 train|packed|train-more|dp2|generate|attention|serving" >&2; exit 2 ;;
esac
