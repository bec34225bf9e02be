"""Studies: one experiment trained at several sleep depths N and seeds, evaluated at every N, reported
with intervals (``megasleep study``, ``configs/studies/``, results in ``docs/results/``)."""
