"""``kvstack serve``: an OpenAI-compatible HTTP server over the paged engine.

:func:`create_app` builds the FastAPI app over an :class:`~kvstack.engine.Engine`; :class:`EngineLoop` is the
background thread that alone calls the engine. ``docs/serve.md`` shows how to run and query it.
"""

from kvstack.serve.app import ServeLimits, create_app
from kvstack.serve.engine_loop import EngineLoop, SampleEvent, Submission

__all__ = ["EngineLoop", "SampleEvent", "ServeLimits", "Submission", "create_app"]
