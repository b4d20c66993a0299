"""Failures that must never pass silently: warnings by default, runaway states, 1-D states, frozen settings."""

from __future__ import annotations

import warnings

import pytest
import torch

import implicitkit as ik

SOLVERS = {"FixedPointIteration": ik.FixedPointIteration, "Anderson": ik.Anderson, "Broyden": ik.Broyden}


def no_fixed_point(dim: int, dtype: torch.dtype):
    """``f(z) = z + 1 + 0.1 tanh(W z + x)``: ``f(z) - z >= 0.9`` everywhere, so there is no fixed point."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(dim, dim, generator=gen, dtype=dtype) / dim**0.5
    x = torch.randn(4, dim, generator=gen, dtype=dtype)
    return lambda z: z + 1 + 0.1 * torch.tanh(z @ w.T + x), torch.zeros(4, dim, dtype=dtype)


def slow_cell(x: torch.Tensor):
    """A contraction at rate 0.99: 50 plain steps leave every sample short of tol=1e-6."""
    return lambda z: 0.99 * z + x


# -- forward failures warn by default, once per call site ---------------------------------------------------
def solve_at_one_site(x: torch.Tensor, solver: ik.Solver) -> ik.SolverStats:
    return ik.fixed_point(slow_cell(x), torch.zeros_like(x), solver=solver).stats


def test_default_forward_failure_warns_once_per_call_site():
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
    solver = ik.FixedPointIteration(tol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            stats = solve_at_one_site(x, solver)
    failed = int((~stats.converged).sum())
    assert failed > 0
    assert len(caught) == 1, [str(w.message) for w in caught]
    warning = caught[0]
    assert issubclass(warning.category, ik.FixedPointWarning) and issubclass(warning.category, RuntimeWarning)
    text = str(warning.message)
    assert f"{failed}/8 samples did not reach tol" in text
    assert "on_failure='report'" in text and "on_failure='raise'" in text
    assert warning.filename == __file__  # attributed to the caller, not to the library


def test_a_sibling_package_whose_name_starts_like_the_librarys_is_a_call_site_of_its_own():
    # ".../implicitkit_det/..." starts with ".../implicitkit": its two solves were one site of the outer caller.
    from implicitkit import stats

    source = "import implicitkit as ik\ndef solve(f, z, s):\n    return ik.fixed_point(f, z, solver=s)\n"
    code = compile(source, stats._PACKAGE_DIR.rstrip("/\\") + "_det/models/detector.py", "exec")
    namespace: dict = {}
    exec(code, namespace)
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        namespace["solve"](slow_cell(x), torch.zeros_like(x), ik.FixedPointIteration(tol=1e-6))
    assert [w.filename for w in caught] == [code.co_filename]


def test_every_occurrence_when_the_filter_asks_and_none_when_reported():
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            solve_at_one_site(x, ik.FixedPointIteration(tol=1e-6))
        solve_at_one_site(x, ik.FixedPointIteration(tol=1e-6, on_failure="report"))
        solve_at_one_site(x, ik.FixedPointIteration(tol=None, max_iter=3))  # a fixed count that stays finite
    assert len(caught) == 2
    with pytest.raises(ik.FixedPointError, match="did not reach tol"):
        solve_at_one_site(x, ik.FixedPointIteration(tol=1e-6, on_failure="raise"))


def test_deq_module_default_warns_from_the_callers_line():
    cell = torch.nn.Linear(1, 1)
    with torch.no_grad():
        cell.weight.fill_(0.999)
    deq = ik.DEQ(lambda z, x: cell(z) + x, solver=ik.FixedPointIteration(tol=1e-8))
    with pytest.warns(ik.FixedPointWarning, match="did not reach tol") as caught:
        deq(torch.zeros(2, 1), torch.ones(2, 1))
    assert [w.filename for w in caught if issubclass(w.category, ik.FixedPointWarning)][:1] == [__file__]


# -- a state that grows without bound is diverged, never successful -----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("name", SOLVERS)
def test_runaway_state_is_never_successful(name, stop_mode, dtype):
    f, z0 = no_fixed_point(8, dtype)
    stats = ik.fixed_point(f, z0, solver=SOLVERS[name](stop_mode=stop_mode, on_failure="report")).stats
    assert not stats.converged.any(), stats.result
    if name == "FixedPointIteration":  # plain iteration creeps (one unit per step) and runs out of steps
        assert (stats.result == ik.Result.max_steps_reached).all(), stats.result
    else:  # the accelerated solvers extrapolate the drift and run off
        assert stats.diverged.all(), stats.result


def test_default_deq_on_a_map_without_fixed_point_warns_and_converges_nowhere():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 8, generator=gen) / 8**0.5, torch.randn(4, 8, generator=gen)
    deq = ik.DEQ(lambda z, x: z + 1 + 0.1 * torch.tanh(z @ w.T + x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        _, stats = deq(torch.zeros(4, 8), x)
    assert not stats.converged.any() and stats.diverged.all()
    assert len(caught) == 1 and "4/4 samples diverged" in str(caught[0].message)


@pytest.mark.parametrize("name", ["Anderson", "Broyden"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_a_far_but_real_fixed_point_is_still_successful(name, stop_mode):
    """``z* = 100 c`` lies 100 times further than ``f(z0)``: growth with progress is convergence."""
    c = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    solver = SOLVERS[name](tol=1e-8, max_iter=60, stop_mode=stop_mode, on_failure="raise")
    z, stats = ik.fixed_point(lambda z: 0.99 * z + c, torch.zeros_like(c), solver=solver)
    assert stats.converged.all()
    torch.testing.assert_close(z, 100 * c, rtol=1e-6, atol=0)


def test_converged_means_a_fixed_point_not_a_stable_one():
    """Anderson finds the repelling root of ``1.5 z + x``; the spectral radius says it repels."""
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    f = lambda z: 1.5 * z + x  # noqa: E731
    z, stats = ik.fixed_point(f, torch.zeros_like(x), solver=ik.Anderson(tol=1e-10))
    assert stats.converged.all()
    torch.testing.assert_close(z, -2 * x)
    torch.testing.assert_close(ik.spectral_radius(f, z), torch.tensor([1.5], dtype=torch.float64))


# -- a state needs a batch dimension ------------------------------------------------------------------------
def test_a_state_without_batch_dimension_is_refused_with_the_fix():
    w, x = torch.randn(6, 6) * 0.3, torch.randn(6)
    with pytest.raises(ValueError, match=r"z0\[None\].*z0\[:, None\]"):
        ik.fixed_point(lambda z: torch.tanh(w @ z + x), torch.zeros(6))
    with pytest.raises(ValueError, match="no dimension besides the batch"):
        ik.fixed_point(lambda s: s, (torch.zeros(3), torch.zeros(3)))


def test_a_per_sample_scalar_beside_a_matrix_leaf_is_read_as_one_number_per_sample():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    state = (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    (_, s), stats = ik.fixed_point(lambda st: (0.5 * st[0] + x, 0.5 * st[1] + x[:, 0]), state)
    assert stats.converged.all()
    torch.testing.assert_close(s, 2 * x[:, 0], rtol=1e-4, atol=0)


# -- settings are fixed at construction ---------------------------------------------------------------------
@pytest.mark.parametrize("name", SOLVERS)
def test_solver_settings_cannot_be_changed_silently(name):
    solver = SOLVERS[name](tol=1e-6)
    with pytest.raises(AttributeError, match=r"fixed at construction.*replace\(throw=\.\.\.\)"):
        solver.throw = True
    with pytest.raises(AttributeError, match="max_iter"):
        solver.max_iter = 3
    strict = solver.replace(throw=True, max_iter=2)
    assert (strict.on_failure, strict.max_iter, strict.tol, solver.max_iter) == ("raise", 2, 1e-6, 50)
    with pytest.raises(ik.FixedPointError):
        ik.fixed_point(slow_cell(torch.ones(2, 1)), torch.zeros(2, 1), solver=strict)
    with pytest.raises(TypeError, match="no setting"):
        solver.replace(tolerance=1.0)
    # throw=False cannot say what a raising solver should do instead; with on_failure it can.
    with pytest.raises(ValueError, match="on_failure='warn' or 'report'"):
        strict.replace(throw=False)
    assert strict.replace(throw=False, on_failure="report").on_failure == "report"
    assert solver.replace(throw=False).on_failure == "warn"


# -- settings that would make a solve silently wrong are refused ---------------------------------------------
@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("factor", [float("nan"), 1.0, 0.5])
def test_divergence_factor_must_exceed_one(name, factor):
    # NaN fails every comparison: each sample stopped after one step, reported as out of iterations.
    with pytest.raises(ValueError, match="divergence_factor must be above 1"):
        SOLVERS[name](divergence_factor=factor)
    never = SOLVERS[name](tol=1e-8, divergence_factor=float("inf"))  # inf: divergence never declared
    value, stats = ik.fixed_point(
        lambda z: 0.5 * z + 1.0, torch.zeros(2, 3, dtype=torch.float64), solver=never
    )
    assert stats.all_converged and torch.allclose(value, torch.full_like(value, 2.0))


def test_a_cell_wider_than_its_state_is_refused_a_narrower_one_accepted():
    # A float64 cell on a float32 state was rounded to float32 every step, and a tol float32 cannot reach
    # then failed as "raise max_iter".
    wide = lambda z: torch.tanh(0.5 * z.double() + 1.0)  # noqa: E731
    with pytest.raises(TypeError, match=r"leaf 0 in torch.float64 for a torch.float32 state.*z0.to"):
        ik.fixed_point(wide, torch.zeros(2, 3), solver=ik.Anderson(tol=1e-12))
    value, stats = ik.fixed_point(wide, torch.zeros(2, 3, dtype=torch.float64), solver=ik.Anderson(tol=1e-12))
    assert stats.all_converged and value.dtype == torch.float64
    # bfloat16 out of a float32 state is what autocast does: accepted, the state stays float32.
    narrow = lambda z: (0.5 * z + 1.0).to(torch.bfloat16)  # noqa: E731
    value, stats = ik.fixed_point(narrow, torch.zeros(2, 3), solver=ik.FixedPointIteration(tol=1e-2))
    assert (
        stats.all_converged
        and value.dtype == torch.float32
        and torch.allclose(value, torch.full_like(value, 2.0), atol=0.05)
    )


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -1.0])
def test_anderson_regularisation_must_be_finite_and_not_negative(lam):
    # NaN made every step the plain one, inf reported every sample as non-finite, -1 made the system indefinite.
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        ik.Anderson(lam=lam)
    assert ik.Anderson(lam=0.0).lam == 0.0


def test_continues_is_true_for_the_samples_that_go_on():
    solver = ik.FixedPointIteration(tol=1e-3)
    residual = torch.tensor([1e-2, 1e-4, float("nan")])
    assert solver.continues(residual, residual).tolist() == [True, False, False]


# -- per-sample stopping: exact where the cell itself treats samples alike ----------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", SOLVERS)
def test_a_sample_solved_in_a_batch_is_bitwise_the_sample_solved_alone(name, dtype):
    """With an elementwise cell (batched and single outputs bitwise equal) the solver adds no coupling."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(24, generator=gen, dtype=dtype) * 1.8 - 0.9
    x = (
        torch.randn(6, 24, generator=gen, dtype=dtype)
        * torch.tensor([0.01, 0.1, 1, 3, 10, 30], dtype=dtype)[:, None]
    )

    def cell(x):
        return lambda z: torch.tanh(z * a + x) + 0.3 * torch.sin(z.flip(1))

    solver = SOLVERS[name](tol=1e-5, max_iter=200, on_failure="report")
    z_all, stats_all = ik.fixed_point(cell(x), torch.zeros_like(x), solver=solver)
    assert len(set(stats_all.nstep.tolist())) > 2
    for i in range(len(x)):
        z_one, stats_one = ik.fixed_point(cell(x[i : i + 1]), torch.zeros_like(x[i : i + 1]), solver=solver)
        assert torch.equal(z_one[0], z_all[i])
        assert torch.equal(stats_one.nstep[0], stats_all.nstep[i])
        assert torch.equal(stats_one.result[0], stats_all.result[i])


