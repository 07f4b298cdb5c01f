"""The peers a user would pick today, replaying the same jobs as the engine.

- `hf-cb`: transformers' own continuous batching (`ContinuousBatchingManager`). It has no
  paused state, so every interception ends the request; when the tool returns (the scripted
  pause after the segment's last token), a NEW request carries the whole context: prompt,
  everything generated, every answer. Its prefix cache is on, as a user would have it, so
  full blocks still cached from the previous piece are not recomputed.
- `hf-generate`: a plain `model.generate` loop, one request at a time, sleeping through each
  tool call and re-running `generate` on the whole context after it (small runs only).

Both count the tokens every forward processes (a forward pre-hook), so the recomputation
share is known for them too: tokens processed beyond the context's own `total - 1` were
computed again. Neither exposes per-token timing, so that share is by tokens, not seconds.
"""
from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.streamers import BaseStreamer

from ..outputs import InterceptionRecord, RequestResult

if TYPE_CHECKING:
    from tqdm.auto import tqdm
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    from .jobs import EngineSettings, Job

STRATEGY = "resubmit"  # what the peers do at an interception, in the strategy column
POLL_S = 0.005  # longest the hf-cb loop blocks on its result queue before checking for due submissions


class _Transcript:
    """One request as a peer runs it: the pieces between interceptions, stitched back into one result."""

    def __init__(self, job: Job, arrival_time: float) -> None:
        self.job = job
        self.arrival_time = arrival_time
        self.context = list(job.prompt)
        self.piece = 0
        self.token_times: list[float] = []
        self.interceptions: list[InterceptionRecord] = []
        self.submit_at = arrival_time

    @property
    def segments(self) -> Sequence:
        return self.job.scripted.segments

    def next_length(self) -> int:
        """Tokens to generate in the current piece: up to the next call, or the final decode."""
        if self.piece < len(self.segments):
            return self.segments[self.piece].n_tokens
        return self.job.max_new_tokens - sum(s.n_tokens for s in self.segments)

    def record(self, tokens: list[int], times: list[float]) -> bool:
        """A piece came back; returns True if the request goes on (after the tool's pause)."""
        self.context += tokens
        if self.interceptions and self.interceptions[-1].resumed_at is None:
            self.interceptions[-1] = self.interceptions[-1]._replace(resumed_at=times[0])
        self.token_times += times
        if self.piece == len(self.segments):
            return False
        seg = self.segments[self.piece]
        paused_at = times[-1]
        self.submit_at = paused_at + seg.pause_s
        self.interceptions.append(
            InterceptionRecord(self.job.scripted.name, "", paused_at, self.submit_at, None, STRATEGY,
                               len(seg.answer_ids), {})
        )
        self.context += list(seg.answer_ids)
        self.piece += 1
        return True

    def result(self, finish_reason: str = "length", error: str | None = None) -> RequestResult:
        times = self.token_times
        return RequestResult(
            request_id=self.job.request.request_id,
            prompt_len=len(self.job.prompt),
            token_ids=self.context[len(self.job.prompt):],
            num_generated=len(times),
            finish_reason=finish_reason,
            error=error,
            arrival_time=self.arrival_time,
            first_token_time=times[0] if times else None,
            finish_time=times[-1] if times else time.perf_counter(),
            token_times=list(times),
            interceptions=list(self.interceptions),
        )


