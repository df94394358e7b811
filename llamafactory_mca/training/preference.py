"""What the preference stages share (dpo, kto; rm uses the pair batching): two rows a sample in one micro-batch,
sequence log-probs from the vocab-parallel logits, reference log-probs without a second model copy, and the
reduction of each micro-batch's metric report over micro-batches and data-parallel ranks.

A micro-batch holds the batch's first rows (chosen for pairs, the targets for kto) followed by its second rows
(rejected, or kto's KL rows), so a sample never straddles micro-batches, pipeline stages or data-parallel ranks.
Vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE)): the rows are built by sft's `data.to_microbatch`
(pixel values / grids of every row, in row order, and Hugging Face's mRoPE positions) and reach the model as sft's
do (`loop.model_kwargs`), under every layout sft runs (PP, TP + SP, CP).

Reference model (where the loss needs one), never a second model copy:
  lora: the same model with the adapters disabled, a forward-only pass over each step's micro-batches before the
        policy step;
  full / freeze: the initial weights (or `ref_model`'s, loaded for the pass), a forward-only pass over the whole
        training (and eval) set before the first step, the log-probs of both rows kept per sample. The pass
        follows the first epoch's batches, so its padding is the HF run's.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist

from llamafactory_mca.training import data as mdata
from llamafactory_mca.training.loop import Run, SupervisedTask, model_kwargs, run_schedule


class PairBatches(mdata.StepBatches):
    """Micro-batches of two rows a sample: [first_1..n, second_1..n] rows (+ padding rows/columns that carry
    nothing). Built like StepBatches' (same inputs, `mdata.to_microbatch`: vision-language batches keep their
    pixel values / grids in `model_inputs` and get mRoPE positions from `rope_fn`), with the sample bookkeeping in
    `extra`: `pairs` (n), `ids` (dataset indices), `attention_mask` and every collated key named in `extra_keys`
    (e.g. kto's `kto_tags`)."""

    extra_keys: tuple = ()

    def build(self, batches: list[Optional[list[int]]]) -> list[mdata.MicroBatch]:
        """One MicroBatch per list of sample indices (None: a padding micro-batch that carries nothing)."""
        mbs = []
        for idx in batches:
            ids = idx if idx is not None else [0]
            features = self.collator([self.dataset[i] for i in ids])
            mb = mdata.to_microbatch(features, self.pad_token_id, rope_fn=self.rope_fn)
            mb.extra = {"pairs": len(ids) if idx is not None else 0, "ids": list(ids) if idx is not None else [],
                        "attention_mask": features["attention_mask"].float()}
            mb.extra.update({key: features[key] for key in self.extra_keys})
            if idx is None:
                mb.carry_nothing()
            mbs.append(mb)
        return mdata.lay_out(mbs, self.layout, self.pad_token_id, self.uniform_shapes, 2 * self.micro_batch_size)


def pairwise_collator(run: Run, label_pad_token_id: Optional[int] = None) -> Any:
    """LLaMA-Factory's pairwise collator (chosen rows, then rejected rows), as its dpo / rm workflows build it."""
    from llamafactory.data import PairwiseDataCollatorWithPadding

    kwargs = {} if label_pad_token_id is None else {"label_pad_token_id": label_pad_token_id}
    return PairwiseDataCollatorWithPadding(template=run.template, model=None, pad_to_multiple_of=8,
                                           **kwargs, **run.tokenizer_module)


def label_pad_id(run: Run) -> int:
    """The label padding LLaMA-Factory's dpo / kto workflows give their collators."""
    return mdata.IGNORE_INDEX if run.data_args.ignore_pad_token_for_loss else run.tokenizer.pad_token_id


def sequence_logps(logits: torch.Tensor, mb: mdata.MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of label log-probs, label count) per row, from vocab-parallel logits [b, s, V/tp]."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    labels = mb.labels.to(logits.device)
    mask = mb.loss_mask.to(logits.device)
    # megatron's kernel works in place on its input: give it a copy
    ce = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous().clone(), labels.t().contiguous())
    logps = -(ce.t() * mask).sum(-1)
    lengths = mask.sum(-1)
    if ps.get_context_parallel_world_size() > 1:  # each CP rank holds part of every row
        logps = CPSum.apply(logps)
        lengths = CPSum.apply(lengths)
    return logps, lengths


