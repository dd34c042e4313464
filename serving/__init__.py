"""OpenAI-compatible HTTP server over the engine. Empty until its issue lands."""
