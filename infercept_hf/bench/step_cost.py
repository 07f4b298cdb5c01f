"""The host cost of one engine step as the number of paused requests grows (simulator).

    python -m infercept_hf.bench.step_cost [--paused 100,5000] [--decoding 32] [--steps 30]

A GPT-J-6B/A100 simulator engine (meta device: no memory, no kernels) holds `--decoding`
requests decoding and N requests paused at a tool that will not answer during the
measurement; before each timed step one more request arrives, decodes a few tokens and
pauses too, as in a server (so min-waste places a new paused request now and then). The
figure is the wall time of `engine.step()` itself (scheduling, policy, bookkeeping; the
virtual clock's forward costs nothing here), the median over `--steps` steps once every
request is in place. A step's cost should follow what changes in it, not
the number of requests standing still: the ratio column compares each N with the first.
The last lines put min-waste at `--host-full-paused` requests with a host pool that their
swapped KV nearly fills, where finding host room is the expensive part.
"""
from __future__ import annotations

import argparse
import statistics
import time

from ..scheduler import POLICIES
from ..tools import Scripted
from .presets import get_preset
from .simulator import BLOCK_SIZE, HardwareModel, meta_model, sim_engine

PRESET = "gpt-j-6b/a100-80g"
PROMPT = BLOCK_SIZE  # one block each: 5,000 paused requests fit the device pool under every policy
LONG_PAUSE_S = 1e9  # a tool that does not answer while the steps are timed
CHURN_TOKENS = 4  # what each request arriving during the timed steps decodes before it pauses


def step_seconds(policy: str, paused: int, decoding: int, steps: int, host_pool_bytes: int | None = None) -> float:
    """Median wall seconds of one `engine.step()` with `paused` requests paused and `decoding` decoding."""
    preset = get_preset(PRESET)
    model = meta_model(preset.make_config())
    hardware = HardwareModel.for_preset(model, preset)
    engine, _ = sim_engine(
        model, hardware, policy, num_blocks=hardware.kv_pool_blocks(BLOCK_SIZE),
        host_pool_bytes=preset.host_pool_bytes if host_pool_bytes is None else host_pool_bytes,
        max_batch_tokens=preset.max_batch_tokens,
    )
    try:
        call = Scripted([(1, LONG_PAUSE_S, [1])])
        for i in range(paused):
            engine.add_request([1 + i % 1000] * PROMPT, max_new_tokens=4, interceptions=call, eos_token_id=[])
        while engine.stats()["paused"] < paused:
            engine.step()
        for i in range(decoding):
            engine.add_request([2 + i] * PROMPT, max_new_tokens=1024, eos_token_id=[])  # outlasts the timed steps
        for _ in range(3 * decoding):  # every decoder past its prefill, the policy's moves settled
            engine.step()
        times = []
        churn = Scripted([(CHURN_TOKENS, LONG_PAUSE_S, [1])])
        for i in range(steps):
            engine.add_request([3 + i] * PROMPT, max_new_tokens=CHURN_TOKENS + 1, interceptions=churn, eos_token_id=[])
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m infercept_hf.bench.step_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paused", default="100,5000", help="paused request counts, comma-separated")
    p.add_argument("--decoding", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--host-full-paused", type=int, default=1000,
                   help="min-waste with a nearly full host pool at this many paused requests (0: skip)")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.paused.split(",")]
    print(f"{PRESET}, {args.decoding} decoding, median of {args.steps} steps (ms per step)")
    print(f"{'policy':>14} " + " ".join(f"{n:>9} paused" for n in counts) + "   ratio")
    for policy in args.policies.split(","):
        ms = [step_seconds(policy, n, args.decoding, args.steps) * 1e3 for n in counts]
        print(f"{policy:>14} " + " ".join(f"{m:>16.2f}" for m in ms) + f"   {ms[-1] / ms[0]:.1f}x", flush=True)
    if args.host_full_paused:
        n = args.host_full_paused
        preset = get_preset(PRESET)
        hardware = HardwareModel.for_preset(meta_model(preset.make_config()), preset)
        nearly_full = int(0.9 * n * PROMPT * hardware.kv_bytes_per_token)  # 90% of their KV fits on host
        roomy = step_seconds("min-waste", n, args.decoding, args.steps) * 1e3
        full = step_seconds("min-waste", n, args.decoding, args.steps, host_pool_bytes=nearly_full) * 1e3
        base = step_seconds("min-waste", counts[0], args.decoding, args.steps) * 1e3
        print(f"min-waste at {n} paused: host roomy {roomy:.2f} ms, host nearly full {full:.2f} ms "
              f"({full / base:.1f}x the {counts[0]}-paused step)")


if __name__ == "__main__":
    main()
