"""The kernel paths run on the machine: faults, GUP, zap, mmap, walkers, khugepaged, the strategies, roles, the oracle, bugs and mutants."""