def test_ift_on_failure_error_lists_every_choice():
    with pytest.raises(TypeError, match="'report', 'warn', 'raise' or an estimator"):
        ik.IFT(on_failure=None)


# -- forward-mode AD: right where supported, the library's own message where not ------------------------
@pytest.mark.parametrize("gradient", [ik.IFT(), ik.JFB(), ik.Unrolled()], ids=repr)
def test_forward_mode_runs_the_solve_on_primals(gradient):
    import torch.autograd.forward_ad as fwd

    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    x = torch.ones(2, 4, dtype=torch.float64)
    solver = ik.FixedPointIteration(tol=1e-12, max_iter=100)

    def solve(x):
        return ik.fixed_point(
            lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), solver=solver, gradient=gradient
        ).value

    _, via_func = torch.func.jvp(solve, (x,), (torch.ones_like(x),))
    with fwd.dual_level():
        via_dual = fwd.unpack_dual(solve(fwd.make_dual(x, torch.ones_like(x)))).tangent
    torch.testing.assert_close(via_func, via_dual, atol=1e-12, rtol=0)
    if isinstance(gradient, ik.IFT):
        with pytest.raises(RuntimeError, match=r"IFT cannot solve for the tangent under torch.func.vmap"):
            torch.func.jacfwd(solve)(x)
    else:
        assert torch.func.jacfwd(solve)(x).shape == (2, 4, 2, 4)


