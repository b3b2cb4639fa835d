"""The pieces the top-level scripts (main_jit.py, engine_jit.py, sample.py, ...) are built from: data
(data, store), device and processes (distributed, nodes, sharding), checkpoints (checkpoint,
checkpointer, checkpoint_dcp, files), the run's records (logger), evaluation (evaluation, scorer, fid,
prc, dinov2, seeds, sweep, sweep_report), errors and exit codes (errors), the built-in demo, the run
config and its merging with what weights imply (config), the weight averages (ema), post-hoc EMA (phema,
phema_files, phema_run), stopping on a signal (stop), sample grids (grid), the run's page (report reads
a run, report_page draws it with svg_plot's plots), and small helpers (lr_sched, pos_embed, viz, cli:
the flags' help text).

Nothing in util/ imports a top-level module except `sampling` (its SamplerSettings): what
knows the network is beside it (model_jit_adapters.py), the exported folders are the top-level
weights.py, and what a run takes from weights (--evaluate_gen's source, --init_from) is run_sources.py."""
