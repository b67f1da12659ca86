#!/usr/bin/env bash
# Development tool (issue 12): time source variants of csrc/selfindex.cu in one GPU call. Installs kvbench, then for
# each variant applies its text substitutions to the installed copy of the source (the JIT build is keyed by the
# source's hash, so each variant builds once), runs the attend parity test and times the decode step's stages with
# benchmarks/selfindex_dev.py. Variants are given in benchmarks/selfindex_variants.py (name -> [(old, new), ...]).
# Usage: OUT=dir VARIANTS="base attend4" CELLS=32768,131072 bash benchmarks/selfindex_variants.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
O=${OUT:-results}
mkdir -p "$O"
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | grep -v "as the 'root' user" | tail -3
SRC=$(python3 -c "import kvbench.kernels, os; print(os.path.join(os.path.dirname(kvbench.kernels.__file__), 'csrc'))")
cp "$SRC/selfindex.cu" "$O/pristine.cu"
for v in ${VARIANTS:-base}; do
  python3 benchmarks/selfindex_variants.py "$v" "$O/pristine.cu" "$SRC/selfindex.cu" || continue
  echo "== $v"
  timeout 120 python3 -c "from kvbench.kernels import selfindex; selfindex.cuda_ops()" > "$O/build-$v.txt" 2>&1 \
    || { echo "build failed"; tail -20 "$O/build-$v.txt"; continue; }
  timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -x tests/test_selfindex_kernels.py \
    -k "attend_paths_match_reference or select_paths_agree" 2>&1 | tail -1
  timeout 120 python3 benchmarks/selfindex_dev.py --contexts ${CELLS:-32768,131072} --batches ${BATCHES:-8} \
    --methods "selfindex:budget=0.1;selfindex:budget=160" 2>&1 | grep -E "T=" | tee "$O/time-$v.txt"
done
