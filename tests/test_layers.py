"""Per-solve layers: variational dropout, weight and spectral normalisation computed once per solve.

References: dense float64 IFT (``torch.linalg.solve`` of ``I - J``, Jacobians from
``torch.autograd.functional.jacobian``) for the cell with the solve's mask or normalised weight written out
by hand; PyTorch's own ``weight_norm`` parametrization (recomputed at every access, ordinary autograd);
one explicit power-iteration step; ``gradcheck``/``gradgradcheck`` of the closed-form backward passes.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from problems import contraction
from torch import nn
from torch.autograd.functional import jacobian

import implicitkit as ik
from implicitkit.layers.spectral_norm import SpectralNorm, _SpectralNormalized
from implicitkit.layers.weight_norm import WeightNorm, _WeightNormalized

B, D = 16, 6
TIGHT = dict(tol=1e-12, max_iter=200, stop_mode="abs", on_failure="raise")


class Cell(nn.Module):
    """``f(z, x) = tanh(0.5 lin(extra(z)) + x)``, ``lin``'s weight of spectral norm 0.9."""

    def __init__(self, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D).double()
        with torch.no_grad():
            self.lin.weight.copy_(contraction(D, 0.9, torch.Generator().manual_seed(1)))
        self.extra = extra if extra is not None else nn.Identity()

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin(self.extra(z)) + x)


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    return x, torch.randn(B, D, generator=gen, dtype=torch.float64)


def dense_ift(f, params, c):
    """Exact ``d sum(c z*) / d params`` for ``z* = f(z*, *params)``, by dense linear algebra."""
    z = torch.zeros_like(c)
    for _ in range(300):
        z = f(z, *params)
    eye = torch.eye(z.numel(), dtype=torch.float64)
    jac = jacobian(lambda s: f(s, *params), z).reshape(z.numel(), z.numel())
    u = torch.linalg.solve((eye - jac).T, c.reshape(-1))
    grads = []
    for i, p in enumerate(params):
        swapped = lambda q, i=i: f(z, *params[:i], q, *params[i + 1 :])  # noqa: E731
        grads.append((u @ jacobian(swapped, p).reshape(z.numel(), -1)).reshape(p.shape))
    return grads


# -- dropout ------------------------------------------------------------------------------------------------
def test_ordinary_dropout_never_converges_variational_dropout_does():
    x, _ = inputs()
    solver = ik.Anderson(tol=1e-8, max_iter=60, stop_mode="abs", on_failure="report")
    torch.manual_seed(0)
    ordinary = ik.DEQ(Cell(nn.Dropout(0.2)), solver=solver).train()
    assert int(ordinary(torch.zeros_like(x), x).stats.converged.sum()) == 0  # a new mask at every step
    held = ik.DEQ(Cell(ik.VariationalDropout(0.2)), solver=solver).train()
    assert int(held(torch.zeros_like(x), x).stats.converged.sum()) == B


def test_mask_is_fixed_within_a_solve_changes_between_solves_and_is_off_in_eval():
    x, _ = inputs()
    drop = ik.VariationalDropout(0.3, generator=torch.Generator().manual_seed(0))
    deq = ik.DEQ(Cell(drop), solver=ik.FixedPointIteration(tol=None, max_iter=6), gradient=ik.RAG(2))
    seen = []
    drop.register_forward_hook(lambda module, args, out: seen.append(module.mask))
    first = deq(torch.zeros_like(x), x, capture=(3,))
    assert len(seen) == 6 + 2 and all(m is seen[0] for m in seen)  # solver steps and RAG's applications
    assert set(seen[0].unique().tolist()) <= {0.0, 1 / 0.7}
    second = deq(torch.zeros_like(x), x)
    assert not torch.equal(second_mask := drop.mask, seen[0])
    first.path[0]  # built after the second solve, still with the first solve's mask
    assert seen[-1] is seen[0] and drop.mask is second_mask
    assert second.stats.nstep.eq(6).all()
    deq.eval()
    assert torch.equal(drop(x), x)


