"""The pieces the top-level scripts (main_jit.py, engine_jit.py, sample.py, ...) are built from: data
(data, store), device and processes (distributed, sharding), checkpoints (checkpoint, files), the
run's records (logger), evaluation (evaluation, fid, sweep), errors and exit codes (errors), the
built-in demo, and small helpers (lr_sched, pos_embed, viz). Modules here may use the top-level
`denoiser` (its EMA and sampler settings); none imports main_jit or engine_jit."""
