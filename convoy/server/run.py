"""``convoy serve``: the engine, its thread and uvicorn, with a graceful SIGTERM."""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn

from convoy.checkpoints import DEFAULT_MODEL_NAME
from convoy.config import EngineConfig, ServerConfig
from convoy.engine.async_engine import AsyncEngine
from convoy.engine.engine import LLMEngine
from convoy.server.app import Admission, build_app

logger = logging.getLogger(__name__)


def served_model_name(engine_config: EngineConfig, server: ServerConfig) -> str:
    if server.served_model_name:
        return server.served_model_name
    if engine_config.model.model:
        return engine_config.model.model
    return DEFAULT_MODEL_NAME


class _GracefulServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: refuse new requests (503), give in-flight ones
    ``grace`` seconds, then abort what is left, so each stream ends with a finish reason
    before uvicorn closes its connections."""

    def __init__(
        self, config: uvicorn.Config, engine: AsyncEngine, admission: Admission, grace: float
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.admission = admission
        self.grace = grace

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.admission.draining.is_set():
            logger.info("shutting down: %.0f s for in-flight requests to finish", self.grace)
            self.admission.draining.set()
            timer = threading.Timer(self.grace, self.engine.abort_all)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once it has stopped, which would make a clean,
        # drained shutdown exit -15; we handled this one, so exit 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def serve(engine_config: EngineConfig, server: ServerConfig) -> None:
    """Load the model and serve until SIGTERM/SIGINT."""
    engine = AsyncEngine(LLMEngine(engine_config))
    app = build_app(engine, server, served_model_name(engine_config, server))
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level="info",
        # uvicorn waits this long for connections after the engine's own grace period ends.
        timeout_graceful_shutdown=int(server.shutdown_grace_s) + 5,
    )
    try:
        _GracefulServer(config, engine, app.state.admission, server.shutdown_grace_s).run()
    finally:
        engine.shutdown()
