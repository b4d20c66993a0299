"""Sparse R-CNN and DEQ Sparse R-CNN: parameter counts, layers against independent references, branches, RAP."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import roi_align

from implicitkit_det.models import (
    FPN,
    CornerPerturbation,
    DEQSparseRCNN,
    DynamicInteraction,
    MultiLevelRoIAlign,
    SparseRCNN,
    SparseRCNNRAP,
    SparseRCNNStage,
    build_model,
    decode_deltas,
    encode_deltas,
    roi_levels,
)

TERMS = {"focal", "l1", "giou", "loss_focal", "loss_l1", "loss_giou", "loss"}


def tiny(name: str = "sparse_rcnn_tiny", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(name, 10, **{"num_queries": 6, **overrides})


def tiny_deq(seed: int = 0, **overrides) -> DEQSparseRCNN:
    schedule = {"train_steps": 4, "supervise_steps": (1, 4), "test_steps": 5}
    return tiny("deq_sparse_rcnn_tiny", seed, **{**schedule, **overrides})


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
        },
        {
            "labels": torch.tensor([7]),
            "boxes_normalized": torch.tensor([[0.2, 0.3, 0.6, 0.7]]),
            "size": torch.tensor([48, 80]),
        },
    ]
    return images, mask, targets


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- parameter counts --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, proposals, total",
    [
        ("sparse_rcnn_r50_1x", 100, 106_290_888),
        ("sparse_rcnn_r50_3x", 300, 106_342_888),
        ("deq_sparse_rcnn_r50_1x", 100, 53_349_240),
        ("deq_sparse_rcnn_r50_3x", 300, 53_401_240),
    ],
)
def test_paper_parameter_counts(name, proposals, total):
    with torch.device("meta"):
        model = build_model(name, 80)
    assert count(model) == total
    assert model.queries.boxes.num_embeddings == proposals == model.postprocess.num_select
    assert count(model.queries) == 260 * proposals  # 4 box + 256 feature values per proposal
    assert count(model.backbone) == 23_508_032
    assert count(model.neck) == 3_344_384
    stages = list(model.stages) if isinstance(model, SparseRCNN) else [model.init_layer, model.refine_layer]
    assert len(stages) == (6 if isinstance(model, SparseRCNN) else 2)
    assert all(count(s) == 13_235_412 for s in stages)


def test_one_dii_head_and_its_parts():
    with torch.device("meta"):
        stage = SparseRCNNStage(80)
        interaction = DynamicInteraction(256, 64, 7)
        fpn = FPN((256, 512, 1024, 2048), 256)
    assert count(stage) == 13_235_412
    assert count(interaction) == 11_634_048
    assert count(fpn) == 3_344_384
    assert interaction.generator.out_features == 2 * 256 * 64 and interaction.out_proj.in_features == 49 * 256
    assert [m.bias is None for m in stage.cls_head if isinstance(m, torch.nn.Linear)] == [True, False]
    assert [m.bias is None for m in stage.reg_head if isinstance(m, torch.nn.Linear)] == [True] * 3 + [False]


def test_dii_head_initialisation():
    torch.manual_seed(0)
    stage = SparseRCNNStage(80)
    torch.testing.assert_close(stage.cls_head[-1].bias, torch.full((80,), -math.log(99.0)))
    assert torch.equal(stage.reg_head[-1].bias, torch.zeros(4))
    for name, p in stage.named_parameters():
        if (
            p.dim() > 1
        ):  # Xavier-uniform: |w| <= sqrt(6 / (fan_in + fan_out)), and the bound is nearly reached
            bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
            assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound, name
    assert torch.equal(stage.attention.in_proj_bias, torch.zeros(3 * 256))


def test_fpn_matches_the_top_down_equations():
    torch.manual_seed(0)
    fpn = FPN((8, 16, 32, 64), 8)
    feats = [torch.randn(1, c, 32 // 2**j, 24 // 2**j) for j, c in enumerate((8, 16, 32, 64))]
    out = fpn(feats)
    assert [o.shape for o in out] == [(1, 8, 32 // 2**j, 24 // 2**j) for j in range(4)]
    inner, layer = fpn.fpn.inner_blocks, fpn.fpn.layer_blocks
    m = inner[3](feats[3])
    want = [layer[3](m)]
    for j in (2, 1, 0):
        m = inner[j](feats[j]) + m.repeat_interleave(2, -2).repeat_interleave(2, -1)  # nearest x2
        want.insert(0, layer[j](m))
    for got, ref in zip(out, want):
        torch.testing.assert_close(got, ref)
    assert all((c.bias == 0).all() for c in fpn.modules() if isinstance(c, torch.nn.Conv2d))


def test_fpn_norm_normalises_every_level_per_image_and_drops_the_biases():
    torch.manual_seed(0)
    fpn = FPN((8, 16, 32, 64), 8, norm_groups=2)
    convs = [m for m in fpn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is None for c in convs)
    feats = [torch.randn(2, c, 32 // 2**j, 24 // 2**j) for j, c in enumerate((8, 16, 32, 64))]
    # An offset shared by both images, as the collapse grows in the backbone, does not reach the outputs.
    shifted = fpn([f + 50.0 for f in feats])
    for level in fpn(feats) + shifted:
        groups = level.view(2, 2, -1)  # [images, groups, values]: GroupNorm's affine starts at (1, 0)
        torch.testing.assert_close(groups.mean(-1), torch.zeros(2, 2), atol=1e-5, rtol=0)
        torch.testing.assert_close(groups.var(-1, unbiased=False), torch.ones(2, 2), atol=1e-3, rtol=0)
    plain = sum(p.numel() for p in FPN((8, 16, 32, 64), 8).parameters())
    assert sum(p.numel() for p in fpn.parameters()) == plain - 8 * 8 + 8 * 2 * 8  # biases out, GN in


# -- delta coder -------------------------------------------------------------------------------------------
def test_delta_encoding_by_hand_and_round_trip():
    box, target = torch.tensor([10.0, 20.0, 50.0, 40.0]), torch.tensor([12.0, 18.0, 60.0, 50.0])
    # Centres (30, 30) and (36, 34), sizes (40, 20) and (48, 32); stds (0.5, 0.5, 1, 1).
    want = torch.tensor([6 / 40 / 0.5, 4 / 20 / 0.5, math.log(48 / 40), math.log(32 / 20)])
    torch.testing.assert_close(encode_deltas(box, target), want)
    torch.testing.assert_close(decode_deltas(box, want), target)

    gen = torch.Generator().manual_seed(0)
    lo = torch.rand(2, 5, 2, generator=gen) * 50
    boxes = torch.cat([lo, lo + 1 + torch.rand(2, 5, 2, generator=gen) * 40], -1)
    lo = torch.rand(2, 5, 2, generator=gen) * 50
    targets = torch.cat([lo, lo + 1 + torch.rand(2, 5, 2, generator=gen) * 40], -1)
    deltas = encode_deltas(boxes, targets)
    torch.testing.assert_close(decode_deltas(boxes, deltas), targets, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        encode_deltas(boxes, decode_deltas(boxes, deltas)), deltas, rtol=1e-4, atol=1e-4
    )


def test_delta_decoding_clamps_the_size_step_and_clips_when_asked():
    box = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    huge = decode_deltas(box, torch.tensor([[[0.0, 0.0, 100.0, -100.0]]]))
    torch.testing.assert_close(huge[0, 0, 2] - huge[0, 0, 0], torch.tensor(10 * 1000 / 16))  # 62.5x at most
    torch.testing.assert_close(huge[0, 0, 3] - huge[0, 0, 1], torch.tensor(10 * 16 / 1000))
    out = decode_deltas(box, torch.tensor([[[2.0, 0.0, 1.0, 0.0]]]), image_sizes=torch.tensor([[40.0, 20.0]]))
    # Centre 5 + 0.5 * 2 * 10 = 15, width 10 e = 27.18: x spans [1.41, 28.59], clipped to the 20 px width.
    torch.testing.assert_close(out, torch.tensor([[[15 - 5 * math.e, 0.0, 20.0, 10.0]]]))


# -- RoI features ------------------------------------------------------------------------------------------
def test_roi_levels_follow_the_canonical_scale_56():
    sides = {56: 0, 111: 0, 112: 1, 223: 1, 224: 2, 447: 2, 448: 3, 1000: 3, 10: 0, 1: 0}
    boxes = torch.tensor([[5.0, 5.0, 5.0 + s, 5.0 + s] for s in sides])
    assert roi_levels(boxes).tolist() == list(sides.values())
    # sqrt(w h) decides, not the longer side: 28 x 448 has scale 112.
    assert roi_levels(torch.tensor([[0.0, 0.0, 28.0, 448.0]])).tolist() == [1]
    # By the rule written out: floor(log2(s / 56 + 1e-6)), clamped to 0..3.
    s = torch.tensor([30.0, 80.0, 150.0, 300.0, 700.0])
    expected = [max(0, min(3, math.floor(math.log2(v / 56 + 1e-6)))) for v in s.tolist()]
    assert roi_levels(torch.stack([0 * s, 0 * s, s, s], -1)).tolist() == expected == [0, 0, 1, 2, 3]


def test_multi_level_roi_align_reads_each_box_from_its_level():
    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 3, 512 // s, 512 // s, generator=gen) for s in (4, 8, 16, 32)]
    boxes = torch.tensor(
        [
            [[10.0, 10.0, 50.0, 60.0], [20.0, 30.0, 200.0, 180.0], [0.0, 0.0, 300.0, 320.0]],
            [[10.0, 0.0, 510.0, 510.0], [5.0, 5.0, 30.0, 12.0], [50.0, 60.0, 170.0, 290.0]],
        ]
    )
    out = MultiLevelRoIAlign()(features, boxes)
    assert out.shape == (6, 3, 7, 7)
    levels = roi_levels(boxes.view(-1, 4))
    assert levels.tolist() == [0, 1, 2, 3, 0, 1]
    for row, (b, i) in enumerate((b, i) for b in range(2) for i in range(3)):
        lvl = int(levels[row])
        roi = torch.cat([torch.tensor([float(b)]), boxes[b, i]])[None]
        want = roi_align(features[lvl], roi, 7, 1 / (4 * 2**lvl), 2, aligned=True)
        torch.testing.assert_close(out[row : row + 1], want)


def test_roi_align_reads_stacked_rows_from_their_images():
    gen = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 3, 512 // s, 512 // s, generator=gen) for s in (4, 8, 16, 32)]
    corners = torch.rand(3 * 2, 4, 2, 2, generator=gen) * 500
    boxes = torch.cat([corners.amin(2), corners.amax(2) + 1], dim=-1)  # [r B, N, 4], r = 3
    out = MultiLevelRoIAlign()(features, boxes)
    assert len(roi_levels(boxes.view(-1, 4)).unique()) > 1
    copied = [level.repeat(3, 1, 1, 1) for level in features]
    torch.testing.assert_close(out, MultiLevelRoIAlign()(copied, boxes), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of the images"):
        MultiLevelRoIAlign()(features, boxes[:3])


# -- the stage and the explicit detector -------------------------------------------------------------------
def test_stage_update_is_the_decoded_regression():
    torch.manual_seed(0)
    stage = SparseRCNNStage(5, dim=32, num_heads=4, hidden_dim=8, ffn_dim=64)
    features = [torch.randn(1, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    state = {
        "content": torch.randn(1, 3, 32),
        "xyxy": torch.tensor([[[0.0, 0.0, 64, 64], [5, 5, 20, 30], [30, 2, 60, 40]]]),
    }
    sizes = torch.tensor([[64.0, 64.0]])
    out = stage(state, features, sizes)
    torch.testing.assert_close(out["xyxy"], decode_deltas(state["xyxy"], stage.reg_head(out["content"])))
    pred = stage.predict(out, sizes)
    assert pred["pred_logits"].shape == (1, 3, 5)
    torch.testing.assert_close(pred["pred_boxes"], out["xyxy"] / 64)


@pytest.mark.parametrize("name", ["sparse_rcnn_tiny", "deq_sparse_rcnn_tiny"])
def test_output_shapes_for_one_and_two_images(name):
    schedule = (
        {"train_steps": 2, "supervise_steps": (1, 2), "test_steps": 2} if name.startswith("deq") else {}
    )
    model = tiny(name, **schedule)
    images, mask, targets = batch()
    for b in (1, 2):
        model.eval()
        with torch.no_grad():
            raw = model.predict(images[:b], mask=mask[:b])
            detections = model(images[:b], mask=mask[:b])
        assert raw["pred_logits"].shape == (b, 6, 10) and raw["pred_boxes"].shape == (b, 6, 4)
        assert [d["boxes"].shape for d in detections] == [(60, 4)] * b  # k = min(100, N x C)
        assert all(set(d) == {"boxes", "scores", "labels"} for d in detections)
        model.train()
        losses = model(images[:b], targets[:b], mask=mask[:b])
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    # The second image's proposals start on its real 48 x 80 extent, not the padded 64 x 96.
    start = model.queries(model.image_sizes(images, mask=mask))["xyxy"]
    torch.testing.assert_close(start[1], torch.tensor([0.0, 0.0, 80.0, 48.0]).expand(6, 4))


def test_sparse_rcnn_supervises_six_untied_stages():
    model = tiny()
    assert (
        isinstance(model, SparseRCNN) and len(model.stages) == 6 and len({id(s) for s in model.stages}) == 6
    )
    assert [s.detach_boxes for s in model.stages] == [False] + [True] * 5
    images, mask, targets = batch()
    losses = model(images, targets, mask=mask)
    assert set(losses) == {f"stage{i}_{t}" for i in range(6) for t in TERMS} | {"loss"}
    torch.testing.assert_close(losses["loss"], sum(losses[f"stage{i}_loss"] for i in range(6)))
    losses["loss"].backward()
    for part in (
        "backbone",
        "neck",
        "queries.boxes",
        "queries.embedding",
        *(f"stages.{i}" for i in range(6)),
    ):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part


def test_boxes_are_detached_between_stages():
    """Only the first stage's regression trains the proposal boxes; later boxes start from sg(b)."""
    model = tiny()
    images, _, targets = batch()
    sizes = model.image_sizes(images, targets)
    features = model.features(images)
    s0 = model.stages[0](model.queries(sizes), features, sizes)
    s1 = model.stages[1](s0, features, sizes)
    s1["xyxy"].sum().backward(retain_graph=True)
    assert model.queries.boxes.weight.grad is None and model.stages[0].reg_head[-1].weight.grad is None
    assert model.stages[1].reg_head[-1].weight.grad.abs().sum() > 0
    s0["xyxy"].sum().backward()
    assert model.queries.boxes.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_inference_is_the_last_stage_of_the_chain():
    model = tiny().eval()
    images, mask, _ = batch()
    sizes = model.image_sizes(images, mask=mask)
    features = model.features(images)
    state = model.queries(sizes)
    for stage in model.stages:
        state = stage(state, features, sizes)
    torch.testing.assert_close(model.predict(images, mask=mask), model.stages[-1].predict(state, sizes))


