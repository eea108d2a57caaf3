"""Running on clusters: where a process runs (:mod:`.env`: torchrun, SLURM tasks, launch checks,
shared run directories) and preemption-safe training (:mod:`.preemption`)."""