class _TokenCounter:
    """Counts the tokens and seconds of every forward of `model` inside its `with` block; the
    hooks come off on the way out, also when a run raises, so the model is left as it was."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._t0 = 0.0
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]

    def __enter__(self) -> _TokenCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += int(ids.shape[-1])
        self._t0 = time.perf_counter()

    def _after(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._t0

    def stats(self, transcripts: Sequence[_Transcript]) -> dict[str, Any]:
        """Engine-style figures: every context token but the last needs one pass; more is recomputation."""
        needed = sum(len(t.context) - 1 for t in transcripts)
        return {
            "forward_s": self.seconds,
            "forward_tokens": self.tokens,
            "recomputed_tokens": max(0, self.tokens - needed),
            "strategies": {STRATEGY: sum(len(t.interceptions) for t in transcripts)},
        }


def run_hf_cb(
    model: torch.nn.Module, jobs: Sequence[Job], settings: EngineSettings, progress: tqdm | None = None
) -> tuple[list[RequestResult], float, float, dict[str, Any]]:
    """Replay `jobs` on `ContinuousBatchingManager`, one new request per piece between interceptions.

    Sized like the engine (`num_blocks`, `block_size`, `max_batch_tokens`); async batching off
    and no switch to flash attention (the engine runs the model as loaded), no CPU offload (it pins memory).
    """
    cb_config = ContinuousBatchingConfig(
        num_blocks=settings.num_blocks,
        page_size=settings.block_size,
        max_batch_tokens=settings.max_batch_tokens,
        allow_block_sharing=True,
        use_async_batching=False,
        auto_switch_to_flash=False,
        max_blocks_per_request=0,
    )
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0),
        continuous_batching_config=cb_config,
    )
    manager.warmup()  # builds the cache and batch processor before the clock starts, as the engine's are
    manager.start()
    with _TokenCounter(model) as counter:
        t0 = time.perf_counter()
        transcripts = [_Transcript(job, t0 + job.request.arrival_s) for job in jobs]
        try:
            results = _serve_pieces(manager, transcripts, progress)
            duration = time.perf_counter() - t0
        finally:
            manager.stop(block=True, timeout=10)
            manager.destroy()
    return results, t0, duration, counter.stats(transcripts)


def _serve_pieces(
    manager: ContinuousBatchingManager, transcripts: Sequence[_Transcript], progress: tqdm | None
) -> list[RequestResult]:
    """Submit each transcript's pieces to the running `manager` as they fall due (arrival, then
    each tool's return) until every request has ended; results in transcript order."""
    due = [(t.submit_at, i) for i, t in enumerate(transcripts)]
    heapq.heapify(due)
    active = 0
    results: dict[int, RequestResult] = {}
    while len(results) < len(transcripts):
        now = time.perf_counter()
        while due and due[0][0] <= now:
            _, i = heapq.heappop(due)
            t = transcripts[i]
            manager.add_request(t.context, request_id=f"{i}.{t.piece}", max_new_tokens=t.next_length(),
                                record_timestamps=True, eos_token_id=-1)
            active += 1
        timeout = POLL_S if not due else min(POLL_S, max(0.0, due[0][0] - time.perf_counter()))
        out = manager.get_result(timeout=timeout) if active else None
        if out is None:
            if not active:
                time.sleep(timeout)
            if active and not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped unexpectedly")
            continue
        active -= 1
        i = int(out.request_id.split(".")[0])
        t = transcripts[i]
        if out.error is not None:
            results[i] = t.result("error", str(out.error))
        elif t.record(list(out.generated_tokens), list(out.timestamps)):
            heapq.heappush(due, (t.submit_at, i))
            continue
        else:
            results[i] = t.result()
        if progress is not None:
            progress.update(1)
    return [results[i] for i in sorted(results)]


class _Stamps(BaseStreamer):
    """Times each generated token as `generate` streams it (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _generate_pieces(model: torch.nn.Module, t: _Transcript) -> None:
    """One request, a `generate` per piece, each started when it falls due (arrival, then each tool's return)."""
    while True:
        time.sleep(max(0.0, t.submit_at - time.perf_counter()))
        ids = torch.tensor([t.context], device=model.device)
        n = t.next_length()
        stamps = _Stamps()
        # greedy, exactly n tokens: min_new_tokens keeps EOS out, as the engine's runs disable it
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0, streamer=stamps)
        if not t.record(out[0, ids.shape[1]:].tolist(), stamps.times):
            return


@torch.inference_mode()
def run_hf_generate(
    model: torch.nn.Module, jobs: Sequence[Job], progress: tqdm | None = None
) -> tuple[list[RequestResult], float, float, dict[str, Any]]:
    """Replay `jobs` one at a time with `model.generate`, sleeping through every tool call."""
    with _TokenCounter(model) as counter:
        t0 = time.perf_counter()
        transcripts = [_Transcript(job, t0 + job.request.arrival_s) for job in jobs]
        for t in transcripts:
            _generate_pieces(model, t)
            if progress is not None:
                progress.update(1)
        duration = time.perf_counter() - t0
    return [t.result() for t in transcripts], t0, duration, counter.stats(transcripts)
