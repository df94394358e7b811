"""Stage dpo on megatron-core, with the semantics of LLaMA-Factory's `CustomDPOTrainer` (TRL's DPO losses).

Data: LLaMA-Factory's pairwise pipeline (`get_dataset(stage="rm")` + `PairwiseDataCollatorWithPadding`): one
microbatch holds a batch's chosen rows followed by its rejected rows, so a pair never straddles microbatches,
pipeline stages or data-parallel ranks.

Loss: per microbatch the mean over its pairs of the preference loss (sigmoid with `dpo_label_smoothing`, ipo,
orpo, simpo; `pref_ftx` adds the SFT term); each microbatch counts 1 in megatron's per-token mode, so the
gradient is the mean of the microbatch means over gradient accumulation and data-parallel ranks, as the HF
Trainer's (loss / gradient_accumulation_steps, averaged by DDP). Sequence log-probs come from megatron's
vocab-parallel cross entropy (TP-safe).

Reference model (losses other than orpo / simpo), never a second model copy:
  lora: the same model with the adapters disabled, a forward-only pass over each step's microbatches before the
        policy step;
  full / freeze: the initial weights (or `ref_model`'s, loaded for the pass), a forward-only pass over the whole
        training (and eval) set before the first step, the log-probs kept per sample. The pass follows the first
        epoch's batches, so its padding is the HF run's.
Metrics: LLaMA-Factory's keys (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected, logits/chosen, logits/rejected; sft_loss and odds_ratio_loss for orpo), the mean of
the microbatch values over gradient accumulation and data-parallel ranks. logits/* average over non-padding
positions only (LLaMA-Factory's include padding positions, whose values depend on the attention backend).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llamafactory_mca.training import data as mdata
from llamafactory_mca.training.loop import Run, SupervisedTask, run_schedule, warn

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "sft_loss", "odds_ratio_loss")


class PairBatches(mdata.StepBatches):
    """Microbatches of pairs: [chosen_1..n, rejected_1..n] rows (+ padding rows/columns that carry nothing).
    Built like StepBatches' (same inputs), with two rows a sample and the pair bookkeeping in `extra`."""

    def build(self, batches: list[Optional[list[int]]]) -> list[mdata.MicroBatch]:
        """One MicroBatch per list of sample indices (None: a padding micro-batch that carries nothing)."""
        mbs = []
        for idx in batches:
            ids = idx if idx is not None else [0]
            features = self.collator([self.dataset[i] for i in ids])
            mb = mdata.to_microbatch(features, self.pad_token_id)
            mb.extra = {"pairs": len(ids) if idx is not None else 0, "ids": list(ids) if idx is not None else [],
                        "attention_mask": features["attention_mask"].float()}
            if idx is None:
                mb.carry_nothing()
            mbs.append(mb)
        return mdata.lay_out(mbs, self.layout, self.pad_token_id, self.uniform_shapes, 2 * self.micro_batch_size)


