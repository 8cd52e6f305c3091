"""Per-target schedules for the kernels of `relay_ops` (hand-written; tuning records beside)."""