# -- a cell that writes into its input state ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("structured", [False, True], ids=["tensor", "dict"])
def test_a_cell_that_changes_its_input_in_place_is_refused(name, structured):
    """``z += ...`` overwrote the solver's iterate: the residual read 0 and every sample 'converged' at once."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

    def damped_in_place(z):
        z += 0.5 * (torch.tanh(0.5 * z + x) - z)
        return z

    f = (lambda s: {"z": damped_in_place(s["z"])}) if structured else damped_in_place
    z0 = {"z": torch.zeros(4, 8)} if structured else torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match=r"changed its input state in place.*z = z \+"):
        ik.fixed_point(f, z0, solver=SOLVERS[name](tol=1e-5, max_iter=50))


# -- the value follows the grad mode of the call ---------------------------------------------------------------
@pytest.mark.parametrize("gradient", [ik.IFT(), ik.JFB(), ik.Neumann(3)], ids=repr)
def test_the_value_keeps_the_grad_mode_of_the_call_not_of_its_first_read(gradient):
    """Read first under no_grad (a log line), the value once kept no graph: the loss lost its gradient."""
    gen = torch.Generator().manual_seed(0)
    w = (0.3 * torch.randn(6, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64)

    def solve():
        return ik.fixed_point(lambda z: torch.tanh(z @ w.T + x), torch.zeros(3, 6, dtype=torch.float64),
                              solver=ik.Anderson(tol=1e-12, max_iter=100), gradient=gradient)  # fmt: skip

    (want,) = torch.autograd.grad(solve().value.square().sum(), w)
    sol = solve()
    with torch.no_grad():
        sol.value.norm()  # logged first
    (got,) = torch.autograd.grad(sol.value.square().sum(), w)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        quiet = solve()
    assert not quiet.value.requires_grad  # solved without autograd: no graph built when read with it


@pytest.mark.parametrize("name", list(SOLVERS))
def test_a_solve_under_inference_mode_runs(name):
    """Inference tensors keep no version counter: the in-place check must not read it there."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        sol = ik.fixed_point(
            lambda z: torch.tanh(0.5 * z + x), torch.zeros(4, 8), solver=SOLVERS[name](tol=1e-6)
        )
    assert sol.stats.all_converged
    torch.testing.assert_close(sol.value, torch.tanh(0.5 * sol.value + x), atol=1e-5, rtol=0)


