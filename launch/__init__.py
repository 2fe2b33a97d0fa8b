"""Launchers: torchrun and SLURM jobs built from the configs in conf/."""
