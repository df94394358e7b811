"""The thin adapter between LLaMA-Factory's data pipeline and megatron-core's schedules.

What stays LLaMA-Factory's: tokenisation, templates, `get_dataset`, and the collators of `run_sft` / `run_pt`.
What this module adds around them:

* sample order: the same global batches, step by step, as the Hugging Face Trainer would draw for the same
  seed (accelerate's seedable RandomSampler, then `BatchSamplerShard` over data-parallel ranks);
* label shift: HF labels are aligned with the inputs and shifted inside the loss; megatron's GPTModel takes
  labels aligned with its outputs;
* padding: sequence lengths padded to a multiple fitting tp/sp/cp, and, with pipeline parallelism, every
  microbatch of a step padded to one shape (pipeline p2p buffers have fixed shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------- order


def epoch_indices(num_samples: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Sample order of one epoch, as accelerate's `SeedableRandomSampler` yields it (seed + epoch)."""
    if not shuffle:
        return list(range(num_samples))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def shard_batches(
    indices: list[int], batch_size: int, num_processes: int, process_index: int, drop_last: bool = False
) -> list[list[int]]:
    """The batches one data-parallel rank gets: accelerate's BatchSamplerShard (split_batches=False,
    even_batches=True) over `BatchSampler(indices, batch_size, drop_last)`.

    Global batch k goes to rank k % num_processes; at the end, missing batches are filled by cycling from the
    start of the epoch, so that every rank gets the same number of full batches.
    """
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if num_processes == 1:  # accelerate does not wrap the sampler then: the last batch may be short
        return batches
    out: list[list[int]] = []
    initial: list[int] = []
    to_yield: list[int] = []
    batch: list[int] = []
    idx = -1
    for idx, batch in enumerate(batches):
        if not drop_last and idx < num_processes:
            initial += batch
        if idx % num_processes == process_index:
            to_yield = batch
        if idx % num_processes == num_processes - 1 and len(batch) == batch_size:
            out.append(to_yield)
            to_yield = []
    if not drop_last and initial:
        if len(to_yield) == batch_size:
            out.append(to_yield)
        while len(initial) < num_processes * batch_size:
            initial += initial
        if len(batch) == batch_size:
            batch = []
            idx += 1
        cycle = 0
        while idx % num_processes != 0 or len(batch) > 0:
            end = cycle + batch_size - len(batch)
            batch = batch + initial[cycle:end]
            if idx % num_processes == process_index:
                out.append(batch)
            cycle = end
            batch = []
            idx += 1
    return out


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    """HF: optimizer steps per epoch from the per-rank number of batches."""
    return max(num_batches // grad_accum + int(num_batches % grad_accum > 0), 1)


# --------------------------------------------------------------------------------------------- collators


def build_collator(stage: str, template: Any, model_args: Any, data_args: Any, training_args: Any,
                   tokenizer_module: dict, pad_multiple: int) -> Any:
    """The collator LLaMA-Factory's own workflow for `stage` builds (run_sft / run_pt), padding-multiple aside."""
    if stage == "pt":
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(tokenizer=tokenizer_module["tokenizer"], mlm=False)
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask

    tokenizer = tokenizer_module["tokenizer"]
    return SFTDataCollatorWith4DAttentionMask(
        template=template,
        model=None,
        pad_to_multiple_of=math.lcm(8, pad_multiple),
        label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
        block_diag_attn=model_args.block_diag_attn,
        neat_packing=data_args.neat_packing,
        attn_implementation=None,
        compute_dtype=model_args.compute_dtype,
        **tokenizer_module,
    )


# --------------------------------------------------------------------------------------------- batches


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] input ids
    position_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s] next-token targets (ignored positions hold 0)
    loss_mask: torch.Tensor  # [b, s] float, 1 where the target counts
    num_label_tokens: torch.Tensor  # int: the HF Trainer's token count (see `to_microbatch`)
    num_input_tokens: int  # non-padding input tokens (throughput)
    num_samples: int = 0  # real samples (eval loss weighting)
    extra: dict = field(default_factory=dict)  # stage-specific data (e.g. DPO: pairs, sample ids, reference logps)

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


