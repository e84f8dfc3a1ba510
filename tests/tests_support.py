"""Constants shared by tests (importable: tests/ is on sys.path through conftest's rootdir)."""

# An untrained head scores every anchor ~prior_prob (0.01): let every anchor be a candidate so
# the teacher has boxes to keep, filter and check; small test sizes keep CPU time low.
TEACHER_OVERRIDES = ["inference.score_threshold=0.0", "input.min_size_test=128", "input.max_size_test=192"]
