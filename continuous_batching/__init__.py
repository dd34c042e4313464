"""Continuous batching engine (request state, schedulers, model runner). Empty until its issue lands."""
