"""Evaluation and benchmarking: the sentiment data, fine-tuning, accuracy against FP32 and HF's
simulation, the peers the benchmark times. Needs the compiler and torch; the runtime never imports it."""
