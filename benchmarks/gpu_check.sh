#!/usr/bin/env bash
# One pass over everything that needs a GPU: the GPU-marked tests, the component benchmarks and
# `speedrun bench` of the record recipe. Usage: benchmarks/gpu_check.sh OUT_DIR [parts...]
# parts: tests kernels mlp flex attention attention-r89 model optim bench stages (default: all but the
# attention ones and stages); tests-kernels + tests-rest split tests in two; stages = speedrun bench of
# record 89's stage table (three batch sizes) on record 45's model (benchmarks/r89_stages_r45_model.json);
# tests-r89-training = the GPU tests of record 89's losses / Adam / model / DC-MHA / FP8 MLP; model-r89 =
# bench_r89_model.py (issue 16's on/off ms/step: run it alone on the machine); test-r89-model = the
# fp32 DC-MHA kernel test and the compiled-vs-eager record-89 model tests (fp32 gradients + no recompiles
# under TESTS_LIMIT, beside the bf16 loss under TESTS_LIMIT_BF16; issue 17); bench-r89 = speedrun bench of
# configs/record_89.json; mini-r89 / mini-r89-public = the compressed 125-step record-89 run on the
# regmix shards in $R89_DATA (regmix_train_*.bin, regmix_val_000000.bin), all FP8 / with the FP8 MLP off
# as the public code's DISABLE_FP8, whose training head is FP8 either way (its measured val at step 125:
# 1.829; target <= 1.835);
# MINI_ARGS adds flags to both (e.g. --seed 1); RUN_DIR: where their run directories go (default OUT_DIR). regmix documents are shorter than record 89's
# cu_seqlens table allows (81 in 16,384 tokens), hence data.max_num_docs_rule spare (same batches).
# Each part has its own time limit and a log in OUT_DIR, and a failing part does not stop the next one.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [tests|tests-kernels|tests-rest|kernels|mlp|flex|attention|attention-r89|model|optim|bench|stages|tests-r89-training|model-r89|test-r89-model|bench-r89|mini-r89|mini-r89-public]...}
shift
parts=${*:-tests kernels mlp flex model optim bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' | tee "$out/device.txt"
git rev-parse --short HEAD >>"$out/device.txt" 2>/dev/null

step() {  # name limit_s command...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name rc=$? in $((SECONDS - t0))s"
    tail -n 25 "$out/$name.log"
}
for part in $parts; do
    case $part in
        tests)   step gpu_tests 540 python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
        # the same tests in two halves, for calls with less time left
        tests-kernels) step gpu_tests_kernels 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_*.py ;;
        tests-rest) step gpu_tests_rest 400 python3 -m pytest -q -m gpu -p no:cacheprovider \
                     --ignore-glob='tests/test_kernels_*' tests ;;
        kernels) step bench_kernels 90 python3 benchmarks/bench_kernels.py --out "$out/bench_kernels.json" ;;
        mlp)     step bench_mlp 90 python3 benchmarks/bench_mlp.py --out "$out/bench_mlp.json" ;;
        flex)    step bench_flex 240 python3 benchmarks/bench_flex.py --out "$out/bench_flex.json" ;;
        attention) step bench_attention 120 python3 benchmarks/bench_attention.py --out "$out/bench_attention.json" ;;
        attention-r89) step bench_attention_r89 240 python3 benchmarks/bench_attention_r89.py \
                     --out "$out/bench_attention_r89.json" ;;
        model)   step bench_model 150 python3 benchmarks/bench_model.py --out "$out/bench_model.json" ;;
        optim)   step bench_optim 90 python3 benchmarks/bench_optim.py --out "$out/bench_optim.json" ;;
        bench)   step bench ${BENCH_LIMIT:-330} python3 -m speedrun bench --config record_124m --warm-start \
                     --out "$out/bench.json" ;;
        stages)  step bench_stages ${BENCH_LIMIT:-420} python3 -m speedrun bench \
                     --config benchmarks/r89_stages_r45_model.json --out "$out/bench_stages.json" ;;
        tests-r89-training) step gpu_tests_r89_training ${TESTS_LIMIT:-420} python3 -m pytest -q -m gpu -p no:cacheprovider \
                     tests/test_kernels_mtp_ce.py tests/test_kernels_adam_update.py tests/test_model_r89_gpu.py \
                     tests/test_kernels_dc_mha.py tests/test_kernels_fp8_mlp.py ;;
        model-r89) step bench_r89_model ${BENCH_LIMIT:-330} python3 benchmarks/bench_r89_model.py \
                     --out "$out/bench_r89_model.json" ;;
        test-r89-model)   # two processes side by side (8ee6a38, H200: 293 s for both), each compiling the
                          # whole model cold; no pytest log capture (it replays thousands of empty
                          # torch.__trace lines)
                 step test_r89_model_bf16 ${TESTS_LIMIT_BF16:-330} python3 -m pytest -q -s -m gpu -p no:cacheprovider \
                     -p no:logging tests/test_model_r89_gpu.py -k "compiled_record89 and bf16" &
                 step test_r89_model_fp32 ${TESTS_LIMIT:-420} python3 -m pytest -q -s -m gpu -p no:cacheprovider \
                     -p no:logging \
                     tests/test_kernels_dc_mha.py::test_gpu_kernel_in_fp32_compiles_fast_and_matches_float64 \
                     tests/test_model_r89_gpu.py::test_compiled_record89_model_matches_eager_twin_and_never_recompiles
                 wait ;;
        bench-r89) step bench_r89 ${BENCH_LIMIT:-560} python3 -m speedrun bench --config record_89 --steps 4 \
                     --skip-steps 1 --cache-dir "${CACHE_DIR:-/tmp/speedrun-inductor-r89}" --out "$out/bench_r89.json" ;;
        mini-r89|mini-r89-public)
                 extra=(${MINI_ARGS:-}); [ "$part" = mini-r89-public ] && extra+=(--model.fp8_mlp false)
                 step "$part" ${MINI_LIMIT:-590} python3 -m speedrun train --config record_89 --cuda \
                     --schedule.num_scheduled_steps 120 --schedule.num_extension_steps 5 \
                     --train.val_tokens 4194304 --train.val_every 40 \
                     --data-path "${R89_DATA:?set R89_DATA to the regmix shards}/regmix_train_*.bin" \
                     --val-data-path "$R89_DATA/regmix_val_000000.bin" --save-path "${RUN_DIR:-$out}/$part" \
                     --data.max_num_docs_rule spare \
                     "${extra[@]}" ;;
        *) echo "unknown part $part" ;;
    esac
done
