"""Paper-scale setups for the simulator: the INFERCEPT paper's models on A100-class GPUs.

Model configs are written out (not fetched: the hub is not reachable) from each model's
published `config.json`; the simulator builds them on the meta device, so nothing is
allocated. GPU figures are datasheet peaks; `Efficiency` turns them into what a serving
engine achieves, and is the one set of judgement calls here (docs/BENCHMARK.md).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GPTJConfig, LlamaConfig, PretrainedConfig


GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    """One accelerator's datasheet peaks."""

    name: str
    memory_bytes: int
    fp16_flops: float  # dense tensor-core peak, FLOP/s
    hbm_bytes_per_s: float
    pcie_bytes_per_s: float  # host link, one direction
    nvlink_bytes_per_s: float  # GPU-to-GPU, one direction
    source: str


A100_80G = GPU(
    name="A100-SXM4-80GB",
    memory_bytes=80 * 10**9,
    fp16_flops=312e12,
    hbm_bytes_per_s=2.039e12,
    pcie_bytes_per_s=32e9,  # PCIe 4.0 x16: 64 GB/s both directions together
    nvlink_bytes_per_s=300e9,  # NVLink 3: 600 GB/s both directions together
    source="NVIDIA A100 Tensor Core GPU datasheet (80GB SXM column)",
)


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the peaks, and the per-iteration costs outside the kernels.

    compute 0.5 and HBM 0.8: typical of fp16 serving kernels on A100 (matmuls reach 60-70% of
    peak, attention and small batches less; streaming weights reaches 80-90% of bandwidth).
    PCIe 0.8: ~25 GB/s of the 32 GB/s peak, what pinned-memory copies measure on A100 hosts.
    `step_overhead_s`: the engine's Python scheduling and kernel launches per iteration
    (vLLM 0.2 spends a few ms there). `allreduce_latency_s`: one NCCL all-reduce's fixed cost.
    `memory_fraction`: of GPU memory the engine may use (vLLM's gpu_memory_utilization 0.9);
    activations and workspace come out of what the KV pool would otherwise get.
    """

    compute: float = 0.5
    hbm: float = 0.8
    pcie: float = 0.8
    nvlink: float = 0.7
    step_overhead_s: float = 0.003
    allreduce_latency_s: float = 10e-6
    memory_fraction: float = 0.9
    activation_bytes_per_gpu: int = 2 * GIB


@dataclass(frozen=True)
class Preset:
    """A model on `num_gpus` GPUs of one kind, tensor-parallel when more than one."""

    name: str
    make_config: Callable[[], PretrainedConfig]
    gpu: GPU
    num_gpus: int
    host_pool_bytes: int  # host memory for swapped KV, all GPUs together
    max_batch_tokens: int  # vLLM 0.2's max_num_batched_tokens: max(2560, max_model_len)
    config_source: str
    efficiency: Efficiency = Efficiency()

    @property
    def max_context(self) -> int:
        from ..model_spec import max_positions  # here: the presets are listed before torch is needed

        return int(max_positions(self.make_config()))


def gpt_j_6b() -> GPTJConfig:
    from transformers import GPTJConfig  # here, not above: `infercept-bench --help` must not load transformers

    return GPTJConfig(
        vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_inner=None,
        activation_function="gelu_new", tie_word_embeddings=False,
    )


def vicuna_13b() -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )


def llama_3_70b() -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False,
    )


PRESETS: dict[str, Preset] = {
    "gpt-j-6b/a100-80g": Preset(
        "gpt-j-6b/a100-80g", gpt_j_6b, A100_80G, 1, host_pool_bytes=128 * GIB, max_batch_tokens=2560,
        config_source="EleutherAI/gpt-j-6b config.json",
    ),
    "vicuna-13b/a100-80g": Preset(
        "vicuna-13b/a100-80g", vicuna_13b, A100_80G, 1, host_pool_bytes=128 * GIB, max_batch_tokens=4096,
        config_source="lmsys/vicuna-13b-v1.5 config.json",
    ),
    "llama-3-70b/8xa100-80g": Preset(
        "llama-3-70b/8xa100-80g", llama_3_70b, A100_80G, 8, host_pool_bytes=512 * GIB, max_batch_tokens=8192,
        config_source="meta-llama/Meta-Llama-3-70B config.json",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown simulator preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
