"""Metric names, defined once: the suites write them, the report and any reader rely on them (design.md, "The
record"). Add metrics freely; do not rename these."""

# every record (top level): the method's family, from Method.family ("dense", "quantization", "selection", ...)
METHOD_FAMILY = "method_family"
# every cell with a context: the share of it one decode step attends, from Method.budget_fraction(context)
BUDGET_FRACTION = "budget_fraction"

# accuracy
SCORE = "score"  # 0..1, by the task's metric
PPL = "ppl"
TOPK_RECALL = "topk_recall"
ATTN_MASS = "attn_mass"
OUT_REL_ERR = "out_rel_err"
ATTENDED_FRAC = "attended_frac"

# memory
NBYTES = "nbytes"
BYTES_PER_TOKEN = "bytes_per_token"
ALLOCATED_BYTES = "allocated_bytes"
PEAK_BYTES = "peak_bytes"
NVML_USED_BYTES = "nvml_used_bytes"
MAX_CONTEXT = "max_context"
MAX_BATCH = "max_batch"

# kernels
TIME_US = "time_us"  # median
FLOOR_US = "floor_us"
BANDWIDTH_GBS = "bandwidth_gbs"
SPEEDUP_VS_FULL = "speedup_vs_full"
STAGE_US = "stage_us"  # a mapping of stage to time

# throughput
TTFT_S = "ttft_s"
DECODE_TOK_S = "decode_tok_s"
LATENCY_MS = "latency_ms"
BATCH = "batch"

# the shared names per suite, as design.md lists them
SHARED = {
    "accuracy": (SCORE, PPL, TOPK_RECALL, ATTN_MASS, OUT_REL_ERR),
    "memory": (NBYTES, BYTES_PER_TOKEN, ALLOCATED_BYTES, PEAK_BYTES, NVML_USED_BYTES, MAX_CONTEXT, MAX_BATCH),
    "kernels": (TIME_US, FLOOR_US, BANDWIDTH_GBS, SPEEDUP_VS_FULL, STAGE_US),
    "throughput": (TTFT_S, DECODE_TOK_S, LATENCY_MS, BATCH),
}
