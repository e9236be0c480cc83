"""`DisaggLLM`: the offline front end (`actors.engine.frontend.LLM`) over a `DisaggPair`."""

from __future__ import annotations

import itertools
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from actors.config import CacheConfig, EngineConfig
from actors.disagg.pair import DisaggPair
from actors.disagg.transport import KVTransport
from actors.engine.frontend import LLM, Tokenizer


class DisaggLLM(LLM):
    """`DisaggLLM(model_dir).generate(prompts, params)`, like `LLM`, on a prefill-only and a
    decode-only engine with separate KV pools (as if on two devices).

    Keyword arguments are `EngineConfig` fields for both engines; `prefill_cache` /
    `decode_cache` give one side its own `CacheConfig` (pool size). `mode` is ignored.
    """

    def __init__(self, model: str | Path, transport: KVTransport | None = None,
                 prefill_cache: CacheConfig | None = None, decode_cache: CacheConfig | None = None,
                 **kwargs: Any) -> None:
        self._sinks = {}
        self._sinks_lock = threading.Lock()
        self.tokenizer = Tokenizer(str(model))
        self.config = EngineConfig(model=str(model), tokenizer_eos_token_id=self.tokenizer.eos_token_id, **kwargs)
        p_cfg = replace(self.config, cache=prefill_cache) if prefill_cache else self.config
        d_cfg = replace(self.config, cache=decode_cache) if decode_cache else self.config
        self.pair = DisaggPair(p_cfg, d_cfg, self._route, transport)
        self.core = self.pair  # type: ignore[assignment]  # the request API LLM uses
        self._counter = itertools.count()
        self.start()

    @property
    def transport(self) -> KVTransport:
        return self.pair.transport
