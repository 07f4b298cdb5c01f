"""`generate()`: a drop-in for `model.generate` with tools, through transformers' own hook.

`generate(model, ids, tools=[...])` calls `model.generate(ids, custom_generate=custom_generate,
...)`, so transformers prepares the GenerationConfig, the logits processors (temperature,
top-k/p, penalties) and validates arguments as it always does; `custom_generate` then runs
every row as a request of an `InterceptEngine` and returns what `model.generate` returns:
prompt + generated ids (tool answers spliced in where they were appended), right-padded.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .engine import EventCallback, InterceptEngine
from .policy import CostModel
from .sampling import Sampler
from .scheduler import check_policy
from .tools import Scripted, Tool

ANSWER_MARGIN_TOKENS = 256  # KV headroom per row for tool answers whose length is unknown in advance


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
    **generate_kwargs: Any,
) -> torch.Tensor:
    """Like `model.generate(input_ids, attention_mask=..., **kwargs)`, pausing rows at tool calls.

    `tools` apply to every row: `Tool`s, and plain functions the model calls in its chat format
    (read with the tokenizer's response template, or `response_template`). `interceptions` gives
    one `Scripted` per row instead. `on_event` hears every row's events (`request_id` = row).
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
    **model_kwargs: Any,
) -> torch.LongTensor:
    """transformers' `custom_generate` entry: `model.generate(ids, custom_generate=custom_generate, tools=[...],
    tool_tokenizer=tok)`. (transformers keeps a plain `tokenizer=` kwarg for itself, hence the name.)"""
    check_policy(policy)
    if streamer is not None:
        raise ValueError("infercept_hf.generate does not support streamer= yet; use InterceptEngine for streaming")
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
    )
    try:
        ids = []
        for i, prompt in enumerate(prompts):
            sampler = Sampler(processors, do_sample=bool(cfg.do_sample)) if (processors or cfg.do_sample) else None
            ids.append(
                engine.add_request(
                    prompt,
                    max_new_tokens=max_new,
                    tools=tools,
                    interceptions=interceptions[i] if interceptions else None,
                    sampler=sampler,
                    eos_token_id=eos,
                    on_event=on_event,
                    response_template=response_template,
                )
            )
        results = engine.run()
    finally:
        engine.close()
    rows = [input_ids[i].tolist() + results[rid].token_ids for i, rid in enumerate(ids)]
    width = max(len(r) for r in rows)
    out = torch.full((batch, width), pad_id, dtype=torch.long, device=input_ids.device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _check_supported(cfg: Any) -> None:
    """Refuse generation options the engine would otherwise silently ignore."""
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
