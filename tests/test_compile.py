"""``torch.compile`` around models that use implicitkit: few graph breaks, no recompiles, eager's numbers.

A solve runs outside the compiled graph (one clean break), so these counts must not creep back up: each
break or recompilation costs compile time in every user's model. Counting uses the ``"eager"`` backend
(Dynamo only, no code generation); one small inductor case checks the numbers of a real compile.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import implicitkit as ik

DTYPE = torch.float64


class Model(nn.Module):
    """An injection layer, a DEQ layer (or a direct ``fixed_point`` call) and a head: a training step's loss."""

    def __init__(self, solver=None, gradient=None, *, direct: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.inject, self.lin, self.head = (nn.Linear(4, 4, dtype=DTYPE) for _ in range(3))
        with torch.no_grad():
            for layer in (self.inject, self.lin, self.head):
                layer.weight.copy_(torch.randn(4, 4, generator=gen, dtype=DTYPE) * 0.4)
                layer.bias.copy_(torch.randn(4, generator=gen, dtype=DTYPE) * 0.1)
        self.solver, self.gradient, self.direct = solver, gradient, direct
        self.deq = ik.DEQ(self.cell, solver=solver, gradient=gradient)

    def cell(self, z, u):
        return torch.tanh(self.lin(z)) + u

    def forward(self, x):
        u = self.inject(x)
        if self.direct:
            z = ik.fixed_point(lambda z: self.cell(z, u), torch.zeros_like(u), solver=self.solver,
                               gradient=self.gradient).value  # fmt: skip
        else:
            z, _ = self.deq(torch.zeros_like(u), u)
        return self.head(z).square().mean()


def step(model, run, x):
    """Loss and every parameter's gradient of one training step."""
    model.zero_grad(set_to_none=True)
    loss = run(x)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


def inputs(seed):
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def compile_and_count(model, backend):
    """The compiled model, after checking that it breaks the graph and recompiles as little as it should:
    returns the graph breaks of its first call; a second call with new values must not recompile."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    for seed, reference in ((1, step(model, model, inputs(1))), (2, step(model, model, inputs(2)))):
        with torch._dynamo.config.patch(error_on_recompile=seed > 1):
            got = step(model, compiled, inputs(seed))
        for a, b in zip(got, reference, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        if seed == 1:
            breaks = sum(counters["graph_break"].values())
    return breaks


@pytest.mark.parametrize(
    "solver, gradient",
    [
        (None, None),
        (ik.FixedPointIteration(tol=1e-10, max_iter=200), ik.JFB()),
        (ik.FixedPointIteration(tol=None, max_iter=20), ik.Unrolled()),
    ],
    ids=["defaults", "FixedPointIteration-JFB", "fixed-count-Unrolled"],
)
def test_deq_breaks_the_graph_once_and_compiles_once(solver, gradient):
    assert compile_and_count(Model(solver, gradient), "eager") == 1


@pytest.mark.parametrize("gradient", [ik.IFT(), ik.Phantom(k=3, tau=0.5)], ids=["IFT", "Phantom"])
def test_fixed_point_breaks_the_graph_at_the_call_and_at_the_value(gradient):
    assert compile_and_count(Model(ik.Anderson(tol=1e-10), gradient, direct=True), "eager") <= 2


def test_inductor_training_step_matches_eager():
    # The one real compile (about 3 s here): the model around the solve is generated code.
    assert compile_and_count(Model(), "inductor") <= 1


class Regularised(nn.Module):
    """A Phantom-gradient DEQ with a Jacobian penalty in the loss and the spectral radius as a monitor."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Model(ik.FixedPointIteration(tol=1e-10, max_iter=200), ik.Phantom(k=3, tau=0.5))
        self.probes, self.start = torch.Generator(), torch.Generator()  # made outside the compiled region

    def forward(self, x):
        m = self.model
        u = m.inject(x)
        z, _ = m.deq(torch.zeros_like(u), u)
        f = lambda v: m.cell(v, u)  # noqa: E731
        penalty = ik.jacobian_frobenius(f, z.detach(), generator=self.probes)
        rho = ik.spectral_radius(f, z.detach(), n_iter=200, generator=self.start)
        return m.head(z).square().mean() + penalty, rho


def test_phantom_jacobian_penalty_and_spectral_radius_compile_to_eager_numbers():
    """torchdeq's users report compile failing with phantom gradients and the power method, and the
    Jacobian penalty having no effect under compile: here each gives eager's numbers and gradients."""
    model = Regularised()
    x = inputs(3)

    def run(module):
        model.zero_grad(set_to_none=True)
        model.probes.manual_seed(4)
        model.start.manual_seed(5)
        loss, rho = module(x)
        loss.backward()
        return [loss.detach(), rho] + [p.grad.clone() for p in model.model.parameters()]

    eager = run(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(torch.compile(model, backend="aot_eager"))
    assert sum(counters["graph_break"].values()) <= 3  # the solve, the penalty, the power method
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    # the penalty has an effect: the cell's weight gradient is not the one without it
    model.zero_grad(set_to_none=True)
    u = model.model.inject(x)
    model.model.head(model.model.deq(torch.zeros_like(u), u).value).square().mean().backward()
    assert (model.model.lin.weight.grad - eager[4]).abs().max() > 1e-3
    # and the monitor is the spectral radius: the largest |eigenvalue| of the dense Jacobian
    z = model.model.deq(torch.zeros_like(u), u).value.detach()
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: model.model.cell(v, u[b].detach()), z[b])
        torch.testing.assert_close(
            eager[1][b], torch.linalg.eigvals(jac).abs().max(), atol=1e-2, rtol=0
        )  # 200 power steps


@pytest.mark.parametrize(
    "solver", [ik.FixedPointIteration, ik.Anderson, ik.Broyden], ids=lambda s: s.__name__
)
def test_fixed_count_solve_reads_nothing_back(solver, monkeypatch):
    """On an accelerator a fixed count (``tol=None``) reads no value back to the host, so the solve can be
    captured in a CUDA graph. Meta tensors have no values: any read (``.item()``, ``.tolist()``,
    ``bool()``) raises, so a solve and its backward on them prove there is none, without a GPU."""
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: False)  # not defined for "meta"
    lin = nn.Linear(8, 8, device="meta")
    x = torch.empty(4, 8, device="meta")
    fixed = solver(tol=None, max_iter=5, on_failure="report")  # the "warn" default reads after the loop
    sol = ik.fixed_point(
        lambda z: torch.tanh(lin(z)) + x, torch.zeros_like(x), solver=fixed, gradient=ik.JFB()
    )
    sol.value.sum().backward()
    assert sol.stats.nstep.device.type == "meta" and lin.weight.grad.shape == (8, 8)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):  # an adaptive solve must read
        solver(tol=1e-3, max_iter=5, on_failure="report").solve(lambda z: torch.tanh(lin(z)) + x, x)


