import os

# XLA:CPU's backend (LLVM) at optimisation level 0: the suite compiles hundreds of tiny programs and runs
# each a few times, so compile time is most of its time (measured: 13.5 -> 10.1 min on 2 cores, the same
# results; LLVM's expensive passes off as well made no difference, measured). XLA's own HLO passes
# (fusion, layout) run as always; only the machine code is less optimised. Set before any backend
# starts; a caller's XLA_FLAGS come after it, and so win.
os.environ["XLA_FLAGS"] = " ".join(
    f for f in ("--xla_backend_optimization_level=0", os.environ.get("XLA_FLAGS", "")) if f
)

# Keras 3 on JAX (tests/test_convert_keras_haiku.py, test_conv_lstm.py, test_activations.py and the docs'
# Keras block), before anything imports keras: a test file run alone must not meet Keras on TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "jax")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# JAX's persistent compilation cache, in a folder of this run's own (the xdist workers inherit the
# variable from the process that starts them, and each keeps a folder of its own in it: a worker that
# read an entry another was still writing failed its test, "Error reading persistent compilation cache
# entry ... truncated stream", under filterwarnings=error) that the run deletes at its end: tests trace
# the same call at the same shape from fresh functions, which jit's in-memory cache (keyed on the
# function) compiles again and this one (keyed on the program) does not (measured on the Zen 4, 2 cores:
# the suite 10.8 -> 9.0 min, 1,256 -> 1,035 s of tests). A folder the caller names in
# JAXLSTM_TEST_XLA_CACHE is used and kept. Subprocesses the tests start do not use it: an emulated
# older CPU must never load code compiled for this one.
_CACHE_VARIABLE = "JAXLSTM_TEST_XLA_CACHE"
_OWN_CACHE = _CACHE_VARIABLE not in os.environ
if _OWN_CACHE:
    os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="jaxlstm-xla-cache-")
jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(os.environ[_CACHE_VARIABLE], os.environ.get("PYTEST_XDIST_WORKER", "main")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:  # the process that made it, after its workers
        shutil.rmtree(os.environ[_CACHE_VARIABLE], ignore_errors=True)


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
