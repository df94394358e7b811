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

from typing import Any

import torch
import torch.nn.functional as F

from llamafactory_mca.training import data as mdata
from llamafactory_mca.training.loop import Run, warn
from llamafactory_mca.training.preference import (
    PairBatches,
    ReferenceTask,
    label_pad_id,
    logits_mean,
    pairwise_collator,
)

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "sft_loss", "odds_ratio_loss")


class DPOTask(ReferenceTask):
    """The `dpo` stage: LLaMA-Factory's preference losses on pairs, reference log-probs without a second model."""

    METRICS = METRICS

    def uses_reference(self, run: Run) -> bool:
        """orpo / simpo need no reference model (LLaMA-Factory's `use_ref_model`)."""
        return bool(run.finetuning_args.use_ref_model)

    def build_collator(self, run: Run) -> Any:
        """LLaMA-Factory's pairwise collator (chosen rows, then rejected rows)."""
        return pairwise_collator(run, label_pad_id(run))

    def plot_keys(self) -> list[str]:
        """The log keys plotted with `plot_loss` (as LLaMA-Factory's DPO workflow)."""
        return ["loss", "rewards/accuracies"]

    def logged_keys(self, run: Run) -> list[str]:
        """sft_loss and odds_ratio_loss are orpo's only."""
        keys = [k for k in self.METRICS if k != "loss"]
        if run.finetuning_args.pref_loss != "orpo":
            keys = [k for k in keys if k not in ("sft_loss", "odds_ratio_loss")]
        return keys

    def pair_loss(self, run: Run, mode: str, mb: mdata.MicroBatch, logits: torch.Tensor, logps: torch.Tensor,
                  lengths: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """TRL's DPO losses (sigmoid with label smoothing, ipo, orpo, simpo) + `pref_ftx`, per micro-batch."""
        fa = run.finetuning_args
        n = mb.extra["pairs"]
        vocab = run.bridge.vocab_size(run.hf_config)
        attn = mb.extra["attention_mask"]
        logits_c = logits_mean(logits, slice(0, n), attn, vocab)
        logits_r = logits_mean(logits, slice(n, 2 * n), attn, vocab)
        loss_type = fa.pref_loss
        all_logps = logps
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
        return loss, count, values


def run_dpo(mca_args: dict, model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any,
            generating_args: Any, callbacks: list) -> None:
    """The `dpo` workflow (`mca_workflow('dpo')`)."""
    from llamafactory_mca.training.loop import run_task

    if training_args.do_eval and not training_args.do_train and finetuning_args.use_ref_model \
            and finetuning_args.finetuning_type != "lora":
        warn("dpo evaluation without training: the reference model is the model itself, rewards are zero")
    run_task(mca_args, model_args, data_args, training_args, finetuning_args, callbacks, DPOTask())


__all__ = ["DPOTask", "PairBatches", "run_dpo", "METRICS"]
