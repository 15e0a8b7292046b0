"""PyTorch adapter for nero-core (placeholder until the torch adapter lands)."""