def test_a_deq_inside_another_deqs_cell_keeps_the_outer_solves_mask():
    """The inner DEQ starts a solve at every outer step; redrawing its mask each time changed the outer map
    from step to step, and the outer solve never converged (0/16 samples)."""

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            inner = Cell(ik.VariationalDropout(0.3, generator=torch.Generator().manual_seed(0)))
            self.inner = ik.DEQ(inner, solver=ik.FixedPointIteration(**TIGHT))
            self.lin = nn.Linear(D, D).double()

        def forward(self, z, x):
            return torch.tanh(0.3 * self.lin(self.inner(torch.zeros_like(z), 0.5 * z + x).value) + x)

    torch.manual_seed(0)
    outer = ik.DEQ(Outer(), solver=ik.FixedPointIteration(tol=1e-9, max_iter=100, on_failure="report"))
    x, _ = inputs()
    drop = outer.cell.inner.cell.extra
    masks = []
    for _ in range(2):
        sol = outer.train()(torch.zeros_like(x), x)
        assert bool(sol.stats.converged.all()), sol.stats.summary()
        masks.append(drop.mask.clone())
    assert not torch.equal(*masks)  # one mask per outer solve, a new one for the next


@pytest.mark.parametrize("dims", [(), (0,)])
def test_stacked_branches_use_their_solves_mask_after_a_later_solve(dims):
    """Path.stacked's map ran with the last solve's mask (or refused the stacked rows' shape)."""
    deq = ik.DEQ(
        Cell(ik.VariationalDropout(0.5, broadcast_dims=dims)),
        solver=ik.FixedPointIteration(tol=None, max_iter=6),
        gradient=ik.RAG(2),
    ).train()
    x, c = inputs()
    sol = deq(torch.zeros_like(x), x, capture=(1, 3, 6))
    deq(torch.zeros_like(x), x)  # a later solve draws another mask
    n = len(sol.path)
    stacked = sol.path.stacked(lambda z: deq.cell(z, x.repeat(n, 1)))
    for branch, one in zip(stacked.chunk(n), sol.path, strict=True):
        torch.testing.assert_close(branch, one, rtol=0, atol=1e-14)
    grads = torch.autograd.grad((c.repeat(n, 1) * stacked).sum(), deq.cell.lin.weight)
    one_by_one = torch.autograd.grad(sum((c * branch).sum() for branch in sol.path), deq.cell.lin.weight)
    torch.testing.assert_close(grads, one_by_one, rtol=1e-12, atol=1e-14)


def test_variational_dropout_refuses_a_call_outside_a_solve():
    with pytest.raises(RuntimeError, match=r"no solve has started.*ik.new_solve\(cell\)"):
        ik.VariationalDropout(0.1)(torch.ones(2, 3))


@pytest.mark.parametrize("dims", [(), (1,)])
def test_ift_gradient_with_dropout_equals_dense_reference_for_the_same_mask(dims):
    x, c = inputs()
    cell = Cell(ik.VariationalDropout(0.25, broadcast_dims=dims))
    deq = ik.DEQ(cell, solver=ik.Anderson(**TIGHT), gradient=ik.IFT(ik.Anderson(**TIGHT), on_failure="raise"))
    x = x.clone().requires_grad_()
    sol = deq(torch.zeros_like(x), x)
    (c * sol.value).sum().backward()
    mask = cell.extra.mask
    assert mask.shape == ((B, 1) if dims else (B, D))

    def f(z, w, b, xx):
        return torch.tanh(0.5 * ((z * mask) @ w.T + b) + xx)

    ref = dense_ift(f, (cell.lin.weight.detach(), cell.lin.bias.detach(), x.detach()), c)
    for got, want in zip((cell.lin.weight.grad, cell.lin.bias.grad, x.grad), ref, strict=True):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-11)


