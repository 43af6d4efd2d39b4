import os

# XLA:CPU's backend (LLVM) at optimisation level 0: the suite compiles hundreds of tiny programs and runs
# each a few times, so compile time is most of its time (measured: 13.5 -> 10.1 min on 2 cores, the same
# results). XLA's own HLO passes (fusion, layout) run as always; only the machine code is less optimised.
# Set before any backend starts; a caller's XLA_FLAGS come after it, and so win.
os.environ["XLA_FLAGS"] = " ".join(
    f for f in ("--xla_backend_optimization_level=0", os.environ.get("XLA_FLAGS", "")) if f
)

import jax  # noqa: E402
import pytest  # noqa: E402

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
