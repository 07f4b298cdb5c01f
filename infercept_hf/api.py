"""`generate()`: a drop-in for `model.generate` with tools, through transformers' own hook.

`generate(model, ids, tools=[...])` calls `model.generate(ids, custom_generate=custom_generate,
...)`, so transformers prepares the GenerationConfig, the logits processors (temperature,
top-k/p, penalties) and validates arguments as it always does; `custom_generate` then runs
every row as a request of an `InterceptEngine` and returns what `model.generate` returns:
prompt + generated ids (tool answers spliced in where they were appended), right-padded.

Every option `model.generate` honours is honoured the same way or refused by name. Rows run
independently, so each row's logits processors and stopping criteria see that row as
`model.generate` would: its left padding included, as a batch of one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import EosTokenCriteria, LogitsProcessorList, MaxLengthCriteria, StoppingCriteriaList

from .patches.generation import row_processors

from .engine import EventCallback, InterceptEngine
from .faults import describe
from .outputs import RequestEvent
from .policy import CostModel
from .sampling import Sampler
from .scheduler import check_policy
from .tools import Scripted, Tool

ANSWER_MARGIN_TOKENS = 256  # KV headroom per row for tool answers whose length is unknown in advance
# What transformers' generate() prepares for its own loop; the engine keeps its own cache and positions.
ENGINE_OWNED_KWARGS = frozenset({"attention_mask", "position_ids", "logits_to_keep", "past_key_values", "use_cache",
                                 "cache_position"})
# Stopping criteria the engine applies itself: max_new_tokens and eos_token_id, per request.
ENGINE_OWNED_CRITERIA = (MaxLengthCriteria, EosTokenCriteria)


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    tools: Sequence[Tool | Callable[..., Any]] | None = None,
    interceptions: Sequence[Scripted] | None = None,
    policy: str = "min-waste",
    tokenizer: Any = None,
    generation_config: Any = None,
    num_blocks: int | None = None,
    block_size: int | None = None,
    host_pool_bytes: int | None = None,
    response_template: dict | None = None,
    on_event: EventCallback | None = None,
    prefix_sharing: bool = True,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """Like `model.generate(input_ids, attention_mask=..., **kwargs)`, pausing rows at tool calls.

    `tools` apply to every row: `Tool`s, and plain functions the model calls in its chat format
    (read with the tokenizer's response template, or `response_template`). `interceptions` gives
    one `Scripted` per row instead. `on_event` hears every row's events (`request_id` = row).
    `prefix_sharing=False` computes every row's prompt itself instead of sharing full KV blocks
    of equal prefixes (the tokens are the same either way).
    Greedy float32 decoding returns exactly the tokens of a plain transformers loop that re-runs
    `model.generate` on the full context after each tool answer, under every policy.
    """
    check_policy(policy)
    if attention_mask is not None:
        generate_kwargs["attention_mask"] = attention_mask
    return model.generate(
        input_ids,
        generation_config=generation_config,
        custom_generate=custom_generate,
        tools=tools,
        interceptions=interceptions,
        policy=policy,
        tool_tokenizer=tokenizer,
        num_blocks=num_blocks,
        block_size=block_size,
        host_pool_bytes=host_pool_bytes,
        response_template=response_template,
        on_event=on_event,
        prefix_sharing=prefix_sharing,
        **generate_kwargs,
    )


def custom_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: Any = None,
    synced_gpus: bool = False,
    streamer: Any = None,
    tools: Sequence[Tool | Callable[..., Any]] | None = None,
    interceptions: Sequence[Scripted] | None = None,
    policy: str = "min-waste",
    tool_tokenizer: Any = None,
    num_blocks: int | None = None,
    block_size: int | None = None,
    host_pool_bytes: int | None = None,
    max_batch_tokens: int | None = None,
    cost_model: CostModel | None = None,
    attention_backend: str = "auto",
    response_template: dict | None = None,
    on_event: EventCallback | None = None,
    prefix_sharing: bool = True,
    **model_kwargs: Any,
) -> torch.LongTensor:
    """transformers' `custom_generate` entry: `model.generate(ids, custom_generate=custom_generate, tools=[...],
    tool_tokenizer=tok)`. (transformers keeps a plain `tokenizer=` kwarg for itself, hence the name.)"""
    check_policy(policy)
    if streamer is not None:
        raise ValueError("infercept_hf.generate does not support streamer= yet; use InterceptEngine for streaming")
    if synced_gpus:
        raise ValueError("infercept_hf.generate does not support synced_gpus=True (DeepSpeed ZeRO-3 / FSDP); "
                         "serve sharded models with infercept_hf.distributed.TensorParallelEngine")
    _check_model_kwargs(model_kwargs)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    batch = input_ids.shape[0]
    if interceptions is not None:
        interceptions = list(interceptions)
        if len(interceptions) != batch:
            raise ValueError(f"interceptions has {len(interceptions)} entries but the batch has {batch} rows")
    _check_supported(generation_config)
    mask = model_kwargs.get("attention_mask")
    prompts = _unpad_rows(input_ids, mask)
    cfg = generation_config
    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length - input_ids.shape[1]
    eos = _as_list(cfg.eos_token_id)
    pad = _as_list(cfg.pad_token_id)
    pad_id = pad[0] if pad else (eos[0] if eos else 0)
    processors = logits_processor if logits_processor is not None and len(logits_processor) else None
    stops = [c for c in (stopping_criteria or ()) if not isinstance(c, ENGINE_OWNED_CRITERIA)]
    answers = [sum(len(s.answer_ids) for s in x.segments) for x in interceptions] if interceptions else [0] * batch
    if num_blocks is None:
        bs = block_size or 16
        margin = ANSWER_MARGIN_TOKENS if tools else 0
        num_blocks = sum(-(-(len(p) + max_new + a + margin) // bs) for p, a in zip(prompts, answers))
    engine = InterceptEngine(
        model,
        tokenizer=tool_tokenizer,
        policy=policy,
        num_blocks=num_blocks,
        block_size=block_size,
        host_pool_bytes=host_pool_bytes,
        max_batch_tokens=max_batch_tokens or 256,
        cost_model=cost_model,
        attention_backend=attention_backend,
        prefix_sharing=prefix_sharing,
    )
    try:
        ids = []
        stop_checks = []
        for i, prompt in enumerate(prompts):
            padding = input_ids[i, : input_ids.shape[1] - len(prompt)].tolist()
            sampler = None
            if processors or cfg.do_sample:
                row = _PaddedRow(LogitsProcessorList(row_processors(processors, i)), padding) if processors else None
                sampler = Sampler(row, do_sample=bool(cfg.do_sample))
            check = _RowStops(engine, StoppingCriteriaList(stops), padding + prompt) if stops else None
            ids.append(
                engine.add_request(
                    prompt,
                    max_new_tokens=max_new,
                    tools=tools,
                    interceptions=interceptions[i] if interceptions else None,
                    sampler=sampler,
                    eos_token_id=eos,
                    on_event=_listeners(check, on_event),
                    response_template=response_template,
                )
            )
            stop_checks.append(check)
        results = engine.run()
    finally:
        engine.close()
    for check in stop_checks:
        if check is not None and check.error is not None:
            raise RuntimeError(f"a stopping criterion raised {describe(check.error)}") from check.error
    # A row a tool failed ends where it failed (the tool's on_error); any other failure (a logits
    # processor raising, NaN scores) raises, as it would from model.generate.
    failed = [r for r in results.values() if r.finish_reason == "error"
              and not (r.interceptions and r.interceptions[-1].error == r.error)]
    if failed:
        raise RuntimeError(f"generation failed for {len(failed)} row(s): {failed[0].error}")
    rows = [input_ids[i].tolist() + results[rid].token_ids for i, rid in enumerate(ids)]
    width = max(len(r) for r in rows)
    out = torch.full((batch, width), pad_id, dtype=torch.long, device=input_ids.device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _listeners(*callbacks: EventCallback | None) -> EventCallback | None:
    """One `on_event` for the engine that tells every given listener, in order."""
    given = [c for c in callbacks if c is not None]
    if len(given) <= 1:
        return given[0] if given else None

    def hear(event: RequestEvent) -> None:
        for callback in given:
            callback(event)

    return hear


class _PaddedRow:
    """A row's processors, fed the row as `model.generate` holds it: its left padding first (a
    length-based processor, `min_new_tokens` say, counts it; the repetition penalty masks it)."""

    def __init__(self, processors: LogitsProcessorList, padding: list[int]) -> None:
        self.processors = processors
        self.padding = padding

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.padding:
            ids = torch.cat([torch.tensor([self.padding], dtype=ids.dtype, device=ids.device), ids], dim=1)
        return self.processors(ids, scores)


class _RowStops:
    """`stopping_criteria` checked on one row after each of its tokens, as `model.generate`
    checks them on the batch; the row stops where they say. Criteria get `scores=None`
    (a criterion that needs the scores raises, and generate() reports it)."""

    def __init__(self, engine: InterceptEngine, criteria: StoppingCriteriaList, row: list[int]) -> None:
        self.engine = engine
        self.criteria = criteria
        self.row = list(row)
        self.error: Exception | None = None

    def __call__(self, event: RequestEvent) -> None:
        self.row.extend(event.token_ids)
        if event.kind != "token" or self.error is not None:
            return
        try:
            stop = bool(self.criteria(torch.tensor([self.row]), None).any())
        except Exception as exc:  # noqa: BLE001 - reported once run() returns
            self.error, stop = exc, True
        if stop:
            self.engine.cancel(event.request_id)


def _check_model_kwargs(model_kwargs: dict[str, Any]) -> None:
    """Refuse model inputs the engine would silently drop (it feeds the model token ids only)."""
    unknown = sorted(k for k, v in model_kwargs.items()
                     if k not in ENGINE_OWNED_KWARGS and v is not None and not (isinstance(v, dict) and not v))
    if unknown:
        raise ValueError(f"infercept_hf.generate does not support these generate() arguments: {unknown}")
    cache = model_kwargs.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("infercept_hf.generate does not support a pre-filled past_key_values: the engine keeps its "
                         "own paged cache; pass the full context as input_ids")


def _check_supported(cfg: Any) -> None:
    """Refuse generation options the engine would otherwise silently ignore."""
    if cfg.guidance_scale is not None and cfg.guidance_scale != 1:
        raise ValueError("guidance_scale (classifier-free guidance) is not supported by infercept_hf.generate")
    if cfg.penalty_alpha is not None and (cfg.top_k or 0) > 1:
        raise ValueError("penalty_alpha (contrastive search) is not supported by infercept_hf.generate")
    if cfg.dola_layers is not None:
        raise ValueError("dola_layers (DoLa decoding) is not supported by infercept_hf.generate")
    if (cfg.num_beams or 1) > 1:
        raise ValueError("infercept_hf.generate supports greedy and sampling, not beam search (num_beams > 1)")
    if (cfg.num_return_sequences or 1) > 1:
        raise ValueError("num_return_sequences > 1 is not supported: repeat the prompt rows instead")
    if cfg.return_dict_in_generate:
        raise ValueError("return_dict_in_generate=True is not supported: generate() returns the token ids tensor")


def _unpad_rows(input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    if mask is None:
        return [row.tolist() for row in input_ids]
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    rows = []
    for i in range(input_ids.shape[0]):
        keep = mask[i].bool()
        n = int(keep.sum())
        if n == 0:
            raise ValueError(f"row {i} of attention_mask is all zeros: an empty prompt")
        if not bool(keep[-n:].all()):
            raise ValueError("attention_mask must describe left padding (zeros only before the prompt)")
        rows.append(input_ids[i, -n:].tolist())
    return rows


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
