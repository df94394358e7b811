"""Worker for the merge tests (no tests here): HF model -> Megatron (any layout) -> train a little -> checkpoint.

    torchrun --standalone --nproc_per_node 2 tests/merge_worker.py --hf DIR --out DIR [--tp 2] [--pp 2]
        [--vpp 2] [--ep 2] [--steps 2] [--lr 1e-3] [--resume CKPT [--resave DIR]]

Writes OUT/checkpoint-{steps} with save_checkpoint and, on rank 0, OUT/reference.pt: the input ids and the
logits the Megatron model computes for them after training (gathered over TP, from the last PP stage). With
--resume the checkpoint is loaded (model + optimizer, in this layout) instead of training, --resave saves it
again, and OUT/reference.pt holds the logits of the loaded model.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from llamafactory_mca.training.loop import configure_schedule

SEQ = 16


def forward_logits(models, tokens):
    """Logits [b, s, vocab] of the whole (pipelined, TP-sharded) model, on the last stage's ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(tokens.shape[1]).unsqueeze(0)
    rows = [tokens[i : i + 1] for i in range(tokens.shape[0])]  # one sample per microbatch (VPP needs >= PP)

    def step(data_iterator, model):
        x = next(data_iterator)
        out = model(x, pos, None)

        def collect(output_tensor, non_loss_data=True):
            return gather_from_tensor_model_parallel_region(output_tensor).detach().clone()

        return out, collect

    for m in models:
        m.eval()
    out = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=[iter(rows) for _ in models] if len(models) > 1 else iter(rows),
        model=models if len(models) > 1 else models[0],
        num_microbatches=len(rows),
        seq_length=tokens.shape[1],
        micro_batch_size=1,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        return torch.cat(out, dim=0)
    return None


def train(models, optimizer, steps: int, vocab: int):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        data = torch.randint(0, vocab, (2 * dp, SEQ + 1), generator=g)[2 * dp_rank : 2 * dp_rank + 2]
        mbs = [(data[i : i + 1, :-1], data[i : i + 1, 1:]) for i in range(2)]
        pos = torch.arange(SEQ).unsqueeze(0)

        def step_fn(it, model):
            x, y = next(it)
            out = model(x, pos, None, labels=y)
            return out, lambda t: (t.float().mean() / 2, {"loss": t.float().mean().detach()})

        for m in models:
            m.train()
            m.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=step_fn,
            data_iterator=[iter(list(mbs)) for _ in models] if len(models) > 1 else iter(mbs),
            model=models if len(models) > 1 else models[0],
            num_microbatches=2,
            seq_length=SEQ,
            micro_batch_size=1,
            forward_only=False,
        )
        optimizer.step()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--resume", default=None, help="load this checkpoint (model + optimizer) instead of training")
    p.add_argument("--resave", default=None, help="with --resume: save what was loaded into this output_dir")
    args = p.parse_args()
    if os.environ.get("MCA_TEST_DUMP_AFTER"):  # debugging hangs: print every thread's stack, then exit
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["MCA_TEST_DUMP_AFTER"]), exit=True)

    from transformers import AutoConfig, AutoTokenizer

    from llamafactory_mca import platform
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.checkpoint import save_checkpoint
    from llamafactory_mca.models import get_bridge

    m = MegatronArguments(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        expert_model_parallel_size=args.ep,
        use_distributed_optimizer=True,
        moe_token_dispatcher_type="alltoall",
    )
    platform.init_parallel(m, seed=1234)
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    hf_config = AutoConfig.from_pretrained(args.hf)
    tokenizer = AutoTokenizer.from_pretrained(args.hf) if os.path.isfile(os.path.join(args.hf, "tokenizer_config.json")) else None
    bridge = get_bridge(hf_config)
    models = bridge.build_model(hf_config, m, torch.float32, wrap_with_ddp=True)
    bridge.load_hf_weights(models, args.hf)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, use_distributed_optimizer=True,
                        bf16=False, params_dtype=torch.float32, clip_grad=1.0),
        models,
    )
    configure_schedule(models, models, optimizer, m, torch.float32)  # the trainer's own wiring
    if args.resume:
        from llamafactory_mca.checkpoint import load_checkpoint

        load_checkpoint(args.resume, models, optimizer)
        if args.resave:
            save_checkpoint(args.resave, args.steps, models, optimizer, None,
                            trainer_state={"global_step": args.steps}, mca_args=m, hf_config=hf_config)
    else:
        if args.steps:
            train(models, optimizer, args.steps, hf_config.vocab_size)
        save_checkpoint(args.out, args.steps, models, optimizer, None, trainer_state={"global_step": args.steps},
                        mca_args=m, hf_config=hf_config, tokenizer=tokenizer)
    tokens = torch.randint(0, hf_config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(99))
    logits = forward_logits(models, tokens)
    if logits is not None and ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        torch.save({"tokens": tokens, "logits": logits[..., : hf_config.vocab_size]},
                   os.path.join(args.out, "reference.pt"))
    platform.destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
