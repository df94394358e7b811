"""HF Trainer bookkeeping for the Megatron loop: TrainerState/TrainerControl, the callback handler, metrics files.

LLaMA-Factory's callbacks (LogCallback -> trainer_log.jsonl, the progress bar, reporters) are driven through
transformers' own `CallbackHandler`, with HF's `DefaultFlowCallback` deciding when to log / evaluate / save /
stop, so step accounting matches the HF Trainer's.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

from transformers import TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback
from transformers.trainer_utils import speed_metrics

TRAINER_STATE_NAME = "trainer_state.json"


def default_callbacks(training_args: Any) -> list[Any]:
    """The callbacks the HF Trainer adds on its own: flow control, report_to integrations, progress."""
    callbacks: list[Any] = [DefaultFlowCallback]
    try:
        from transformers.integrations import get_reporting_integration_callbacks

        callbacks += get_reporting_integration_callbacks(training_args.report_to)
    except Exception:  # an integration that is listed but not installed: HF raises too, we only skip it
        pass
    callbacks.append(PrinterCallback if training_args.disable_tqdm else ProgressCallback)
    return callbacks


class HFTrainerBookkeeping:
    """The parts of `transformers.Trainer` that callbacks and output files rely on."""

    def __init__(self, training_args: Any, callbacks: list[Any], tokenizer: Any, is_world_zero: bool,
                 is_local_zero: bool, model_config: Any = None) -> None:
        self.args = training_args
        self.state = TrainerState(is_local_process_zero=is_local_zero, is_world_process_zero=is_world_zero)
        self.control = TrainerControl()
        self.handler = CallbackHandler(
            default_callbacks(training_args) + list(callbacks), _ModelStub(model_config), tokenizer, None, None
        )
        # HF removes duplicates of the default callbacks passed twice (e.g. an explicit ProgressCallback).
        self.start_time = time.time()
        self._last_log_time = self.start_time
        self._last_log_tokens = 0
        self.tr_loss = 0.0  # sum of per-step losses since the last log
        self.total_loss = 0.0  # sum of all logged per-step losses
        self.globalstep_last_logged = 0
        self.stored_metrics: dict[str, list[float]] = {}  # per-step metrics since the last log (e.g. DPO rewards)

    # ---------------------------------------------------------------------------------------- events
    def on_init_end(self) -> None:
        self.control = self.handler.on_init_end(self.args, self.state, self.control)

    def on_train_begin(self, max_steps: int, num_train_epochs: int, train_batch_size: int) -> None:
        self.state.max_steps = max_steps
        self.state.num_train_epochs = num_train_epochs
        self.state.train_batch_size = train_batch_size
        self.state.logging_steps = self.args.logging_steps
        self.state.eval_steps = self.args.eval_steps
        self.state.save_steps = self.args.save_steps
        if hasattr(self.state, "compute_steps"):
            self.state.compute_steps(self.args, max_steps)
        self.state.is_hyper_param_search = False
        self.start_time = self._last_log_time = time.time()
        self.control = self.handler.on_train_begin(self.args, self.state, self.control)

    def on_epoch_begin(self) -> None:
        self.control = self.handler.on_epoch_begin(self.args, self.state, self.control)

    def on_step_begin(self) -> None:
        self.control = self.handler.on_step_begin(self.args, self.state, self.control)

    def on_substep_end(self) -> None:
        self.control = self.handler.on_substep_end(self.args, self.state, self.control)

    def on_optimizer_step(self) -> None:
        self.control = self.handler.on_pre_optimizer_step(self.args, self.state, self.control)
        self.control = self.handler.on_optimizer_step(self.args, self.state, self.control)

    def on_step_end(self) -> None:
        self.control = self.handler.on_step_end(self.args, self.state, self.control)

    def on_epoch_end(self) -> None:
        self.control = self.handler.on_epoch_end(self.args, self.state, self.control)

    def on_save(self) -> None:
        self.control = self.handler.on_save(self.args, self.state, self.control)

    def on_evaluate(self, metrics: dict) -> None:
        self.control = self.handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)

    def on_train_end(self) -> None:
        self.control = self.handler.on_train_end(self.args, self.state, self.control)

    # ---------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float]) -> None:
        """`Trainer.log`: epoch added, appended to the log history, callbacks' on_log."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        output = {**logs, "step": self.state.global_step}
        self.state.log_history.append(output)
        self.control = self.handler.on_log(self.args, self.state, self.control, logs)

    def add_step_loss(self, loss: float) -> None:
        if math.isnan(loss) or math.isinf(loss):
            if self.args.logging_nan_inf_filter:  # HF: add the average of the previous logged losses
                loss = self.tr_loss / (1 + self.state.global_step - self.globalstep_last_logged)
        self.tr_loss += loss

    def add_step_metrics(self, metrics: dict[str, float]) -> None:
        """Metrics of one optimizer step (already averaged over its microbatches and data-parallel ranks); the
        next log reports their mean over the steps since the last log, as TRL's `store_metrics` / `log` do."""
        for key, value in metrics.items():
            self.stored_metrics.setdefault(key, []).append(float(value))

    def maybe_log(self, grad_norm: Optional[float], learning_rate: float, extra: dict[str, float]) -> None:
        """`Trainer._maybe_log_save_evaluate`'s logging part: mean of the per-step losses since the last log."""
        if not (self.control.should_log and self.state.global_step > self.globalstep_last_logged):
            return
        steps = self.state.global_step - self.globalstep_last_logged
        logs: dict[str, float] = {"loss": self.tr_loss / steps}
        if grad_norm is not None:
            logs["grad_norm"] = grad_norm
        logs["learning_rate"] = learning_rate
        now = time.time()
        tokens = self.state.num_input_tokens_seen - self._last_log_tokens
        logs["tokens_per_second"] = round(tokens / max(now - self._last_log_time, 1e-9), 2)
        self._last_log_time, self._last_log_tokens = now, self.state.num_input_tokens_seen
        logs.update(extra)
        for key, values in self.stored_metrics.items():
            logs[key] = sum(values) / len(values)
        self.stored_metrics = {}
        self.total_loss += self.tr_loss
        self.tr_loss = 0.0
        self.globalstep_last_logged = self.state.global_step
        self.log(logs)

    def final_metrics(self, num_train_samples: int) -> dict[str, float]:
        """`Trainer._finalize_training`'s metrics: speed metrics, total_flos and the mean train loss."""
        self.total_loss += self.tr_loss
        self.tr_loss = 0.0
        train_loss = self.total_loss / max(self.state.global_step, 0.001)
        metrics = speed_metrics("train", self.start_time, num_samples=num_train_samples,
                                num_steps=self.state.max_steps, num_tokens=self.state.num_input_tokens_seen)
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = train_loss
        self.log(metrics)  # as HF: the dict gains "epoch" here
        return metrics

    # ---------------------------------------------------------------------------------------- files
    def save_metrics(self, split: str, metrics: dict[str, Any]) -> None:
        """`Trainer.save_metrics` (+ `log_metrics` on the console): {split}_results.json and all_results.json."""
        if not self.state.is_world_process_zero:
            return
        print(f"***** {split} metrics *****")
        for key in sorted(metrics):
            print(f"  {key:<30} = {metrics[key]}")
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, f"{split}_results.json"), "w") as f:
            json.dump(metrics, f, indent=4, sort_keys=True)
        path = os.path.join(self.args.output_dir, "all_results.json")
        all_metrics: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                all_metrics = json.load(f)
        all_metrics.update(metrics)
        with open(path, "w") as f:
            json.dump(all_metrics, f, indent=4, sort_keys=True)

    def save_state(self, output_dir: Optional[str] = None) -> None:
        if not self.state.is_world_process_zero:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.state.save_to_json(os.path.join(output_dir, TRAINER_STATE_NAME))