# -- the value is the solve's: its autocast, and not after an optimizer step ----------------------------------
@pytest.mark.parametrize("gradient", [ik.IFT(), ik.JFB(), ik.RAG(2), ik.Phantom(k=2, tau=0.5)], ids=repr)
def test_a_read_after_an_optimizer_step_of_fs_parameters_is_refused(gradient):
    """The value and the branches are built from f's parameters when read: after opt.step() they were the
    next model's. A step of another model's optimizer changes nothing f reads, and is no reason to refuse."""
    torch.manual_seed(0)
    lin, other = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    opt, other_opt = torch.optim.SGD(lin.parameters(), lr=0.5), torch.optim.SGD(other.parameters(), lr=0.5)
    kw = dict(solver=ik.Anderson(tol=1e-6), gradient=gradient, capture=(3,))
    sol = ik.fixed_point(lambda z: torch.tanh(0.5 * lin(z) + x), torch.zeros(2, 4), **kw)
    sol.path.backward(lambda z: z.square().sum())
    other(x).sum().backward()
    other_opt.step()
    assert sol.path[0].requires_grad  # another model's step
    opt.step()
    with pytest.raises(
        RuntimeError, match=r"optimizer has stepped them since the fixed_point call.*before optimizer"
    ):
        sol.value
    with pytest.raises(RuntimeError, match=r"A Solution\.path branch is built when it is read"):
        sol.path[0]
    read = ik.fixed_point(lambda z: torch.tanh(0.5 * lin(z) + x), torch.zeros(2, 4), **kw)
    value = read.value
    opt.step()
    assert read.value is value  # read before the step: kept


