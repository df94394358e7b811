"""Stage rm on megatron-core: LLaMA-Factory's pairwise reward model (`PairwiseTrainer` on TRL's
`AutoModelForCausalLMWithValueHead`).

Model: the value head of `models.value_head` (v_head.summary: hidden -> 1, TP-replicated) in place of the output
layer on the last pipeline stage; it starts from `value_head.safetensors` (or `.bin`) of the adapter or model
directory when there is one (LLaMA-Factory's `load_valuehead_params`), else from a seeded random init.
Data: LLaMA-Factory's pairwise pipeline and collator (chosen rows, then rejected rows: `training.preference`).
Loss, per micro-batch: the mean over its pairs of -logsigmoid(chosen score - rejected score), each score the
value at the row's last non-padding token; the step's loss is the mean of the micro-batch losses (the HF path:
`micro_batch`; `loss_weighting: sample` weighs every pair of the global batch the same).
Metrics: training logs the loss (as LLaMA-Factory); evaluation eval_loss and eval_accuracy (the share of pairs
whose chosen score is higher, LLaMA-Factory's `ComputeAccuracy`).
Export: the Hugging Face model (its output layer unchanged, as on the HF path) and `value_head.safetensors` into
`output_dir`, LLaMA-Factory's layout (`fix_valuehead_checkpoint`), which its `load_model(add_valuehead=True)`
loads.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from llamafactory_mca.training import data as mdata
from llamafactory_mca.training.loop import Run, SupervisedTask, run_schedule, save_final_model
from llamafactory_mca.training.preference import PairBatches, forward_step, pairwise_collator, sum_reports

REPORT = ("loss", "accuracy", "pairs", "weight")


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor, rows: int) -> torch.Tensor:
    """The value at each of the first `rows` rows' last non-padding token (right padding), [rows]."""
    last = attention_mask[:rows].sum(-1).long().to(values.device) - 1
    return values[:rows].gather(1, last.unsqueeze(1)).squeeze(1)


class RMTask(SupervisedTask):
    """The `rm` stage: pairwise loss on the value head's scores of chosen and rejected rows."""

    dataset_stage = "rm"

    def build_collator(self, run: Run) -> Any:
        """LLaMA-Factory's pairwise collator, as its run_rm builds it."""
        return pairwise_collator(run)

    def batch_builder(self, run: Run, dataset: Any, micro_batch_size: int, training: bool = False) -> Any:
        """Pair micro-batches (the loss is weighted in the loss function)."""
        return PairBatches(dataset, run.collator, run.pad_id, run.layout, uniform_shapes=run.pp > 1,
                           micro_batch_size=micro_batch_size, rope_fn=run.rope_fn)

    def plot_keys(self) -> list[str]:
        """The log keys plotted with `plot_loss` (as LLaMA-Factory's rm workflow; eval_loss is added by the loop)."""
        return ["loss", "eval_accuracy"]

    def adapt_model(self, run: Run) -> None:
        """The value head in place of the output layer, from LLaMA-Factory's value head file where there is one."""
        from llamafactory.model import load_valuehead_params

        from llamafactory_mca.models.value_head import attach_value_heads, summary_dropout

        adapters = run.model_args.adapter_name_or_path
        path = adapters[-1] if adapters else run.model_args.model_name_or_path
        initial = load_valuehead_params(path, run.model_args)
        heads = attach_value_heads(run.models, run.bridge.tied_embeddings(run.hf_config),
                                   summary_dropout(run.hf_config), run.training_args.seed, initial)
        if heads and initial is not None:
            from llamafactory_mca.log import get_logger

            get_logger("trainer").info(f"value head loaded from {path}")

    def save_final_model(self, run: Run) -> None:
        """The Hugging Face model and `value_head.safetensors` (LLaMA-Factory's layout)."""
        from llamafactory_mca.models.value_head import save_value_head

        save_final_model(run)
        save_value_head(run.models, run.training_args.output_dir)

    # ---------------------------------------------------------------------------------------- forward / loss
    def _forward_step(self, run: Run, mode: str, data_iterator: Any, model: Any):
        return forward_step(partial(self._loss_func, run, mode), data_iterator, model)

    def _loss_func(self, run: Run, mode: str, mb: mdata.MicroBatch, values: torch.Tensor):
        n = mb.extra["pairs"]
        report = torch.zeros(len(REPORT), dtype=torch.float64, device=values.device)
        if n == 0:  # an eval filler batch: no loss, no metrics
            return values.sum() * 0.0, torch.tensor(1, dtype=torch.int, device=values.device), {"rm": report}
        scores = last_token_scores(values.squeeze(-1).float(), mb.extra["attention_mask"], 2 * n)
        chosen, rejected = scores[:n], scores[n:]
        losses = -F.logsigmoid(chosen - rejected)
        per_pair = mode == "train" and run.loss_weighting == "sample"
        loss = losses.sum() if per_pair else losses.mean()
        weight = n if per_pair else 1
        report[0] = loss.detach().double()
        report[1] = (chosen > rejected).double().sum()
        report[2] = n
        report[3] = weight
        return loss, torch.tensor(weight, dtype=torch.int, device=values.device), {"rm": report}

    # ---------------------------------------------------------------------------------------- task API
    def train_step(self, run: Run, mbs: list) -> tuple[float, dict[str, float]]:
        """One optimizer step's forward/backward over `mbs`; (loss, {})."""
        losses = run_schedule(run.ddp_models, mbs, forward_only=False,
                              forward_step=partial(self._forward_step, run, "train"))
        buf = sum_reports(losses, "rm", len(REPORT), run.device)
        return float(buf[0]) / max(float(buf[3]), 1.0), {}

    def evaluate(self, run: Run, name: str, dataset: Any) -> dict[str, float]:
        """eval_loss (mean of the eval batches' losses) and eval_accuracy (over all pairs)."""
        bs = run.training_args.per_device_eval_batch_size
        builder = self.batch_builder(run, dataset, bs)
        batches = mdata.eval_batches(len(dataset), bs, run.dp_size, run.dp_rank)
        total = torch.zeros(len(REPORT), dtype=torch.float64, device=run.device)
        chunk = max(run.ga, 1)
        for i in range(0, len(batches), chunk):
            mbs = builder.build(batches[i : i + chunk])
            with torch.no_grad():
                losses = run_schedule(run.ddp_models, mbs, forward_only=True,
                                      forward_step=partial(self._forward_step, run, "eval"))
            total += sum_reports(losses, "rm", len(REPORT), run.device)
        prefix = f"eval_{name}_" if name else "eval_"
        return {f"{prefix}loss": float(total[0]) / max(float(total[3]), 1.0),
                f"{prefix}accuracy": float(total[1]) / max(float(total[2]), 1.0)}


def run_rm(mca_args: dict, model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any,
           generating_args: Any, callbacks: list) -> None:
    """The `rm` workflow (`mca_workflow('rm')`)."""
    from llamafactory_mca.training.loop import run_task

    run_task(mca_args, model_args, data_args, training_args, finetuning_args, callbacks, RMTask())


__all__ = ["RMTask", "last_token_scores", "run_rm"]
