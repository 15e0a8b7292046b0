"""The small harness every study shares: data, models, optimizers, the training loop, records and figures."""
