"""DEQDet: the refinement as a fixed point, its supervised branches, RAP, and the detector conventions."""

from __future__ import annotations

import time

import pytest
import torch

from implicitkit_det.models import RAP, BoxPerturbation, DEQDet, build_model, xyxy_to_xyzr, xyzr_to_xyxy

SUPERVISED = (1, 3, 6, 9, 12, 20)
BRANCHES = {"init", "init_f1", "init_f2", *(f"rag_s{i}" for i in SUPERVISED)}
TERMS = {"focal", "l1", "giou", "loss_focal", "loss_l1", "loss_giou", "loss"}


def tiny(seed: int = 0, **overrides) -> DEQDet:
    torch.manual_seed(seed)
    overrides = {"num_queries": 6, **overrides}
    return build_model("deqdet_tiny", 10, **overrides)


def batch():
    """Two images padded to 64 x 96; the second is really 48 x 80."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 96, generator=gen)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    images[1, :, 48:], images[1, :, :, 80:] = 0, 0
    mask[1, 48:], mask[1, :, 80:] = True, True
    targets = [
        {
            "labels": torch.tensor([1, 4]),
            "boxes_normalized": torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.4, 0.9, 0.9]]),
            "size": torch.tensor([64, 96]),
            "orig_size": torch.tensor([128, 192]),
        },
        {
            "labels": torch.tensor([7]),
            "boxes_normalized": torch.tensor([[0.2, 0.3, 0.6, 0.7]]),
            "size": torch.tensor([48, 80]),
            "orig_size": torch.tensor([48, 80]),
        },
    ]
    return images, mask, targets


def unrolled_prediction(model: DEQDet, images, mask, steps: int):
    """The reference: G, then F applied ``steps`` times, written out."""
    sizes = model.image_sizes(images, mask=mask)
    features = model.features(images)
    y = model.init_layer(model.queries(sizes), features, sizes)
    for _ in range(steps):
        y = model.refine_layer(y, features, sizes)
    return model.refine_layer.predict(y, sizes)


@torch.no_grad()
def test_inference_applies_f_exactly_test_steps_times():
    model = tiny().eval()
    images, mask, _ = batch()
    assert model.test_steps == 21
    got = model.predict(images, mask=mask)
    want = unrolled_prediction(model, images, mask, 21)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    model.test_steps = 4  # a run-time setting
    torch.testing.assert_close(model.predict(images, mask=mask), unrolled_prediction(model, images, mask, 4))


def test_mask_passed_as_targets_is_a_clear_error():
    images, mask, _ = batch()
    with pytest.raises(TypeError, match="as mask="):
        tiny().eval()(images, mask)


def test_image_sizes_from_targets_mask_or_padding():
    images, mask, targets = batch()
    want = torch.tensor([[64.0, 96.0], [48.0, 80.0]])
    torch.testing.assert_close(DEQDet.image_sizes(images, targets), want)
    torch.testing.assert_close(DEQDet.image_sizes(images, mask=mask), want)
    torch.testing.assert_close(DEQDet.image_sizes(images), torch.tensor([[64.0, 96.0], [64.0, 96.0]]))


def test_images_that_are_not_a_normalised_batch_are_refused():
    model = tiny().eval()
    images, _, _ = batch()
    with pytest.raises(
        TypeError, match=r"images are torch.uint8; the detectors take float images normalised"
    ):
        model((images * 50).to(torch.uint8))  # a dataset built without transforms
    with pytest.raises(ValueError, match=r"images must be a \[B, 3, H, W\] batch, got shape \(3, 64, 96\)"):
        model.predict(images[0])


def test_a_mask_that_would_give_wrong_sizes_is_refused():
    """An inverted mask (True = valid, other libraries' pixel_mask) read as the whole padded size."""
    images, mask, _ = batch()
    with pytest.raises(ValueError, match=r"top-left pixel of image 0.*inverted.*~mask"):
        DEQDet.image_sizes(images, mask=~mask)
    with pytest.raises(TypeError, match=r"bool tensor, True on padding.*pixel_mask == 0"):
        DEQDet.image_sizes(images, mask=(~mask).long())
    with pytest.raises(ValueError, match=r"mask must be \[B, H, W\]"):
        DEQDet.image_sizes(images, mask=mask[:, :32])


def test_eval_returns_detections_in_original_pixels():
    model = tiny().eval()
    images, mask, targets = batch()
    with torch.no_grad():
        detections = model(images, targets, mask=mask)
        raw = model.predict(images, mask=mask)
    assert len(detections) == 2
    for det, (h, w) in zip(detections, [(128, 192), (48, 80)]):
        assert set(det) == {"boxes", "scores", "labels"}
        assert det["boxes"].shape == (60, 4) and det["scores"].shape == (60,)  # k = min(100, N x C)
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        assert det["labels"].dtype == torch.int64 and det["labels"].max() < 10
    # The best detection of image 0 is its query's box scaled to the original 128 x 192 image.
    q = int(raw["pred_logits"][0].sigmoid().flatten().argmax()) // 10
    scale = torch.tensor([192.0, 128.0, 192.0, 128.0])
    torch.testing.assert_close(detections[0]["boxes"][0], raw["pred_boxes"][0, q] * scale)


def test_training_losses_and_gradients_reach_every_part():
    model = tiny()
    images, mask, targets = batch()
    losses = model(images, targets, mask=mask)
    assert set(losses) == {f"{b}_{t}" for b in BRANCHES for t in TERMS} | {"loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], sum(losses[f"{b}_loss"] for b in BRANCHES))
    losses["loss"].backward()
    for part in ("backbone", "neck", "queries", "init_layer", "refine_layer"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part) and p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part
    # The initial box is the whole real image: normalised, it is the unit box for both images.
    assert model.queries(model.image_sizes(images, targets))["xyzr"].shape == (2, 6, 4)


@pytest.mark.parametrize("stacked", [False, True])
def test_branches_are_what_the_design_says(stacked):
    """init = G(q0); init_f{k} = F^k(G(q0)); rag_s{i} = F(F(y_i)) with y_i the i-th no-grad iterate."""
    model = tiny(stack_branches=stacked)
    model.perturbation = None
    images, _, targets = batch()
    sizes = model.image_sizes(images, targets)
    features = model.features(images)
    groups = list(model.training_branches(features, sizes))
    init, rag = ["init", "init_f1", "init_f2"], [f"rag_s{i}" for i in SUPERVISED]
    assert [list(g) for g in groups] == ([init + rag] if stacked else [init, *([name] for name in rag)])
    outputs = {k: v for g in groups for k, v in g.items()}
    F, G = model.refine_layer, model.init_layer
    with torch.no_grad():
        y = G(model.queries(sizes), features, sizes)
        want = {"init": G.predict(y, sizes)}
        z = y
        for k in (1, 2):
            z = F(z, features, sizes)
            want[f"init_f{k}"] = F.predict(z, sizes)
        for step in range(1, 21):
            y = F(y, features, sizes)
            if step in SUPERVISED:
                want[f"rag_s{step}"] = F.predict(F(F(y, features, sizes), features, sizes), sizes)
    for name, out in want.items():
        for key in out:
            torch.testing.assert_close(outputs[name][key], out[key], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("stacked", [False, True])
def test_gradient_routes_of_the_branches(stacked):
    """F(G) trains G; a RAG branch trains F (and the features) but never G: it starts from sg(y_i)."""
    model = tiny(stack_branches=stacked)
    images, _, targets = batch()
    sizes = model.image_sizes(images, targets)
    groups = model.training_branches(model.features(images), sizes)
    init_group = next(groups)
    model.criterion(init_group["init_f2"], targets)["loss"].backward(retain_graph=True)
    assert model.init_layer.attention.in_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    rag = (init_group if stacked else next(groups))["rag_s1"]
    model.criterion(rag, targets)["loss"].backward()
    # Stacked with y_0's rows, a RAG branch sends G exact zeros (the rows do not mix); alone, nothing.
    unreached = [*model.init_layer.parameters(), model.queries.embedding.weight]
    assert all(p.grad is None or not p.grad.any() for p in unreached)
    assert model.refine_layer.mixing.generator.weight.grad.abs().sum() > 0
    assert model.neck.convs[0].weight.grad.abs().sum() > 0


def test_forward_backward_equals_one_graph():
    images, mask, targets = batch()
    want_model = tiny(seed=3)
    want_model.perturbation = RAP(1.0, 0.1, 1.0, 4.0, generator=torch.Generator().manual_seed(5))
    want_losses = want_model(images, targets, mask=mask)
    want_losses["loss"].backward()
    got_model = tiny(seed=3)
    got_model.perturbation = RAP(1.0, 0.1, 1.0, 4.0, generator=torch.Generator().manual_seed(5))
    got_losses = got_model.forward_backward(images, targets, mask=mask)
    assert set(got_losses) == set(want_losses) and not got_losses["loss"].requires_grad
    torch.testing.assert_close(got_losses["loss"], want_losses["loss"].detach())
    for (name, p), q in zip(want_model.named_parameters(), got_model.parameters()):
        if p.grad is not None:  # summed in another order: equal up to float32 rounding of the largest entry
            atol = 1e-5 * float(p.grad.abs().max())
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=atol, msg=name)


def test_rap_is_off_in_eval_and_reproducible_with_a_generator():
    images, mask, targets = batch()
    model = tiny()
    reference = model.eval().predict(images, mask=mask)
    model.perturbation = RAP(1.0, 0.5, 1.0, 25.0)  # would change every step in training
    torch.testing.assert_close(model.predict(images, mask=mask), reference, rtol=0, atol=0)

    model.train()

    def losses(seed):
        model.perturbation = RAP(1.0, 0.1, 1.0, 4.0, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return model(images, targets, mask=mask)["rag_s20_loss"]

    assert losses(0) == losses(0)
    assert losses(0) != losses(1)
    model.perturbation = None
    with torch.no_grad():
        assert model(images, targets, mask=mask)["rag_s20_loss"] != losses(0)


@pytest.mark.parametrize("deq_tol", [None, 1e-3], ids=["fixed steps", "early exit"])
def test_predict_in_training_mode_is_never_perturbed(deq_tol):
    """RAP perturbs the training branches only: predict() gives the eval-mode outputs in either mode."""
    images, mask, _ = batch()
    model = tiny(backbone_norm="frozen")  # no batch statistics: the modes differ only by what RAP does
    model.perturbation = RAP(1.0, 0.5, 1.0, 25.0)
    model.test_tol = deq_tol
    with torch.no_grad():
        reference = model.eval().predict(images, mask=mask)
        in_training = model.train().predict(images, mask=mask)
    torch.testing.assert_close(in_training, reference, rtol=0, atol=0)


def test_training_losses_do_not_depend_on_the_grad_mode():
    images, mask, targets = batch()
    model = tiny()
    model.perturbation = RAP(generator=torch.Generator().manual_seed(0))
    with_grad = model(images, targets, mask=mask)
    model.perturbation = RAP(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        without = model(images, targets, mask=mask)
    for name, value in with_grad.items():
        torch.testing.assert_close(without[name], value.detach(), msg=name)


def test_box_perturbation():
    xyzr = xyxy_to_xyzr(torch.tensor([[[10.0, 10.0, 30.0, 20.0], [40.0, 5.0, 41.0, 6.0]]]))
    state = {"content": torch.randn(1, 2, 8), "xyzr": xyzr}
    assert BoxPerturbation(prob=0.0)(state, 1) is state
    box = BoxPerturbation(
        prob=1.0, pixels=25.0, generator=torch.Generator().manual_seed(0), sort_corners=True
    )
    out = box(state, 1)  # re-sorted corners (the official default leaves them crossed: test_det_fidelity)
    gen = torch.Generator().manual_seed(0)
    torch.rand((), generator=gen)  # the step's Bernoulli draw
    noisy = xyzr_to_xyxy(xyzr) + 25.0 * torch.randn(xyzr.shape, generator=gen)
    lo, hi = torch.minimum(noisy[..., :2], noisy[..., 2:]), torch.maximum(noisy[..., :2], noisy[..., 2:])
    torch.testing.assert_close(xyzr_to_xyxy(out["xyzr"]), torch.cat([lo, hi], -1), rtol=1e-5, atol=1e-4)
    assert out["content"] is state["content"]


def test_rap_composes_content_and_box_parts():
    rap = RAP(generator=torch.Generator().manual_seed(0))
    assert rap.content.prob == 0.2 and rap.content.scale == 0.1 and rap.content.leaves == [("content",)]
    assert rap.box.prob == 0.2 and rap.box.pixels == 25.0
    state = {"content": torch.randn(2, 3, 8), "xyzr": torch.randn(2, 3, 4)}
    changed = [not torch.equal(rap(state, k)["content"], state["content"]) for k in range(200)]
    assert 20 < sum(changed) < 80  # about one step in five


def test_paper_scale_forward():
    """deqdet_r50_1x at its real widths (ResNet-50, 256 channels, P = 64), on one 256 px image, few queries."""
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model("deqdet_r50_1x", 80, num_queries=4, test_steps=2).eval()
    images = torch.randn(1, 3, 256, 256)
    mask = torch.zeros(1, 256, 256, dtype=torch.bool)
    mask[:, 200:] = True
    with torch.no_grad():
        features = model.features(images)
        raw = model.predict(images, mask=mask)
        detections = model(images, mask=mask)
    assert [f.shape for f in features] == [(1, 256, 256 // s, 256 // s) for s in (4, 8, 16, 32)]
    assert raw["pred_logits"].shape == (1, 4, 80) and raw["pred_boxes"].shape == (1, 4, 4)
    assert detections[0]["boxes"].shape == (100, 4)
    assert torch.isfinite(raw["pred_boxes"]).all()
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("name", ["deqdet_tiny", "adamixer_tiny"])
def test_build_model_rejects_unknown_names_and_applies_overrides(name):
    with torch.device("meta"):
        model = build_model(name, 3, num_queries=7)
    assert model.queries.embedding.num_embeddings == 7
    with pytest.raises(KeyError, match="unknown model config"):
        build_model("nope", 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(gn_groups=7), r"ModelConfig.gn_groups=7 does not divide dim=64"),
        (dict(rap_content_prob=1.5), r"ModelConfig.rap_content_prob=1.5: give a value in \[0, 1\]"),
        (dict(rap_box_pixels=-1.0), r"ModelConfig.rap_box_pixels=-1.0"),
        (dict(supervise_steps=(), init_refinements=0), r"leaves the refinement layer F out of every loss"),
        (dict(test_solver="anderson"), r"test_solver='anderson' solves to test_tol, and no test_tol is set"),
    ],
)
def test_options_that_cannot_work_are_named_when_the_model_is_built(overrides, message):
    # Each was accepted: torch's GroupNorm error, "prob must lie in [0, 1]", an F that never trained, no solver.
    with pytest.raises(ValueError, match=message):
        build_model("deqdet_tiny", 3, **overrides)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(test_solver="no-such-solver"), "choose 'fixed' or 'anderson'"),
        (dict(test_steps=-3), r"test_steps=-3: give the number of applications of F"),
        (dict(test_solver="anderson"), "no test_tol is set"),
    ],
)
def test_test_time_settings_are_checked_when_set(settings, message):
    model = build_model("deqdet_tiny", 3)
    before = model.test_settings
    with pytest.raises(ValueError, match=message):
        model.configure_test(**settings)
    assert model.test_settings == before  # nothing changed
    model.configure_test(test_tol=1e-3, test_solver="anderson")
    assert model.test_settings["test_solver"] == "anderson"


def test_frozen_stages_keep_their_batch_norm_statistics():
    """With norm="batch", frozen stages kept updating their running statistics in training."""
    from implicitkit_det.models.backbone import ResNetBackbone

    backbone = ResNetBackbone("resnet10", norm="batch", frozen_stages=2).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items() if k.endswith("running_mean")}
    backbone(torch.randn(2, 3, 64, 64))
    changed = {
        k.split(".")[0] + "." + k.split(".")[1]
        for k, v in backbone.state_dict().items()
        if k in before and not torch.equal(v, before[k])
    }
    assert changed == {"stages.2", "stages.3"}  # the stem and stages 0-1 are frozen, statistics included


