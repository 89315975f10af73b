"""A training process's life on a shared machine: one writer per run folder, and no outliving its launcher.

``run_lock``: ``<run_dir>/.d2m-lock``, taken by global rank 0 before any engine is built;
``watchdog``: a worker whose launcher (torchrun's agent, Slurm's step daemon) died exits.
Nothing here is imported by the package itself: each module is small and imported where used.
"""
