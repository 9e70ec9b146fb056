"""Result files, comparisons, plots, the host fingerprint, calibration, cost tables, benchmarks, the crossover map."""