class _ModelStub:
    """What callbacks get as `model`: reporters read `model.config` (and guard everything else)."""

    def __init__(self, config: Any) -> None:
        self.config = config


def kernel_summary(mca_args: Any, config: Any) -> str:
    """One start-up line: the layer implementation, Transformer Engine or not, and the kernels and fusions in use
    (what megatron's own "falling back" warnings said piecemeal; those are filtered, see `log.py`)."""
    from llamafactory_mca.models.spec import use_transformer_engine
    from llamafactory_mca.platform import on_gpu, te_available

    te_spec = use_transformer_engine(mca_args)
    te = "Transformer Engine spec (experimental)" if te_spec else "local modules"
    attention = "TE" if te_spec else ("megatron DotProductAttention" if mca_args.attention_backend == "local"
                                      else "torch SDPA")
    parts = [f"layers: {te} (TE {'importable' if te_available() else 'absent'})", f"attention: {attention}"]
    if not te_spec:
        parts.append("norm: fused RMSNorm")
    if getattr(config, "num_moe_experts", None):
        parts.append(f"experts: {'one grouped GEMM' if config.moe_grouped_gemm else 'loop over experts'}, "
                     f"{config.moe_token_dispatcher_type} dispatch")
    parts.append("cross entropy: vocab-parallel")
    fusions = [name.replace("_fusion", "") for name in ("bias_activation_fusion", "gradient_accumulation_fusion",
                                                        "apply_rope_fusion", "masked_softmax_fusion",
                                                        "bias_dropout_fusion") if getattr(config, name, False)]
    from llamafactory_mca.kernels import rope

    if rope.installed() and "apply_rope" not in fusions:
        fusions.append("apply_rope (ours, compiled)")
    if getattr(config, "cuda_graph_impl", "none") != "none":
        fusions.append(f"cuda graphs ({config.cuda_graph_impl}, per layer)")
    parts.append(f"fusions: {', '.join(fusions) or 'none'}")
    parts.append(f"device: {'cuda (nccl)' if on_gpu() else 'cpu (gloo)'}")
    return " | ".join(parts)


class NonFiniteError(FloatingPointError):
    """`check_for_nan_in_loss_and_grad`: a step's loss or gradient norm is NaN/Inf; training stops at that step."""


def check_finite(step: int, loss: float, grad_norm: Optional[float]) -> None:
    """Raise NonFiniteError naming the step and what was not finite (the loss, the gradient norm or both).

    (megatron's DDP check, on with the same key, stops earlier on a NaN gradient bucket, in the backward pass.)"""
    bad = [f"{name} = {value}" for name, value in (("loss", loss), ("grad_norm", grad_norm))
           if value is not None and not math.isfinite(float(value))]
    if bad:
        raise NonFiniteError(
            f"step {step}: {' and '.join(bad)} (check_for_nan_in_loss_and_grad). Training stopped; no checkpoint was "
            "written from this state. Fix: lower learning_rate, set max_grad_norm, check the data, or resume from "
            "the last checkpoint."
        )
