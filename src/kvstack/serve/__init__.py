"""``kvstack serve``: an OpenAI-compatible HTTP server over the paged engine."""
