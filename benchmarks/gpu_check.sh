#!/usr/bin/env bash
# One GPU call that checks and measures landed main (run from a checkout's root; about 6-8 minutes on an H200):
# 1. install kvbench (non-editable: the checkout's kvbench/ folder must not shadow the package) and every GPU test;
# 2. the kernel suite for every registered method at the Llama-3.1-8B attention shape, 32K x 1 and x 8, 10% budgets
#    (selfindex also at 160 tokens), CUDA-graph timing; half the time left, or all of it with THROUGHPUT=0;
# 3. the throughput suite on synthetic Llama-3.1-8B (bf16) at 32K x 8: graph mode where a method is capture-safe,
#    eager otherwise (the record says which and why).
# Writes $OUT/<gpu>/{log.txt,tests.txt,kernels.jsonl,throughput.jsonl,...} and prints a table last; with $OUT set (the
# device machine) it then packs $OUT/<gpu>/ into $OUT/<gpu>.tgz, because the device returns at most 8 files.
# The device's copy of the checkout has no .git: pass the commit as KVBENCH_COMMIT=$(git rev-parse HEAD) in the
# command line (from a clean tree), or every record says commit null.
# 4. optionally: the device top-k's paths timed and quest/doublesparse's kernel cells with the CUDA one (TOPK=1),
#    eager (--no-graph) decode for NOGRAPH's methods, the rag suite (RAG: its -m/--rag-methods options),
#    and the largest-batch search at 32K for SEARCH's methods (records under $OUT/<gpu>/search/).
# Usage: KVBENCH_COMMIT=<sha> BUDGET=seconds [TESTS="tests/..."] [TEST_S=seconds] [PYTEST_ARGS="-n 6"] [TEST_K="pytest -k expression"] [KERNELS=0] [THROUGHPUT=0] [NOGRAPH="full ..."] [RAG="..."]
#        [RAG_PROFILE=1] [SEARCH="full ..."] [TOPK=1]
#        bash benchmarks/gpu_check.sh
set -u
T0=$(date +%s)
left() { echo $(( ${BUDGET:-480} - ($(date +%s) - T0) )); }
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
O=${OUT:-results}/$GPU
mkdir -p "$O"
LOG=$O/log.txt
[ -n "${KVBENCH_COMMIT:-}" ] || echo "warning: KVBENCH_COMMIT is not set: records will not name their commit" | tee -a "$LOG"
# a build/ folder kept from an earlier call can install stale modules: build from scratch, reinstall
rm -rf build
python3 -m pip install -q --force-reinstall --no-deps --no-build-isolation . 2>&1 | grep -v "as the 'root' user"
python3 -c "import kvbench.kernels, kvbench.suites, kvbench; print('kvbench from', kvbench.__file__)" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"
# selfindex's CUDA extension compiles for about a minute: on the CPU, while the tests use the GPU
(python3 -c "from kvbench.kernels import selfindex; selfindex.cuda_ops()" > "$O/selfindex_build.log" 2>&1 &)

echo "== GPU tests ($(left) s left)" | tee -a "$LOG"
# PYTEST_ARGS="-n 6": xdist workers sharing the GPU (the parity tests are small; the extensions build once, locked)
timeout ${TEST_S:-170} python3 -m pytest -q -m gpu -p no:cacheprovider -v --durations=25 ${TEST_K:+-k "$TEST_K"} ${PYTEST_ARGS:-} \
  ${TESTS:-tests} > "$O/tests.txt" 2>&1
tail -30 "$O/tests.txt" | tee -a "$LOG"

if [ "${TOPK:-0}" = 1 ]; then  # the device top-k's paths (CUDA, Triton's two, torch.topk), then quest and
  # doublesparse with the CUDA one (KVBENCH_TOPK=cuda; records under $O/topk-cuda/, info.topk says which ran)
  echo "== topk ($(left) s left)" | tee -a "$LOG"
  timeout 150 python3 benchmarks/topk_bench.py --out "$O/topk.jsonl" 2>&1 | tail -12 | tee -a "$LOG"
  KVBENCH_TOPK=cuda timeout 200 kvbench run kernels -m quest:budget=0.1 -m doublesparse:budget=0.1 \
    --contexts ${CONTEXTS:-32K} --batches ${BATCHES:-1,8} --warmup-ms 5 --rep-ms 25 --out "$O/topk-cuda" 2>&1 \
    | tail -12 | tee -a "$LOG"
