"""How the token losses of one optimizer step are weighted: the one place that decides it.

The Hugging Face Trainer (transformers 5.6, `Trainer.training_step` / `compute_loss`) weights the loss of a global
batch in one of two ways, depending on its `model_accepts_loss_kwargs`:

- `token` (True): the Trainer counts the label tokens of the whole global batch (`num_items_in_batch`, gathered over
  data-parallel ranks with `average_tokens_across_devices`) and every label token weighs the same.
- `micro_batch` (False): each micro-batch's loss is its own token mean, divided by the accumulation steps; DDP then
  averages over data-parallel ranks. A token of a short micro-batch weighs more than one of a long micro-batch, so
  the curve depends on how the global batch is split (batch 1 x 4 differs from 2 x 2).

Who sets it on LLaMA-Factory's HF path (0.9.5):
- the Trainer, from the model class (`Trainer.__init__`): the class attribute `accepts_loss_kwargs` where it exists
  (False for Qwen2.5-VL, Qwen3-VL ...), else whether `forward` takes `**kwargs` (True for the text families and for
  Qwen2-VL);
- then LLaMA-Factory's own trainers override it: `CustomTrainer` (pt) and `CustomSeq2SeqTrainer` (sft) set it to
  False whenever a processor was loaded, i.e. for every multimodal model ("avoid wrong loss under gradient
  accumulation"), and the dpo / kto / rm trainers always set it to False.
So on the HF path text models are token-weighted and every vision-language model is micro-batch-weighted (Qwen2-VL
too, although its class would accept the kwargs: this was the ~8e-6 first-step offset of our Qwen2-VL tests).

`loss_weighting: auto` follows that rule, so the two backends' curves lie on top of each other.
Users may also ask for one explicitly, or for `sample` (every sample of the global batch weighs the same: the mean
over samples of each sample's token mean; ms-swift users know it as sample-level loss).

The weights are applied on the host, to the micro-batch's `loss_mask`, before the sequence is padded, packed or
split for context parallelism: each token's weight travels with the token. megatron-core runs in per-token-loss
mode and divides the summed, weighted loss by the sum of `loss_denominator` over all micro-batches and
data-parallel ranks, which gives each weighting exactly:

| weighting | token weight | loss_denominator of a micro-batch |
|---|---|---|
| token | 1 | its label tokens (HF's `num_items_in_batch` counts labels before the shift) |
| micro_batch | 1 / its predicted tokens | 1 (0 for a filler micro-batch that carries no sample) |
| sample | 1 / the sample's predicted tokens | its samples that have a predicted token |

A "sample" is a row of the micro-batch, or, with `neat_packing`, each packed sample (its segment). With plain
`packing` the samples of a block are not separable: a packed block counts as one sample.

The preference stages dpo and rm compute one loss per pair: `micro_batch` (the mean over the micro-batch's pairs,
as the HF path) or `sample` (every pair of the global batch weighs the same); `token` has no meaning there. kto's
loss mixes per-sample terms with a per-micro-batch KL estimate and ftx rescaling: `micro_batch` only.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # torch is imported where tensors are made: args.py imports this module without torch
    import torch

LOSS_WEIGHTINGS = ("auto", "token", "micro_batch", "sample")
PAIRWISE_STAGES = ("dpo", "rm", "kto")
MICRO_BATCH_ONLY_STAGES = ("kto",)


def check_loss_weighting(weighting: str, stage: Optional[str]) -> None:
    """Raise McaArgumentError naming `loss_weighting` and the fix for a value the stage cannot use."""
    from llamafactory_mca.args import McaArgumentError

    if weighting not in LOSS_WEIGHTINGS:
        raise McaArgumentError(f"loss_weighting: {weighting!r} is not one of {', '.join(LOSS_WEIGHTINGS)}. "
                         "Fix: set loss_weighting to auto (the Hugging Face Trainer's rule), token, micro_batch or "
                         "sample.")
    if stage in PAIRWISE_STAGES and weighting == "token":
        raise McaArgumentError(f"loss_weighting: token has no meaning for stage {stage} (its loss is one value per pair). "
                         "Fix: set loss_weighting to auto or micro_batch (the HF path's weighting) or sample.")
    if stage in MICRO_BATCH_ONLY_STAGES and weighting not in ("auto", "micro_batch"):
        raise McaArgumentError(f"loss_weighting: {weighting} is not implemented for stage {stage} (its loss is one "
                               "value per micro-batch, as on the HF path). Fix: set loss_weighting to auto or "
                               "micro_batch.")


def hf_model_class(hf_config: Any) -> Optional[type]:
    """The transformers class LLaMA-Factory's loader instantiates for `hf_config` (model/loader.py: image-text
    configs through AutoModelForImageTextToText, the rest through AutoModelForCausalLM), or None if unknown."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        mapping = auto._model_mapping
        if type(hf_config) in mapping.keys():
            return mapping[type(hf_config)]
    return None


