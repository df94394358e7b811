"""Stage kto on megatron-core, with the semantics of LLaMA-Factory's `CustomKTOTrainer` (TRL's KTO loss).

Data: LLaMA-Factory's feedback pipeline (`get_dataset(stage="kto")`: each sample has its target completion, a
`kto_tag` (desirable or not) and a KL completion, another sample's response to its prompt) collated by its
`KTODataCollatorWithPadding`; one micro-batch holds the batch's target rows followed by its KL rows
(`TargetAndKLRows`), so both forwards of the HF path run as one here (the KL rows carry no gradient: their
estimate is detached, as in TRL).

Loss, per micro-batch (TRL's `kto_loss`, `loss_type: kto`):
  kl        = mean over the micro-batch of (policy - reference) KL-row log-probs, averaged over data-parallel
              ranks (TRL's `gather_for_metrics(kl).mean()`), clamped at 0, detached;
  desirable = kto_chosen_weight * (1 - sigmoid(pref_beta * (logratio - kl)));
  undesirable = kto_rejected_weight * (1 - sigmoid(pref_beta * (kl - logratio)));
  loss      = mean of both + pref_ftx * mean over desirable samples of -(log-prob / tokens) / #desirable * n.
The step's loss is the mean of the micro-batch losses (the HF path's `micro_batch` weighting). Reference log-probs
as dpo's (`training.preference`): precomputed once for full / freeze (or `ref_model`), the adapters disabled for
LoRA.

Metrics, as LLaMA-Factory's `CustomKTOTrainer.log`: rewards/chosen, logps/chosen, logits/chosen (and the rejected
ones) are sums over the step's desirable (undesirable) samples divided by their count; rewards/margins their
difference; kl the sum of the micro-batch estimates. logits/* sum over non-padding positions only (LLaMA-Factory's
include padding positions, whose logits depend on the attention backend). In evaluation with several
data-parallel ranks the KL estimate is each rank's own (eval batches may be fillers on some ranks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from llamafactory_mca.training import data as mdata
from llamafactory_mca.training.loop import Run
from llamafactory_mca.training.preference import PairBatches, ReferenceTask, label_pad_id, logits_sums

SIDES = ("chosen", "rejected")
SUMS = ("rewards", "logps", "logits")
METRICS = ("loss", "kl", *(f"{key}/{side}_sum" for side in SIDES for key in SUMS), "count/chosen", "count/rejected")


class TargetAndKLRows:
    """LLaMA-Factory's `KTODataCollatorWithPadding`, its target and KL batches stacked into one batch of 2n rows
    (right-padded to one length; padding carries no label), with the `kto_tags` of the n samples.

    Vision-language data: a KL row holds its sample's own prompt (images included) with another sample's
    response, and the HF path feeds the KL forward the target batch's pixel values; the stacked batch therefore
    carries the target batch's vision inputs twice (targets' images, then the KL rows' same images). Videos go
    with them too, where LLaMA-Factory 0.9.5's KTO trainer passes its model images only (its video tokens then
    embed as text): with video data the two backends differ."""

    def __init__(self, collator: Any, pad_token_id: int) -> None:
        self.collator = collator
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        target = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        kl = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
        length = max(target[0].shape[1], kl[0].shape[1])

        def stack(i: int, value: int) -> torch.Tensor:
            parts = [torch.nn.functional.pad(t[i], (0, length - t[i].shape[1]), value=value) for t in (target, kl)]
            return torch.cat(parts, dim=0)

        stacked = {"input_ids": stack(0, self.pad_token_id), "attention_mask": stack(1, 0),
                   "labels": stack(2, mdata.IGNORE_INDEX), "kto_tags": batch["kto_tags"].bool()}
        for key in (*mdata.MODEL_INPUT_KEYS, "second_per_grid_ts"):
            if torch.is_tensor(batch.get(key)):
                stacked[key] = torch.cat([batch[key], batch[key]], dim=0)
        return stacked


class KTOBatches(PairBatches):
    """Micro-batches of [targets, KL rows] with the samples' `kto_tags`."""

    extra_keys = ("kto_tags",)


