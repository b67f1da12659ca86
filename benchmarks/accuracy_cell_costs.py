"""CPU seconds of the parts of an accuracy-suite cell, for the cost model in suites/accuracy.py: per length, the shared
dense prefill pass (kvbench/decoding.py's record_prefill); per method and length, the replay of that pass into the
method's cache, the question chunk of the query-agnostic protocol and one decode step (fidelity on, as the suite runs).
One thread, so process CPU time counts work, not the spinning of a second thread on a machine others load.
Usage: nice -n 5 python benchmarks/accuracy_cell_costs.py OUT.jsonl [LENGTHS] (records of 2026-12-02 in
benchmarks/records/accuracy-cell-costs.jsonl; before the shared prefill the file measured whole cells)."""
import json, sys, time
import torch
torch.set_num_threads(1)
from kvbench.bridge import attach, with_cache
from kvbench.decoding import record_prefill, replay, prefill_queries
from kvbench.models import load_model
from kvbench.registry import parse_method
from kvbench.suites import tasks as T
from kvbench.suites.fidelity import Fidelity

model, tok = load_model("embedded", device="cpu")
out = open(sys.argv[1], "a")
lengths = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1024,2048,4096").split(",")]
methods = ["full", "selfindex:budget=0.1", "selfindex:budget=160", "kivi", "snapkv:capacity=0.1"]
STEPS = 8
cpu = time.process_time
load = lambda: float(open("/proc/loadavg").read().split()[0])  # noqa: E731
with torch.inference_mode():
    record_prefill(model, torch.tensor([T.make_instance(tok, "passkey", 200, 0.5, 0).ids]))  # warm-up
    for L in lengths:
        inst = T.make_instance(tok, "niah_single", L, 0.5, 0, haystack="noise")
        ids = torch.tensor([inst.ids])
        c0 = cpu()
        whole = record_prefill(model, ids)
        c1 = cpu()
        ctx = record_prefill(model, ids[:, : inst.split])
        out.write(json.dumps(dict(part="pass", length=L, cpu_s=round(c1 - c0, 3), load=load())) + "\n")
        for m in methods:
            row = dict(part="cell", length=L, method=m, fidelity=True, threads=1)
            cache = attach(model, Fidelity(inner=parse_method(m)))
            c0 = cpu()
            replay(cache, whole, prefill_queries(cache.method))
            row["replay_s"] = round(cpu() - c0, 4)
            kw, nxt = with_cache(model, cache), whole.logits.argmax(-1, keepdim=True)
            c0 = cpu()
            for _ in range(STEPS):
                nxt = model(nxt, **kw).logits[:, -1].argmax(-1, keepdim=True)
            row["step_s"] = round((cpu() - c0) / STEPS, 4)
            cache = attach(model, Fidelity(inner=parse_method(m)))
            replay(cache, ctx, prefill_queries(cache.method))
            c0 = cpu()
            model(ids[:, inst.split:], **with_cache(model, cache), logits_to_keep=1)
            row["question_s"] = round(cpu() - c0, 4)
            out.write(json.dumps({**row, "load": load()}) + "\n")
            out.flush()