def to_microbatch(features: dict[str, torch.Tensor], pad_token_id: int) -> MicroBatch:
    """One collated HF batch -> megatron inputs (right padding, causal attention).

    `num_label_tokens` is what the HF Trainer divides the summed loss by (`num_items_in_batch`): labels
    != -100 counted *before* the shift. For sft the first label is always a prompt token (-100), so this
    equals the number of predicted tokens; for pt it counts each sequence's first token too, exactly as HF.
    """
    input_ids = features["input_ids"]
    labels = features.get("labels")
    if labels is None:
        labels = input_ids.masked_fill(features["attention_mask"] == 0, IGNORE_INDEX)
    attention_mask = features.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            "`neat_packing` / `block_diag_attn` (4D attention masks) are not supported by the Megatron backend "
            "yet. Fix: set neat_packing: false and block_diag_attn: false."
        )
    if attention_mask is not None and attention_mask.numel() and bool((attention_mask[:, 0] == 0).any()) \
            and bool((attention_mask.sum(-1) > 0).all()):
        raise ValueError("left padding found in a training batch; the Megatron backend expects right padding")
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    loss_mask = (shifted != IGNORE_INDEX).float()
    b, s = input_ids.shape
    return MicroBatch(
        tokens=input_ids.long(),
        position_ids=torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous(),
        labels=shifted.masked_fill(shifted == IGNORE_INDEX, 0).long(),
        loss_mask=loss_mask,
        num_label_tokens=torch.tensor(int((labels != IGNORE_INDEX).sum()), dtype=torch.int),
        num_input_tokens=int(attention_mask.sum()) if attention_mask is not None else b * s,
        num_samples=b,
    )


def pad_microbatch(mb: MicroBatch, seq_length: int, batch_size: int, pad_token_id: int) -> MicroBatch:
    """Right-pad to [batch_size, seq_length]; added rows/columns carry no loss."""
    b, s = mb.tokens.shape
    if s == seq_length and b == batch_size:
        return mb
    assert seq_length >= s and batch_size >= b

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        out = torch.full((batch_size, seq_length), value, dtype=t.dtype)
        out[:b, :s] = t
        return out

    position_ids = torch.arange(seq_length, dtype=torch.long).unsqueeze(0).expand(batch_size, -1).contiguous()
    return MicroBatch(
        tokens=pad(mb.tokens, pad_token_id),
        position_ids=position_ids,
        labels=pad(mb.labels, 0),
        loss_mask=pad(mb.loss_mask, 0.0),
        num_label_tokens=mb.num_label_tokens,
        num_input_tokens=mb.num_input_tokens,
        num_samples=mb.num_samples,
        extra=mb.extra,
    )


def seq_multiple(tp: int, sequence_parallel: bool, cp: int) -> int:
    """Sequence lengths must divide by tp under sequence parallelism and by 2*cp under context parallelism."""
    multiple = 1
    if sequence_parallel and tp > 1:
        multiple = math.lcm(multiple, tp)
    if cp > 1:
        multiple = math.lcm(multiple, 2 * cp)
    return multiple


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


class StepBatches:
    """Builds the microbatches of one optimizer step for this data-parallel rank."""

    def __init__(self, dataset: Any, collator: Any, pad_token_id: int, multiple: int, uniform_shapes: bool,
                 micro_batch_size: int) -> None:
        self.dataset = dataset
        self.collator = collator
        self.pad_token_id = pad_token_id
        self.multiple = multiple
        self.uniform_shapes = uniform_shapes
        self.micro_batch_size = micro_batch_size

    def build(self, batches: list[Optional[list[int]]]) -> list[MicroBatch]:
        """Collate, adapt and pad; a None entry becomes a batch without loss (sample 0, fully masked)."""
        mbs = []
        for idx in batches:
            features = self.collator([self.dataset[i] for i in (idx if idx is not None else [0])])
            mb = to_microbatch(features, self.pad_token_id)
            if idx is None:
                mb.loss_mask.zero_()
                mb.num_label_tokens = torch.tensor(0, dtype=torch.int)
                mb.num_input_tokens = 0
                mb.num_samples = 0
            target = round_up(mb.seq_length, self.multiple)
            if target != mb.seq_length:
                mb = pad_microbatch(mb, target, mb.batch_size, self.pad_token_id)
            mbs.append(mb)
        if self.uniform_shapes and mbs:
            seq = max(mb.seq_length for mb in mbs)
            bsz = max([self.micro_batch_size] + [mb.batch_size for mb in mbs])
            mbs = [pad_microbatch(mb, seq, bsz, self.pad_token_id) for mb in mbs]
        return mbs


def microbatch_iterator(mbs: list[MicroBatch]) -> Iterator[MicroBatch]:
    return iter(list(mbs))


def eval_batches(num_samples: int, batch_size: int, num_processes: int, process_index: int) -> list[Optional[list[int]]]:
    """Sequential eval order, batch k on rank k % num_processes (no duplicated samples).

    Every rank gets the same number of entries (MoE expert parallelism needs the same number of forwards on
    each rank): missing ones are None, to be run as a batch that carries no loss.
    """
    indices = list(range(num_samples))
    batches = [indices[i : i + batch_size] for i in range(0, num_samples, batch_size)]
    per_rank = math.ceil(len(batches) / num_processes)
    mine: list[Optional[list[int]]] = batches[process_index::num_processes]
    return mine + [None] * (per_rank - len(mine))


def count_label_tokens(mbs: list[MicroBatch]) -> int:
    return int(sum(int(mb.num_label_tokens) for mb in mbs))


def maybe(x: Optional[Any], default: Any) -> Any:
    return default if x is None else x
