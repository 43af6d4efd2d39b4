import os

import jax
import pytest

# Four simulated CPU devices, for tests/test_sharding.py (before any backend starts;
# everything else runs on the first one, as it would on one device).
jax.config.update("jax_num_cpu_devices", 4)

# Strict JAX, as equinox does: no implicit dtype or rank promotion slips through.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def standard_promotion():
    """For tests that drive third-party code (optax) that is not strict-promotion clean."""
    with jax.numpy_dtype_promotion("standard"):
        yield


# The forward-layout autotuner times candidates: off in the suite, so that every run
# traces the same programs; tests/test_tuning.py turns it on where it is the subject.
os.environ["JAXLSTM_AUTOTUNE"] = "0"
