import jax
import pytest

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