def test_a_schedule_changed_after_building_is_named_in_the_detectors_terms():
    # It failed with the solver's "capture steps must lie in [1, max_iter]... raise max_iter".
    model = build_model("deqdet_tiny", 3, num_queries=4).train()
    model.train_steps = 4  # the preset supervises steps up to 20
    targets = [{"labels": torch.tensor([1]), "boxes_normalized": torch.tensor([[0.1, 0.1, 0.5, 0.5]])}]
    with pytest.raises(
        ValueError,
        match=r"DEQDet.supervise_steps=\(1, 3, 6, 9, 12, 20\): \[6, 9, 12, 20\] outside 1 .. train_steps=4",
    ):
        model(torch.randn(1, 3, 64, 64), targets)


def test_settings_and_sizes_that_would_be_read_silently_are_refused():
    """Three ways to get other detections than asked for, each without an error before: test settings set
    as attributes (configure_test checks them, plain assignment did not), an orig_size on some targets only
    (every image then came back in input pixels), and a target size that disagrees with the mask."""
    images, mask, targets = batch()
    model = tiny().eval()
    with torch.no_grad():
        model.test_solver = "anderson"  # without test_tol: F would run test_steps times, no solver
        with pytest.raises(ValueError, match="test_solver='anderson' solves to test_tol"):
            model(images, mask=mask)
        model.test_solver = "fixed"
        partial = [targets[0], {k: v for k, v in targets[1].items() if k != "orig_size"}]
        with pytest.raises(ValueError, match="1 of 2 targets have an orig_size"):
            model(images, partial, mask=mask)
        swapped = [targets[0], {**targets[1], "size": torch.tensor([80, 48])}]  # (w, h)
        with pytest.raises(
            ValueError, match=r"targets\[1\]\['size'\] is \[80, 48\] .* the mask says \[48, 80\]"
        ):
            model(images, swapped, mask=mask)
        before_resize = [{**targets[0], "size": torch.tensor([128, 192])}, targets[1]]
        with pytest.raises(ValueError, match=r"targets\[0\]\['size'\] is \[128, 192\] for a batch padded to"):
            model(images, before_resize)
        assert len(model(images, targets, mask=mask)) == 2  # as collate_detection gives them: fine
