"""The thin adapter between LLaMA-Factory's data pipeline and megatron-core's schedules.

What stays LLaMA-Factory's: tokenisation, templates, `get_dataset`, and the collators of `run_sft` / `run_pt`.
What this module adds around them:

* sample order: the same global batches, step by step, as the Hugging Face Trainer would draw for the same
  seed (accelerate's seedable RandomSampler, then `BatchSamplerShard` over data-parallel ranks);
* label shift: HF labels are aligned with the inputs and shifted inside the loss; megatron's GPTModel takes
  labels aligned with its outputs;
* padding: sequence lengths padded to a multiple fitting tp/sp/cp (`models.packing.seq_multiple`), and, with
  pipeline parallelism, every microbatch of a step padded to one shape (pipeline p2p buffers have fixed shapes);
* neat_packing: LLaMA-Factory's packed rows (attention mask = per-sample indices 1, 2, 3 ..., 0 = padding) become
  one THD row with `PackedSeqParams` (`models.packing.pack_thd`), so that each sample attends only to itself;
* context parallelism: after the label shift (and packing), each microbatch keeps this CP rank's tokens
  (`models.packing.cp_split`, causal load balancing); token and sample counts stay on CP rank 0 only, so that
  sums over the data-parallel group with CP count them once;
* multimodal models (Qwen2-VL): pixel values / grid sizes pass to the model, mRoPE position ids [3, b, s] are
  computed as Hugging Face computes them (LLaMA-Factory's collator only does so when it holds the HF model),
  per packed sample under neat_packing; under CP the model gets the full token row (`cp_input_ids`) and full
  mRoPE positions, and merges the vision features before it keeps its own chunks (models/qwen2_vl.py);
* prefetch (`prefetch_steps`): the microbatches of the next optimizer steps are built in DataLoader worker
  processes while the current step trains, so collation (images included) is off the training process' path.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from llamafactory_mca.models import packing
from llamafactory_mca.training.loss_weighting import apply_loss_weighting
from llamafactory_mca.training.multimodal import packed_rope_positions

IGNORE_INDEX = -100
MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


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
    # neat_packing: keep the 2-D mask of per-sample indices (no 4-D block mask): it becomes THD cu_seqlens here
    return SFTDataCollatorWith4DAttentionMask(
        template=template,
        model=None,
        pad_to_multiple_of=math.lcm(8, pad_multiple),
        label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
        block_diag_attn=False,
        neat_packing=data_args.neat_packing,
        attn_implementation=None,
        compute_dtype=model_args.compute_dtype,
        **tokenizer_module,
    )


# --------------------------------------------------------------------------------------------- batches


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] input ids
    position_ids: torch.Tensor  # [b, s]; mRoPE [3, b, s], the full sequence's also after the CP split
    labels: torch.Tensor  # [b, s] next-token targets (ignored positions hold 0)
    loss_mask: torch.Tensor  # [b, s] float, 1 where the target counts
    loss_denominator: torch.Tensor  # int: what the step's summed, weighted loss is divided by, summed over the
    # micro-batches and data-parallel ranks of a step (token weighting: the label tokens, the HF Trainer's
    # `num_items_in_batch`; see training/loss_weighting.py for the others)
    num_input_tokens: int  # non-padding input tokens (throughput)
    num_samples: int = 0  # real samples (eval loss weighting)
    extra: dict = field(default_factory=dict)  # stage-specific data (e.g. DPO: pairs, sample ids, reference logps)
    segment_ids: Optional[torch.Tensor] = None  # [b, s] neat_packing: sample index per token, 0 = padding
    packed_seq_params: Any = None  # THD (neat_packing): megatron PackedSeqParams, global cu_seqlens
    model_inputs: dict = field(default_factory=dict)  # extra model kwargs (Qwen2-VL: pixel_values, image_grid_thw;
    # under CP `cp_input_ids`, the full token row)
    full_seq_length: int = 0  # the sequence length before the CP split (0: not split)
    token_mask: Optional[torch.Tensor] = None  # [b, s] float, 1 for real input tokens (HF attention mask > 0)

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def schedule_seq_length(self) -> int:
        """What megatron's schedules take as seq_length (they divide it by cp and, under SP, by tp)."""
        return self.full_seq_length or self.tokens.shape[1]

    def carry_nothing(self) -> None:
        """Make this a filler micro-batch (a step with fewer batches than its peers): shapes stay, loss, token
        and sample counts are zero."""
        self.loss_mask.zero_()
        if self.token_mask is not None:
            self.token_mask.zero_()
        self.loss_denominator = torch.tensor(0, dtype=torch.int)
        self.num_input_tokens = 0
        self.num_samples = 0

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def pin_memory(self) -> "MicroBatch":
        """A copy whose tensors live in pinned host memory, so that their copies to the GPU run asynchronously
        (a pageable copy makes the host wait for the GPU). torch's DataLoader calls this in its pin thread."""
        import dataclasses

        def pin(x: Any) -> Any:
            if torch.is_tensor(x):
                return x.pin_memory()
            if isinstance(x, dict):
                return {k: pin(v) for k, v in x.items()}
            if dataclasses.is_dataclass(x) and not isinstance(x, type):  # PackedSeqParams: its cu_seqlens
                return dataclasses.replace(x, **{f.name: pin(getattr(x, f.name)) for f in dataclasses.fields(x)
                                                 if torch.is_tensor(getattr(x, f.name))})
            return x

        return dataclasses.replace(self, **{f.name: pin(getattr(self, f.name)) for f in dataclasses.fields(self)})


