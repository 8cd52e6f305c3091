"""Evaluation and benchmarking: the sentiment data, fine-tuning, accuracy against FP32 and HF's
simulation, the peers the benchmark times, the one-call GPU check. Needs the compiler and torch,
except the GPU check's run half (`gpu_check.py`), which runs with the TVM runtime alone; the runtime
never imports it."""
