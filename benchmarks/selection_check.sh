set -u
T0=$(date +%s); left() { echo $(( 188 - ($(date +%s) - T0) )); }
O=$OUT/w; mkdir -p $O
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | grep -v root | tail -2
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== parity ($(left) s left)"
timeout 70 python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_topk_select.py tests/test_qjl_attend.py tests/test_score_triton.py tests/test_selection_attend.py > $O/tests1.txt 2>&1; echo "tests1 rc=$?"
grep -E "PASSED|FAILED|ERROR" $O/tests1.txt | sed 's/.*:://' | cut -c1-110
grep -E "^E " $O/tests1.txt | head -8 | cut -c1-200
echo "== kernels ($(left) s left)"
timeout 75 kvbench run kernels -m full -m quest:budget=0.1 -m doublesparse:budget=0.1 -m qjl --contexts 32K --batches 1,8 --warmup-ms 5 --rep-ms 25 --out $O > $O/kernels_log.txt 2>&1; echo "kernels rc=$?"
tail -5 $O/kernels_log.txt | cut -c1-200
echo "== pinned/graph parity ($(left) s left)"
timeout $(( $(left) - 8 )) python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_selection_pinned.py > $O/tests2.txt 2>&1; echo "tests2 rc=$?"
grep -E "PASSED|FAILED|ERROR" $O/tests2.txt | sed 's/.*:://' | cut -c1-110
tar czf $OUT/r.tgz -C $O .
python3 - $O <<'PY'
import json, glob, sys
for f in glob.glob(sys.argv[1] + "/**/kernels*.jsonl", recursive=True):
    for l in open(f):
        r = json.loads(l); m = r["metrics"] or {}
        st = {k: round(v, 1) for k, v in (m.get("stage_us") or {}).items()}
        print(f'{r["method"]:24s} {r["cell"]["context"]:6d} x{r["cell"]["batch"]} {r["status"]:6s} t={m.get("time_us", 0) or 0:8.1f} floor={m.get("floor_us", 0) or 0:6.1f} x{m.get("speedup_vs_full") or 0:5.2f} {st} {(r.get("error") or "")[:80]}')
PY
