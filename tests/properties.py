"""Shared settings and strategies of the property-based (hypothesis) tests of the pure functions:
shapes with an empty time axis, masks of every density, every input dtype."""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROPERTY = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
SHAPES = st.sampled_from([(1, 0), (3, 0), (1, 1), (3, 1), (2, 5), (4, 7), (2, 2, 6)])
DENSITY = st.sampled_from([0.0, 0.3, 0.8, 1.0])
DTYPES = st.sampled_from(["float32", "bfloat16", "float16"])
SEEDS = st.integers(0, 2**31 - 1)
