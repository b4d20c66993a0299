"""DEQ detectors with stacked branches: the losses and gradients of the branches built group by group."""

from __future__ import annotations

import pytest
import torch
from det_engine_toy import random_batch

from implicitkit_det.models import build_model
from implicitkit_det.models.configs import parse_model_args

CLASSES = 10


def losses_and_grads(config: str, stacked: bool, data, branchwise: bool = False, **schedule):
    torch.manual_seed(3)
    model = build_model(
        config, CLASSES, num_queries=6, backbone_norm="frozen", train_steps=4, supervise_steps=(1, 2, 4),
        stack_branches=stacked, **schedule,
    )  # fmt: skip
    torch.manual_seed(7)  # the same perturbation draws in both runs
    if branchwise:
        losses = model.forward_backward(data.images, data.targets, mask=data.mask)
    else:
        losses = model(data.images, data.targets, mask=data.mask)
        losses["loss"].backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_same(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    (got_losses, got_grads), (want_losses, want_grads) = got, want
    assert list(got_losses) == list(want_losses)
    for key, value in want_losses.items():
        torch.testing.assert_close(got_losses[key], value, rtol=1e-10, atol=1e-12, msg=key)
    assert got_grads.keys() == want_grads.keys()
    # Relative to the largest gradient of the model: some are rounding noise of ~1e-24 (a tau whose IoF bias
    # is 0 on these boxes), which no ordering of the same sums reproduces.
    scale = max(float(grad.abs().max()) for grad in want_grads.values())
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-12 * scale, msg=name)


@pytest.mark.parametrize("config", ["deqdet_tiny", "deq_sparse_rcnn_tiny"])
def test_stacked_branches_equal_branches_group_by_group(config, float64):
    data = random_batch(torch.Generator().manual_seed(0), batch=2, size=64, classes=CLASSES)
    want = losses_and_grads(config, False, data)
    assert [k for k in want[0] if k.endswith("_loss")] == [
        f"{name}_loss" for name in ("init", "init_f1", "init_f2", "rag_s1", "rag_s2", "rag_s4")
    ]
    assert_same(losses_and_grads(config, True, data), want)
    assert float(want[1]["refine_layer.cls_head.3.weight"].abs().max()) > 0  # F is trained by the branches
    assert float(want[1]["init_layer.cls_head.3.weight"].abs().max()) > 0  # G through y_0 and its own head


@pytest.mark.parametrize(
    ("init_refinements", "rag_steps"), [(1, 2), (3, 2), (0, 2), (2, 1)], ids=lambda v: str(v)
)
def test_stacked_branches_of_unequal_refinement_counts(init_refinements, rag_steps, float64):
    """The init rows and the RAG rows leave the stack at different steps; the engine's branch-wise step."""
    data = random_batch(torch.Generator().manual_seed(1), batch=2, size=64, classes=CLASSES)
    schedule = {"init_refinements": init_refinements, "rag_steps": rag_steps}
    want = losses_and_grads("deqdet_tiny", False, data, branchwise=True, **schedule)
    assert sum(k.startswith("init_f") and k.endswith("_loss") for k in want[0]) == init_refinements
    assert_same(losses_and_grads("deqdet_tiny", True, data, branchwise=True, **schedule), want)


@pytest.mark.parametrize(
    "config", ["deqdet_tiny", "deq_sparse_rcnn_tiny", "deqdet_r50_1x", "deq_sparse_rcnn_r50_1x"]
)
def test_tiny_presets_stack_their_branches_and_paper_presets_do_not(config):
    with torch.device("meta"):
        model = build_model(config, CLASSES)
        assert model.stack_branches is config.endswith("_tiny")
        # The earlier name of the field, as saved runs and older commands spell it.
        assert build_model(config, CLASSES, stack_rag_branches=False).stack_branches is False
    assert parse_model_args(["stack_rag_branches=true"]) == {"stack_branches": True}


def test_a_run_saved_under_the_earlier_field_name_resumes_with_the_new_one(tmp_path):
    from implicitkit_det import cli
    from implicitkit_det.engine.run_config import RunConfigError, build_run_config

    def resolve(argv, checkpoint=None):
        parser = cli.build_parser()
        return build_run_config(vars(parser.parse_args(argv)), cli.given_options(parser, argv), checkpoint)

    saved = resolve(["--model-arg", "num_queries=4"]).to_dict()
    # as a run of the field's earlier name saved it
    saved["overrides"] = {"num_queries": 4, "stack_rag_branches": True}
    checkpoint = {"args": saved, "config": {"name": "deqdet_tiny", "overrides": saved["overrides"]}}
    # The same setting under its new name is the same run, not a change...
    resumed = resolve(["--resume", str(tmp_path), "--model-arg", "stack_branches=true"], checkpoint)
    assert resumed.overrides == {"num_queries": 4, "stack_branches": True} and resumed.changed == {}
    # ...and another value under either name is refused like any other model change on resume.
    for name in ("stack_branches", "stack_rag_branches"):
        with pytest.raises(RunConfigError, match="differs from the run being resumed"):
            resolve(["--resume", str(tmp_path), "--model-arg", f"{name}=false"], checkpoint)
    # A checkpoint of the oldest layout (no saved settings) reads the model config's overrides the same way.
    oldest = resolve(["--resume", str(tmp_path)], {"config": checkpoint["config"]})
    assert oldest.overrides == {"num_queries": 4, "stack_branches": True}


def test_a_field_given_under_both_names_must_agree():
    with torch.device("meta"):
        model = build_model("deqdet_tiny", CLASSES, stack_rag_branches=False, stack_branches=False)
        assert model.stack_branches is False
        with pytest.raises(ValueError, match="stack_rag_branches=True and stack_branches=False set the same"):
            build_model("deqdet_tiny", CLASSES, stack_rag_branches=True, stack_branches=False)
