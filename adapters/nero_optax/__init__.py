"""optax adapter for nero-core (placeholder until the JAX adapter lands)."""