class KTOTask(ReferenceTask):
    """The `kto` stage: TRL's KTO loss on target rows, the KL estimate from the mismatched-completion rows."""

    dataset_stage = "kto"
    METRICS = METRICS
    batches_class = KTOBatches

    def build_collator(self, run: Run) -> Any:
        """LLaMA-Factory's KTO collator (as its run_kto builds it), target and KL rows stacked."""
        from llamafactory.data import KTODataCollatorWithPadding

        collator = KTODataCollatorWithPadding(template=run.template, model=None, pad_to_multiple_of=8,
                                              label_pad_token_id=label_pad_id(run), **run.tokenizer_module)
        pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
        return TargetAndKLRows(collator, pad)

    def plot_keys(self) -> list[str]:
        """The log keys plotted with `plot_loss` (as LLaMA-Factory's KTO workflow)."""
        return ["loss", "rewards/chosen"]

    def pair_loss(self, run: Run, mode: str, mb: mdata.MicroBatch, logits: torch.Tensor, logps: torch.Tensor,
                  lengths: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """TRL's KTO loss of one micro-batch (mean over its samples) + `pref_ftx`; the metric sums."""
        from megatron.core import parallel_state as ps

        fa = run.finetuning_args
        n = mb.extra["pairs"]
        tags = mb.extra["kto_tags"].to(logits.device)
        ref = mb.extra["ref_logps"].to(logits.device, torch.float32)
        target, kl_rows = logps[:n], logps[n : 2 * n].detach()
        kl = (kl_rows - ref[n : 2 * n]).mean().detach()
        dp = ps.get_data_parallel_world_size()
        if mode == "train" and dp > 1:  # TRL: gather_for_metrics(kl).mean() (every rank trains on a real batch)
            kl = kl.clone()
            dist.all_reduce(kl, group=ps.get_data_parallel_group())
            kl = kl / dp
        kl = kl.clamp(min=0)
        beta = fa.pref_beta
        logratios = target - ref[:n]
        chosen_lr, rejected_lr = logratios[tags], logratios[~tags]
        losses = torch.cat([fa.kto_chosen_weight * (1 - torch.sigmoid(beta * (chosen_lr - kl))),
                            fa.kto_rejected_weight * (1 - torch.sigmoid(beta * (kl - rejected_lr)))])
        loss = losses.nanmean()
        n_chosen = int(tags.sum())
        if fa.pref_ftx > 1e-6 and n_chosen > 0:  # TRL's rescaling, as LLaMA-Factory writes it
            sft_loss = -(target / lengths[:n])[tags]
            loss = loss + fa.pref_ftx * sft_loss.nanmean() / n_chosen * n
        logit_sums, _ = logits_sums(logits, slice(0, n), mb.extra["attention_mask"],
                                     run.bridge.vocab_size(run.hf_config))
        values = {"loss": loss.detach(), "kl": kl / (dp if mode == "train" else 1)}
        for side, mask in (("chosen", tags), ("rejected", ~tags)):
            values[f"rewards/{side}_sum"] = (beta * logratios.detach()[mask]).sum()
            values[f"logps/{side}_sum"] = target.detach()[mask].sum()
            values[f"logits/{side}_sum"] = logit_sums[mask].sum()
            values[f"count/{side}"] = mask.sum().double()
        return loss, 1, values

    def metrics(self, run: Run, buf: torch.Tensor, prefix: str = "") -> tuple[float, dict[str, float]]:
        """(loss, metrics) as `CustomKTOTrainer.log` builds them from the summed micro-batch values."""
        value = {key: float(buf[i]) for i, key in enumerate(self.METRICS)}
        out: dict[str, float] = {}
        for side in SIDES:
            count = value[f"count/{side}"]
            if count > 0:
                for key in SUMS:
                    out[f"{prefix}{key}/{side}"] = value[f"{key}/{side}_sum"] / count
        if f"{prefix}rewards/chosen" in out and f"{prefix}rewards/rejected" in out:
            out[f"{prefix}rewards/margins"] = out[f"{prefix}rewards/chosen"] - out[f"{prefix}rewards/rejected"]
        out[f"{prefix}kl"] = value["kl"]
        return value["loss"] / max(float(buf[-1]), 1.0), out


def run_kto(mca_args: dict, model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any,
            generating_args: Any, callbacks: list) -> None:
    """The `kto` workflow (`mca_workflow('kto')`)."""
    from llamafactory_mca.training.loop import run_task

    run_task(mca_args, model_args, data_args, training_args, finetuning_args, callbacks, KTOTask())


__all__ = ["KTOTask", "TargetAndKLRows", "run_kto", "METRICS"]