class CPSum(torch.autograd.Function):
    """Sum over the context-parallel group; backward: identity (every CP rank computes the same loss from the
    sum, and DDP sums the gradients of the ranks' own token paths over dp x cp)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        out = x.detach().clone()
        dist.all_reduce(out, group=ps.get_context_parallel_group())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def logits_sums(logits: torch.Tensor, rows: slice, mask: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the logits over the real vocabulary and the non-padding positions, per row of `rows`; the number of
    non-padding positions per row), collective over TP and CP.

    LLaMA-Factory sums over padding positions as well, whose logits depend on how padding is attended to
    (HF masks padded keys, megatron's causal attention does not): those positions are left out here.
    """
    from megatron.core import parallel_state as ps

    m = mask[rows].to(logits.device)
    seq = m.shape[1]
    local = logits.detach()[rows, :seq].float()
    per = local.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * per
    real = max(0, min(per, vocab - start))
    totals = (local[..., :real].sum(-1) * m).sum(-1).double()
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(totals, group=ps.get_tensor_model_parallel_group())
    tokens = m.sum(-1).double()
    if ps.get_context_parallel_world_size() > 1:
        both = torch.cat([totals, tokens])
        dist.all_reduce(both, group=ps.get_context_parallel_group())
        totals, tokens = both[: len(totals)], both[len(totals):]
    return totals.float(), tokens.float()


