"""Per-cell wall and CPU seconds of accuracy-suite cell kinds (method x length x protocol), for the cost model in
suites/accuracy.py. Usage: nice -n 5 python benchmarks/accuracy_cell_costs.py OUT.jsonl (records of 2026-12-02 in
benchmarks/records/accuracy-cell-costs.jsonl, measured on the shared 2-core machine at load 5-12)."""
import json, sys, time
import torch
from kvbench.models import load_model
from kvbench.registry import parse_method
from kvbench.suites import tasks as T
from kvbench.suites.accuracy import evaluate

torch.set_num_threads(2)
model, tok = load_model("embedded", device="cpu")
out = open(sys.argv[1], "a")
methods = ["full", "selfindex:budget=0.1", "selfindex:budget=160", "kivi", "snapkv:capacity=0.1"]
plan = []
for L in (1024, 2048, 4096):
    plan += [(L, "niah_single", "noise", m, T.QUERY_AWARE, True) for m in methods if m != "selfindex:budget=160"]
    plan += [(L, "niah_single", "noise", "full", T.QUERY_AWARE, False),
             (L, "niah_single", "noise", "selfindex:budget=0.1", T.QUERY_AGNOSTIC, True)]
plan += [(L, "ppl", "noise", "full", T.QUERY_AGNOSTIC, True) for L in (1024, 4096)]
plan += [(4096, "niah_multivalue", "docs", "full", T.QUERY_AWARE, True)]
for L, task, hay, m, p, fid in plan:
    t0 = time.perf_counter(); c0 = time.process_time()
    inst = T.make_instance(tok, task, L, 0.5 if task != "ppl" else None, 0, haystack=hay)
    t1 = time.perf_counter()
    r = evaluate(model, tok, parse_method(m), inst, p, fidelity=fid)
    t2 = time.perf_counter(); c2 = time.process_time()
    out.write(json.dumps(dict(length=L, task=task, haystack=hay, method=m, protocol=p, fidelity=fid,
                              make_s=round(t1 - t0, 3), cell_s=round(t2 - t1, 3), cpu_s=round(c2 - c0, 3),
                              score=r.get("score"),
                              new_tokens=r.get("new_tokens"), prefill_s=r.get("prefill_s"),
                              decode_s=r.get("decode_s"), load=open("/proc/loadavg").read().split()[0])) + "\n")
    out.flush()
