"""Optimizer state that follows every parameter through a rewrite.

A rewrite keeps module names, so a parameter is known by its qualified name before and after.
:attr:`PassResult.param_edits <morphir.PassResult>` says how a reshaped parameter derives from the
old one (rows taken, columns taken and scaled); the optimizer's per-parameter state (momentum
buffers, Adam moments) gets the same map: a kept channel keeps its state, a new channel copies its
source's, and a column the rewrite scales (a split's halved outgoing weights) has its first
moments scaled alike and its second moments (names ending in ``_sq``) by the square. That keeps the
velocity in function space: the first step after a split moves the network's output as the step
before it would have (momentum in parameter units would instead halve the rows' buffers and keep
the columns'; the function-space reading matches the rewrite's own contract). Parameters
new to the graph (an inserted layer, a bias created by folding) start without state.

>>> result = morphir.rewrite(g, chosen, "learned")
>>> opt = morphir.rebuild_optimizer(opt, g.module, result.graph.module, result.param_edits)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from morphir.rewriter import ParamEdit

__all__ = ["carry_state", "rebuild_optimizer"]

log = logging.getLogger(__name__)


def _carry_tensor(key: str, value: torch.Tensor, edit: ParamEdit) -> torch.Tensor:
    if edit.rows is not None:
        value = value[edit.rows.to(value.device)]
    if edit.cols is not None:
        scale = edit.col_scale.to(value)
        if key.endswith("_sq"):
            scale = scale * scale
        view = (1, -1) + (1,) * (value.dim() - 2)
        value = value[:, edit.cols.to(value.device)] * scale.view(view)
    return value.clone()


def carry_state(
    state: Mapping[str, Mapping[str, Any]],
    edits: Mapping[str, ParamEdit],
    params: Mapping[str, torch.Tensor],
) -> dict[str, dict[str, Any]]:
    """Per-parameter optimizer state, keyed by qualified name, mapped onto the rewritten ``params``.

    ``state``: the old state by parameter name; ``edits``: the rewrite's ``param_edits``; ``params``:
    the new named parameters. Tensors shaped like the old parameter follow its edit; others (Adam's
    step count) are copied. A parameter without old state, or whose state does not fit after the
    edit, starts fresh.

    >>> new = carry_state({n: opt.state[p] for n, p in old.named_parameters()}, result.param_edits,
    ...                   dict(result.graph.module.named_parameters()))
    """
    out: dict[str, dict[str, Any]] = {}
    for name, param in params.items():
        old = state.get(name)
        if not old:
            continue
        edit = edits.get(name)
        new: dict[str, Any] = {}
        for key, value in old.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                value = _carry_tensor(key, value, edit) if edit is not None else value.clone()
                if value.shape != param.shape:
                    log.debug("optimizer state %s of %s does not fit after the rewrite; starting it fresh", key, name)
                    new = {}
                    break
            elif isinstance(value, torch.Tensor):
                value = value.clone()
            new[key] = value
        if new:
            out[name] = new
    return out


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer,
    old_module: torch.nn.Module,
    new_module: torch.nn.Module,
    edits: Mapping[str, ParamEdit],
) -> torch.optim.Optimizer:
    """A new optimizer of the same class and hyperparameters over ``new_module``'s parameters, with
    the state of ``optimizer`` carried through the rewrite (see :func:`carry_state`).

    The hyperparameters (learning rate included, so a schedule continues) come from the first
    parameter group; one group over all parameters is rebuilt.

    >>> opt = rebuild_optimizer(opt, g.module, result.graph.module, result.param_edits)
    """
    by_param = {p: name for name, p in old_module.named_parameters()}
    old_state = {by_param[p]: s for p, s in optimizer.state.items() if p in by_param}
    hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    params = dict(new_module.named_parameters())
    new_opt = type(optimizer)(list(params.values()), **optimizer.defaults)
    new_opt.param_groups[0].update(hyper)
    for name, st in carry_state(old_state, edits, params).items():
        new_opt.state[params[name]] = st
    return new_opt