def test_checkpointed_replay_reuses_the_solves_mask():
    x, c = inputs()
    drop = ik.VariationalDropout(0.25, generator=torch.Generator().manual_seed(3))
    grads = []
    for every in (None, 2):
        torch.manual_seed(0)
        cell = Cell(drop)
        deq = ik.DEQ(cell, solver=ik.FixedPointIteration(tol=None, max_iter=9), gradient=ik.Unrolled(every))
        drop.generator.manual_seed(3)
        (c * deq(torch.zeros_like(x), x).value).sum().backward()
        grads.append(cell.lin.weight.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


# -- weight norm -------------------------------------------------------------------------------------------
def count_calls(monkeypatch, cls) -> list[int]:
    calls = [0]
    original = cls.compute

    def counted(self, *args):
        calls[0] += 1
        return original(self, *args)

    monkeypatch.setattr(cls, "compute", counted)
    return calls


def test_weight_norm_once_per_solve_with_exact_gradient_to_g_and_v(monkeypatch):
    calls = count_calls(monkeypatch, WeightNorm)
    x, c = inputs()
    cell = Cell()
    ik.weight_norm(cell.lin)
    deq = ik.DEQ(cell, solver=ik.Anderson(**TIGHT), gradient=ik.IFT(ik.Anderson(**TIGHT), on_failure="raise"))
    sol = deq(torch.zeros_like(x), x)
    (c * sol.value).sum().backward()
    assert calls[0] == 1 and int(sol.stats.nstep.max()) > 5
    assert cell.training and int(sol.stats.converged.sum()) == B
    deq(torch.zeros_like(x), x)
    assert calls[0] == 2
    g = cell.lin.parametrizations.weight.original0
    v = cell.lin.parametrizations.weight.original1

    def f(z, gg, vv):
        w = gg * vv / vv.norm(dim=1, keepdim=True)
        return torch.tanh(0.5 * (z @ w.T + cell.lin.bias.detach()) + x)

    ref = dense_ift(f, (g.detach(), v.detach()), c)
    assert torch.allclose(g.grad, ref[0], rtol=1e-9, atol=1e-11)
    assert torch.allclose(v.grad, ref[1], rtol=1e-9, atol=1e-11)


def test_weight_norm_serves_every_path_branch_without_retaining_graphs():
    """``Path.backward`` frees each branch's graph; PyTorch's weight norm in one graph is the reference."""
    x, c = inputs()
    ours, theirs = Cell(), Cell()
    theirs.load_state_dict(ours.state_dict())
    ik.weight_norm(ours.lin)
    torch.nn.utils.parametrizations.weight_norm(theirs.lin)
    solver = ik.FixedPointIteration(tol=None, max_iter=8)
    sol = ik.DEQ(ours, solver=solver, gradient=ik.RAG(2))(torch.zeros_like(x), x, capture=(2, 5))
    sol.path.backward(lambda z: (c * z).sum())
    ref = ik.DEQ(theirs, solver=solver, gradient=ik.RAG(2))(torch.zeros_like(x), x, capture=(2, 5))
    sum((c * z).sum() for z in ref.path).backward()
    for name in ("original0", "original1"):
        got = getattr(ours.lin.parametrizations.weight, name).grad
        want = getattr(theirs.lin.parametrizations.weight, name).grad
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_normalised_weights_refuse_a_backward_after_an_in_place_update():
    x, c = inputs()
    cell = Cell()
    ik.weight_norm(cell.lin)
    sol = ik.DEQ(cell, gradient=ik.JFB())(torch.zeros_like(x), x)
    with torch.no_grad():
        cell.lin.parametrizations.weight.original1.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"modified in place.*before stepping the optimiser"):
        (c * sol.value).sum().backward()


@pytest.mark.parametrize("normalise", [ik.weight_norm, ik.spectral_norm])
def test_a_dim_out_of_range_is_refused_not_wrapped(normalise):
    # dim % weight.dim() once picked another axis: dim=5 of a conv weight normalised dim 1.
    with pytest.raises(IndexError, match=r"dim 5 is out of range .* \(expected -4..3\)"):
        normalise(nn.Conv2d(3, 8, 3), dim=5)
    assert normalise(nn.Conv2d(3, 8, 3), dim=-4) is not None  # in range: as PyTorch's own


@pytest.mark.parametrize("normalise", [ik.weight_norm, ik.spectral_norm])
def test_a_trained_model_deep_copies_after_a_solve(normalise):
    """An EMA or best-model snapshot (copy.deepcopy) after a training step: the cached weight of the last
    solve is a graph tensor that deepcopy refused; a copy starts outside any solve."""
    import copy

    deq = ik.DEQ(Cell(), solver=ik.FixedPointIteration(**TIGHT), gradient=ik.JFB())
    deq.cell.lin = normalise(deq.cell.lin)
    x, c = inputs()
    (c * deq(torch.zeros_like(x), x).value).sum().backward()
    twin = copy.deepcopy(deq).eval()
    torch.testing.assert_close(twin(torch.zeros_like(x), x).value, deq.eval()(torch.zeros_like(x), x).value)


