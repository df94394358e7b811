"""Optimizer checkpoints that load into another expert-parallel layout (EP changes the chaining of optimizers).

megatron-core keeps expert parameters in a second optimizer of a ChainedOptimizer only when they are expert
parallel (EP > 1: `allreduce=False`, param groups with `is_expert_parallel=True`); with EP=1 they share the dense
optimizer and its param groups. The optimizer's tensors (fp32 main params, Adam moments) are stored under global,
layout-free keys (`fully_reshardable`, `chained_optim_avoid_prefix`), but its small non-tensor part (each
optimizer's param groups: lr, weight decay, step ...; the common Adam step; the sharding type) is stored in
`common.pt` in the structure of the saving layout: `{0: dense, 1: experts}` for EP > 1, one dict for EP = 1.
megatron loads that structure as is, so an EP change failed (KeyError 'optimizer' with the distributed
optimizer, 'pre_wd_mult' without).

`optimizer_state_for_layout` rebuilds the state dict that the current optimizer expects: the tensors as loaded
(they sit where this layout asked for them), the non-tensor entries from the checkpoint, each param group taken
from the saved group with the same weight-decay / lr multipliers (`is_expert_parallel` is the layout's own).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

# megatron's param_group_identifier_keys without `is_expert_parallel`, which depends on the EP degree only
GROUP_KEYS = ("wd_mult", "lr_mult", "is_decoupled_lr")


class OptimizerLayoutError(ValueError):
    """The checkpoint's optimizer state does not fit this optimizer; the message names the key and the fix."""


def container_copy(obj: Any) -> Any:
    """A copy of the dicts and lists of a (sharded) state dict, sharing its leaves: what was asked for, kept
    apart from what a load puts in the containers."""
    if isinstance(obj, dict):
        return {k: container_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [container_copy(v) for v in obj]
    return obj


def saved_optimizer_parts(saved_common: Any) -> list[dict]:
    """The per-optimizer parts of a checkpoint's common (non-tensor) optimizer state: [dense, experts] from a
    ChainedOptimizer of several optimizers (int keys), [the one] otherwise."""
    if isinstance(saved_common, dict) and saved_common and all(isinstance(k, int) for k in saved_common):
        return [saved_common[k] for k in sorted(saved_common)]
    return [saved_common]


def optimizer_state_for_layout(requested: Any, loaded: Any, saved_common: Any, num_optimizers: int) -> Any:
    """The state dict to pass to the (chained) optimizer's `load_state_dict` in this layout.

    `requested`: `container_copy` of the optimizer's sharded state dict built for this layout (is_loading=True);
    `loaded`: the `optimizer` entry dist_checkpointing.load returned for it; `saved_common`: the `optimizer`
    entry of the checkpoint's common state dict; `num_optimizers`: how many optimizers the ChainedOptimizer
    chains now. Raises OptimizerLayoutError when a param group of this optimizer has no counterpart saved.
    """
    saved = saved_optimizer_parts(saved_common)
    if num_optimizers == 1:
        return _rebuild(requested, loaded, saved, ())
    # an unchanged chaining: optimizer i takes what optimizer i saved first
    order = (lambda i: [saved[i]] + saved[:i] + saved[i + 1:]) if len(saved) == num_optimizers else (lambda i: saved)
    return {i: _rebuild(requested[i], loaded[i], order(i), ()) for i in range(num_optimizers)}


def _rebuild(requested: Any, loaded: Any, saved: Sequence[dict], path: tuple) -> Any:
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(requested, ShardedBase):
        return loaded  # a tensor (or object) read from the shards, where this layout asked for it
    if isinstance(requested, LocalNonpersistentObject):
        return requested.unwrap()
    if isinstance(requested, dict):
        out = {}
        for k, v in requested.items():
            if k == "param_groups" and isinstance(v, list):
                out[k] = _param_groups(v, _saved_at(saved, path + (k,)) or [], path + (k,))
            else:
                out[k] = _rebuild(v, _child(loaded, k), saved, path + (k,))
        # scalars saved next to them that this layout's fresh state has not got (the common Adam step: megatron
        # writes it only when it is not 0)
        saved_here = _saved_at(saved, path)
        if isinstance(saved_here, dict):
            out.update({k: v for k, v in saved_here.items()
                        if k not in out and isinstance(k, str) and not isinstance(v, (dict, list))})
        return out
    if isinstance(requested, list):
        return [_rebuild(v, _child(loaded, i), saved, path + (i,)) for i, v in enumerate(requested)]
    found = [part for part in (_saved_at([s], path) for s in saved) if part is not None]
    return found[0] if found else requested  # e.g. the common Adam step, the sharding type, the grad scaler


def _child(container: Any, key: Any) -> Any:
    if isinstance(container, dict):
        return container.get(key)
    if isinstance(container, list) and isinstance(key, int) and key < len(container):
        return container[key]
    return None


def _saved_at(saved: Sequence[dict], path: tuple) -> Any:
    """The value at `path` in the first saved optimizer part that has it; for `param_groups`, the groups of
    every part (a layout with fewer optimizers takes its groups from all of them)."""
    values = []
    for part in saved:
        node: Any = part
        for k in path:
            node = _child(node, k)
            if node is None:
                break
        if node is not None:
            values.append(node)
    if not values:
        return None
    if path and path[-1] == "param_groups":
        return [g for groups in values for g in groups]
    return values[0]


def _group_key(group: dict) -> tuple:
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in GROUP_KEYS)


def _param_groups(current: list, saved_groups: list, path: tuple) -> list:
    """This optimizer's param groups with the checkpoint's values (lr, step, betas ...): each from the saved group
    with the same multipliers, preferring one with the same `is_expert_parallel`; `params` and
    `is_expert_parallel` stay this layout's."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    out = []
    for group in current:
        key = _group_key(group)
        candidates = [g for g in saved_groups if _group_key(g) == key]
        if not candidates:
            have = sorted({_group_key(g) for g in saved_groups}, key=str)
            raise OptimizerLayoutError(
                f"optimizer param group {dict(zip(GROUP_KEYS, key))} of this run is not in the checkpoint "
                f"(it has {[dict(zip(GROUP_KEYS, h)) for h in have]}, at {'.'.join(map(str, path))}). Fix: resume "
                "with the weight_decay and learning-rate settings the checkpoint was trained with."
            )
        same = [g for g in candidates if g.get("is_expert_parallel") == group.get("is_expert_parallel")]
        chosen: Optional[dict] = (same or candidates)[0]
        new = {k: v for k, v in chosen.items() if k != "params"}
        if "is_expert_parallel" in group:
            new["is_expert_parallel"] = group["is_expert_parallel"]
        if "params" in group:
            params = group["params"]
            new["params"] = params.unwrap() if isinstance(params, LocalNonpersistentObject) else params
        out.append(new)
    return out
