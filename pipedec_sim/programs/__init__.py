"""The `pipedec-sim` programs, on top of everything else: the CLI, the simulator's driver,
sweeps, the tuner and plots."""