@pytest.mark.parametrize("dim", [None, -1, 0, 1])
def test_weight_norm_takes_pytorchs_dims_with_pytorchs_meaning_and_state_dict(dim):
    """None and -1 are PyTorch's whole-tensor norm (g a scalar); -1 meant the last dimension here."""
    ours, theirs = nn.Conv2d(3, 4, 3).double(), nn.Conv2d(3, 4, 3).double()
    theirs.load_state_dict(ours.state_dict())
    ik.weight_norm(ours, dim=dim)
    nn.utils.parametrizations.weight_norm(theirs, dim=dim)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=1e-15)
    theirs.load_state_dict(ours.state_dict())  # the same raw tensors, shapes included
    raw = ours.parametrizations.weight
    g, v = (p.detach().clone().requires_grad_() for p in (raw.original0, raw.original1))
    inner = None if dim in (None, -1) else dim
    assert torch.autograd.gradcheck(lambda g, v: _WeightNormalized.apply(g, v, inner), (g, v))
    assert torch.autograd.gradgradcheck(lambda g, v: _WeightNormalized.apply(g, v, inner), (g, v))


def test_spectral_norm_of_a_transposed_convolution_normalises_its_output_dimension():
    """A ConvTranspose weight is [in, out, ...]: PyTorch's default takes dim 1 there, and so does this one."""
    torch.manual_seed(0)
    layer = ik.spectral_norm(nn.ConvTranspose2d(6, 3, 3).double())
    for _ in range(100):  # outside a solve each training access takes a power-iteration step
        weight = layer.weight.detach()
    matrix = weight.transpose(0, 1).reshape(3, -1)
    assert torch.linalg.matrix_norm(matrix, ord=2).item() == pytest.approx(1.0, abs=1e-3)


# -- spectral norm -----------------------------------------------------------------------------------------
def test_spectral_norm_advances_once_per_solve_with_exact_gradient(monkeypatch):
    calls = count_calls(monkeypatch, SpectralNorm)
    x, c = inputs()
    cell = Cell()
    ik.spectral_norm(cell.lin)
    norm = cell.lin.parametrizations.weight[0]
    w = cell.lin.parametrizations.weight.original
    u0, v0 = norm._u.clone(), norm._v.clone()
    deq = ik.DEQ(cell, solver=ik.Anderson(**TIGHT), gradient=ik.IFT(ik.Anderson(**TIGHT), on_failure="raise"))
    sol = deq(torch.zeros_like(x), x)
    (c * sol.value).sum().backward()
    # One power-iteration step, written out.
    u1 = torch.nn.functional.normalize(w.detach() @ v0, dim=0)
    v1 = torch.nn.functional.normalize(w.detach().T @ u1, dim=0)
    assert (
        calls[0] == 1 and torch.allclose(norm._u, u1, atol=1e-14) and torch.allclose(norm._v, v1, atol=1e-14)
    )
    assert not torch.allclose(u0, u1)
    assert cell.training and int(sol.stats.converged.sum()) == B

    def f(z, ww):
        return torch.tanh(0.5 * (z @ (ww / (u1 @ ww @ v1)).T + cell.lin.bias.detach()) + x)

    (ref,) = dense_ift(f, (w.detach(),), c)
    assert torch.allclose(w.grad, ref, rtol=1e-9, atol=1e-11)
    cell.eval()
    deq(torch.zeros_like(x), x)
    assert calls[0] == 2 and torch.equal(norm._u, u1)  # eval: recomputed, not advanced


def test_spectral_norm_recomputed_within_a_solve_does_not_advance_again():
    """A manual JFB step after a no-grad solve, and forward mode, recompute the weight: with the solve's u
    and v, not one more power-iteration step per application (13 steps in one forward-mode solve)."""
    x, _ = inputs()
    cell = Cell()
    ik.spectral_norm(cell.lin)
    norm = cell.lin.parametrizations.weight[0]
    deq = ik.DEQ(cell, solver=ik.Anderson(**TIGHT))
    with torch.no_grad():
        z = deq(torch.zeros_like(x), x).value
    u, v = norm._u.clone(), norm._v.clone()  # after the solve's one step
    for _ in range(3):
        z = cell(z, x)  # with grad: the weight is recomputed for its graph
    assert torch.equal(norm._u, u) and torch.equal(norm._v, v)
    with fwAD.dual_level():
        tangent = fwAD.make_dual(x, torch.ones_like(x))
        deq(torch.zeros_like(x), tangent)
    w = cell.lin.parametrizations.weight.original.detach()
    one_step = torch.nn.functional.normalize(w @ v, dim=0)  # the forward-mode solve's own single step
    torch.testing.assert_close(norm._u, one_step, rtol=0, atol=1e-14)


