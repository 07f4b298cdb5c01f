"""Kernel benchmark: `python -m infercept_hf.kernels.bench` (CUDA only).

Decode attention and KV copies are memory bound, so each line reports the bytes they must
move over the time they took, and that rate as a fraction of what a plain device-to-device
memcpy reaches on this GPU. Swaps cross the host link, so they are compared with a plain
pinned host<->device copy instead. Prefill is compute bound: it also reports TFLOP/s.
"""
from __future__ import annotations

import sys

import torch

PAGE = 32  # transformers' default page size
DTYPE = torch.float16
MIB = 1 << 20


def _ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50)


def copy_bandwidth(nbytes: int = 512 * MIB) -> float:
    """Device memcpy rate in GB/s, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / _ms(lambda: dst.copy_(src)) / 1e6


def host_link(nbytes: int = 256 * MIB) -> tuple[float, float]:
    """Pinned host->device and device->host rates in GB/s."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = nbytes / _ms(lambda: dev.copy_(host, non_blocking=True)) / 1e6
    d2h = nbytes / _ms(lambda: host.copy_(dev, non_blocking=True)) / 1e6
    return h2d, d2h


def paged_inputs(batch: int, ctx: int, kv_heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random pages for `batch` sequences of `ctx` tokens, scattered in a shuffled order."""
    pages_per_seq = -(-ctx // PAGE)
    num_pages = batch * pages_per_seq
    k_pages = torch.randn(num_pages, PAGE, kv_heads, dim, dtype=DTYPE, device="cuda")
    v_pages = torch.randn_like(k_pages)
    table = torch.randperm(num_pages, device="cuda").to(torch.int32).view(batch, pages_per_seq)
    return k_pages, v_pages, table


def row(kernel: str, shape: str, ms: float, nbytes: float, reference_gbs: float, extra: str = "") -> None:
    """One line: time, bytes moved per second, and that rate over the reference copy's."""
    gbs = nbytes / ms / 1e6
    print(f"{kernel:<9} {shape:<40} {ms * 1e3:>9.1f} {gbs:>8.0f} {gbs / reference_gbs:>7.0%}  {extra}")


def bench_decode(copy_gbs: float) -> None:
    from . import paged_decode_attention

    for batch, heads, kv_heads, dim, ctx in [(64, 32, 8, 128, 1024), (32, 32, 8, 128, 4096), (4, 32, 8, 128, 32768),
                                             (16, 32, 32, 128, 2048), (16, 16, 2, 256, 8192), (32, 32, 8, 80, 2048)]:
        k_pages, v_pages, table = paged_inputs(batch, ctx, kv_heads, dim)
        q = torch.randn(batch, heads, dim, dtype=DTYPE, device="cuda")
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        ms = _ms(lambda: paged_decode_attention(q, k_pages, v_pages, table, lens, dim**-0.5, backend="triton"))
        nbytes = 2 * batch * ctx * kv_heads * dim * DTYPE.itemsize + 2 * q.nbytes
        row("decode", f"B={batch} H={heads}/{kv_heads} D={dim} ctx={ctx}", ms, nbytes, copy_gbs)


def bench_prefill(copy_gbs: float) -> None:
    from . import paged_prefill_attention

    for batch, heads, kv_heads, dim, q_len, ctx in [(4, 32, 8, 128, 512, 2048), (1, 32, 8, 128, 4096, 4096),
                                                    (8, 32, 8, 128, 128, 8192)]:
        k_pages, v_pages, table = paged_inputs(batch, ctx, kv_heads, dim)
        q = torch.randn(batch * q_len, heads, dim, dtype=DTYPE, device="cuda")
        cu = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * q_len
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        ms = _ms(lambda: paged_prefill_attention(q, k_pages, v_pages, table, cu, lens, dim**-0.5, q_len,
                                                 backend="triton"))
        visible = q_len * (ctx - q_len) + q_len * (q_len + 1) / 2  # key reads per query head, causal
        flops = 4 * batch * heads * dim * visible
        nbytes = 2 * batch * ctx * kv_heads * dim * DTYPE.itemsize + 2 * q.nbytes
        shape = f"B={batch} H={heads}/{kv_heads} D={dim} q={q_len} ctx={ctx}"
        row("prefill", shape, ms, nbytes, copy_gbs, f"{flops / ms / 1e9:.0f} TFLOP/s")


def bench_write(copy_gbs: float) -> None:
    from . import write_kv

    for tokens, kv_heads, dim in [(1, 8, 128), (256, 8, 128), (8192, 8, 128)]:
        k_pages, v_pages, _ = paged_inputs(1, 65536, kv_heads, dim)
        k_new = torch.randn(tokens, kv_heads, dim, dtype=DTYPE, device="cuda")
        v_new = torch.randn_like(k_new)
        slots = torch.randperm(k_pages.shape[0] * PAGE, device="cuda")[:tokens]
        ms = _ms(lambda: write_kv(k_new, v_new, k_pages, v_pages, slots, backend="triton"))
        row("write_kv", f"T={tokens} H={kv_heads} D={dim}", ms, 4 * k_new.nbytes, copy_gbs)


def bench_blocks(copy_gbs: float, h2d: float, d2h: float) -> None:
    """Block gather/scatter on the device, then whole swaps through a pinned host buffer."""
    from . import gather_blocks, scatter_blocks

    layers, kv_heads, dim = 32, 8, 128
    block_bytes = layers * 2 * PAGE * kv_heads * dim * DTYPE.itemsize
    num_blocks, moved = 4096 * MIB // block_bytes, 256
    copy_view = torch.empty(num_blocks, block_bytes, dtype=torch.uint8, device="cuda")
    ids = torch.randperm(num_blocks, device="cuda")[:moved]
    shape = f"{moved} blocks x {block_bytes // 1024} KiB"
    staging = torch.empty(moved, block_bytes, dtype=torch.uint8, device="cuda")
    layer_staging = torch.empty(moved, block_bytes // layers, dtype=torch.uint8, device="cuda")
    host = torch.empty(staging.shape, dtype=torch.uint8, pin_memory=True)

    ms = _ms(lambda: gather_blocks(copy_view, ids, staging, backend="triton"))
    row("gather", shape, ms, 2 * staging.nbytes, copy_gbs)
    ms = _ms(lambda: scatter_blocks(staging, copy_view, ids, backend="triton"))
    row("scatter", shape, ms, 2 * staging.nbytes, copy_gbs)
    ms = _ms(lambda: gather_blocks(copy_view, ids, layer_staging, layer=7, num_layers=layers, backend="triton"))
    row("gather/L", f"{shape}, 1 of {layers} layers", ms, 2 * layer_staging.nbytes, copy_gbs)

    def swap_out() -> None:
        gather_blocks(copy_view, ids, staging, backend="triton")
        host.copy_(staging, non_blocking=True)

    def swap_in() -> None:
        staging.copy_(host, non_blocking=True)
        scatter_blocks(staging, copy_view, ids, backend="triton")

    row("swap-out", shape, _ms(swap_out), host.nbytes, d2h, "(of the D2H link)")
    row("swap-in", shape, _ms(swap_in), host.nbytes, h2d, "(of the H2D link)")


def main() -> int:
    if not torch.cuda.is_available():
        print("infercept_hf.kernels.bench: no CUDA device here; the Triton kernels are benchmarked on GPUs only.")
        return 0
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth()
    h2d, d2h = host_link()
    print(f"{torch.cuda.get_device_name()}: device copy {copy_gbs:.0f} GB/s, host link H2D {h2d:.1f} / "
          f"D2H {d2h:.1f} GB/s, {DTYPE}, page size {PAGE}")
    print(f"{'kernel':<9} {'shape':<40} {'time_us':>9} {'GB/s':>8} {'of_copy':>7}")
    bench_decode(copy_gbs)
    bench_prefill(copy_gbs)
    bench_write(copy_gbs)
    bench_blocks(copy_gbs, h2d, d2h)
    return 0


if __name__ == "__main__":
    sys.exit(main())