# -- the DEQ variant ---------------------------------------------------------------------------------------
def test_deq_weights_do_not_depend_on_the_number_of_steps():
    with torch.device("meta"):
        short = build_model("deq_sparse_rcnn_r50_1x", 80, train_steps=2, test_steps=3, supervise_steps=(1, 2))
        long = build_model(
            "deq_sparse_rcnn_r50_1x", 80, train_steps=30, test_steps=40, supervise_steps=(5, 30)
        )
    assert count(short) == count(long) == 53_349_240
    assert [n for n, _ in short.named_parameters()] == [n for n, _ in long.named_parameters()]
    model = tiny_deq()
    assert isinstance(model, DEQSparseRCNN)
    assert (model.init_layer.detach_boxes, model.refine_layer.detach_boxes) == (False, True)
    assert model.init_layer is not model.refine_layer
    assert isinstance(model.perturbation, SparseRCNNRAP) and model.perturbation.box.pixels == 4.0


def test_deq_branches_are_deqdets_with_sparse_rcnn_layers():
    """init = G(p); init_f{k} = F^k(G(p)); rag_s{i} = F(F(y_i)), y_i the i-th no-grad iterate of F."""
    model = tiny_deq()
    model.perturbation = None
    images, _, targets = batch()
    sizes = model.image_sizes(images, targets)
    features = model.features(images)
    outputs = {k: v for g in model.training_branches(features, sizes) for k, v in g.items()}
    assert set(outputs) == {"init", "init_f1", "init_f2", "rag_s1", "rag_s4"}
    F, G = model.refine_layer, model.init_layer
    with torch.no_grad():
        y = G(model.queries(sizes), features, sizes)
        want = {"init": G.predict(y, sizes)}
        z = y
        for k in (1, 2):
            z = F(z, features, sizes)
            want[f"init_f{k}"] = F.predict(z, sizes)
        for step in range(1, 5):
            y = F(y, features, sizes)
            if step in (1, 4):
                want[f"rag_s{step}"] = F.predict(F(F(y, features, sizes), features, sizes), sizes)
    for name, out in want.items():
        for key in out:
            torch.testing.assert_close(outputs[name][key], out[key], rtol=1e-5, atol=1e-4, msg=name)