@pytest.mark.parametrize("gradient", [ik.IFT(), ik.JFB(), ik.RAG(2)], ids=repr)
def test_a_step_that_changes_nothing_f_reads_is_no_reason_to_refuse(gradient):
    """A solve without autograd (a teacher's, an EMA model's) read after another model's step, and a step
    of the encoder that made f's input before the call, change nothing the value reads: they once refused."""
    torch.manual_seed(0)
    enc, cell, other = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    x0 = torch.randn(2, 4)

    def solve():
        x = enc(x0)
        return ik.fixed_point(lambda z: torch.tanh(0.5 * cell(z) + x), torch.zeros(2, 4), gradient=gradient)

    def step(module):
        module(x0).sum().backward()
        torch.optim.SGD(module.parameters(), lr=0.1).step()

    with torch.no_grad():
        quiet, quiet_stale = solve(), solve()
    upstream, stale = solve(), solve()
    step(other)
    assert not quiet.value.requires_grad  # the call's mode: no graph
    step(enc)
    assert upstream.value.requires_grad
    step(cell)
    for sol in (quiet_stale, stale):
        with pytest.raises(RuntimeError, match="optimizer has stepped them"):
            sol.value


def test_a_first_read_under_inference_mode_keeps_the_graph():
    """inference_mode, unlike no_grad, is not undone by enabling grad: the kept value had no graph."""
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64)
    sol = ik.fixed_point(lambda z: torch.tanh(0.3 * z @ w.T + x), torch.zeros(2, 4, dtype=torch.float64))
    with torch.inference_mode():
        sol.value.norm()  # logged first
    (grad,) = torch.autograd.grad(sol.value.sum(), w)
    assert grad.abs().sum() > 0


