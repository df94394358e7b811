"""Layer spec choice, in one place.

* `transformer_impl: transformer_engine` or `attention_backend: te` (opt-in, experimental): megatron-core's TE
  spec.
* otherwise megatron-core's local modules (multi-latent attention where the config asks for it: megatron's
  MLASelfAttention with local linears), with our pieces: `SDPAttention` (torch SDPA) as core attention
  (`attention_backend: local` keeps megatron's DotProductAttention), `FusedRMSNorm` (torch's fused kernel
  on GPU, Hugging Face's exact arithmetic elsewhere; works under sequence parallelism) and `TorchGroupedMLP`
  experts (one grouped GEMM for all local experts), both from `llamafactory_mca.kernels`.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from llamafactory_mca.models.attention import SDPAttention
from llamafactory_mca.kernels.experts import TorchGroupedMLP
from llamafactory_mca.kernels.norm import FusedRMSNorm
from llamafactory_mca.platform import te_available


class _LocalProvider(LocalSpecProvider):
    def __init__(self, attention: type, experts_grouped: bool):
        self._attention = attention
        self._experts_grouped = experts_grouped

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        if rms_norm:
            return FusedRMSNorm
        return super().layer_norm(rms_norm=rms_norm, for_qk=for_qk)

    def core_attention(self) -> type:
        return self._attention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
        if moe_use_grouped_gemm and self._experts_grouped:
            return TorchGroupedMLP, None
        return super().grouped_mlp_modules(False, False)


def use_transformer_engine(mca_args) -> bool:
    """The Transformer Engine layer spec only when asked for (`transformer_impl: transformer_engine` or
    `attention_backend: te`): experimental, never run by our tests; `auto` stays on the tested local path even
    where TE imports (NGC containers ship it)."""
    impl = getattr(mca_args, "transformer_impl", "auto")
    if impl == "local":
        return False
    asked = impl == "transformer_engine" or getattr(mca_args, "attention_backend", "auto") == "te"
    if asked and not te_available():
        key = "transformer_impl" if impl == "transformer_engine" else "attention_backend"
        raise ValueError(
            f"`{key}`: '{getattr(mca_args, key)}' but transformer_engine does not import. "
            f"Fix: install transformer_engine, or set {key}: auto"
        )
    return asked


def layer_spec(config: TransformerConfig, mca_args, qk_layernorm: bool = False,
               num_experts: Optional[int] = -1) -> ModuleSpec:
    """The transformer layer spec for `config` (dense or MoE); `num_experts=None` gives the dense layer of a MoE
    model (default: `config.num_moe_experts`)."""
    if num_experts == -1:
        num_experts = config.num_moe_experts
    if use_transformer_engine(mca_args):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=qk_layernorm,
            multi_latent_attention=config.multi_latent_attention,
        )
    attention = DotProductAttention if getattr(mca_args, "attention_backend", "auto") == "local" else SDPAttention
    provider = _LocalProvider(attention, experts_grouped=True)
    # build the local spec with megatron's helper, then swap in our provider's modules
    import megatron.core.models.gpt.gpt_layer_specs as specs

    orig = specs.LocalSpecProvider
    specs.LocalSpecProvider = lambda: provider
    try:
        spec = get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=qk_layernorm,
            multi_latent_attention=config.multi_latent_attention,
            normalization=config.normalization,
        )
    finally:
        specs.LocalSpecProvider = orig
    return spec


__all__ = ["FusedRMSNorm", "SDPAttention", "TorchGroupedMLP", "layer_spec", "block_spec", "use_transformer_engine"]


def block_spec(config: TransformerConfig, mca_args, qk_layernorm: bool = False, vp_stage: Optional[int] = None):
    """What GPTModel takes as `transformer_layer_spec` for one pipeline chunk.

    Local modules: an explicit block spec, so that the final norm is our FusedRMSNorm as well (megatron's
    fallback WrappedTorchNorm refuses sequence parallelism).
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    pattern = moe_layer_pattern(config)
    spec = layer_spec(config, mca_args, qk_layernorm=qk_layernorm)
    if use_transformer_engine(mca_args) and all(pattern):
        return spec
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    specs = [spec] * num_layers
    if not all(pattern):
        specs = chunk_layer_specs(config, pattern, spec, layer_spec(config, mca_args, qk_layernorm, None), vp_stage)
    norm = FusedRMSNorm
    if use_transformer_engine(mca_args):
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm)


def moe_layer_pattern(config: TransformerConfig) -> list[int]:
    """1 (MoE) or 0 (dense) per decoder layer, from `config.moe_layer_freq` as megatron reads it (an int N: every
    N-th layer from the first; a list: one flag per layer); all 1 for a dense model (one spec for every layer)."""
    freq = config.moe_layer_freq
    if not config.num_moe_experts:
        return [1] * config.num_layers
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    if len(freq) != config.num_layers:
        raise ValueError(f"moe_layer_freq has {len(freq)} entries for {config.num_layers} layers")
    return [int(f) for f in freq]


def chunk_layer_specs(config: TransformerConfig, pattern: list[int], moe_spec: ModuleSpec, dense_spec: ModuleSpec,
                      vp_stage: Optional[int]) -> list:
    """The layer specs of one pipeline chunk's layers (`vp_stage`) of a model mixing MoE and dense layers."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return [moe_spec if flag else dense_spec for flag in pattern[offset: offset + count]]
