"""What every route needs: the engine, its loop thread, settings, metrics, admission."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from moska.engine.protocol import ServedEngine
from moska.server.admission import AdmissionController
from moska.server.async_engine import AsyncEngine
from moska.server.build_worker import BuildWorker
from moska.server.load_shedding import LoopLag
from moska.server.metrics import ServerMetrics
from moska.server.settings import ServerSettings
from moska.server.tokenizer_pool import TokenizerPool

if TYPE_CHECKING:  # structured output imports the grammar engine: only when first used
    from moska.server.structured_output import ServerGrammars


@dataclass
class ServerState:
    engine: ServedEngine
    settings: ServerSettings
    metrics: ServerMetrics
    admission: AdmissionController
    async_engine: AsyncEngine
    tokenizers: TokenizerPool  # tokenization and chat templating, off the event loop
    builds: BuildWorker | None = None  # library builds, off the engine thread (None: no manager)
    grammars: ServerGrammars | None = None  # structured output's compiler, made on first use
    loop_lag: LoopLag = field(default_factory=LoopLag)  # admission counts the wait before it

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or str(self.engine.model_name)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)


def get_state(request: Request) -> ServerState:
    return request.app.state.moska


StateDep = Annotated[ServerState, Depends(get_state)]
