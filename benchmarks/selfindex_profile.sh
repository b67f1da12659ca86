#!/usr/bin/env bash
# One GPU call that profiles the selfindex decode kernels with Nsight Compute (development tool, issue 12): build,
# then ncu's full set on one decode step's score/count/place/attend kernels at 32K x 8 (10% budget), and the basic set
# (durations) at a few more cells. Writes $OUT/ncu-*.txt; prints each kernel's headline metrics last.
# Usage: OUT=dir bash benchmarks/selfindex_profile.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
O=${OUT:-results}
mkdir -p "$O"
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | grep -v "as the 'root' user" | tail -3
python3 -c "from kvbench.kernels import selfindex; selfindex.cuda_ops()" || exit 1
K='regex:score_kernel|count_kernel|place_kernel|attend_kernel|select_kernel'
timeout 200 ncu --clock-control none --set full -k "$K" -c 4 python3 benchmarks/selfindex_ncu.py 32768 8 0.1 \
  > "$O/ncu-full-32k8.txt" 2>&1
for cell in "32768 1 0.1" "32768 8 160" "131072 8 0.1"; do
  timeout 60 ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy -k "$K" -c 4 \
    python3 benchmarks/selfindex_ncu.py $cell > "$O/ncu-basic-${cell// /-}.txt" 2>&1
done
for f in "$O"/ncu-*.txt; do
  echo "== $f"
  grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Grid Size|Block Size|Issue Slots Busy|No Eligible|Stall|Theoretical Occupancy|L2 Hit|Waves Per SM|Warp Cycles Per Issued|Eligible Warps" "$f" \
    | grep -v "^    -" | head -120
done
