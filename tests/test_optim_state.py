"""Optimizer state follows parameters through rewrites."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import morphir


def trained(opt_cls=torch.optim.SGD, **kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    g = morphir.trace(net, torch.zeros(1, 1, 4, 4))
    opt = opt_cls(g.module.parameters(), lr=0.1, **kw)
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(g.module(x), y).backward()
        opt.step()
    return g, opt


def test_split_and_prune_carry_momentum_rows_and_scaled_columns() -> None:
    g, opt = trained(momentum=0.9, nesterov=True, weight_decay=1e-4)
    old = {n: opt.state[p]["momentum_buffer"].clone() for n, p in g.module.named_parameters()}
    split = [c for c in morphir.candidates(g, "split") if c.site.index == 1]
    prune = [c for c in morphir.candidates(g, "prune") if c.site.index == 3]
    result = morphir.rewrite(g, split + prune)
    new_opt = morphir.rebuild_optimizer(opt, g.module, result.graph.module, result.param_edits)
    params = dict(result.graph.module.named_parameters())
    buf = {n: new_opt.state[p]["momentum_buffer"] for n, p in params.items()}
    # channels 0, 1, 2 kept (3 pruned), the copy of channel 1 appended: rows [0, 1, 2, 1]
    rows = torch.tensor([0, 1, 2, 1])
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert buf[name].shape == params[name].shape
        assert torch.equal(buf[name], old[name][rows])
    # the classifier reads 16 features per channel; both copies of channel 1 read half
    cols = (rows[:, None] * 16 + torch.arange(16)).reshape(-1)
    scale = torch.tensor([1.0, 0.5, 1.0, 0.5]).repeat_interleave(16)
    assert torch.allclose(buf["4.weight"], old["4.weight"][:, cols] * scale)
    assert torch.equal(buf["4.bias"], old["4.bias"])
    assert new_opt.param_groups[0]["lr"] == 0.1 and new_opt.param_groups[0]["nesterov"]


def test_adam_second_moments_scale_by_the_square_and_inserted_layers_start_fresh() -> None:
    g, opt = trained(torch.optim.Adam)
    old = {n: dict(opt.state[p]) for n, p in g.module.named_parameters()}
    split = [c for c in morphir.candidates(g, "split") if c.site.index == 0]
    result = morphir.rewrite(g, split)
    new_opt = morphir.rebuild_optimizer(opt, g.module, result.graph.module, result.param_edits)
    params = dict(result.graph.module.named_parameters())
    st = new_opt.state[params["4.weight"]]
    assert torch.allclose(st["exp_avg"][:, :16], old["4.weight"]["exp_avg"][:, :16] * 0.5)
    assert torch.allclose(st["exp_avg_sq"][:, :16], old["4.weight"]["exp_avg_sq"][:, :16] * 0.25)
    assert torch.equal(st["exp_avg"][:, 16:64], old["4.weight"]["exp_avg"][:, 16:64])
    assert torch.allclose(st["exp_avg"][:, 64:], old["4.weight"]["exp_avg"][:, :16] * 0.5)
    assert float(st["step"]) == 3.0

    # a deepen inserts a layer: its parameters start without state, the others keep theirs
    g2 = result.graph
    deeper = morphir.rewrite(g2, morphir.candidates(g2, "deepen")[:1])
    opt3 = morphir.rebuild_optimizer(new_opt, g2.module, deeper.graph.module, deeper.param_edits)
    params3 = dict(deeper.graph.module.named_parameters())
    new_names = set(params3) - set(params)
    assert new_names and all(params3[n] not in opt3.state for n in new_names)
    assert torch.equal(opt3.state[params3["0.weight"]]["exp_avg"], new_opt.state[params["0.weight"]]["exp_avg"])
    F.cross_entropy(deeper.graph.module(torch.randn(4, 1, 4, 4)), torch.tensor([0, 1, 2, 0])).backward()
    opt3.step()  # the rebuilt optimizer steps without complaint
    assert all(params3[n] in opt3.state for n in new_names)
