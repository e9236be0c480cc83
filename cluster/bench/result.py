"""The result record of `semipd bench serve` and its JSON file. `BenchResult` is one run at one request rate.
Its JSON carries the commit and the command line that made it (from its config; None when not known) and vLLM's
keys at the top level, so existing scripts read it: the setup (model_id, tokenizer_id,
num_prompts, backend, the `--metadata` pairs, request_rate, burstiness, max_concurrency, a ramp-up's
ramp_up_strategy, ramp_up_start_rps, ramp_up_end_rps and rps_change_events) and the flat metrics (completed,
request_throughput, mean_ttft_ms, p99_ttft_ms, ...); plus the config, the goodput SLOs, the per-request records,
server-side metrics, the per-workload-profile breakdown (`profile_breakdown`) and a label (and, for a
structured-output run, `structured_output`, `correct_rate` in percent and the `conformance` counts);
`BenchResult.from_json` rebuilds it (aggregates recomputed from the records), and `write_result` / `load_result`
put it in a file and read it back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.bench.arrivals import RampUp
from cluster.bench.client import RequestRecord
from cluster.bench.metrics import BenchMetrics, Conformance, SLOs, compute_metrics

SCHEMA = "semipd-bench-serve/1"


@dataclass
class BenchResult:
    """One run at one request rate."""

    label: str
    date: str
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    slos: SLOs
    percentile_metrics: tuple[str, ...]
    metric_percentiles: tuple[float, ...]
    records: list[RequestRecord]
    metrics: BenchMetrics
    config: dict[str, Any] = field(default_factory=dict)
    server_metrics: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    split_changes: list[dict[str, Any]] | None = None  # semipd servers: SM split changes during the run
    structured_output: dict[str, Any] | None = None  # StructuredOutput.to_dict() of a structured-output run
    conformance: Conformance | None = None  # of a structured-output run: how many outputs conformed
    ramp_up: RampUp | None = None  # the rate ramp of a run without a request rate (request_rate inf)
    rps_change_events: list[dict[str, Any]] | None = None  # of a ramp-up run: when each whole RPS was reached

    def to_json(self) -> dict[str, Any]:
        """The result's JSON; `--metadata` pairs also at the top level, as vLLM writes them, unless they collide
        with a key of the result."""
        data: dict[str, Any] = {
            "schema": SCHEMA,
            "label": self.label,
            "date": self.date,
            "commit": self.config.get("commit") or None,
            "command": self.config.get("command") or None,
            **vllm_setup(self.config),
            "request_rate": _num(self.request_rate),
            "burstiness": _num(self.burstiness),
            "max_concurrency": self.max_concurrency,
            **(self.ramp_up.to_dict() if self.ramp_up else {}),
            **({"rps_change_events": self.rps_change_events} if self.rps_change_events is not None else {}),
            "goodput": self.slos.as_dict(),
            "percentile_metrics": list(self.percentile_metrics),
            "metric_percentiles": list(self.metric_percentiles),
            **self.metrics.to_flat(),
            "by_profile": profile_breakdown(self),
            "config": _jsonable(self.config),
            "metadata": dict(self.metadata),
            "server_metrics": self.server_metrics,
            "split_changes": self.split_changes,
            "requests": [r.to_dict() for r in self.records],
        }
        if self.structured_output is not None:
            conformance = self.conformance or Conformance.of(self.records)
            data.update(structured_output=_jsonable(self.structured_output), correct_rate=conformance.correct_rate,
                        conformance=conformance.to_dict())
        return {**self.metadata, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        """Rebuild a result written by `to_json` (ValueError when it is not one). Without its
        "requests" (records left out to keep a file small) the saved aggregates are used."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a semipd bench serve result (schema {data.get('schema')!r})")
        records = [RequestRecord.from_dict(r) for r in data.get("requests", ())]
        slos = SLOs.from_dict(data.get("goodput"))
        percentiles = tuple(float(p) for p in data["metric_percentiles"])
        metrics = (compute_metrics(records, float(data["duration"]), slos, percentiles) if "requests" in data
                   else BenchMetrics.from_flat(data, percentiles))
        structured = data.get("structured_output")
        conformance = None if structured is None else (
            Conformance.of(records) if "requests" in data else Conformance.from_dict(data["conformance"],
                                                                                     metrics.completed))
        return cls(
            label=data.get("label", ""),
            date=data.get("date", ""),
            request_rate=float(data["request_rate"]),
            burstiness=float(data.get("burstiness", 1.0)),  # "inf" too
            max_concurrency=data.get("max_concurrency"),
            slos=slos,
            percentile_metrics=tuple(data["percentile_metrics"]),
            metric_percentiles=percentiles,
            records=records,
            metrics=metrics,
            config=data.get("config", {}),
            server_metrics=data.get("server_metrics"),
            metadata=data.get("metadata", {}),
            split_changes=data.get("split_changes"),
            structured_output=structured,
            conformance=conformance,
            ramp_up=RampUp.from_dict(data),
            rps_change_events=data.get("rps_change_events"),
        )


def vllm_setup(config: dict[str, Any]) -> dict[str, Any]:
    """vLLM's setup keys of a run's config (`ServeBenchConfig.to_dict()` with the model sent and the tokenizer
    used): model_id, tokenizer_id, num_prompts, and backend (also as endpoint_type): openai or openai-chat."""
    backend = "openai-chat" if config.get("endpoint") == "/v1/chat/completions" else "openai"
    return {"endpoint_type": backend, "backend": backend, "model_id": config.get("model"),
            "tokenizer_id": config.get("tokenizer_id"),
            "num_prompts": (config.get("workload") or {}).get("num_prompts")}


def _num(x: float) -> float | str:
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _num(obj)
    return obj


def write_result(result: BenchResult, path: Path) -> Path:
    """Write the result JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1))
    return path


def load_result(path: str | Path) -> BenchResult:
    """Read a result JSON written by `write_result`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"result file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON: {e}") from None
    try:
        return BenchResult.from_json(data)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{p}: malformed result ({e})") from None


def profile_breakdown(result: BenchResult) -> dict[str, dict[str, Any]]:
    """Per workload profile (the phases of `shifting`, the parts of `mixed`): counts,
    latency summaries and SLO attainment; empty for a single-profile workload."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in result.records:
        groups.setdefault(r.profile, []).append(r)
    if len(groups) < 2:
        return {}
    keep = ("num_requests", "completed", "failed", "slo_attainment_pct")
    out: dict[str, dict[str, Any]] = {}
    for name, recs in groups.items():
        flat = compute_metrics(recs, result.metrics.duration_s, result.slos, result.metric_percentiles).to_flat()
        out[name] = {k: v for k, v in flat.items()
                     if k in keep or (k.endswith("_ms") and not k.startswith("std_") and "_itl_" not in k)}
    return out


__all__ = ["BenchResult", "SCHEMA", "load_result", "profile_breakdown", "vllm_setup", "write_result"]
