"""Worker for the checkpoint tests (no tests here): a tiny GPT trained with megatron-core on CPU gloo ranks.

    torchrun --nproc_per_node 2 tests/checkpoint_worker.py --out DIR --steps 6 --save_steps 3 [--tp 2]
        [--pp 2] [--experts 4 [--ep 2]] [--resume DIR/checkpoint-3 | --resume auto] [--stop_after 3] [--distopt]
        [--dropout 0.1]
        [--signal_at 5 --signal_rank 1] [--kill_during_save 4] [--enospc_at 4 --enospc_rank 1]

`--experts N`: every layer's MLP is a mixture of N experts (top-2, megatron's SequentialMLP), sharded over `--ep`
ranks (megatron then keeps the expert parameters in a second, chained optimizer).
Rank 0 writes DIR/losses.json ({step: loss}) with the loss of every optimizer step it ran (losses_resumed.json
when resumed). The data of step k depends only on k (its "data position"), as with a resumed dataloader.
`--resume auto`: the newest complete checkpoint in DIR, if any (as LLaMA-Factory's automatic resume).
Faults: `--signal_at K --signal_rank R` (rank R sends itself SIGUSR1 during step K: every rank saves checkpoint-K
through training.preemption and exits 0), `--kill_during_save K` (the last rank SIGKILLs itself in the middle of
the save of checkpoint-K), `--enospc_at K --enospc_rank R` (the torch_dist writer of rank R fails with ENOSPC at step K).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import sys

import torch

from llamafactory_mca.training.loop import configure_schedule

VOCAB, SEQ, GLOBAL_BATCH = 96, 16, 4


def build(args):
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    from megatron.core import parallel_state as ps
    from llamafactory_mca import platform

    platform.setup_platform()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    cfg = TransformerConfig(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=args.dropout,
        attention_dropout=args.dropout,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=vpp,
        batch_p2p_comm=False,
        bf16=False,
        **(dict(num_moe_experts=args.experts, moe_router_topk=2, moe_ffn_hidden_size=48,
                moe_router_load_balancing_type="none", moe_token_dispatcher_type="alltoall",
                expert_model_parallel_size=ps.get_expert_model_parallel_world_size()) if args.experts else {}),
    )
    spec = get_gpt_layer_local_spec(num_experts=args.experts or None, normalization="RMSNorm")
    chunks = []
    for v in range(vpp or 1):
        chunks.append(
            GPTModel(
                cfg,
                spec,
                vocab_size=VOCAB,
                max_sequence_length=SEQ,
                position_embedding_type="rope",
                share_embeddings_and_output_weights=False,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v),
                vp_stage=v if vpp else None,
            )
        )
    ddp_cfg = DistributedDataParallelConfig(
        use_distributed_optimizer=args.distopt, grad_reduce_in_fp32=True, overlap_grad_reduce=False
    )
    models = [DDP(cfg, ddp_cfg, m) for m in chunks]
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=1.0,
        use_distributed_optimizer=args.distopt,
        bf16=False,
        params_dtype=torch.float32,
    )
    optimizer = get_megatron_optimizer(opt_cfg, models)
    return cfg, models, optimizer, DecayingLR(_torch_opts(optimizer), args.lr)


class DecayingLR:
    """lr = base / (1 + step) in every param group of every (chained) torch optimizer: a decaying LR, so the
    scheduler state matters on resume."""

    def __init__(self, optimizers, base_lr: float) -> None:
        self.optimizers, self.base_lr, self.last_epoch = optimizers, base_lr, 0
        self._apply()

    def _apply(self) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.base_lr / (1 + self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lr": self.base_lr}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch, self.base_lr = state["last_epoch"], state["base_lr"]
        self._apply()


def _torch_opts(optimizer):
    from llamafactory_mca.checkpoint import _torch_optimizers

    return _torch_optimizers(optimizer)


def batch_for_step(step: int, dp_rank: int, dp_size: int):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    per = GLOBAL_BATCH // dp_size
    tokens = tokens[dp_rank * per : (dp_rank + 1) * per]
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def train_step(cfg, models, optimizer, step: int, signal_now: bool = False) -> float | None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    inputs, labels = batch_for_step(step, dp_rank, dp_size)
    micro = 1  # one sample per microbatch: microbatches = GLOBAL_BATCH / dp
    n_micro = inputs.shape[0] // micro
    batches = iter([(inputs[i : i + micro], labels[i : i + micro]) for i in range(n_micro)])
    pos = torch.arange(SEQ).unsqueeze(0)

    def forward_step(data_iterator, model):
        x, y = next(data_iterator)
        out = model(x, pos, None, labels=y)

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss / n_micro, {"loss": loss.detach().clone()}

        return out, loss_func

    for m in models:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    fb = get_forward_backward_func()
    data_iter = [batches] + [iter([(inputs[i : i + micro], labels[i : i + micro]) for i in range(n_micro)]) for _ in models[1:]]
    out = fb(
        forward_step_func=forward_step,
        data_iterator=data_iter if len(models) > 1 else batches,
        model=models if len(models) > 1 else models[0],
        num_microbatches=n_micro,
        seq_length=SEQ,
        micro_batch_size=micro,
        forward_only=False,
    )
    if signal_now:  # in the middle of the step, as a scheduler's signal would come
        os.kill(os.getpid(), signal.SIGUSR1)
    optimizer.step()
    loss = None
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        loss = torch.stack([o["loss"] for o in out]).mean()
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        loss = (loss / dp_size).item()
    return loss


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save_steps", type=int, default=0)
    p.add_argument("--stop_after", type=int, default=0, help="exit (as if killed) after this step")
    p.add_argument("--resume", default=None)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--experts", type=int, default=0, help="MoE layers with this many experts")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (with --experts)")
    p.add_argument("--distopt", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--save_total_limit", type=int, default=None)
    p.add_argument("--resave", default=None, help="after loading --resume, save it again into this output_dir")
    p.add_argument("--no_untie", action="store_true", help="disable the shared-step fix (shows the trap)")
    p.add_argument("--signal_at", type=int, default=0)
    p.add_argument("--signal_rank", type=int, default=0)
    p.add_argument("--kill_during_save", type=int, default=0)
    p.add_argument("--enospc_at", type=int, default=0)
    p.add_argument("--enospc_rank", type=int, default=0)
    args = p.parse_args()

    from llamafactory_mca import platform
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.checkpoint import load_checkpoint, save_checkpoint

    m = MegatronArguments(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        expert_model_parallel_size=args.ep,
        use_distributed_optimizer=args.distopt,
    )
    platform.init_parallel(m, seed=1234)
    from megatron.core import parallel_state as ps

    cfg, models, optimizer, scheduler = build(args)
    configure_schedule(models, models, optimizer, m, torch.float32)  # the trainer's own wiring
    if args.no_untie:
        import llamafactory_mca.checkpoint as ckpt

        ckpt.untie_optimizer_steps = lambda optimizer: 0
    from llamafactory_mca.checkpoint import get_last_checkpoint
    from llamafactory_mca.training.preemption import PreemptionWatch, exit_after_save

    watch = PreemptionWatch("SIGTERM,SIGUSR1")
    rank = torch.distributed.get_rank()
    if args.resume == "auto":
        args.resume = get_last_checkpoint(args.out)
    start = 0
    if args.resume:
        res = load_checkpoint(args.resume, models, optimizer, scheduler)
        start = res["trainer_state"]["global_step"]
        steps = [st["step"] for o in _torch_opts(optimizer) for st in o.state.values() if "step" in st]
        res["distinct_step_tensors"] = len({id(t) for t in steps})
        res["num_step_tensors"] = len(steps)
        res["step_values"] = sorted({float(t) for t in steps})
        res["torch_rng_sha"] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
        if torch.distributed.get_rank() == 0:
            keys = ("step", "rng_restored", "optimizer_loaded", "distinct_step_tensors", "num_step_tensors",
                    "step_values", "torch_rng_sha")
            print("RESUMED", json.dumps({k: res[k] for k in keys}), flush=True)
        if args.resave:
            save_checkpoint(args.resave, start, models, optimizer, scheduler,
                            trainer_state=res["trainer_state"], mca_args=m)
    losses = {}

    def report() -> None:  # the last pipeline stage of DP rank 0 / TP rank 0 reports
        if (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_data_parallel_rank() == 0
                and ps.get_tensor_model_parallel_rank() == 0):
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"losses{'_resumed' if args.resume else ''}.json"), "w") as f:
                json.dump(losses, f)

    for step in range(start, args.steps):
        done = step + 1
        loss = train_step(cfg, models, optimizer, step, signal_now=done == args.signal_at and rank == args.signal_rank)
        scheduler.step()
        if loss is not None:
            losses[done] = loss
        preempted = watch.stop_requested()  # the trainer's per-step check (collective)
        if (args.save_steps and done % args.save_steps == 0) or preempted:
            inject_faults(args, done, rank)
            path = save_checkpoint(
                args.out, done, models, optimizer, scheduler,
                trainer_state={"global_step": done, "data_position": {"step": done}},
                mca_args=m, save_total_limit=args.save_total_limit,
            )
            if preempted:
                report()
                exit_after_save(watch, path)
        if args.stop_after and done >= args.stop_after:
            break
    report()
    platform.destroy_parallel()
    return 0


def inject_faults(args, step: int, rank: int) -> None:
    """Arm the faults asked for at this step's save: a SIGKILL in the middle of it, a full disk on one rank."""
    import llamafactory_mca.checkpoint as ckpt
    from torch.distributed.checkpoint import FileSystemWriter

    if step == args.kill_during_save and rank == torch.distributed.get_world_size() - 1:
        def die(state):  # after the torch_dist shards, before the RNG files and the marker
            os.kill(os.getpid(), signal.SIGKILL)

        ckpt.rng_state_to_tensors = die
    if step == args.enospc_at and rank == args.enospc_rank:
        def full(self, plan, planner):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(str(self.path), "__1_0.distcp"))

        FileSystemWriter.write_data = full


if __name__ == "__main__":
    sys.exit(main())