def test_failure_warning_under_compile_is_eagers_and_breaks_nothing_more():
    """The default failure policy warns from inside the solve, which runs outside the compiled graph."""
    model = Model(ik.FixedPointIteration(tol=1e-12, max_iter=2), ik.JFB())
    torch._dynamo.reset()
    counters.clear()
    with pytest.warns(ik.FixedPointWarning, match="did not reach tol within max_iter") as caught:
        step(model, torch.compile(model, backend="eager"), inputs(1))
    assert sum(counters["graph_break"].values()) == 1
    ours = [w for w in caught if issubclass(w.category, ik.FixedPointWarning)]  # Dynamo may warn of its own
    assert ours and all(w.filename == __file__ for w in ours)  # the model's forward, not the library or torch


FIRST_CALL_UNDER_COMPILE = """
import sys
import torch
import implicitkit as ik

assert "torch._dynamo" not in sys.modules, "import implicitkit loaded the compiler"
lin = torch.nn.Linear(4, 4, dtype=torch.float64)
deq = ik.DEQ(lambda z, u: torch.tanh(0.5 * lin(z)) + u)


def loss(x):
    z, _ = deq(torch.zeros_like(x), x)
    return z.square().sum()


from torch._dynamo.utils import counters

x = torch.randn(3, 4, dtype=torch.float64)
compiled = torch.compile(loss, backend="eager")(x)
print(sum(counters["graph_break"].values()), float((compiled - loss(x)).abs()))
"""


def test_import_leaves_the_compiler_unloaded_and_a_first_call_under_compile_breaks_once():
    """``torch.compiler.disable`` applied at import loaded ``torch._dynamo``: ``import implicitkit`` took 1.8 s
    on top of torch's 2. Applied at the first call instead, a first call made from compiled code must still
    run outside the graph, with one break (the wrapper's own frame compiled gave four)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALL_UNDER_COMPILE], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    breaks, difference = done.stdout.split()
    assert int(breaks) == 1 and float(difference) == 0.0
