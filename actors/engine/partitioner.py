"""SM partitioner: every prefill/decode split pre-created, switched between iterations.

`GreenContextPartitioner` (CUDA) splits the GPU's SMs with green contexts through
cuda-python: for each split, a group of `prefill_sms` SMs for prefill and the
remainder for decode, each exposed as a torch stream whose kernels stay on its SMs.
`CpuPartitioner` has the same interface over a nominal SM count and no streams, so
the controller and its tests run anywhere.

`switch(n)` only records the wish; each worker calls `partition_for(phase)` at its
next iteration boundary and runs on what it gets. `version` increments per switch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from actors.runner.cublas import release_workspaces, set_sm_count_target
from actors.slo.types import nearest_split

Phase = Literal["prefill", "decode"]
SM_GRANULE = 8  # Hopper partitions come in multiples of 8 SMs


# Fewer SMs than this on either side and cuBLAS kernels fail to launch there (seen on an
# H100: a 120/12 split ran no fp16/bf16 GEMM on its 12-SM side; 112/20 ran them all). Sizing cuBLAS
# for the 12 SMs does not help: CUBLAS_STATUS_EXECUTION_FAILED there (H200, 2026-12-03, bench/partition_gemm.py).
MIN_PARTITION_SMS = 16


def split_choices(total_sms: int, granule: int = SM_GRANULE, min_sms: int = MIN_PARTITION_SMS) -> tuple[int, ...]:
    """Prefill SM counts (multiples of `granule`) that leave both phases at least `min_sms`."""
    return tuple(n for n in range(granule, total_sms, granule) if n >= min_sms and total_sms - n >= min_sms)


def restrict_splits(total_sms: int, wanted: tuple[int, ...] | None, min_sms: int = MIN_PARTITION_SMS
                    ) -> tuple[int, ...]:
    """The splits to create: `split_choices(total_sms)`, or the ones nearest each of `wanted`."""
    allowed = split_choices(total_sms, min_sms=min_sms)
    if not wanted or not allowed:
        return allowed
    return tuple(sorted({nearest_split(allowed, w) for w in wanted}))


@dataclass(frozen=True)
class Partition:
    """Where one phase's kernels run: `stream` (None: the default stream) over `sms` SMs, with cuBLAS
    sizing its GEMMs for `gemm_sms` SMs (0: for the whole GPU, cuBLAS's default)."""

    stream: torch.cuda.Stream | None
    sms: int
    gemm_sms: int = 0


@dataclass(frozen=True)
class SwitchRecord:
    time: float
    from_sms: int
    to_sms: int
    reason: str


class Partitioner:
    """Common state: the split set, the current choice and the switch log."""

    def __init__(self, total_sms: int, splits: tuple[int, ...], initial: int | None) -> None:
        if not splits:
            raise ValueError(f"no SM split possible on {total_sms} SMs")
        self.total_sms = total_sms
        self.splits = splits
        want = total_sms // 2 if initial is None else initial
        self.current = nearest_split(splits, want)
        self.version = 0
        self.switches: list[SwitchRecord] = []
        self._lock = threading.Lock()

    def nearest(self, prefill_sms: int) -> int:
        return nearest_split(self.splits, prefill_sms)

    def switch(self, prefill_sms: int, reason: str = "") -> bool:
        """Ask for a split (rounded to the nearest available). True if it changed."""
        target = self.nearest(prefill_sms)
        with self._lock:
            if target == self.current:
                return False
            self.switches.append(SwitchRecord(time.time(), self.current, target, reason))
            self.current = target
            self.version += 1
            return True

    @property
    def prefill_fraction(self) -> float:
        return self.current / self.total_sms

    def sms_for(self, phase: Phase) -> int:
        return self.current if phase == "prefill" else self.total_sms - self.current

    def partition_for(self, phase: Phase) -> Partition:
        """The partition a worker of `phase` runs its next iteration on."""
        return Partition(None, self.sms_for(phase))

    def all_partitions(self, phase: Phase) -> list[Partition]:
        """Every partition `phase` may run on, over all splits (for CUDA-graph capture)."""
        return []


class CpuPartitioner(Partitioner):
    """No SMs to split: same bookkeeping, no streams."""

    def __init__(self, total_sms: int = 128, initial: int | None = None, splits: tuple[int, ...] | None = None) -> None:
        super().__init__(total_sms, restrict_splits(total_sms, splits), initial)


class WholeGpuPartitioner(Partitioner):
    """Unified mode on a GPU: one side stream over all SMs (no split to switch)."""

    def __init__(self, device: torch.device) -> None:
        total = torch.cuda.get_device_properties(device).multi_processor_count
        super().__init__(total, (total,), total)
        self._stream = torch.cuda.Stream(device)

    def partition_for(self, phase: Phase) -> Partition:
        return Partition(self._stream, self.total_sms)

    def all_partitions(self, phase: Phase) -> list[Partition]:
        return [Partition(self._stream, self.total_sms)]


class GreenContextPartitioner(Partitioner):
    """Green-context SM partitions for every split (or those nearest `splits`), created once at start
    (3-5 ms each; the engine then captures decode CUDA graphs for each). `min_sms`: the fewest SMs
    either side may get; each partition is probed with a GEMM sized for it."""

    def __init__(self, device: torch.device, initial: int | None = None, splits: tuple[int, ...] | None = None,
                 min_sms: int = MIN_PARTITION_SMS) -> None:
        total = torch.cuda.get_device_properties(device).multi_processor_count
        super().__init__(total, restrict_splits(total, splits, min_sms), initial)
        self._device_index = device.index if device.index is not None else torch.cuda.current_device()
        self._keepalive: list[Any] = []
        self._streams: dict[int, tuple[torch.cuda.ExternalStream, torch.cuda.ExternalStream]] = {}
        self.actual_sms: dict[int, tuple[int, int]] = {}
        for n in self.splits:
            self._streams[n] = self._make_split(n)
            for part in (self._partition(n, "prefill"), self._partition(n, "decode")):
                _probe_gemm(part)
        set_sm_count_target(total, device)
        release_workspaces()  # the probes' cuBLAS workspaces, one per stream

    def _make_split(self, prefill_sms: int) -> tuple[torch.cuda.ExternalStream, torch.cuda.ExternalStream]:
        from cuda.bindings import driver as cu

        torch.cuda.init()
        _, dev = _check(cu.cuDeviceGet(self._device_index))
        _, full = _check(cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        _, groups, _, remainder = _check(cu.cuDevSmResourceSplitByCount(1, full, 0, prefill_sms))
        pair = []
        for res in (groups[0], remainder):
            _, desc = _check(cu.cuDevResourceGenerateDesc([res], 1))
            _, gctx = _check(cu.cuGreenCtxCreate(desc, dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
            _, stream = _check(cu.cuGreenCtxStreamCreate(gctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
            self._keepalive.extend([gctx, stream, desc])
            pair.append(torch.cuda.ExternalStream(int(stream), device=torch.device("cuda", self._device_index)))
        self.actual_sms[prefill_sms] = (groups[0].sm.smCount, remainder.sm.smCount)
        return pair[0], pair[1]

    def partition_for(self, phase: Phase) -> Partition:
        return self._partition(self.current, phase)

    def all_partitions(self, phase: Phase) -> list[Partition]:
        return [self._partition(n, phase) for n in self.splits]

    def _partition(self, split: int, phase: Phase) -> Partition:
        prefill, decode = self._streams[split]
        prefill_sms, decode_sms = self.actual_sms[split]
        # Sized GEMMs ran a layer's prefill GEMMs up to 1.4x faster on their partition; decode's (64 rows)
        # ran 4-10% slower than cuBLAS's default (H200, 2026-12-03, bench/partition_gemm.py).
        if phase == "prefill":
            return Partition(prefill, prefill_sms, gemm_sms=prefill_sms)
        return Partition(decode, decode_sms)


def _probe_gemm(part: Partition) -> None:
    """Fail at start, not mid-serving, if cuBLAS cannot run on a partition (sized for it, as the runners do)."""
    stream = part.stream
    assert stream is not None
    a = torch.ones(64, 256, dtype=torch.bfloat16, device=torch.device("cuda", stream.device_index))
    set_sm_count_target(part.gemm_sms, a.device)
    with torch.cuda.stream(stream):
        b = a @ a.T
    stream.synchronize()
    assert float(b[0, 0]) == 256.0, "GEMM on a green-context stream gave a wrong result"


def _check(result: tuple[Any, ...]) -> tuple[Any, ...]:
    from cuda.bindings import driver as cu

    err = result[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return result


def make_partitioner(device: torch.device, mode: str, prefill_sms: int | None,
                     splits: tuple[int, ...] | None = None) -> Partitioner:
    if device.type != "cuda":
        return CpuPartitioner(initial=prefill_sms, splits=splits)
    if mode == "unified":
        return WholeGpuPartitioner(device)
    return GreenContextPartitioner(device, initial=prefill_sms, splits=splits)