# gradcheck's forward-AD check scripts a helper with torch.jit, which PyTorch now warns about.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_closed_form_backward_passes_pass_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(4, 1, 1, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_()
    v = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _WeightNormalized.apply(a, b, 0), (g, v))
    assert torch.autograd.gradgradcheck(lambda a, b: _WeightNormalized.apply(a, b, 0), (g, v))
    u = torch.nn.functional.normalize(torch.randn(3, generator=gen, dtype=torch.float64), dim=0)
    vv = torch.nn.functional.normalize(torch.randn(8, generator=gen, dtype=torch.float64), dim=0)
    # dim=1: the weight [4, 3, 2] seen as a [3, 8] matrix.
    assert torch.autograd.gradcheck(lambda w: _SpectralNormalized.apply(w, u, vv, 1), (v,))
    assert torch.autograd.gradgradcheck(lambda w: _SpectralNormalized.apply(w, u, vv, 1), (v,))
    # Forward mode: the closed-form tangents against finite differences.
    assert torch.autograd.gradcheck(
        lambda a, b: _WeightNormalized.apply(a, b, 0), (g, v), check_forward_ad=True, check_backward_ad=False
    )
    assert torch.autograd.gradcheck(
        lambda w: _SpectralNormalized.apply(w, u, vv, 1), (v,), check_forward_ad=True, check_backward_ad=False
    )


@pytest.mark.parametrize("normalise", [ik.weight_norm, ik.spectral_norm])
def test_forward_mode_tangents_through_normalised_weights_in_a_deq(normalise):
    """Tangents in the weights' raw tensors reach ``z*`` (the solve's cached weight carries none)."""
    torch.manual_seed(0)
    deq = ik.DEQ(Cell(normalise(nn.Linear(D, D).double())), solver=ik.Anderson(**TIGHT)).eval()
    deq.gradient = ik.IFT(ik.Anderson(**TIGHT))
    x, _ = inputs()
    params = {k: p.detach() for k, p in deq.named_parameters()}
    tangents = {k: torch.randn_like(p) for k, p in params.items()}
    run = lambda p: torch.func.functional_call(deq, p, (torch.zeros_like(x), x)).value  # noqa: E731
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(p, tangents[k]) for k, p in params.items()}
        tangent = fwAD.unpack_dual(run(duals)).tangent
    eps = 1e-6
    shifted = [run({k: p + s * eps * tangents[k] for k, p in params.items()}) for s in (1, -1)]
    assert tangent is not None
    torch.testing.assert_close(tangent, (shifted[0] - shifted[1]) / (2 * eps), rtol=1e-6, atol=1e-7)


def test_a_step_with_grad_after_a_no_grad_solve_trains_the_normalised_weight():
    """The manual JFB pattern: solve without grad, then one step of the cell with grad. The step uses the
    solve's dropout mask and a weight computed afresh, whose gradient equals the weight's own."""
    torch.manual_seed(0)
    cell = Cell(nn.Sequential(ik.weight_norm(nn.Linear(D, D).double()), ik.VariationalDropout(0.2)))
    x, c = inputs()
    with torch.no_grad():
        z = ik.DEQ(cell, solver=ik.Anderson(**TIGHT))(torch.zeros_like(x), x).value
    mask = cell.extra[1].mask
    (c * cell(z, x)).sum().backward()
    raw = cell.extra[0].parametrizations.weight
    g, v = raw.original0.detach().requires_grad_(), raw.original1.detach().requires_grad_()
    weight = g * v / v.norm(dim=1, keepdim=True)
    inner = torch.nn.functional.linear(z, weight, cell.extra[0].bias) * mask
    (c * torch.tanh(0.5 * cell.lin(inner) + x)).sum().backward()
    torch.testing.assert_close(raw.original0.grad, g.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(raw.original1.grad, v.grad, rtol=1e-12, atol=1e-14)


def test_a_deep_copy_of_dropout_starts_outside_any_solve():
    """The copy kept the last solve's mask: outside a solve it ran with it where a fresh layer refuses."""
    import copy

    drop = ik.VariationalDropout(0.5)
    ik.new_solve(drop)
    drop(torch.ones(3, 4))
    twin = copy.deepcopy(drop)
    assert twin.solve_state is None and drop.mask is not None
    with pytest.raises(RuntimeError, match="no solve has started for it"):
        twin(torch.ones(3, 4))