def to_microbatch(features: dict[str, torch.Tensor], pad_token_id: int, segments: bool = False,
                  rope_fn: Optional[Any] = None) -> MicroBatch:
    """One collated HF batch -> megatron inputs (right padding, causal attention).

    `loss_denominator` starts as what the HF Trainer divides the summed loss by (`num_items_in_batch`): labels
    != -100 counted *before* the shift. For sft the first label is always a prompt token (-100), so this
    equals the number of predicted tokens; for pt it counts each sequence's first token too, exactly as HF.

    segments: the attention mask holds neat_packing's per-sample indices (kept as `segment_ids`).
    rope_fn: (input_ids, image_grid_thw, video_grid_thw, attention_mask) -> [3, b, s] mRoPE positions, for
    multimodal models when the collator gave none.
    """
    input_ids = features["input_ids"]
    labels = features.get("labels")
    if labels is None:
        labels = input_ids.masked_fill(features["attention_mask"] == 0, IGNORE_INDEX)
    attention_mask = features.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            "4D attention masks are not supported by the Megatron backend: neat_packing is turned into packed "
            "sequences (THD) from the 2-D mask of sample indices. Fix: build the collator with block_diag_attn=False."
        )
    if attention_mask is not None and attention_mask.numel() and bool((attention_mask[:, 0] == 0).any()) \
            and bool((attention_mask.sum(-1) > 0).all()):
        raise ValueError("left padding found in a training batch; the Megatron backend expects right padding")
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    loss_mask = (shifted != IGNORE_INDEX).float()
    b, s = input_ids.shape
    # Text positions run 0..s-1 (megatron's RoPE ignores position ids; plain `packing` therefore keeps running
    # positions, as before); multimodal RoPE takes [3, b, s] positions.
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous()
    model_inputs = {k: features[k] for k in MODEL_INPUT_KEYS if torch.is_tensor(features.get(k))}
    given = features.get("position_ids")
    if torch.is_tensor(given) and given.dim() == 3:
        position_ids = (given[1:] if given.shape[0] == 4 else given).long()
    elif rope_fn is not None and segments and attention_mask is not None:  # neat_packing: per-sample positions
        position_ids = packed_rope_positions(rope_fn, input_ids, attention_mask, model_inputs.get("image_grid_thw"),
                                             model_inputs.get("video_grid_thw"), features.get("second_per_grid_ts"))
    elif rope_fn is not None:
        position_ids = rope_fn(input_ids, model_inputs.get("image_grid_thw"), model_inputs.get("video_grid_thw"),
                               (attention_mask >= 1).long() if attention_mask is not None else None,
                               second_per_grid_ts=features.get("second_per_grid_ts")).long()
    return MicroBatch(
        tokens=input_ids.long(),
        position_ids=position_ids,
        labels=shifted.masked_fill(shifted == IGNORE_INDEX, 0).long(),
        loss_mask=loss_mask,
        loss_denominator=torch.tensor(int((labels != IGNORE_INDEX).sum()), dtype=torch.int),
        num_input_tokens=int((attention_mask > 0).sum()) if attention_mask is not None else b * s,
        num_samples=b,
        segment_ids=attention_mask.long() if segments and attention_mask is not None else None,
        model_inputs=model_inputs,
        token_mask=(attention_mask > 0).float() if attention_mask is not None else torch.ones(b, s),
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

    lead = tuple(mb.position_ids.shape[:-2])  # () or (3,) for mRoPE
    position_ids = torch.arange(seq_length, dtype=torch.long).expand(*lead, batch_size, seq_length).clone()
    position_ids[..., :b, :s] = mb.position_ids
    return MicroBatch(
        tokens=pad(mb.tokens, pad_token_id),
        position_ids=position_ids,
        labels=pad(mb.labels, 0),
        loss_mask=pad(mb.loss_mask, 0.0),
        loss_denominator=mb.loss_denominator,
        num_input_tokens=mb.num_input_tokens,
        num_samples=mb.num_samples,
        extra=mb.extra,
        segment_ids=pad(mb.segment_ids, 0) if mb.segment_ids is not None else None,
        model_inputs=mb.model_inputs,
        token_mask=pad(mb.token_mask, 0.0) if mb.token_mask is not None else None,
    )


# --------------------------------------------------------------------------------------------- layout


@dataclass
class SeqLayout:
    """How this rank lays a microbatch out along the sequence: tp / sp / cp alignment, THD packing, CP split."""

    tp: int = 1
    cp: int = 1
    cp_rank: int = 0
    sequence_parallel: bool = False
    thd: bool = False  # neat_packing: packed samples as THD + PackedSeqParams

    @property
    def multiple(self) -> int:
        return packing.seq_multiple(self.tp, self.cp, self.sequence_parallel)


def to_thd(mb: MicroBatch, layout: SeqLayout, pad_token_id: int) -> MicroBatch:
    """neat_packing rows [b, s] -> one THD row [1, T] + PackedSeqParams (each sample attends to itself only).

    Row padding (segment 0) is dropped; each sample is padded to 2*cp under CP and T to the multiple SP needs.
    The labels were shifted on the rows: a sample's last token keeps the target the Hugging Face path gives it
    (the next sample's first label, -100 for sft prompts), so the loss equals LLaMA-Factory's neat_packing loss.
    """
    seg_mult, total_mult = packing.thd_multiples(layout.tp, layout.cp, layout.sequence_parallel)
    batch = {"tokens": mb.tokens, "labels": mb.labels, "loss_mask": mb.loss_mask, "position_ids": mb.position_ids}
    packed, params, _ = packing.pack_thd(batch, mb.segment_ids, seg_mult, total_mult,
                                         pad_values={"tokens": pad_token_id, "labels": 0, "loss_mask": 0.0})
    return MicroBatch(
        tokens=packed["tokens"], position_ids=packed["position_ids"], labels=packed["labels"],
        loss_mask=packed["loss_mask"], loss_denominator=mb.loss_denominator, num_input_tokens=mb.num_input_tokens,
        num_samples=mb.num_samples, extra=mb.extra, segment_ids=None, packed_seq_params=params,
        model_inputs=mb.model_inputs,
    )


def extend_thd(mb: MicroBatch, total: int, pad_token_id: int) -> MicroBatch:
    """Append one padding sequence so that the THD row holds `total` tokens (uniform pipeline shapes)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    t = mb.tokens.shape[-1]
    extra = total - t
    if extra <= 0:
        return mb
    p = mb.packed_seq_params

    def cat(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.cat([x, torch.full((*x.shape[:-1], extra), value, dtype=x.dtype)], dim=-1)

    def cu(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([c, c[-1:] + extra])

    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu(p.cu_seqlens_q), cu_seqlens_kv=cu(p.cu_seqlens_kv),
                             cu_seqlens_q_padded=cu(p.cu_seqlens_q_padded),
                             cu_seqlens_kv_padded=cu(p.cu_seqlens_kv_padded),
                             max_seqlen_q=max(p.max_seqlen_q, extra), max_seqlen_kv=max(p.max_seqlen_kv, extra))
    positions = torch.cat([mb.position_ids, torch.arange(extra).expand(*mb.position_ids.shape[:-1], extra)], -1)
    return MicroBatch(
        tokens=cat(mb.tokens, pad_token_id), position_ids=positions, labels=cat(mb.labels, 0),
        loss_mask=cat(mb.loss_mask, 0.0), loss_denominator=mb.loss_denominator,
        num_input_tokens=mb.num_input_tokens, num_samples=mb.num_samples, extra=mb.extra,
        packed_seq_params=params, model_inputs=mb.model_inputs,
    )


def split_for_cp(mb: MicroBatch, layout: SeqLayout) -> MicroBatch:
    """This CP rank's tokens of `mb` (after the label shift); counts stay on CP rank 0 only.

    Multimodal batches (mRoPE positions [3, b, s]) keep their full positions and hand the full token row to the
    model as `cp_input_ids`: the vision features are merged into the whole sequence before the model keeps this
    rank's chunks of it, and megatron's mRoPE splits the positions itself (models/qwen2_vl.py)."""
    if layout.cp == 1:
        return mb
    mrope = mb.position_ids.dim() == 3
    batch = {"tokens": mb.tokens, "labels": mb.labels, "loss_mask": mb.loss_mask}
    if not mrope:
        batch["position_ids"] = mb.position_ids
    if mb.token_mask is not None:
        batch["token_mask"] = mb.token_mask
    local = packing.cp_split(batch, layout.cp, layout.cp_rank, mb.packed_seq_params)
    first = layout.cp_rank == 0
    extra = dict(mb.extra)
    if torch.is_tensor(extra.get("attention_mask")):  # DPO: per-token mask of the rows, split the same way
        m = extra["attention_mask"]
        m = torch.nn.functional.pad(m, (0, mb.tokens.shape[-1] - m.shape[-1]))
        extra["attention_mask"] = packing.cp_split({"tokens": mb.tokens, "m": m}, layout.cp, layout.cp_rank,
                                                   mb.packed_seq_params)["m"]
    model_inputs = dict(mb.model_inputs, cp_input_ids=mb.tokens) if mrope else mb.model_inputs
    return MicroBatch(
        tokens=local["tokens"], position_ids=mb.position_ids if mrope else local["position_ids"],
        labels=local["labels"], loss_mask=local["loss_mask"],
        loss_denominator=mb.loss_denominator if first else torch.zeros_like(mb.loss_denominator),
        num_input_tokens=mb.num_input_tokens if first else 0, num_samples=mb.num_samples if first else 0,
        extra=extra, packed_seq_params=mb.packed_seq_params, model_inputs=model_inputs,
        full_seq_length=mb.tokens.shape[-1], token_mask=local.get("token_mask"),
    )


def lay_out(mbs: list[MicroBatch], layout: SeqLayout, pad_token_id: int, uniform_shapes: bool,
            rows: int) -> list[MicroBatch]:
    """Pad (or pack), make shapes uniform for the pipeline (at least `rows` rows), then split for CP."""
    if layout.thd:
        mbs = [to_thd(mb, layout, pad_token_id) for mb in mbs]
        if uniform_shapes and mbs:
            total = max(mb.tokens.shape[-1] for mb in mbs)
            mbs = [extend_thd(mb, total, pad_token_id) for mb in mbs]
    else:
        out = []
        for mb in mbs:
            target = round_up(mb.seq_length, layout.multiple)
            out.append(pad_microbatch(mb, target, mb.batch_size, pad_token_id) if target != mb.seq_length else mb)
        mbs = out
        if uniform_shapes and mbs:
            seq = max(mb.seq_length for mb in mbs)
            bsz = max([rows] + [mb.batch_size for mb in mbs])
            mbs = [pad_microbatch(mb, seq, bsz, pad_token_id) for mb in mbs]
    return [split_for_cp(mb, layout) for mb in mbs]


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


class StepBatches:
    """Builds the microbatches of one optimizer step for this data-parallel rank."""

    def __init__(self, dataset: Any, collator: Any, pad_token_id: int, layout: SeqLayout, uniform_shapes: bool,
                 micro_batch_size: int, rope_fn: Optional[Any] = None, loss_weighting: str = "token") -> None:
        self.dataset = dataset
        self.loss_weighting = loss_weighting  # training/loss_weighting.py; evaluation keeps "token"
        self.collator = collator
        self.pad_token_id = pad_token_id
        self.layout = layout
        self.uniform_shapes = uniform_shapes
        self.micro_batch_size = micro_batch_size
        self.rope_fn = rope_fn

    @property
    def multiple(self) -> int:
        return self.layout.multiple

    def build(self, batches: list[Optional[list[int]]]) -> list[MicroBatch]:
        """Collate, adapt, pad / pack and split; a None entry becomes a batch without loss (sample 0, fully
        masked)."""
        mbs = []
        for idx in batches:
            features = self.collator([self.dataset[i] for i in (idx if idx is not None else [0])])
            mb = to_microbatch(features, self.pad_token_id, segments=self.layout.thd, rope_fn=self.rope_fn)
            if idx is None:
                mb.carry_nothing()
            apply_loss_weighting(mb, self.loss_weighting)
            mbs.append(mb)
        return lay_out(mbs, self.layout, self.pad_token_id, self.uniform_shapes, self.micro_batch_size)


class _StepsDataset(torch.utils.data.Dataset):
    """Item i = the microbatches of optimizer step i, built by `builder` (in a DataLoader worker)."""

    def __init__(self, builder: Any, steps: list[list[Optional[list[int]]]]) -> None:
        self.builder = builder
        self.steps = steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> list[MicroBatch]:
        return self.builder.build(self.steps[i])


def _as_built(item: list[MicroBatch]) -> list[MicroBatch]:
    return item


def prefetch_steps(builder: Any, steps: list[list[Optional[list[int]]]], workers: int = 1,
                   ahead: int = 2) -> Iterator[list[MicroBatch]]:
    """The microbatches of each step of `steps` (up to the first empty one), in order, built by `builder.build`.

    workers > 0: built in that many forked DataLoader worker processes, each up to `ahead` steps in advance,
    while the training process runs the current step (the builder only touches CPU tensors, the dataset and
    the collator, which the fork shares), and, where CUDA is present, pinned by the DataLoader's pin thread
    (`MicroBatch.pin_memory`) so that the copies to the GPU do not stop the host; workers = 0: built in this
    process when asked for, as before.
    The numbers are the same either way (building is deterministic); only where and when it runs changes.
    """
    steps = list(itertools.takewhile(bool, steps))
    if workers <= 0 or len(steps) <= 1:
        for step in steps:
            yield builder.build(step)
        return
    loader = torch.utils.data.DataLoader(
        _StepsDataset(builder, steps), batch_size=None, shuffle=False, num_workers=min(workers, len(steps)),
        collate_fn=_as_built, prefetch_factor=ahead, multiprocessing_context="fork", persistent_workers=False,
        pin_memory=torch.cuda.is_available())
    yield from loader


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