def _sequence_logps(logits: torch.Tensor, mb: mdata.MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
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
        logps = _CPSum.apply(logps)
        lengths = _CPSum.apply(lengths)
    return logps, lengths


class _CPSum(torch.autograd.Function):
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


def _logits_mean(logits: torch.Tensor, rows: slice, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Mean of the logits over the real vocabulary and the non-padding positions of `rows` (collective over TP).

    LLaMA-Factory averages over padding positions as well, whose logits depend on how padding is attended to
    (HF masks padded keys, megatron's causal attention does not): those positions are left out here.
    """
    from megatron.core import parallel_state as ps

    m = mask[rows].to(logits.device)
    seq = m.shape[1]
    local = logits.detach()[rows, :seq].float()
    per = local.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * per
    real = max(0, min(per, vocab - start))
    total = (local[..., :real].sum(-1) * m).sum().reshape(1).double()
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_tensor_model_parallel_group())
    tokens = m.sum().reshape(1).double()
    if ps.get_context_parallel_world_size() > 1:
        both = torch.cat([total, tokens])
        dist.all_reduce(both, group=ps.get_context_parallel_group())
        total, tokens = both[:1], both[1:]
    count = float(tokens) * vocab
    return (total / max(count, 1.0)).float()


class DPOTask(SupervisedTask):
    """The `dpo` stage: LLaMA-Factory's preference losses on pairs, reference log-probs without a second model."""

    dataset_stage = "rm"

    def __init__(self) -> None:
        self.ref_tables: dict[str, torch.Tensor] = {}  # dataset name -> [N, 2] (chosen, rejected) reference logps
        self._ref_out: dict[int, tuple[float, float]] = {}

    # ---------------------------------------------------------------------------------------- data
    def build_collator(self, run: Run) -> Any:
        """LLaMA-Factory's pairwise collator (chosen rows, then rejected rows)."""
        from llamafactory.data import PairwiseDataCollatorWithPadding

        return PairwiseDataCollatorWithPadding(
            template=run.template,
            model=None,
            pad_to_multiple_of=8,  # as LLaMA-Factory's run_dpo; our own multiple is padded on top
            label_pad_token_id=mdata.IGNORE_INDEX if run.data_args.ignore_pad_token_for_loss
            else run.tokenizer.pad_token_id,
            **run.tokenizer_module,
        )

    def batch_builder(self, run: Run, dataset: Any, micro_batch_size: int, training: bool = False) -> Any:
        """Pair micro-batches; their loss masks stay unweighted (the pair loss is weighted in the loss function,
        see `loss_weighting`)."""
        return PairBatches(dataset, run.collator, run.pad_id, run.layout, uniform_shapes=run.pp > 1,
                           micro_batch_size=micro_batch_size)

    def plot_keys(self) -> list[str]:
        """The log keys plotted with `plot_loss` (as LLaMA-Factory's DPO workflow)."""
        return ["loss", "rewards/accuracies"]

    # ---------------------------------------------------------------------------------------- reference
    def prepare(self, run: Run) -> None:
        """Before training: dropout off (as LLaMA-Factory's DPO trainer) and the reference log-probs."""
        fa = run.finetuning_args
        # LLaMA-Factory's DPO trainer disables every dropout of the model (LoRA's included)
        if run.lora is not None:
            run.lora.dropout = 0.0
        for model in run.models:
            model.config.hidden_dropout = 0.0
            model.config.attention_dropout = 0.0
        if not fa.use_ref_model or run.lora is not None:
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
        fa = run.finetuning_args
        if not fa.use_ref_model:
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
        mb: mdata.MicroBatch = next(data_iterator)
        device = next(model.parameters()).device
        output = model(mb.tokens.to(device), mb.position_ids.to(device), None)
        return output, partial(self._loss_func, run, mode, mb)

    def _loss_func(self, run: Run, mode: str, mb: mdata.MicroBatch, logits: torch.Tensor):
        fa = run.finetuning_args
        n = mb.extra["pairs"]
        logps, lengths = _sequence_logps(logits, mb)
        if mode == "ref_table":
            for j, idx in enumerate(mb.extra["ids"]):
                self._ref_out[idx] = (float(logps[j]), float(logps[n + j]))
            zero = logits.sum() * 0.0
            return zero, torch.tensor(1, dtype=torch.int, device=logits.device), {"dpo": torch.zeros(1)}
        if mode == "ref_step":
            mb.extra["ref_logps"] = logps[: 2 * n].detach().clone()
            zero = logits.sum() * 0.0
            return zero, torch.tensor(1, dtype=torch.int, device=logits.device), {"dpo": torch.zeros(1)}

        report = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=logits.device)
        if n == 0:  # an eval filler batch: no loss, no metrics
            return logits.sum() * 0.0, torch.tensor(1, dtype=torch.int, device=logits.device), {"dpo": report}
        vocab = run.hf_config.vocab_size
        attn = mb.extra["attention_mask"]
        logits_c = _logits_mean(logits, slice(0, n), attn, vocab)
        logits_r = _logits_mean(logits, slice(n, 2 * n), attn, vocab)
        loss_type = fa.pref_loss
        all_logps = logps[: 2 * n]
        lengths = lengths[: 2 * n]
        if loss_type in ("ipo", "orpo", "simpo"):
            all_logps = all_logps / lengths
        chosen, rejected = all_logps[:n], all_logps[n:]
        chosen_avg = chosen if loss_type in ("ipo", "orpo", "simpo") else chosen / lengths[:n]
        beta = fa.pref_beta
        if not fa.use_ref_model:
            if loss_type == "orpo":
                log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
                losses = -chosen + beta * (-F.logsigmoid(log_odds))
            else:  # simpo
                logits_pi = (chosen - rejected) - fa.simpo_gamma / beta
                losses = -F.logsigmoid(beta * logits_pi)
            chosen_rewards = beta * chosen.detach()
            rejected_rewards = beta * rejected.detach()
        else:
            ref = mb.extra["ref_logps"].to(logits.device, torch.float32)
            ref_c, ref_r = ref[:n], ref[n : 2 * n]
            if loss_type in ("ipo",):
                ref_c, ref_r = ref_c / lengths[:n], ref_r / lengths[n:]
            z = (chosen - rejected) - (ref_c - ref_r)
            if loss_type == "sigmoid":
                ls = fa.dpo_label_smoothing
                losses = -F.logsigmoid(beta * z) * (1 - ls) - F.logsigmoid(-beta * z) * ls
            elif loss_type == "ipo":
                losses = (z - 1 / (2 * beta)) ** 2
            else:
                raise NotImplementedError(f"pref_loss {loss_type}")
            chosen_rewards = beta * (chosen - ref_c).detach()
            rejected_rewards = beta * (rejected - ref_r).detach()
        sft_loss = -chosen_avg
        if fa.pref_ftx > 1e-6:
            losses = losses + fa.pref_ftx * sft_loss
        # loss_weighting: micro_batch (the HF path) averages the pairs of each micro-batch and the micro-batches;
        # sample sums the pairs, and megatron divides by the pairs of the global batch. Evaluation averages batches.
        per_pair = mode == "train" and run.loss_weighting == "sample"
        agg = torch.sum if per_pair else torch.mean
        count = n if per_pair else 1
        loss = agg(losses)
        values = {
            "loss": loss.detach(),
            "rewards/chosen": agg(chosen_rewards),
            "rewards/rejected": agg(rejected_rewards),
            "rewards/accuracies": agg((chosen_rewards > rejected_rewards).float()),
            "rewards/margins": agg(chosen_rewards - rejected_rewards),
            "logps/chosen": agg(chosen.detach()),
            "logps/rejected": agg(rejected.detach()),
            "logits/chosen": logits_c * count,
            "logits/rejected": logits_r * count,
        }
        if loss_type == "orpo":
            values["sft_loss"] = agg(sft_loss.detach())
            values["odds_ratio_loss"] = agg((losses.detach() - sft_loss.detach()) / beta)
        for i, key in enumerate(METRICS):
            if key in values:
                report[i] = values[key].double()
        report[-1] = float(count)  # this microbatch's weight in the step's mean
        from megatron.core import parallel_state as ps

        if ps.get_context_parallel_rank() != 0:  # the CP group computed one loss: count it once
            report.zero_()
            return loss, torch.tensor(0, dtype=torch.int, device=logits.device), {"dpo": report}
        return loss, torch.tensor(count, dtype=torch.int, device=logits.device), {"dpo": report}

    def _reduce(self, run: Run, losses: list) -> torch.Tensor:
        """Sum of the microbatch reports over microbatches and data-parallel ranks, on every rank."""
        from megatron.core import parallel_state as ps

        buf = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=run.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for item in losses:
                buf += item["dpo"].to(device=run.device, dtype=torch.float64)
            dist.all_reduce(buf, group=ps.get_data_parallel_group(with_context_parallel=True))
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return buf

    def _metrics(self, run: Run, buf: torch.Tensor, prefix: str = "") -> tuple[float, dict[str, float]]:
        count = max(float(buf[-1]), 1.0)
        keys = [k for k in METRICS if k != "loss"]
        if run.finetuning_args.pref_loss != "orpo":
            keys = [k for k in keys if k not in ("sft_loss", "odds_ratio_loss")]
        metrics = {f"{prefix}{k}": float(buf[METRICS.index(k)]) / count for k in keys}
        return float(buf[0]) / count, metrics

    # ---------------------------------------------------------------------------------------- task API
    def train_step(self, run: Run, mbs: list) -> tuple[float, dict[str, float]]:
        """One optimizer step's forward/backward over `mbs`; (loss, reward metrics)."""
        self._attach_reference(run, mbs, "train")
        losses = run_schedule(run.ddp_models, mbs, forward_only=False,
                              forward_step=partial(self._forward_step, run, "train"))
        return self._metrics(run, self._reduce(run, losses))

    def evaluate(self, run: Run, name: str, dataset: Any) -> dict[str, float]:
        """eval_loss: mean of the eval batches' losses (as HF's evaluation loop, batches of equal size); the
        reward metrics: mean over eval batches, with the `eval_` prefix (as TRL)."""
        bs = run.training_args.per_device_eval_batch_size
        builder = self.batch_builder(run, dataset, bs)
        batches = mdata.eval_batches(len(dataset), bs, run.dp_size, run.dp_rank)
        total = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=run.device)
        chunk = max(run.ga, 1)
        for i in range(0, len(batches), chunk):
            mbs = builder.build(batches[i : i + chunk])
            self._attach_reference(run, mbs, f"eval:{name}")
            with torch.no_grad():
                losses = run_schedule(run.ddp_models, mbs, forward_only=True,
                                       forward_step=partial(self._forward_step, run, "policy"))
            total += self._reduce(run, losses)
        prefix = f"eval_{name}_" if name else "eval_"
        loss, metrics = self._metrics(run, total, prefix)
        return {f"{prefix}loss": loss, **metrics}


def run_dpo(mca_args: dict, model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any,
            generating_args: Any, callbacks: list) -> None:
    """The `dpo` workflow (`mca_workflow('dpo')`)."""
    from llamafactory_mca.training.loop import run_task

    if training_args.do_eval and not training_args.do_train and finetuning_args.use_ref_model \
            and finetuning_args.finetuning_type != "lora":
        warn("dpo evaluation without training: the reference model is the model itself, rewards are zero")
    run_task(mca_args, model_args, data_args, training_args, finetuning_args, callbacks, DPOTask())


__all__ = ["DPOTask", "PairBatches", "run_dpo", "METRICS"]