def test_deq_gradients_reach_every_part():
    model = tiny_deq()
    images, mask, targets = batch()
    losses = model(images, targets, mask=mask)
    branches = {"init", "init_f1", "init_f2", "rag_s1", "rag_s4"}
    assert set(losses) == {f"{b}_{t}" for b in branches for t in TERMS} | {"loss"}
    losses["loss"].backward()
    for part in ("backbone", "neck", "queries.boxes", "queries.embedding", "init_layer", "refine_layer"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part


@torch.no_grad()
def test_deq_inference_applies_f_test_steps_times_without_rap():
    model = tiny_deq().eval()
    images, mask, _ = batch()
    model.perturbation = SparseRCNNRAP(1.0, 0.5, 1.0, 25.0)  # would change every step in training
    first = model.predict(images, mask=mask)
    torch.testing.assert_close(model.predict(images, mask=mask), first, rtol=0, atol=0)
    sizes = model.image_sizes(images, mask=mask)
    features = model.features(images)
    y = model.init_layer(model.queries(sizes), features, sizes)
    for _ in range(model.test_steps):
        y = model.refine_layer(y, features, sizes)
    torch.testing.assert_close(first, model.refine_layer.predict(y, sizes), rtol=0, atol=0)


def test_deq_training_path_is_perturbed_reproducibly():
    images, mask, targets = batch()
    model = tiny_deq()

    def rag_loss(seed):
        model.perturbation = SparseRCNNRAP(1.0, 0.1, 1.0, 4.0, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return model(images, targets, mask=mask)["rag_s4_loss"]

    assert rag_loss(0) == rag_loss(0) and rag_loss(0) != rag_loss(1)
    model.perturbation = None
    with torch.no_grad():
        assert model(images, targets, mask=mask)["rag_s4_loss"] != rag_loss(0)


# -- RAP on corner boxes -----------------------------------------------------------------------------------
def test_sparse_rcnn_rap_moves_the_corners_first_then_the_content():
    xyxy = torch.tensor([[[10.0, 10.0, 30.0, 20.0], [40.0, 5.0, 41.0, 6.0]]])
    state = {"content": torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(3)), "xyxy": xyxy}
    assert CornerPerturbation(prob=0.0)(state, 1) is state
    out = SparseRCNNRAP(1.0, 0.1, 1.0, 25.0, generator=torch.Generator().manual_seed(0))(state, 1)

    gen = torch.Generator().manual_seed(0)
    torch.rand((), generator=gen)  # the box part's Bernoulli draw
    noisy = xyxy + 25.0 * torch.randn(xyxy.shape, generator=gen)
    lo, hi = torch.minimum(noisy[..., :2], noisy[..., 2:]), torch.maximum(noisy[..., :2], noisy[..., 2:])
    torch.testing.assert_close(out["xyxy"], torch.cat([lo, hi], -1))
    assert (out["xyxy"][..., 2:] >= out["xyxy"][..., :2]).all()
    torch.rand((), generator=gen)  # the content part's Bernoulli draw
    q = state["content"]
    eps = torch.randn(q.shape, generator=gen)
    torch.testing.assert_close(out["content"], 0.9 * q + 0.1 * q.norm(dim=-1, keepdim=True) * eps)


def test_sparse_rcnn_rap_defaults_and_rates():
    rap = SparseRCNNRAP(generator=torch.Generator().manual_seed(0))
    assert (rap.box.prob, rap.box.pixels, rap.content.prob, rap.content.scale) == (0.2, 25.0, 0.2, 0.1)
    state = {"content": torch.randn(2, 3, 8), "xyxy": torch.tensor([0.0, 0.0, 50.0, 50.0]).expand(2, 3, 4)}
    moved = [not torch.equal(rap(state, k)["xyxy"], state["xyxy"]) for k in range(200)]
    assert 20 < sum(moved) < 80  # about one step in five
    with pytest.raises(ValueError, match="prob must lie in"):
        CornerPerturbation(prob=1.5)
    with pytest.raises(ValueError, match="perturbation must be 'rap'"):
        DEQSparseRCNN(*([None] * 5), perturbation="noise")  # refused before any part is used


def test_deq_variant_takes_the_deq_schedule_from_its_config():
    from implicitkit_det.models import build_model

    with torch.device("meta"):
        model = build_model("deq_sparse_rcnn_tiny", 10, train_steps=7, test_steps=9, supervise_steps=(2, 7))
    assert (model.train_steps, model.test_steps, model.supervise_steps) == (7, 9, (2, 7))


@pytest.mark.parametrize("config", ["sparse_rcnn_tiny", "deq_sparse_rcnn_tiny"])
def test_every_trainable_parameter_gets_a_gradient_when_no_box_reads_a_level(config):
    """DDP (without find_unused_parameters) needs a gradient for every parameter in every step: with small
    boxes only the finest level is read, and the other levels' FPN convolutions got none."""
    from implicitkit_det.models.roi import roi_levels

    torch.manual_seed(0)
    model = build_model(config, 10, num_queries=6)
    if hasattr(model, "train_steps"):
        model.train_steps, model.supervise_steps = 2, (1, 2)
    with torch.no_grad():  # boxes of a model trained on small objects: every one under 112 px
        model.queries.boxes.weight[:, 2:] = 0.3
        for module in model.modules():
            if hasattr(module, "reg_head"):
                module.reg_head[-1].weight.zero_()
    images = torch.randn(2, 3, 160, 192)
    targets = [
        {
            "labels": torch.tensor([3, 1]),
            "boxes_normalized": torch.tensor([[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]]),
            "size": torch.tensor([160, 192]),
        }
    ] * 2
    sizes = model.image_sizes(images, targets)
    assert roi_levels(model.queries(sizes)["xyxy"]).unique().tolist() == [0]
    model.forward_backward(images, targets)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
