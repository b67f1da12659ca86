"""The suites: accuracy, memory, kernels and throughput, and the task generators they use."""