fi

METHODS=${METHODS:-"full selfindex:budget=0.1 selfindex:budget=160 kivi:bits=2 kivi:bits=4 snapkv:capacity=0.1 \
streaming quest:budget=0.1 doublesparse:budget=0.1 qjl h2o:heavy=0.05,recent=0.05 tova:capacity=0.1 \
pyramidkv:capacity=0.1 adakv:capacity=0.1"}
if [ "${KERNELS:-1}" = 1 ]; then
  echo "== kernel suite ($(left) s left)" | tee -a "$LOG"
  M=""; for m in $METHODS; do M="$M -m $m"; done
  timeout $(( $(left) / $([ "${THROUGHPUT:-1}" = 1 ] && echo 2 || echo 1) - 15 )) kvbench run kernels $M --contexts ${CONTEXTS:-32K} --batches ${BATCHES:-1,8} \
    --warmup-ms 5 --rep-ms 25 --out "$O" 2>&1 | tail -40 | tee -a "$LOG"
fi
if [ "${THROUGHPUT:-1}" = 1 ]; then
  echo "== throughput ($(left) s left)" | tee -a "$LOG"
  TM=${TMETHODS:-"full selfindex:budget=0.1 kivi:bits=2 snapkv:capacity=0.1 streaming"}
  M=""; for m in $TM; do M="$M -m $m"; done
  timeout $(( $(left) - 15 )) kvbench run throughput $M --model synthetic:llama-3.1-8b --contexts 32K \
    --batches ${TBATCHES:-8} --fill synthetic --no-search --out "$O" 2>&1 | tail -30 | tee -a "$LOG"
fi
if [ -n "${NOGRAPH:-}" ]; then  # eager transformers decode for these methods (--no-graph), for the graph-vs-eager pair
  echo "== throughput --no-graph ($(left) s left)" | tee -a "$LOG"
  M=""; for m in $NOGRAPH; do M="$M -m $m"; done
  timeout $(( $(left) - 15 )) kvbench run throughput $M --model synthetic:llama-3.1-8b --contexts 32K \
    --batches ${TBATCHES:-8} --fill synthetic --no-search --no-graph --out "$O" 2>&1 | tail -12 | tee -a "$LOG"
fi
if [ -n "${RAG:-}" ]; then  # the rag suite on synthetic Llama-3.1-8B: TTFT and bytes held (random weights: no accuracy)
  echo "== rag ($(left) s left)" | tee -a "$LOG"
  timeout $(( $(left) - 15 )) kvbench run rag --model synthetic:llama-3.1-8b --tasks synthetic --documents 8 \
    --doc-tokens 2K --seeds 0-2 $RAG --out "$O" 2>&1 | tail -25 | tee -a "$LOG"
fi
if [ "${RAG_PROFILE:-0}" = 1 ]; then  # TTFT per masked-attention kernel and a profiler table (benchmarks/rag_profile.py)
  echo "== rag profile ($(left) s left)" | tee -a "$LOG"
  timeout $(( $(left) - 15 )) python3 benchmarks/rag_profile.py --methods recompute,reuse,cacheblend,samkv \
    > "$O/rag-profile.txt" 2>&1; tail -7 "$O/rag-profile.txt" | tee -a "$LOG"
fi
if [ -n "${SEARCH:-}" ]; then  # the largest batch within device memory at 32K, and its throughput
  echo "== throughput batch search ($(left) s left)" | tee -a "$LOG"
  M=""; for m in $SEARCH; do M="$M -m $m"; done
  timeout $(( $(left) - 10 )) kvbench run throughput $M --model synthetic:llama-3.1-8b --contexts 32K --batches 1 \
    --fill synthetic --search --search-context 32K --out "$O/search" 2>&1 | tail -15 | tee -a "$LOG"
fi
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/$GPU.tgz" -C "$OUT" "$GPU" && cp "$LOG" "$OUT/log.txt" && rm -rf "${OUT:?}/$GPU"
fi
