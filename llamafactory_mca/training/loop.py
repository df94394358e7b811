"""The training loop for stages pt / sft on megatron-core's schedules, with the HF Trainer's semantics.

The pieces (`setup_run`, `train`, `evaluate`) are shared by every stage; a task object supplies the
stage's collator, batches, loss and metrics (`SupervisedTask` here; `training.dpo`, `training.kto`, `training.rm` for
the preference stages).

Per optimizer step (one "global step" as LLaMA-Factory users know it):
  this rank's `gradient_accumulation_steps` microbatches (the HF Trainer's batches for this data-parallel rank)
  -> `get_forward_backward_func()` (no pipelining / 1F1B / interleaved 1F1B)
  -> per-token loss mode: each microbatch returns (sum of its weighted token CE, its loss denominator, ...);
     megatron's `finalize_model_grads` divides the gradients by the denominators of the whole global batch (all
     microbatches, all data-parallel ranks). With `loss_weighting` token (text models) the weights are 1 and the
     denominators the label tokens: exactly the HF Trainer's `num_items_in_batch` scaling; the other weightings
     (micro_batch for vision-language models, as LLaMA-Factory's HF path) are in training/loss_weighting.py
  -> megatron optimizer (grad clipping, AdamW) and `OptimizerParamScheduler` (HF schedule shapes)
  -> loss = global weighted CE sum / global denominator, broadcast to every rank, logged by global rank 0
     through LLaMA-Factory's callbacks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from llamafactory_mca.log import get_logger
from llamafactory_mca.training import data as mdata
from llamafactory_mca.training.logging import HFTrainerBookkeeping, check_finite, kernel_summary
from llamafactory_mca.training.lr_schedule import build_scheduler
from transformers.trainer_utils import speed_metrics

def _log(msg: str) -> None:
    get_logger("trainer").info_rank0(msg)


def warn(msg: str) -> None:
    """A warning on global rank 0 (LLaMA-Factory's logger)."""
    get_logger("trainer").warning_rank0(msg)


def _get_bridge(hf_config: Any) -> Any:
    from llamafactory_mca.models import get_bridge

    return get_bridge(hf_config)


def _params_dtype(training_args: Any) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


# --------------------------------------------------------------------------------------------- setup


def _build_optimizer(m: Any, training_args: Any, models: list, params_dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(
        optimizer="adam",
        lr=training_args.learning_rate,
        min_lr=0.0,
        weight_decay=training_args.weight_decay,
        adam_beta1=training_args.adam_beta1,
        adam_beta2=training_args.adam_beta2,
        adam_eps=training_args.adam_epsilon,
        clip_grad=training_args.max_grad_norm if training_args.max_grad_norm else 0.0,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=m.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    from llamafactory_mca import platform

    return platform.tune_optimizer(get_megatron_optimizer(cfg, models))


def configure_schedule(models: list, ddp_models: list, optimizer: Any, m: Any, params_dtype: torch.dtype) -> Any:
    """Schedule-related TransformerConfig fields, set on the config object every chunk shares (also used by
    the checkpoint and merge test workers, which drive megatron's schedules without the trainer)."""
    from llamafactory_mca import platform
    from megatron.core.distributed import finalize_model_grads

    for model in models:
        config = model.config
        config.batch_p2p_comm = platform.batch_p2p_comm(interleaved=len(models) > 1)
        config.batch_p2p_sync = platform.batch_p2p_sync()
        config.overlap_p2p_comm = False
        config.pipeline_dtype = params_dtype
        # fixed p2p shapes (batches are padded alike under PP), unless a model sends extra rows along (Qwen3-VL's
        # DeepStack maps, models/qwen3_vl.py)
        config.variable_seq_lengths = any(getattr(chunk, "varying_p2p_shapes", False) for chunk in models)
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        config.timers = None
        no_sync = [d.no_sync for d in ddp_models]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if m.overlap_grad_reduce:
            sync = [d.start_grad_sync for d in ddp_models]
            config.grad_sync_func = sync[0] if len(sync) == 1 else sync
        if m.overlap_param_gather:
            psync = [d.start_param_sync for d in ddp_models]
            config.param_sync_func = psync[0] if len(psync) == 1 else psync
    return models[0].config


# --------------------------------------------------------------------------------------------- steps


def model_kwargs(mb: mdata.MicroBatch, device: torch.device) -> dict:
    """Keyword inputs of the model besides tokens / positions: THD packing params, multimodal inputs."""
    kwargs = {key: _to(value, device) for key, value in mb.model_inputs.items()}
    p = mb.packed_seq_params
    if p is not None:
        from megatron.core.packed_seq_params import PackedSeqParams

        kwargs["packed_seq_params"] = PackedSeqParams(
            qkv_format=p.qkv_format, cu_seqlens_q=_to(p.cu_seqlens_q, device), cu_seqlens_kv=_to(p.cu_seqlens_kv, device),
            cu_seqlens_q_padded=_to(p.cu_seqlens_q_padded, device),
            cu_seqlens_kv_padded=_to(p.cu_seqlens_kv_padded, device),
            max_seqlen_q=p.max_seqlen_q, max_seqlen_kv=p.max_seqlen_kv)
    return kwargs


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without making the host wait for the GPU (the prefetcher pins the batches)."""
    return t.to(device, non_blocking=True)


def _forward_step(data_iterator: Any, model: Any):
    mb: mdata.MicroBatch = next(data_iterator)
    device = next(model.parameters()).device
    output = model(
        _to(mb.tokens, device),
        _to(mb.position_ids, device),
        None,
        labels=_to(mb.labels, device),
        **model_kwargs(mb, device),
    )
    return output, partial(_loss_func, _to(mb.loss_mask, device), _to(mb.loss_denominator, device), mb.num_samples)


def _loss_func(loss_mask: torch.Tensor, num_tokens: torch.Tensor, num_samples: int, output_tensor: torch.Tensor):
    """Per-token loss mode: (sum of weighted token CE, loss denominator, report).

    `loss_mask` carries the token weights of the run's `loss_weighting` (training/loss_weighting.py). The schedule
    may scale the returned loss in place, so the report holds a clone: [weighted CE sum, denominator, samples].
    """
    losses = output_tensor.float().reshape(-1)
    loss_sum = torch.sum(losses * loss_mask.reshape(-1))
    # the sample count is filled on the device (`new_full`): a host tensor copied over would make the host wait
    # for the GPU after every microbatch's forward (a blocking copy, `cudaStreamSynchronize`)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach().float(),
                          loss_sum.detach().new_full((), float(num_samples))])
    return loss_sum, num_tokens, {"lm loss": report}


def _reduce_report(losses: list, device: torch.device, num_microbatches: int = 0) -> torch.Tensor:
    """Per-microbatch [CE sum, label tokens, samples], summed over data-parallel ranks, on every rank.

    Shape [num_microbatches, 3]; the loss only exists on the last pipeline stage, which broadcasts it.
    """
    from megatron.core import parallel_state as ps

    n = num_microbatches or len(losses)
    buf = torch.zeros(n, 3, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for i, item in enumerate(losses):
            buf[i] = item["lm loss"].to(device=device, dtype=torch.float64)
        dist.all_reduce(buf, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return buf


def run_schedule(ddp_models: list, mbs: list, forward_only: bool, forward_step: Optional[Callable] = None) -> list:
    """One pass of megatron's schedule over `mbs` (forward and backward unless forward_only); returns the
    loss functions' reports of the last pipeline stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    iters = [mdata.microbatch_iterator(mbs) for _ in ddp_models]
    return fb(
        forward_step_func=forward_step or _forward_step,
        data_iterator=iters if len(iters) > 1 else iters[0],
        model=ddp_models if len(ddp_models) > 1 else ddp_models[0],
        num_microbatches=len(mbs),
        seq_length=mbs[0].schedule_seq_length,  # megatron divides it by cp (and by tp under SP)
        micro_batch_size=mbs[0].batch_size,
        forward_only=forward_only,
    )


def _sum_all(value: float, device: torch.device, group: Any = None) -> float:
    """`value` summed over `group` (itself on one rank: no host -> device copy, which would wait for the GPU)."""
    if dist.get_world_size(group) == 1:
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return float(t[0])


# --------------------------------------------------------------------------------------------- run


@dataclass
class Run:
    """Everything one training run holds after setup (the pieces every stage's task works with)."""

    m: Any
    model_args: Any
    data_args: Any
    training_args: Any
    finetuning_args: Any
    callbacks: list
    stage: str
    device: torch.device
    world_size: int
    dp_size: int
    dp_rank: int
    tp: int
    pp: int
    ga: int
    bs: int
    gbs: int
    tokenizer: Any = None
    tokenizer_module: Any = None
    template: Any = None
    train_dataset: Any = None
    eval_dataset: Any = None
    collator: Any = None
    pad_id: int = 0
    multiple: int = 1
    layout: mdata.SeqLayout = field(default_factory=mdata.SeqLayout)
    rope_fn: Optional[Callable] = None  # multimodal RoPE positions (Qwen2-VL), see training/multimodal.py
    hf_config: Any = None
    params_dtype: torch.dtype = torch.float32
    bridge: Any = None
    models: list = field(default_factory=list)
    ddp_models: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    config: Any = None
    lora: Any = None  # models.lora.LoraState under finetuning_type: lora
    book: Optional[HFTrainerBookkeeping] = None
    max_steps: int = 0
    loss_weighting: str = "token"  # resolved `loss_weighting` (training/loss_weighting.py)
    router_aux: Any = None  # models.router_aux_loss.HFRouterAuxLoss when moe_aux_loss_coef asks for HF's aux loss


class SupervisedTask:
    """Stages pt / sft: token-weighted cross entropy, as the HF Trainer computes it."""

    dataset_stage: Optional[str] = None  # None: the run's own stage

    def build_collator(self, run: Run) -> Any:
        return mdata.build_collator(run.stage, run.template, run.model_args, run.data_args, run.training_args,
                                    run.tokenizer_module, run.multiple)

    def batch_builder(self, run: Run, dataset: Any, micro_batch_size: int, training: bool = False) -> Any:
        """Micro-batches of `dataset`; for training weighted by the run's `loss_weighting`, for evaluation
        token-weighted per eval step (the HF evaluation loop's per-batch mean)."""
        return mdata.StepBatches(dataset, run.collator, run.pad_id, run.layout, uniform_shapes=run.pp > 1,
                                 micro_batch_size=micro_batch_size, rope_fn=run.rope_fn,
                                 loss_weighting=run.loss_weighting if training else "token")

    def adapt_model(self, run: Run) -> None:
        """After the fine-tuning method is applied, before DDP and the optimizer (e.g. rm's value head)."""

    def prepare(self, run: Run) -> None:
        """After the model, optimizer and bookkeeping exist, before the first step."""

    def save_final_model(self, run: Run) -> None:
        """What `output_dir` gets when training ends (`save_final_model`; rm adds its value head)."""
        save_final_model(run)

    def train_step(self, run: Run, mbs: list) -> tuple[float, dict[str, float]]:
        """Forward and backward of one optimizer step's microbatches; returns (loss, metrics to log). The loss may
        be a 0-d device tensor (the loop converts it after the optimizer step, so that the host queues the step's
        kernels before it waits for the GPU)."""
        if run.router_aux is not None:
            run.router_aux.begin_step(mbs, run.device)
        losses = run_schedule(run.ddp_models, mbs, forward_only=False)
        report = _reduce_report(losses, run.device, len(mbs)).sum(0)
        loss = report[0] / report[1].clamp(min=1.0)  # on the device: the loop reads it after the optimizer step
        if run.router_aux is None:
            return loss, {}
        aux = run.router_aux.end_step(run.device)  # the HF path's loss adds coef * aux (models/router_aux_loss.py)
        return loss + run.router_aux.coef * aux, {"load_balancing_loss": aux}

    def evaluate(self, run: Run, name: str, dataset: Any) -> dict[str, float]:
        """eval_loss as the HF evaluation loop computes it: per eval step (one batch on each data-parallel rank),
        token CE sum / label tokens of that step, averaged over steps weighted by their samples."""
        builder = self.batch_builder(run, dataset, run.training_args.per_device_eval_batch_size)
        batches = mdata.eval_batches(len(dataset), run.training_args.per_device_eval_batch_size, run.dp_size,
                                     run.dp_rank)
        weighted, samples = 0.0, 0.0
        chunk = max(run.ga, 1)
        for i in range(0, len(batches), chunk):
            mbs = builder.build(batches[i : i + chunk])
            with torch.no_grad():
                losses = run_schedule(run.ddp_models, mbs, forward_only=True)
            for ce, tokens, n in _reduce_report(losses, run.device, len(mbs)).tolist():
                if n > 0:
                    weighted += n * ce / max(tokens, 1.0)
                    samples += n
        prefix = f"eval_{name}" if name else "eval"
        return {f"{prefix}_loss": weighted / max(samples, 1.0)}

    def plot_keys(self) -> list[str]:
        return ["loss"]


def setup_run(mca_args: dict, model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any,
              callbacks: list, task: Any) -> Run:
    """Parallel state, LLaMA-Factory's data pipeline, the bridged model with its fine-tuning method, DDP,
    optimizer, LR schedule and HF Trainer bookkeeping."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.model import load_tokenizer
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from llamafactory_mca import platform
    from llamafactory_mca.args import MegatronArguments, global_batch_size

    m: MegatronArguments = mca_args[MegatronArguments]

    platform.setup_platform()
    platform.init_parallel(m, training_args.seed)
    world_size = dist.get_world_size()
    ga = training_args.gradient_accumulation_steps
    bs = training_args.per_device_train_batch_size
    run = Run(m=m, model_args=model_args, data_args=data_args, training_args=training_args,
              finetuning_args=finetuning_args, callbacks=callbacks, stage=finetuning_args.stage,
              device=platform.device(), world_size=world_size, dp_size=ps.get_data_parallel_world_size(),
              dp_rank=ps.get_data_parallel_rank(), tp=ps.get_tensor_model_parallel_world_size(),
              pp=ps.get_pipeline_model_parallel_world_size(), ga=ga, bs=bs,
              gbs=global_batch_size(m, world_size, bs, ga))
    _log(
        f"global batch size = (world_size {world_size} // (tp {run.tp} * pp {run.pp} * cp {m.context_parallel_size}))"
        f" * per_device_train_batch_size {bs} * gradient_accumulation_steps {ga} = {run.gbs} "
        f"(data-parallel size {run.dp_size})"
    )

    # ---- data: LLaMA-Factory's pipeline as it is
    run.tokenizer_module = load_tokenizer(model_args)
    run.tokenizer = run.tokenizer_module["tokenizer"]
    run.template = get_template_and_fix_tokenizer(run.tokenizer, data_args)
    dataset_module = get_dataset(run.template, model_args, data_args, training_args,
                                 stage=task.dataset_stage or run.stage, **run.tokenizer_module)
    run.train_dataset = dataset_module.get("train_dataset")
    run.eval_dataset = dataset_module.get("eval_dataset")
    if training_args.do_train and run.train_dataset is None:
        raise ValueError("no training data: set `dataset` (LLaMA-Factory's key)")
    if run.train_dataset is not None and not hasattr(run.train_dataset, "__len__"):
        raise NotImplementedError("`streaming: true` is not supported by the Megatron trainer yet. Fix: streaming: false.")
    run.layout = mdata.SeqLayout(tp=run.tp, cp=ps.get_context_parallel_world_size(),
                                 cp_rank=ps.get_context_parallel_rank(), sequence_parallel=m.sequence_parallel,
                                 thd=bool(data_args.neat_packing) and run.stage == "sft")
    run.multiple = run.layout.multiple
    run.collator = task.build_collator(run)
    run.pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0

    # ---- model: the bridge builds it and loads the HF weights, then the fine-tuning method applies
    run.hf_config = AutoConfig.from_pretrained(model_args.model_name_or_path,
                                               trust_remote_code=model_args.trust_remote_code)
    from llamafactory_mca.training import multimodal

    run.rope_fn = multimodal.rope_fn(run.hf_config)
    from llamafactory_mca.training.loss_weighting import resolve_loss_weighting

    run.loss_weighting = resolve_loss_weighting(m.loss_weighting, run.stage, run.hf_config,
                                                has_processor=run.tokenizer_module.get("processor") is not None)
    _log(f"loss weighting: {run.loss_weighting}" + (" (as LLaMA-Factory's HF path weights this model)"
                                                     if m.loss_weighting == "auto" else ""))
    run.params_dtype = _params_dtype(training_args)
    run.bridge = _get_bridge(run.hf_config)
    hf_aux_coef = None
    if m.moe_aux_loss_coeff is None and getattr(model_args, "moe_aux_loss_coef", None):
        if run.bridge.hf_router_aux_loss(run.hf_config):
            from llamafactory_mca.models.router_aux_loss import unsupported_reason

            reason = unsupported_reason(m, run.stage, run.layout.thd)
            if reason is None:
                hf_aux_coef = model_args.moe_aux_loss_coef  # LLaMA-Factory's own key, added as its HF path adds it
            else:
                m.moe_aux_loss_coeff = model_args.moe_aux_loss_coef
                warn(f"moe_aux_loss_coef: with {reason} the HF path's pooled load-balancing loss is not available; "
                     "megatron's per-layer load-balancing loss is used instead (the loss differs from the HF path's)")
        else:
            warn(f"moe_aux_loss_coef: LLaMA-Factory's HF path adds no router aux loss to {run.hf_config.model_type}, "
                 "so neither does this backend. Fix (to add megatron's load-balancing loss anyway): set "
                 "moe_aux_loss_coeff")
    # No random init: every weight is overwritten by the HF checkpoint (the bridge marks TP-split weights).
    run.models = run.bridge.build_model(run.hf_config, m, run.params_dtype, wrap_with_ddp=False, init_weights=False)
    platform.setup_platform()  # megatron modules imported while building
    run.bridge.load_hf_weights(run.models, model_args.model_name_or_path)
    run.lora = apply_finetuning_type(run)
    task.adapt_model(run)
    if hf_aux_coef is not None:
        from llamafactory_mca.models.router_aux_loss import HFRouterAuxLoss, hf_path_trains_on_it

        trains = hf_path_trains_on_it(run.model_args)
        if not trains:
            warn("moe_aux_loss_coef: LLaMA-Factory's HF path with its (reentrant) gradient checkpointing adds the "
                 "router aux loss to the logged loss but back-propagates none of it, and so does this backend. "
                 "Fix (to train on it, on both paths): disable_gradient_checkpointing: true")
        run.router_aux = HFRouterAuxLoss(run.models, hf_aux_coef, run.bridge.moe_topk(run.hf_config), trains)
    from llamafactory_mca.training.ddp import wrap_ddp

    run.ddp_models = wrap_ddp(m, run.models)
    run.optimizer = _build_optimizer(m, training_args, run.ddp_models, run.params_dtype)
    run.config = configure_schedule(run.models, run.ddp_models, run.optimizer, m, run.params_dtype)
    run.book = HFTrainerBookkeeping(training_args, callbacks, run.tokenizer, dist.get_rank() == 0,
                                    int(os.environ.get("LOCAL_RANK", "0")) == 0, run.hf_config)
    run.book.on_init_end()
    return run


def apply_finetuning_type(run: Run) -> Any:
    """full: everything trains; freeze: LLaMA-Factory's layer/module selection; lora: adapters on the TP linears.
    Returns the LoRA state (or None)."""
    from llamafactory_mca.training.finetune import apply_freeze, count_parameters

    ftype = run.finetuning_args.finetuning_type
    lora_state = None
    if ftype == "freeze":
        names = apply_freeze(run.bridge, run.models, run.finetuning_args)
        _log(f"Fine-tuning method: Freeze (megatron parameters trainable on rank 0: {len(names)})")
    elif ftype == "lora":
        from llamafactory_mca.models import lora

        lora_state = lora.apply_lora(run.bridge, run.models, run.finetuning_args, run.model_args, run.m)
        _log(f"Fine-tuning method: LoRA (r={lora_state.r}, alpha={lora_state.alpha}, "
             f"targets={','.join(lora_state.target_modules)})")
    elif ftype != "full":
        from llamafactory_mca.args import McaArgumentError

        raise McaArgumentError(f"`finetuning_type`: '{ftype}' is not supported by the Megatron backend. "
                               "Fix: use full, freeze or lora.")
    from llamafactory_mca.training import multimodal

    if ftype == "full":
        frozen = multimodal.apply_full_tuning_freeze(run.bridge, run.models, run.finetuning_args)
        if frozen:
            _log(f"Fine-tuning method: Full (frozen on rank 0: {', '.join(frozen)})")
    trainable, total = count_parameters(run.models)
    _log(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: "
         f"{100 * trainable / max(total, 1):.4f}")
    return lora_state


def train(run: Run, task: Any) -> None:
    """The HF Trainer's loop over optimizer steps, on megatron's schedules; `task` computes each step's loss."""
    from megatron.core import parallel_state as ps

    m, training_args, finetuning_args, book = run.m, run.training_args, run.finetuning_args, run.book
    ga, bs, dp_size, dp_rank = run.ga, run.bs, run.dp_size, run.dp_rank

    # ---- step accounting (HF Trainer.set_initial_training_values)
    shuffle = not finetuning_args.disable_shuffling
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    drop_last = training_args.dataloader_drop_last
    num_examples = len(run.train_dataset) if run.train_dataset is not None else 0

    def epoch_batches(epoch: int) -> list[list[int]]:
        order = mdata.epoch_indices(num_examples, seed, epoch, shuffle)
        return mdata.shard_batches(order, bs, dp_size, dp_rank, drop_last)

    batches_per_epoch = max(len(epoch_batches(0)), 1)
    update_steps_per_epoch = mdata.steps_per_epoch(batches_per_epoch, ga)
    if training_args.max_steps > 0:
        max_steps = training_args.max_steps
        num_train_epochs = max_steps // update_steps_per_epoch + int(max_steps % update_steps_per_epoch > 0)
        num_train_samples = max_steps * run.gbs
    else:
        max_steps = math.ceil(training_args.num_train_epochs * update_steps_per_epoch)
        num_train_epochs = math.ceil(training_args.num_train_epochs)
        num_train_samples = int(num_examples * training_args.num_train_epochs)
    run.max_steps = max_steps
    run.scheduler = build_scheduler(run.optimizer, training_args, max_steps)
    steps = task.batch_builder(run, run.train_dataset, bs, training=True) if run.train_dataset is not None else None

    from llamafactory_mca.training.preemption import PreemptionWatch, exit_after_save

    watch = PreemptionWatch(m.save_on_signal, run.device)  # before the (long) resume load: signals are kept
    start_step = 0
    resume = getattr(training_args, "resume_from_checkpoint", None)
    if resume:
        # LoRA checkpoints hold the adapter only: the base weights come from the HF model
        start_step = _load_checkpoint(resume, run.ddp_models, run.optimizer, run.scheduler, book)

    _log(f"***** Running training (Megatron: tp={run.tp} pp={run.pp} vpp={m.virtual_pipeline_model_parallel_size} "
         f"cp={run.layout.cp} ep={m.expert_model_parallel_size} dp={dp_size}"
         f"{' packed=thd' if run.layout.thd else ''}) *****")
    _log(f"  Num examples = {num_examples:,}  Num epochs = {num_train_epochs:,}  Total optimization steps = "
         f"{max_steps:,}  Global batch size = {run.gbs:,}")
    _log(f"  {kernel_summary(m, run.config)}")

    book.state.global_step = start_step
    book.globalstep_last_logged = start_step
    book.on_train_begin(max_steps, num_train_epochs, bs * dp_size)
    for model in run.ddp_models:
        model.train()

    def after_step() -> None:
        """`Trainer._maybe_log_save_evaluate` after logging: evaluation, then checkpoint."""
        if book.control.should_evaluate and run.eval_dataset is not None:
            metrics = evaluate(run, task)
            book.log(dict(metrics))
            book.on_evaluate(metrics)
        if book.control.should_save:
            # (under LoRA the PEFT adapter is written into the checkpoint before it is published)
            _save_checkpoint(book, run.ddp_models, run.optimizer, run.scheduler, training_args, m, saved_tokenizer(run),
                             run.hf_config, resumable=watch.triggered)
            book.on_save()

    last_grad_norm, last_lr = None, run.optimizer.param_groups[0]["lr"]
    epochs_trained = start_step // update_steps_per_epoch
    steps_skipped = start_step % update_steps_per_epoch
    for epoch in range(epochs_trained, num_train_epochs):
        batches = epoch_batches(epoch)
        book.on_epoch_begin()
        first = steps_skipped if epoch == epochs_trained else 0
        # the next steps' microbatches are built in DataLoader workers while this one trains (training/data.py)
        feed = mdata.prefetch_steps(steps, [batches[u * ga : (u + 1) * ga] for u in range(first, update_steps_per_epoch)],
                                    workers=max(int(training_args.dataloader_num_workers or 0), 1))
        for update_step, mbs in zip(range(first, update_steps_per_epoch), feed):
            book.on_step_begin()
            lr = run.optimizer.param_groups[0]["lr"]  # HF logs the rate this step used
            for model in run.ddp_models:
                model.zero_grad_buffer()
            run.optimizer.zero_grad()
            loss, metrics = task.train_step(run, mbs)
            ok, grad_norm, _ = run.optimizer.step()
            loss = float(loss)  # the first wait for the GPU after the step's kernels are queued
            if m.check_for_nan_in_loss_and_grad:  # raised before any checkpoint of this state is written
                check_finite(book.state.global_step + 1, loss, grad_norm)
            if ok:
                run.scheduler.step(increment=1)
            input_tokens = _sum_all(sum(mb.num_input_tokens for mb in mbs), run.device,
                                    ps.get_data_parallel_group(with_context_parallel=True))
            book.state.num_input_tokens_seen += int(input_tokens)
            book.add_step_loss(loss)
            book.add_step_metrics(metrics)
            book.on_optimizer_step()
            book.state.global_step += 1
            consumed = min((update_step + 1) * ga, batches_per_epoch)
            book.state.epoch = epoch + consumed / batches_per_epoch
            book.on_step_end()
            extra = _moe_metrics(run.config, ga)
            last_grad_norm = float(grad_norm) if grad_norm is not None else None
            last_lr = lr
            book.maybe_log(last_grad_norm, lr, extra)
            if watch.stop_requested():  # collective: a signal on any rank -> all save this step, then stop
                book.control.should_save = book.control.should_training_stop = True
            after_step()
            if book.control.should_epoch_stop or book.control.should_training_stop:
                break
        book.on_epoch_end()
        book.maybe_log(last_grad_norm, last_lr, {})
        after_step()
        if book.control.should_training_stop:
            break

    if watch.triggered:  # the checkpoint is published: exit 0 without the final export
        exit_after_save(watch, os.path.join(training_args.output_dir, f"checkpoint-{book.state.global_step}"))
    watch.close()
    metrics = book.final_metrics(num_train_samples)
    book.on_train_end()
    book.save_metrics("train", metrics)
    book.save_state()
    if m.save_hf_model:
        task.save_final_model(run)
    if dist.get_rank() == 0 and finetuning_args.plot_loss:
        from llamafactory.extras.ploting import plot_loss

        keys = task.plot_keys()
        if isinstance(run.eval_dataset, dict):
            keys += [f"eval_{key}_loss" for key in run.eval_dataset.keys()]
        else:
            keys += ["eval_loss"]
        plot_loss(training_args.output_dir, keys=keys)


def save_final_model(run: Run) -> None:
    """What LLaMA-Factory's `trainer.save_model()` writes into output_dir: the PEFT adapter under LoRA, else the
    full Hugging Face model (collective)."""
    out = run.training_args.output_dir
    if run.lora is not None:
        from llamafactory_mca.models import lora

        lora.save_peft_adapter(run.models, run.lora, out, base_model_name_or_path=run.model_args.model_name_or_path)
        if dist.get_rank() == 0:
            saved_tokenizer(run).save_pretrained(out)
        dist.barrier()
        return
    run.bridge.save_hf_pretrained(run.models, out, tokenizer=saved_tokenizer(run), dtype=run.params_dtype)


def saved_tokenizer(run: Run) -> Any:
    """What is saved beside the weights: for multimodal models the processor (its save_pretrained writes the
    tokenizer and the image/video processor configs, as LLaMA-Factory's SaveProcessorCallback does), else the
    tokenizer."""
    return (run.tokenizer_module or {}).get("processor") or run.tokenizer


def evaluate(run: Run, task: Any) -> dict[str, float]:
    """Every eval dataset through `task.evaluate`, with HF's speed metrics; models back in train mode after."""
    datasets = run.eval_dataset if isinstance(run.eval_dataset, dict) else {"": run.eval_dataset}
    metrics: dict[str, float] = {}
    for model in run.ddp_models:
        model.eval()
    for name, ds in datasets.items():
        start = time.time()
        metrics.update(task.evaluate(run, name, ds))
        prefix = f"eval_{name}" if name else "eval"
        num_steps = math.ceil(len(ds) / max(run.training_args.per_device_eval_batch_size * run.dp_size, 1))
        for key, value in speed_metrics("eval", start, num_samples=len(ds), num_steps=num_steps).items():
            metrics[key.replace("eval", prefix, 1)] = value
    for model in run.ddp_models:
        model.train()
    return metrics


def final_evaluate(run: Run, task: Any) -> None:
    metrics = evaluate(run, task)
    if run.stage == "pt":
        for key in list(metrics):
            if key.endswith("_loss"):
                try:
                    metrics[key.replace("_loss", "_perplexity")] = math.exp(metrics[key])
                except OverflowError:
                    metrics[key.replace("_loss", "_perplexity")] = float("inf")
    run.book.log(metrics)  # as HF's evaluate(): the metrics gain "epoch" and reach trainer_log.jsonl
    run.book.on_evaluate(metrics)
    run.book.save_metrics("eval", metrics)


def run_task(mca_args: dict, model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any,
             callbacks: list, task: Any) -> None:
    run = setup_run(mca_args, model_args, data_args, training_args, finetuning_args, callbacks, task)
    task.prepare(run)  # before any checkpoint is loaded: e.g. DPO's reference pass sees the initial weights
    if training_args.do_train:
        train(run, task)
    if training_args.do_eval and run.eval_dataset is not None:
        final_evaluate(run, task)
    if dist.is_initialized():
        dist.barrier()


def run_stage(mca_args: dict, model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any,
              generating_args: Any, callbacks: list) -> None:
    """Train (and evaluate) stage pt / sft on megatron-core (full, freeze or lora)."""
    run_task(mca_args, model_args, data_args, training_args, finetuning_args, callbacks, SupervisedTask())


# --------------------------------------------------------------------------------------------- MoE


def _moe_metrics(config: Any, num_microbatches: int) -> dict[str, float]:
    """MoE auxiliary losses of this step from megatron's tracker (mean over MoE layers and microbatches), then
    reset the tracker; empty for dense models. Collective: every rank calls it."""
    if not getattr(config, "num_moe_experts", None):
        return {}
    try:
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
            reduce_aux_losses_tracker_across_ranks,
        )
    except ImportError:
        return {}
    out: dict[str, float] = {}
    try:
        reduce_aux_losses_tracker_across_ranks()
        tracker = get_moe_layer_wise_logging_tracker()
        for name, entry in tracker.items():
            values = entry.get("values") if isinstance(entry, dict) else None
            if values is None:
                continue
            layers = max(int((values != 0).sum()), 1)  # MoE layers that reported (dense layers stay 0)
            out[name] = float(values.float().sum()) / num_microbatches / layers
    finally:
        clear_aux_losses_tracker()
    return out


# --------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(book: HFTrainerBookkeeping, ddp_models: list, optimizer: Any, scheduler: Any,
                     training_args: Any, m: Any, tokenizer: Any, hf_config: Any, resumable: bool = False) -> None:
    """The one call site of checkpoint saving: output_dir/checkpoint-{global_step} (collective).

    Under LoRA the PEFT adapter (what the HF Trainer's LoRA checkpoints hold) is written into the checkpoint
    before it is published, and the marker records the base model (merge needs it). `save_only_model` (HF's key)
    leaves the optimizer, scheduler and RNG state out, for full, freeze and LoRA alike, except with `resumable`
    (the checkpoint of a preempted run, which exists to be resumed from)."""
    import dataclasses

    from llamafactory_mca import checkpoint
    from llamafactory_mca.models import lora

    state = lora.state_of(ddp_models)
    save_adapter = extra_info = None
    if state is not None:
        def save_adapter(tmp_dir: str) -> None:
            lora.save_peft_adapter(ddp_models, state, tmp_dir, base_model_name_or_path=state.base_model_name_or_path)

        extra_info = lora.checkpoint_marker(state)
    checkpoint.save_checkpoint(
        training_args.output_dir,
        book.state.global_step,
        ddp_models,
        optimizer,
        scheduler,
        trainer_state=dataclasses.asdict(book.state),
        mca_args=m,
        hf_config=hf_config,
        tokenizer=tokenizer,
        save_total_limit=training_args.save_total_limit,
        extra_files=save_adapter,
        extra_info=extra_info,
        save_only_model=bool(getattr(training_args, "save_only_model", False)) and not resumable,
    )


def _load_checkpoint(path: str, ddp_models: list, optimizer: Any, scheduler: Any, book: HFTrainerBookkeeping) -> int:
    """Resume (collective): restores weights, optimizer, scheduler, RNG and the TrainerState; returns the step.
    A save_only_model checkpoint is refused (with an optimizer to load) by `checkpoint.load_checkpoint`.

    The load is always strict: under LoRA, every adapter tensor must be in the checkpoint (the base weights
    come from the Hugging Face model)."""
    from llamafactory_mca import checkpoint
    from llamafactory_mca.models import lora

    result = checkpoint.load_checkpoint(path, ddp_models, optimizer, scheduler, strict=True)
    lora_state = lora.state_of(ddp_models)
    saved_base = result["info"].get("base_model_name_or_path")
    if lora_state is not None and saved_base and lora_state.base_model_name_or_path and dist.get_rank() == 0:
        if os.path.abspath(saved_base) != os.path.abspath(lora_state.base_model_name_or_path):
            warn(f"{path} was trained on base model {saved_base}, this run uses "
                 f"{lora_state.base_model_name_or_path}: the adapter is applied to another base")
    state = result.get("trainer_state") or {}
    for key, value in state.items():
        # the process roles are this process' own, not those of the rank that wrote the checkpoint
        if key in ("is_local_process_zero", "is_world_process_zero"):
            continue
        if hasattr(book.state, key):
            setattr(book.state, key, value)
    book.state.global_step = int(result.get("step", state.get("global_step", 0)))
    return book.state.global_step
