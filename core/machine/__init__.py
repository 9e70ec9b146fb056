"""The simulated machine: shared memory, the C primitives, layout, the mm, locks, CPUs (TLB/IPI), events, configuration."""
