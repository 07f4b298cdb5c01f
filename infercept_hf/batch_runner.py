"""One forward pass over the paged cache: many requests' chunks packed into one row.

Each chunk is `length` tokens of one request starting at position `start` (its cached
length): a decode step is a chunk of 1, a prompt, a resumed answer or a recompute is a
longer one. Chunks are packed into `input_ids [1, T]`; the model reads and writes the paged
cache through `PagedKVView` and attends under a block-diagonal causal mask, so sequences
never see each other.
"""
from __future__ import annotations

import inspect

import torch

from .patches.paged_pool import extend_indices, page_table, seqlen_k
from .patches.sdpa_gqa import grouped_query_attention
from .patches.transformers_cb import (
    SLIDING_ATTENTION,
    PagedKVView,
    UnsupportedModelError,
    attention_implementation,
    build_packed_mask,
    register_kernel_attention,
    routes_attention_through_interface,
)

from .cache import InterceptPagedCache
from .request import Chunk

ATTENTION_BACKENDS = ("auto", "torch", "triton")


def resolve_attention_backend(name: str, model: torch.nn.Module, cache: InterceptPagedCache) -> str:
    """`auto`: Triton's paged kernels on CUDA where the model allows them, else the torch path.

    The kernels read keys and values straight from the pages, so they need a model whose
    attention goes through transformers' AttentionInterface and full-attention layers only;
    the torch path (the model's own attention over gathered K/V) runs everything else.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}; choose one of {ATTENTION_BACKENDS}")
    fits_kernels = routes_attention_through_interface(model) and cache.full_attention_only
    if name == "auto":
        from .kernels import triton_available

        return "triton" if model.device.type == "cuda" and fits_kernels and triton_available(model.device) else "torch"
    if name == "triton" and not fits_kernels:
        raise UnsupportedModelError(
            f"attention_backend='triton' needs full-attention layers and attention through transformers' "
            f"AttentionInterface; {type(model).__name__} has neither or not both: use attention_backend='torch'"
        )
    return name


def _kernel_attention(module, query, key, value, attention_mask, **kwargs):
    """The paged kernels, noting which layers reached them (a bypassing model must not pass silently)."""
    from .kernels.attention import infercept_paged_attention

    kwargs["infercept_calls"].add(module.layer_idx)
    return infercept_paged_attention(module, query, key, value, attention_mask, **kwargs)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: InterceptPagedCache, attention_backend: str = "auto") -> None:
        self.model = model
        self.cache = cache
        self.backend = resolve_attention_backend(attention_backend, model, cache)
        if self.backend == "triton":
            self.kernel_name = register_kernel_attention(_kernel_attention)
        spec = cache.spec
        self.device = spec.device
        self.mask_dtype = spec.mask_dtype
        self.sliding_window = spec.sliding_window or 1
        self.num_layers = spec.num_layers
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._checked = False

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run the chunks; return float32 logits [n, vocab] for the chunks that yield a token."""
        cache = self.cache
        ids: list[int] = []
        pos: list[int] = []
        cu_q = [0]
        cu_k = {name: [0] for name in cache.allocators}
        read: list[list[int]] = [[] for _ in cache.allocators]
        write: list[list[int]] = [[] for _ in cache.allocators]
        keep: list[int] = []
        for c in chunks:
            req = c.request
            ids.extend(req.tokens[c.start : c.start + c.length])
            pos.extend(range(c.start, c.start + c.length))
            cu_q.append(cu_q[-1] + c.length)
            for name, alloc in cache.allocators.items():
                cu_k[name].append(cu_k[name][-1] + seqlen_k(alloc, c.start, c.length))
            extend_indices(cache, req.rid, c.start, c.length, read, write)
            if c.yields_token:
                keep.append(cu_q[-1] - 1)
        dev = self.device
        masks = {
            name: build_packed_mask(
                cu_q, k, self.sliding_window if name == SLIDING_ATTENTION else 1, self.mask_dtype, dev
            )
            for name, k in cu_k.items()
        }
        paged_kwargs = {
            "read_index": [torch.tensor(r, dtype=torch.long, device=dev) for r in read],
            "write_index": [torch.tensor(w, dtype=torch.long, device=dev) for w in write],
            "cu_seq_lens_k": {n: torch.tensor(k, dtype=torch.int32, device=dev) for n, k in cu_k.items()},
            "max_length_k": {n: max(b - a for a, b in zip(k, k[1:])) for n, k in cu_k.items()},
        }
        kernels = self.backend == "triton"
        view = PagedKVView(cache, paged_kwargs, write=not kernels)
        extra = {}
        if self.takes_logits_to_keep:
            extra["logits_to_keep"] = torch.tensor(keep, dtype=torch.long, device=dev)
        if kernels:
            extra.update(self._kernel_kwargs(chunks, cu_q, paged_kwargs["write_index"]))
        with attention_implementation(self.model, self.kernel_name) if kernels else grouped_query_attention():
            out = self.model(
                input_ids=torch.tensor([ids], dtype=torch.long, device=dev),
                position_ids=torch.tensor([pos], dtype=torch.long, device=dev),
                attention_mask=masks if len(masks) > 1 else next(iter(masks.values())),
                past_key_values=view,
                use_cache=True,
                **extra,
            )
        if kernels and len(extra["infercept_calls"]) != len(view.updated_layers):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: some layers bypassed the paged-kernel attention; use attention_backend='torch'"
            )
        if not self._checked:
            self._check_routing(view)
        logits = out.logits[0]
        if not self.takes_logits_to_keep:
            logits = logits[keep]
        return logits.float()

    def _kernel_kwargs(self, chunks: list[Chunk], cu_q: list[int], write_index: list[torch.Tensor]) -> dict:
        """What the paged kernels read: page tables and cached lengths per sequence."""
        dev = self.device
        tables = [page_table(self.cache, c.request.rid, 0) for c in chunks]
        width = max(len(t) for t in tables)
        block_table = [t + [0] * (width - len(t)) for t in tables]  # padded rows: one tensor, one copy
        return {
            "cache": self.cache,
            "write_index": write_index,
            "cu_seq_lens_q": torch.tensor(cu_q, dtype=torch.int32, device=dev),
            "max_length_q": max(c.length for c in chunks),
            "infercept_block_table": torch.tensor(block_table, dtype=torch.int32, device=dev),
            "infercept_seq_lens_k": torch.tensor([c.start + c.length for c in chunks], dtype=torch.int32, device=dev),
            "infercept_backend": "triton",
            "infercept_calls": set(),
        }

    def _check_routing(self, view: PagedKVView) -> None:
        """Refuse models that never wrote through `past_key_values`: their tokens would be wrong."""
        num_layers = self.num_layers
        if len(view.updated_layers) != num_layers:
            arch = type(self.model).__name__
            raise UnsupportedModelError(
                f"{arch} is not supported by infercept_hf: only {len(view.updated_layers)} of its {num_layers} "
                "layers wrote their keys/values through `past_key_values.update`, so the paged cache would be "
                "bypassed and the tokens would be wrong"
            )
        self._checked = True