def logits_mean(logits: torch.Tensor, rows: slice, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Mean of the logits over the real vocabulary and the non-padding positions of `rows` (see `logits_sums`)."""
    totals, tokens = logits_sums(logits, rows, mask, vocab)
    return totals.sum() / max(float(tokens.sum()) * vocab, 1.0)


def forward_step(loss_func: Any, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
    """megatron's forward step of the preference stages: the model's output (logits, or rm's values) on the next
    micro-batch, with its multimodal inputs (pixel values, grids) and mRoPE positions as sft passes them
    (`loop.model_kwargs`), and `loss_func(micro_batch, output)` bound to it."""
    mb: mdata.MicroBatch = next(data_iterator)
    device = next(model.parameters()).device
    output = model(mb.tokens.to(device), mb.position_ids.to(device), None, **model_kwargs(mb, device))
    return output, partial(loss_func, mb)


def sum_reports(losses: list, key: str, size: int, device: torch.device) -> torch.Tensor:
    """The loss functions' `key` reports ([size] each) summed over micro-batches and data-parallel ranks, on every
    rank (the last pipeline stage computes them and broadcasts the sum)."""
    from megatron.core import parallel_state as ps

    buf = torch.zeros(size, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            buf += item[key].to(device=device, dtype=torch.float64)
        dist.all_reduce(buf, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return buf


class ReferenceTask(SupervisedTask):
    """A stage whose loss compares the policy's sequence log-probs of both rows of a sample with a reference
    model's (dpo, kto). Subclasses give `METRICS`, the collator and `pair_loss`."""

    dataset_stage = "rm"
    METRICS: tuple = ("loss",)
    batches_class = PairBatches

    def __init__(self) -> None:
        self.ref_tables: dict[str, torch.Tensor] = {}  # dataset name -> [N, 2] reference logps (first, second row)
        self._ref_out: dict[int, tuple[float, float]] = {}

    def uses_reference(self, run: Run) -> bool:
        """Whether the loss needs reference log-probs."""
        return True

    def batch_builder(self, run: Run, dataset: Any, micro_batch_size: int, training: bool = False) -> Any:
        """Two-row micro-batches; their loss masks stay unweighted (the loss is weighted in the loss function,
        see `loss_weighting`)."""
        return self.batches_class(dataset, run.collator, run.pad_id, run.layout, uniform_shapes=run.pp > 1,
                                  micro_batch_size=micro_batch_size, rope_fn=run.rope_fn)

    # ---------------------------------------------------------------------------------------- reference
    def prepare(self, run: Run) -> None:
        """Before training: dropout off (as LLaMA-Factory's DPO / KTO trainers) and the reference log-probs."""
        fa = run.finetuning_args
        # LLaMA-Factory's DPO / KTO trainers disable every dropout of the model (LoRA's included)
        if run.lora is not None:
            run.lora.dropout = 0.0
        for model in run.models:
            model.config.hidden_dropout = 0.0
            model.config.attention_dropout = 0.0
        if not self.uses_reference(run) or run.lora is not None:
            return
        ref_path = fa.ref_model
        if ref_path:
            run.bridge.load_hf_weights(run.models, ref_path)
        try:
            if run.train_dataset is not None and run.training_args.do_train:
                self.ref_tables["train"] = self._precompute(run, run.train_dataset, train_order=True)
            if run.eval_dataset is not None:
                sets = run.eval_dataset if isinstance(run.eval_dataset, dict) else {"": run.eval_dataset}
                for name, ds in sets.items():
                    self.ref_tables[f"eval:{name}"] = self._precompute(run, ds, train_order=False)
        finally:
            if ref_path:
                run.bridge.load_hf_weights(run.models, run.model_args.model_name_or_path)

    def _precompute(self, run: Run, dataset: Any, train_order: bool) -> torch.Tensor:
        """Reference log-probs of every sample of `dataset` (forward only), [N, 2] on every rank."""
        from megatron.core import parallel_state as ps

        n = len(dataset)
        bs = run.bs if train_order else run.training_args.per_device_eval_batch_size
        if train_order:
            seed = run.training_args.data_seed if run.training_args.data_seed is not None else run.training_args.seed
            order = mdata.epoch_indices(n, seed, 0, not run.finetuning_args.disable_shuffling)
            shards = [mdata.shard_batches(order, bs, run.dp_size, r, run.training_args.dataloader_drop_last)
                      for r in range(run.dp_size)]
            mine: list = list(shards[run.dp_rank])
            covered = {i for shard in shards for b in shard for i in b}
            rest = [i for i in range(n) if i not in covered]
        else:
            mine, rest = [], list(range(n))
        if rest:
            extra = mdata.eval_batches(len(rest), bs, run.dp_size, run.dp_rank)
            mine += [[rest[i] for i in b] if b is not None else None for b in extra]
        builder = self.batch_builder(run, dataset, bs)
        self._ref_out = {}
        for model in run.ddp_models:
            model.eval()
        step = max(run.ga, 1)
        with torch.no_grad():
            for i in range(0, len(mine), step):
                mbs = builder.build(mine[i : i + step])
                run_schedule(run.ddp_models, mbs, forward_only=True,
                             forward_step=partial(self._forward_step, run, "ref_table"))
        for model in run.ddp_models:
            model.train()
        table = torch.zeros(n, 2, dtype=torch.float64, device=run.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            if ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
                for idx, (c, r) in self._ref_out.items():
                    table[idx, 0], table[idx, 1] = c, r
            dist.all_reduce(table, group=ps.get_data_parallel_group(with_context_parallel=True))
            if ps.get_tensor_model_parallel_world_size() > 1:
                dist.all_reduce(table, group=ps.get_tensor_model_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(table, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        self._ref_out = {}
        return table

    def _attach_reference(self, run: Run, mbs: list, table_key: str) -> None:
        if not self.uses_reference(run):
            return
        if run.lora is not None:
            from llamafactory_mca.models import lora

            was_training = [m.training for m in run.ddp_models]
            for model in run.ddp_models:
                model.eval()  # no LoRA dropout in the reference pass (the HF reference forward runs under no_grad)
            with torch.no_grad(), lora.disabled(run.lora):
                run_schedule(run.ddp_models, mbs, forward_only=True,
                             forward_step=partial(self._forward_step, run, "ref_step"))
            for model, flag in zip(run.ddp_models, was_training):
                model.train(flag)
            return
        table = self.ref_tables[table_key]
        for mb in mbs:
            ids = mb.extra["ids"]
            if ids:
                t = table[ids].float()
                mb.extra["ref_logps"] = torch.cat([t[:, 0], t[:, 1]])

    # ---------------------------------------------------------------------------------------- forward / loss
    def _forward_step(self, run: Run, mode: str, data_iterator: Any, model: Any):
        return forward_step(partial(self._loss_func, run, mode), data_iterator, model)

    def _loss_func(self, run: Run, mode: str, mb: mdata.MicroBatch, logits: torch.Tensor):
        n = mb.extra["pairs"]
        logps, lengths = sequence_logps(logits, mb)
        if mode in ("ref_table", "ref_step"):
            if mode == "ref_table":
                for j, idx in enumerate(mb.extra["ids"]):
                    self._ref_out[idx] = (float(logps[j]), float(logps[n + j]))
            else:
                mb.extra["ref_logps"] = logps[: 2 * n].detach().clone()
            zero = logits.sum() * 0.0
            return zero, torch.tensor(1, dtype=torch.int, device=logits.device), {"pref": torch.zeros(1)}
        report = torch.zeros(len(self.METRICS) + 1, dtype=torch.float64, device=logits.device)
        if n == 0:  # an eval filler batch: no loss, no metrics
            return logits.sum() * 0.0, torch.tensor(1, dtype=torch.int, device=logits.device), {"pref": report}
        loss, count, values = self.pair_loss(run, mode, mb, logits, logps[: 2 * n], lengths[: 2 * n])
        return self.report(loss, count, values, report)

    def pair_loss(self, run: Run, mode: str, mb: mdata.MicroBatch, logits: torch.Tensor, logps: torch.Tensor,
                  lengths: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """(the micro-batch's loss, its weight in the step's mean, {metric key: this micro-batch's value times
        the weight}) from the policy's sequence log-probs of the 2n rows (`mb.extra['ref_logps']`: the reference's)."""
        raise NotImplementedError

    def report(self, loss: torch.Tensor, count: int, values: dict[str, torch.Tensor], report: torch.Tensor):
        """What the loss function returns to megatron's schedule: (loss, weight, {'pref': metric report})."""
        from megatron.core import parallel_state as ps

        for i, key in enumerate(self.METRICS):
            if key in values:
                report[i] = values[key].double()
        report[-1] = float(count)  # this microbatch's weight in the step's mean
        if ps.get_context_parallel_rank() != 0:  # the CP group computed one loss: count it once
            report.zero_()
            return loss, torch.tensor(0, dtype=torch.int, device=loss.device), {"pref": report}
        return loss, torch.tensor(count, dtype=torch.int, device=loss.device), {"pref": report}

    def reduce(self, run: Run, losses: list) -> torch.Tensor:
        """Sum of the microbatch reports over microbatches and data-parallel ranks, on every rank."""
        return sum_reports(losses, "pref", len(self.METRICS) + 1, run.device)

    def metrics(self, run: Run, buf: torch.Tensor, prefix: str = "") -> tuple[float, dict[str, float]]:
        """(loss, {prefixed metric: value}) from a reduced report: the weighted means."""
        count = max(float(buf[-1]), 1.0)
        metrics = {f"{prefix}{k}": float(buf[self.METRICS.index(k)]) / count for k in self.logged_keys(run)}
        return float(buf[0]) / count, metrics

    def logged_keys(self, run: Run) -> list[str]:
        """The metric keys (besides the loss) this run logs."""
        return [k for k in self.METRICS if k != "loss"]

    # ---------------------------------------------------------------------------------------- task API
    def train_step(self, run: Run, mbs: list) -> tuple[float, dict[str, float]]:
        """One optimizer step's forward/backward over `mbs`; (loss, metrics)."""
        self._attach_reference(run, mbs, "train")
        losses = run_schedule(run.ddp_models, mbs, forward_only=False,
                              forward_step=partial(self._forward_step, run, "train"))
        return self.metrics(run, self.reduce(run, losses))

    def evaluate(self, run: Run, name: str, dataset: Any) -> dict[str, float]:
        """eval_loss: mean of the eval batches' losses (as HF's evaluation loop, batches of equal size); the
        metrics: mean over eval batches, with the `eval_` prefix (as TRL)."""
        bs = run.training_args.per_device_eval_batch_size
        builder = self.batch_builder(run, dataset, bs)
        batches = mdata.eval_batches(len(dataset), bs, run.dp_size, run.dp_rank)
        total = torch.zeros(len(self.METRICS) + 1, dtype=torch.float64, device=run.device)
        chunk = max(run.ga, 1)
        for i in range(0, len(batches), chunk):
            mbs = builder.build(batches[i : i + chunk])
            self._attach_reference(run, mbs, f"eval:{name}")
            with torch.no_grad():
                losses = run_schedule(run.ddp_models, mbs, forward_only=True,
                                      forward_step=partial(self._forward_step, run, "policy"))
            total += self.reduce(run, losses)
        prefix = f"eval_{name}_" if name else "eval_"
        loss, metrics = self.metrics(run, total, prefix)
        return {f"{prefix}loss": loss, **metrics}


__all__ = ["CPSum", "PairBatches", "ReferenceTask", "label_pad_id", "logits_mean", "logits_sums",
           "forward_step", "pairwise_collator", "sequence_logps", "sum_reports"]