def test_the_value_keeps_the_autocast_of_the_call():
    """Read after the autocast block, the value was computed in float32 while the solve ran in bfloat16."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)

    def solve():
        return ik.fixed_point(lambda z: torch.tanh(0.5 * lin(z) + x), torch.zeros(2, 4), gradient=ik.RAG(2))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = solve().value
        later = solve()
    outside = later.value
    assert outside.dtype == inside.dtype and torch.equal(outside, inside)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = ik.fixed_point(lambda z: torch.tanh(0.5 * lin(z) + x), torch.zeros(2, 4), gradient=ik.RAG(2))
        with torch.autocast("cpu", enabled=False):
            assert plain.value.dtype == inside.dtype  # nor does a read in a float32 region change it


@pytest.mark.parametrize("max_iter", [150, 300, 600])
def test_a_slow_contraction_far_from_its_start_is_not_called_diverged(max_iter):
    """``0.999 z + x`` from 0: the residual falls at every step towards ``z* = 1000 x``; it once read as run off."""
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solver = ik.FixedPointIteration(tol=1e-4, max_iter=max_iter, on_failure="report")
    stats = ik.fixed_point(
        lambda z: 0.999 * z + x, torch.zeros_like(x), solver=solver, gradient=ik.JFB()
    ).stats
    assert (stats.result == ik.Result.max_steps_reached).all(), stats.result
    loose = ik.FixedPointIteration(tol=5e-3, max_iter=600, on_failure="report")  # met by the letter of "rel"
    z, stats = ik.fixed_point(lambda z: 0.999 * z + x, torch.zeros_like(x), solver=loose, gradient=ik.JFB())
    assert stats.converged.all(), stats.result
    rel = torch.linalg.vector_norm(0.999 * z + x - z, dim=1) / torch.linalg.vector_norm(0.999 * z + x, dim=1)
    assert (rel <= 5e-3).all()


def test_graph_memory_keeps_autograds_check_of_in_place_changes():
    """Saved-tensor hooks replace autograd's version check: inside GraphMemory, backward used the changed
    values (the gradient of 2 sigmoid(x) came out negative)."""
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with ik.GraphMemory():
        y = x.sigmoid()
        y.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    with ik.GraphMemory():
        y = x.sigmoid() * 2
        y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.sigmoid() * (1 - x.sigmoid()))


def test_a_newcomers_mistakes_are_named():
    """A class for an instance, a string solver, (state, aux) without has_aux, an integer state."""
    cell = torch.nn.Linear(3, 3)
    with pytest.raises(
        TypeError,
        match=r"gradient must be a GradientEstimator instance such as ik.IFT\(\), got the class IFT",
    ):
        ik.DEQ(cell, gradient=ik.IFT)
    with pytest.raises(TypeError, match=r"solver must be a Solver instance .* got 'anderson'"):
        ik.fixed_point(lambda z: z, torch.zeros(2, 3), solver="anderson")
    with pytest.raises(ValueError, match=r"if it is \(state, aux\), pass has_aux=True"):
        ik.fixed_point(lambda z: (0.5 * z, z.sum()), torch.zeros(2, 3))
    with pytest.raises(
        TypeError, match=r"state leaf 0 in torch\.int64: a fixed-point state is floating point"
    ):
        ik.fixed_point(lambda z: z.long(), torch.zeros(2, 3))


@pytest.mark.parametrize(
    "layer", [torch.nn.Dropout(0.2), torch.nn.BatchNorm1d(4)], ids=lambda m: type(m).__name__
)
def test_layers_that_change_the_map_every_step_are_warned_of_once(layer):
    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.layer = torch.nn.Linear(4, 4), layer

        def forward(self, z, x):
            return torch.tanh(0.3 * self.layer(self.lin(z)) + x)

    deq = ik.DEQ(Cell(), solver=ik.Anderson(on_failure="report"))
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=rf"layer \({type(layer).__name__}\)"):
        deq(torch.zeros(3, 4), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq(torch.zeros(3, 4), x)  # once per DEQ
        deq.eval()(torch.zeros(3, 4), x)  # eval mode: nothing changes per step


def test_the_advice_for_a_slow_solve_fits_the_solver():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    stats = ik.fixed_point(
        lambda z: 0.99 * z + x,
        torch.zeros(4, 8),
        solver=ik.Anderson(tol=1e-12, max_iter=2, on_failure="report"),
    ).stats
    assert "Anderson/Broyden" not in stats.failure_message()
    stats = ik.fixed_point(
        lambda z: 0.99 * z + x,
        torch.zeros(4, 8),
        solver=ik.FixedPointIteration(tol=1e-12, max_iter=2, on_failure="report"),
    ).stats
    assert "use Anderson/Broyden" in stats.failure_message()


def test_the_adjoints_advice_fits_its_solver_too():
    """IFT names its adjoint's stats "IFT adjoint (Anderson)": the check for Anderson missed that name."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    sol = ik.fixed_point(
        lambda z: 0.99 * z + x,
        torch.zeros(4, 8),
        solver=ik.FixedPointIteration(tol=None, max_iter=50),
        gradient=ik.IFT(ik.Anderson(tol=1e-14, max_iter=2), on_failure="report"),
    )
    sol.value.sum().backward()
    message = sol.backward_stats[-1].failure_message()
    assert message.startswith("IFT adjoint (Anderson)") and "raise max_iter or loosen tol;" in message
    assert "Anderson/Broyden" not in message


