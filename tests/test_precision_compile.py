"""Mixed precision (the solver stays in float32 under bf16 autocast) and torch.compile (same result as eager)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import implicitkit as ik

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


class Spy:
    """Wraps a solver's ``step`` to record the dtypes it computes with and the history it keeps."""

    def __init__(self, solver):
        self.seen = []
        step = solver.step

        def spied(memory, z, fz):
            out = step(memory, z, fz)
            tensors = {k: v for k, v in vars(memory).items() if isinstance(v, torch.Tensor)} if memory else {}
            self.seen.append({"proposal": out.dtype, **{k: v.dtype for k, v in tensors.items()}})
            return out

        object.__setattr__(solver, "step", spied)  # instrumentation: solver settings are frozen


def elementwise_cell(x):
    """A map autocast leaves in float32 (no matmul), so any bf16 rounding would come from the solver."""
    return lambda z: 0.9 * torch.tanh(z) + x


@pytest.mark.parametrize(
    "make",
    [lambda: ik.Anderson(tol=1e-7, max_iter=100), lambda: ik.Broyden(tol=1e-7, max_iter=100)],
    ids=["Anderson", "Broyden"],
)
def test_solver_history_stays_float32_under_autocast(make):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    reference = make().solve(elementwise_cell(x), torch.zeros(4, 16))
    solver = make()
    spy = Spy(solver)
    with torch.autocast(**AUTOCAST):
        result = solver.solve(elementwise_cell(x), torch.zeros(4, 16))
    assert spy.seen and all(dtype == torch.float32 for seen in spy.seen for dtype in seen.values()), spy.seen
    assert result.stats.all_converged
    # bf16 history would leave errors around 1e-3; float32 reproduces the float32 solve
    torch.testing.assert_close(result.value, reference.value, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("error")  # the adjoint solve converges at a tolerance that suits bf16 VJPs
def test_deq_trains_under_autocast():
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 16, generator=gen) * 0.5 / 16**0.5)
    x = torch.randn(8, 16, generator=gen)
    # VJPs through bf16 matmuls carry bf16 rounding: ask the adjoint for what they can deliver.
    gradient = ik.IFT(ik.Anderson(tol=1e-3), on_failure="raise")
    deq = ik.DEQ(lambda z, x: torch.tanh(lin(z)) + x, solver=ik.Anderson(tol=1e-3), gradient=gradient)

    def forward():
        lin.weight.grad = None
        return deq(torch.zeros_like(x), x)

    z32, _ = forward()
    z32.square().mean().backward()
    g32 = lin.weight.grad.clone()
    with torch.autocast(**AUTOCAST):
        z16, stats = forward()
    z16.square().mean().backward()  # backward outside the autocast region, as recommended
    assert z16.dtype == torch.float32 and stats.residual.dtype == torch.float32
    assert stats.all_converged
    torch.testing.assert_close(z16, z32.detach(), atol=3e-2, rtol=0)  # the cell itself computes in bf16
    assert torch.nn.functional.cosine_similarity(lin.weight.grad.flatten(), g32.flatten(), dim=0) > 0.99


class Block(nn.Module):
    def __init__(self, gradient):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.lin = nn.Linear(8, 8)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(8, 8, generator=gen) * 0.3 / 8**0.5)
            self.lin.bias.zero_()
        self.gradient = gradient

    def forward(self, x):
        sol = ik.fixed_point(
            lambda z: torch.tanh(self.lin(z)) + x,
            torch.zeros_like(x),
            solver=ik.FixedPointIteration(tol=1e-6, max_iter=30),
            gradient=self.gradient,
        )
        return sol.value


@pytest.mark.parametrize("gradient", [ik.JFB(), ik.Phantom(k=3, tau=0.5)], ids=lambda g: type(g).__name__)
def test_compiled_module_matches_eager(gradient):
    torch._dynamo.reset()
    block = Block(gradient)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)

    def run(module):
        x.grad, block.lin.weight.grad = None, None
        y = module(x)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), block.lin.weight.grad.clone()

    eager = run(block)
    compiled = run(torch.compile(block, backend="aot_eager"))
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