def hf_trainer_weighting(hf_config: Any, has_processor: bool = False) -> str:
    """`token` or `micro_batch`: the weighting of LLaMA-Factory's HF path for stages pt / sft.

    A loaded processor (multimodal model) means `micro_batch` (LLaMA-Factory's trainers). Otherwise mirrors
    `Trainer.__init__` (transformers 5.6) for the class LLaMA-Factory loads: the class attribute
    `accepts_loss_kwargs` when it exists, else whether `forward` takes `**kwargs`. PEFT wrappers are unwrapped by the
    Trainer before it looks, so LoRA does not change the answer."""
    if has_processor:
        return "micro_batch"
    cls = hf_model_class(hf_config)
    if cls is None:
        return "token"
    if hasattr(cls, "accepts_loss_kwargs"):
        accepts = bool(cls.accepts_loss_kwargs)
    else:
        accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.forward).parameters.values())
    return "token" if accepts else "micro_batch"


def resolve_loss_weighting(weighting: str, stage: str, hf_config: Any, has_processor: bool = False) -> str:
    """The weighting a run uses: the explicit choice, or for `auto` the HF path's (dpo / rm / kto: micro_batch)."""
    check_loss_weighting(weighting, stage)
    if weighting != "auto":
        return weighting
    if stage in PAIRWISE_STAGES:
        return "micro_batch"
    return hf_trainer_weighting(hf_config, has_processor)


def sample_ids(loss_mask: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """[b, s] sample index of every position: the row, or (neat_packing) row and segment; -1 where no loss."""
    import torch

    b, s = loss_mask.shape
    rows = torch.arange(b, dtype=torch.long).unsqueeze(1).expand(b, s)
    ids = rows if segment_ids is None else rows * (int(segment_ids.max()) + 1) + segment_ids.long()
    return ids.masked_fill(loss_mask == 0, -1)


def token_weights(loss_mask: torch.Tensor, weighting: str,
                  segment_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """(per-position weights to multiply the loss mask by, the micro-batch's loss denominator) for a
    `micro_batch` or `sample` weighting of one micro-batch (see the module docstring's table)."""
    import torch

    predicted = float(loss_mask.sum())
    if predicted == 0:
        return torch.zeros_like(loss_mask), 0
    if weighting == "micro_batch":
        return torch.full_like(loss_mask, 1.0 / predicted) * loss_mask, 1
    if weighting != "sample":
        raise ValueError(f"token_weights: unexpected weighting {weighting!r}")
    ids = sample_ids(loss_mask, segment_ids)
    present, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    per_id = torch.where(present >= 0, 1.0 / counts.to(loss_mask.dtype),
                         torch.zeros_like(counts, dtype=loss_mask.dtype))
    return per_id[inverse] * loss_mask, int((present >= 0).sum())


def apply_loss_weighting(mb: Any, weighting: str) -> None:
    """Weight micro-batch `mb` (training.data.MicroBatch, before padding / packing / CP split) in place: its
    `loss_mask` carries the token weights and `loss_denominator` what megatron divides the step's loss by.
    `token` leaves it as built (weights 1, denominator = label tokens)."""
    if weighting in ("token", "auto"):
        return
    import torch

    weights, denominator = token_weights(mb.loss_mask, weighting, mb.segment_ids)
    mb.loss_mask = weights
    mb.loss_denominator = torch.tensor(denominator, dtype=torch.int)
