"""The OpenAI-compatible HTTP layer: request models, the FastAPI app, Prometheus metrics."""
