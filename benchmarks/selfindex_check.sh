#!/usr/bin/env bash
# One GPU call for the selfindex kernels (issue 12), run from a checkout's root on the device, about 200 s:
# 1. install (non-editable) and build the CUDA extension;
# 2. GPU parity tests of the select and attend paths, and compute-sanitizer memcheck and racecheck on the parity
#    tests' smallest shapes (pack, append, both select paths, the CUDA attend), all three at once;
# 3. the kernel suite (CUDA-graph timing, Llama-3.1-8B attention shape, bf16) at 32K and 128K x 1 and 8, 10% and 160
#    tokens against dense, then 32K with the three-kernel select (KVBENCH_SELFINDEX_SELECT=3) for comparison;
# 4. a table last. Each stage has a timeout from what is left of BUDGET seconds, so a failing or slow stage still lets
#    the rest run. Writes $OUT/w/* and packs it into $OUT/r.tgz (the device returns at most 8 files).
# Usage: OUT=dir BUDGET=195 [TEST_S=60] [FIRST_TESTS="tests/...::test_x ..." (run first)] bash benchmarks/selfindex_check.sh
set -u
T0=$(date +%s)
B=${BUDGET:-195}
left() { echo $(( B - ($(date +%s) - T0) )); }
cap() { local t=$(( $(left) - $2 )); [ "$t" -gt "$1" ] && t=$1; [ "$t" -lt 5 ] && t=5; echo $t; }  # min(max, left - reserve)
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
O=${OUT:-results}/w
mkdir -p "$O"
LOG=$O/log.txt
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | grep -v "as the 'root' user" | tail -3
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee -a "$LOG"
echo "== build ($(left) s left)" | tee -a "$LOG"
timeout "$(cap 110 80)" python3 -c "from kvbench.kernels import selfindex; selfindex.cuda_ops()" > "$O/build.txt" 2>&1 \
  || { echo "build failed"; tail -30 "$O/build.txt"; } | tee -a "$LOG"

echo "== parity tests, memcheck, racecheck ($(left) s left)" | tee -a "$LOG"
T=tests/test_selfindex_kernels.py
S=$(cap ${TEST_S:-60} 75)  # TEST_S: the parity stage's own limit
G=tests/test_graph_decode.py::test_graph_replays_of_the_compressing_methods_are_token_identical_to_eager_steps
# in this order (what the changes touch first): pytest keeps the command line's order
timeout "$S" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE ${FIRST_TESTS:-} "$T::test_select_paths_agree" \
  "$T::test_selection_is_deterministic_and_planned_steps_equal_eager_ones" "$G[selfindex:budget=0.1]" \
  "$G[selfindex:budget=64,sinks=8,window=16,fixed=scored]" "$T::test_long_context_many_splits_and_large_budget" \
  "$T::test_decode_steps_match_reference" "$T::test_small_budget_decode_matches_reference" \
  "$T::test_full_budget_16_1_on_cuda_matches_dense_attention" > "$O/tests.txt" 2>&1 &
P1=$!
SMALL=("$T::test_pack_matches_reference[dtype0-shape0]" "$T::test_select_paths_agree[3-shape0]"
       "$T::test_select_paths_agree[0-shape4]" "$T::test_attend_paths_match_reference[cuda-dtype0-shape0]"
       "$T::test_decode_steps_match_reference[sinks-2+1-dtype1-shape0]")
for tool in memcheck racecheck; do
  timeout "$S" compute-sanitizer --tool $tool --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider "${SMALL[@]}" \
    > "$O/$tool.txt" 2>&1 &
done
wait $P1; echo "tests rc=$?" | tee -a "$LOG"
wait
tail -4 "$O/tests.txt" | tee -a "$LOG"
for tool in memcheck racecheck; do
  echo "$tool: $(grep -hE "SUMMARY|passed|failed" "$O/$tool.txt" | tr '\n' ' ')" | tee -a "$LOG"
done

echo "== kernel suite ($(left) s left)" | tee -a "$LOG"
timeout "$(cap 60 22)" kvbench run kernels -m full -m selfindex:budget=0.1 -m selfindex:budget=160 --contexts 32K,128K \
  --batches 1,8 --warmup-ms 5 --rep-ms 25 --out "$O/k1" > "$O/kernels.txt" 2>&1
echo "== three-kernel select ($(left) s left)" | tee -a "$LOG"
KVBENCH_SELFINDEX_SELECT=3 timeout "$(cap 25 6)" kvbench run kernels -m full -m selfindex:budget=0.1 \
  -m selfindex:budget=160 --contexts 32K --batches 1,8 --warmup-ms 5 --rep-ms 25 --out "$O/k3" > "$O/kernels3.txt" 2>&1

python3 - "$O" <<'EOF' | tee -a "$LOG"
import json, pathlib, sys
o = pathlib.Path(sys.argv[1])
print(f"{'select':6s} {'method':22s} {'ctx':>6s} {'B':>2s} {'time_us':>8s} {'score_sel':>9s} {'attend':>7s} "
      f"{'floor':>6s} {'vs full':>7s}")
for tag in ("k1", "k3"):
    for f in sorted((o / tag).glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            m, c = r["metrics"] or {}, r["cell"]
            if r["method"] == "full" and tag == "k3":
                continue
            if r["status"] != "ok":
                print(tag, r["method"], c.get("context"), c.get("batch"), r["status"], (r["error"] or "")[:80])
                continue
            st = m.get("stage_us", {})
            label = r["method"] if r["method"] != "selfindex" else f"selfindex:budget={r['params'].get('budget')}"
            print(f"{'1' if tag == 'k1' else '3':6s} {label:22s} {c['context']:6d} {c['batch']:2d} {m['time_us']:8.1f} "
                  f"{st.get('score_select', float('nan')):9.1f} {st.get('attend', float('nan')):7.1f} "
                  f"{m['floor_us']:6.1f} {m['speedup_vs_full'] or 0:7.2f}")
EOF
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
[ -n "${OUT:-}" ] && tar czf "$OUT/r.tgz" -C "$O" . && cp "$LOG" "$OUT/log.txt"