def test_the_advice_names_the_precision_the_solve_ran_in():
    """It read autocast when the message was built: a bf16 solve read later had no hint, an fp32 one read in
    an autocast block had one."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    solver = ik.Anderson(tol=1e-12, max_iter=2, on_failure="report")
    plain = ik.fixed_point(lambda z: 0.99 * z + x, torch.zeros(4, 8), solver=solver).stats
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" not in plain.failure_message()
        low = ik.fixed_point(lambda z: 0.99 * z + x, torch.zeros(4, 8), solver=solver).stats
    assert "the cell ran under autocast in bfloat16, whose rounding (about 2 digits)" in low.failure_message()


def test_an_object_that_acts_like_a_solver_is_accepted():
    """The check is for the mistakes (a class, a name), not for subclassing: a wrapper solves as before."""

    class Wrapped:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    x = torch.randn(2, 3)
    z, stats = ik.fixed_point(lambda z: 0.5 * z + x, torch.zeros(2, 3), solver=Wrapped(ik.Anderson(tol=1e-8)))
    assert stats.converged.all()
    torch.testing.assert_close(z, 2 * x)


def test_a_perturbation_that_changes_its_state_in_place_is_refused():
    """The perturbation gets the solver's own iterate, which is the caller's z0 at step 1 and the returned
    value later: `z.add_` moved z0, the value and the path states without a sign (0.62 off the value)."""
    z0 = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="The perturbation changed the state it was given in place"):
        ik.fixed_point(
            lambda z: 0.5 * z + 1.0,
            z0,
            solver=ik.FixedPointIteration(tol=None, max_iter=6),
            perturbation=lambda z, k: z.add_(1.0) if k in (1, 5) else z,
        )
    z0 = torch.zeros(2, 3)  # (the refused step had already moved it: the error says so)
    moved = ik.fixed_point(  # the same shift out of place: fine
        lambda z: 0.5 * z + 1.0,
        z0,
        solver=ik.FixedPointIteration(tol=None, max_iter=6),
        perturbation=lambda z, k: z + 1.0 if k in (1, 5) else z,
    )
    assert torch.isfinite(moved.value).all() and z0.abs().max() == 0


@pytest.mark.parametrize("gradient", [ik.IFT(), ik.JFB(), ik.Unrolled()])
def test_a_value_read_after_last_was_changed_in_place_is_refused(gradient):
    """`last` is the returned state itself when every sample improved at its last step, and the value is
    built from that state at its first read: `sol.last.mul_(0)` before it moved the value by 1.2."""
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sol = ik.fixed_point(
        lambda z: 0.5 * torch.tanh(z) + x,
        torch.zeros(2, 3, dtype=torch.float64),
        solver=ik.FixedPointIteration(tol=None, max_iter=12),
        gradient=gradient,
        capture=[12],
    )
    with torch.no_grad():
        sol.last.mul_(0)
    with pytest.raises(
        RuntimeError, match=r"Solution.value is built from a state of the solve that was changed"
    ):
        sol.value
    with pytest.raises(RuntimeError, match=r"The path branch of step 12 is built from a state"):
        sol.path[0]
    if not isinstance(gradient, ik.Unrolled):  # stacked branches: every estimator but Unrolled's graph
        with pytest.raises(RuntimeError, match=r"Solution.path.stacked is built from a state"):
            sol.path.stacked(lambda z: 0.5 * torch.tanh(z) + x.repeat(1, 1))


def test_unrolled_differentiates_every_step_of_a_sample_that_starts_at_its_fixed_point():
    """Of equal residuals the first iterate was kept as the value: a sample starting at z* (residual 0 at
    every step) got one step's gradient from Unrolled (JFB's) although 40 ran. The later one is kept now."""
    gen = torch.Generator().manual_seed(0)
    a = 0.5 * torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
    b = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)  # z* = 0 = z0
    sol = ik.fixed_point(
        lambda z: z @ a.T + b,
        torch.zeros(1, 3, dtype=torch.float64),
        solver=ik.FixedPointIteration(tol=None, max_iter=40),
        gradient=ik.Unrolled(),
    )
    (grad,) = torch.autograd.grad(sol.value.sum(), b)
    exact = torch.linalg.solve((torch.eye(3, dtype=torch.float64) - a).T, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(grad[0], exact, atol=1e-10)  # 0.5^40 of the series is left out
