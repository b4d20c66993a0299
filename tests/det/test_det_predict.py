"""Pictures: predictions drawn where the model says, the prediction grid, and the refinement curve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from implicitkit_det import cli
from implicitkit_det.engine.predict import (
    Detector,
    detect,
    draw_detections,
    image_files,
    predict_files,
    read_rgb,
    save_grid,
)
from implicitkit_det.engine.refinement import refinement_curve
from implicitkit_det.predict import main as predict_main

SMALL = [
    "--config", "deqdet_tiny", "--image-size", "64", "--max-size", "96", "--workers", "0", "--batch-size", "2",
    "--max-iters", "2", "--warmup-iters", "2", "--print-freq", "1", "--deq-steps", "2",
    "--model-arg", "train_steps=2", "--model-arg", "supervise_steps=[1,2]", "--model-arg", "num_queries=8",
]  # fmt: skip


def test_boxes_are_drawn_where_the_detections_say():
    image = torch.zeros(3, 40, 50, dtype=torch.uint8)
    det = {"boxes": torch.tensor([[10.0, 5.0, 45.0, 35.0], [0, 0, 5, 5]]), "labels": torch.tensor([0, 1]),
           "scores": torch.tensor([0.9, 0.1])}  # fmt: skip
    drawn = draw_detections(image, det, class_names=["zero", "one"], score_threshold=0.5)
    assert drawn[:, 15, 10].tolist() == [255, 0, 0]  # the left edge of the kept box, in label 0's colour
    assert drawn[:, 35, 30].tolist() == [255, 0, 0]  # its bottom edge
    assert drawn[:, 2, 2].tolist() == [0, 0, 0]  # the low-scoring box is not drawn
    assert drawn[:, 28, 30].tolist() == [0, 0, 0]  # nothing inside the box but its label (at the top)


def test_grid_pads_images_of_different_sizes(tmp_path):
    path = save_grid(
        [torch.zeros(3, 10, 20, dtype=torch.uint8), torch.zeros(3, 16, 8, dtype=torch.uint8)],
        tmp_path / "g.png",
        columns=2,
    )
    grid = read_rgb(str(path))
    assert grid.shape == (3, 16 + 2 * 4, 2 * 20 + 3 * 4)


@pytest.fixture(scope="module")
def trained_run(tiny_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = [*SMALL, "--data-root", str(tiny_digits.root), "--epochs", "1", "--output-dir", str(out)]
    cli.main([*argv, "--refinement-curve", "3", "--save-predictions", "2"])
    return out


def test_run_saves_the_curve_and_the_prediction_grid(trained_run):
    saved = json.loads((trained_run / "refinement_curve.json").read_text())
    assert [p["steps"] for p in saved["curve"]] == [0, 1, 2, 3] and saved["train_depth"] == 2
    assert all(0.0 <= p["AP"] <= 1.0 for p in saved["curve"])
    assert (trained_run / "refinement_curve.png").stat().st_size > 0
    grid = read_rgb(str(trained_run / "predictions.png"))
    assert grid.shape[0] == 3 and grid.shape[2] > grid.shape[1]  # 2 images x (truth, prediction) in a row


def test_curve_equals_evaluation_at_each_step_count(trained_run, tiny_digits):
    """The one-pass curve scores exactly what ``--eval-only --deq-steps n`` scores."""
    checkpoint = trained_run / "checkpoint_last.pth"
    base = [*SMALL, "--data-root", str(tiny_digits.root), "--resume", str(checkpoint), "--eval-only"]
    curve = json.loads((trained_run / "refinement_curve.json").read_text())["curve"]
    for n in (0, 3):
        stats = cli.main([*base, "--deq-steps", str(n), "--output-dir", str(trained_run / f"eval{n}")])
        assert stats["AP"] == pytest.approx(curve[n]["AP"], abs=1e-9)


def test_predict_files_and_cli(trained_run, tiny_digits, tmp_path, capsys):
    images = sorted(tiny_digits.images("val").glob("*.png"))[:2]
    results = predict_main(
        [
            str(trained_run / "checkpoint_last.pth"),
            *map(str, images),
            "--out",
            str(tmp_path),
            "--score",
            "0.0",
        ]
    )
    assert [r["output"].name for r in results] == [p.name for p in images]
    for r in results:
        drawn, original = read_rgb(str(r["output"])), read_rgb(str(r["image"]))
        assert drawn.shape == original.shape and not torch.equal(drawn, original)  # boxes were drawn
        boxes = r["detections"]["boxes"]
        assert len(boxes) == 80  # the top 80 of 8 queries x 10 classes, all scoring >= 0
        assert boxes[:, 2].max() <= 1.1 * original.shape[2]  # in the image's pixels (unclipped, untrained)
    assert "80 detections" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        predict_main([str(trained_run / "checkpoint_last.pth"), str(tmp_path / "missing.png")])
    # The same through the training command line's subcommand, given the run folder.
    again = cli.main(["predict", str(trained_run), str(images[0]), "--out", str(tmp_path / "sub")])
    assert again[0]["output"] == tmp_path / "sub" / images[0].name and again[0]["output"].is_file()


def test_an_explicit_stack_scores_each_stage_then_its_last_again(tiny_digits, tmp_path):
    # AdaMixer with 3 stages: steps 0..2 are its stages, 3 and 4 its last stage applied again.
    shared = SMALL[2 : SMALL.index("--deq-steps")]  # without the DEQ options
    argv = [*shared, "--config", "adamixer_tiny", "--model-arg", "num_stages=3", "--epochs", "1",
            "--data-root", str(tiny_digits.root), "--output-dir", str(tmp_path), "--refinement-curve", "4"]  # fmt: skip
    stats = cli.main(argv)
    saved = json.loads((tmp_path / "refinement_curve.json").read_text())
    assert [p["steps"] for p in saved["curve"]] == [0, 1, 2, 3, 4] and saved["train_depth"] == 2
    assert saved["curve"][2]["AP"] == pytest.approx(stats["AP"], abs=1e-9)  # the model's own output


def test_refinement_curve_refuses_a_model_without_refinement_layers():
    with pytest.raises(TypeError, match="stack of decoder"):
        refinement_curve(torch.nn.Linear(2, 2), [], None, max_steps=2, device=torch.device("cpu"))


def test_predict_rescales_boxes_to_the_image_given():
    class Fixed(torch.nn.Module):
        def forward(self, images, mask):  # one box covering the whole network input, padding left out
            h, w = int((~mask[0]).any(1).sum()), int((~mask[0]).any(0).sum())
            return [
                {
                    "boxes": torch.tensor([[0.0, 0.0, w, h]]),
                    "scores": torch.ones(1),
                    "labels": torch.zeros(1, dtype=torch.long),
                }
            ]

    detector = Detector(Fixed(), image_size=32, max_size=64, class_names=None, device=torch.device("cpu"))
    (det,) = detect(detector, [torch.zeros(3, 100, 150, dtype=torch.uint8)])
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 150.0, 100.0]]), atol=1.0, rtol=0)


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    return path


def test_a_folder_says_what_it_leaves_out(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.tif")
    _png(tmp_path / "sub" / "c.png")
    with pytest.warns(UserWarning, match=r"left out 2 entries .*: b.tif, sub/; name such a file or folder"):
        assert image_files([tmp_path]) == [tmp_path / "a.png"]
    assert image_files([tmp_path / "b.tif"]) == [tmp_path / "b.tif"]  # named, any format PIL reads


def test_two_images_drawn_to_one_file_are_refused_before_any_work(tmp_path):
    first, second = _png(tmp_path / "cam1" / "frame.png"), _png(tmp_path / "cam2" / "frame.jpg")
    message = f"{first} and {second} would both be drawn to {tmp_path / 'out' / 'frame.png'}"
    with pytest.raises(ValueError, match=message):  # before the checkpoint is read
        predict_files(tmp_path / "no_checkpoint.pth", [first, second], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_predict_runs_with_the_runs_test_steps(trained_run, tmp_path):
    """The run evaluated with --deq-steps 2: predict and load_detector run the same, not the preset's count."""
    from implicitkit_det.engine.predict import load_detector
    from implicitkit_det.models import build_model

    preset_steps = build_model("deqdet_tiny", 10).test_steps
    assert preset_steps != 2
    assert load_detector(trained_run).model.test_steps == 2
    assert load_detector(trained_run, test_steps=5).model.test_steps == 5
    # A checkpoint written before the model record kept them: the run's saved options give the same.
    state = torch.load(trained_run / "checkpoint_last.pth", weights_only=True)
    del state["config"]["test_settings"]
    torch.save(state, tmp_path / "older.pth")
    assert load_detector(tmp_path / "older.pth").model.test_steps == 2
    # Older runs could save anderson without a tolerance, which applied F test_steps times: so does this.
    state["config"]["test_settings"] = {"test_steps": 2, "test_tol": None, "test_solver": "anderson"}
    torch.save(state, tmp_path / "anderson.pth")
    assert load_detector(tmp_path / "anderson.pth").model.test_settings["test_solver"] == "fixed"


def test_drawing_over_an_input_image_is_refused_before_any_work(tmp_path):
    image = _png(tmp_path / "photos" / "holiday.png")
    before = image.read_bytes()
    with pytest.raises(
        ValueError, match=r"would overwrite the input image .*holiday.png; give --out a folder"
    ):
        predict_files(tmp_path / "no_checkpoint.pth", [tmp_path / "photos"], tmp_path / "photos")
    assert image.read_bytes() == before


def test_the_curve_of_an_amp_run_scores_what_its_evaluation_scores(tiny_digits, monkeypatch):
    """Under --amp the evaluation runs the backbone in bfloat16: the curve must too, or its points differ."""
    from implicitkit_det.data import CocoDetectionDataset, collate_detection, make_eval_transforms
    from implicitkit_det.engine.evaluate import evaluate
    from implicitkit_det.evaluation import CocoEvaluator
    from implicitkit_det.models import build_model

    torch.manual_seed(0)
    model = build_model("deqdet_tiny", 10, num_queries=6, test_steps=2).eval()
    with torch.no_grad():  # weights away from their initial values (zero box regressor), as trained ones are
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    data = CocoDetectionDataset(
        tiny_digits.images("val"),
        tiny_digits.annotations("val"),
        transforms=make_eval_transforms(size=64, max_size=96),
    )
    loader = [collate_detection([data[0], data[1]])]
    seen = []
    monkeypatch.setattr(
        CocoEvaluator, "update", lambda self, results, image_ids=None: seen.append(list(results))
    )
    cpu, ids = torch.device("cpu"), data.label_to_category_id
    evaluate(
        model, loader, CocoEvaluator(data.coco), device=cpu, label_to_category_id=ids, amp=True, verbose=False
    )
    for amp in (True, False):
        refinement_curve(model, loader, data.coco, max_steps=2, device=cpu, label_to_category_id=ids, amp=amp)
    evaluated, amp_curve, float32_curve = seen[0], seen[3], seen[6]

    def boxes_and_scores(results):
        return torch.tensor([[*r["bbox"], r["score"]] for r in results])

    torch.testing.assert_close(boxes_and_scores(amp_curve), boxes_and_scores(evaluated), rtol=0, atol=1e-4)
    assert not torch.allclose(boxes_and_scores(float32_curve), boxes_and_scores(evaluated), rtol=0, atol=1e-4)


def test_an_unusable_image_is_refused_before_any_is_drawn(tmp_path):
    good = _png(tmp_path / "in" / "a.png")
    Image.fromarray(np.full((8, 8), 3000, dtype=np.uint16)).save(tmp_path / "in" / "b.png")
    (tmp_path / "in" / "c.png").write_bytes(b"not an image")
    with pytest.raises(
        ValueError, match=r"2 of the 3 images cannot be used:\n.*b.png is in PIL mode I;16.*\n.*c.png"
    ):
        predict_files(
            tmp_path / "no_checkpoint.pth", [tmp_path / "in"], tmp_path / "out"
        )  # before the checkpoint
    assert not (tmp_path / "out").exists() and good.exists()


def test_a_file_that_is_no_checkpoint_names_what_to_pass(tmp_path):
    from implicitkit_det.engine.checkpoint import read_checkpoint

    (tmp_path / "instances.json").write_text("{}")
    with pytest.raises(
        ValueError, match=r"^cannot read checkpoint .*instances.json \([^\n]*\): pass a run folder"
    ):
        read_checkpoint(tmp_path / "instances.json")


def test_deq_steps_for_a_detector_without_them_is_named(tiny_digits, tmp_path):
    from implicitkit_det.engine.predict import load_detector

    argv = [
        *SMALL[2 : SMALL.index("--deq-steps")],
        "--config",
        "adamixer_tiny",
        "--model-arg",
        "num_queries=8",
    ]
    cli.main(
        [*argv, "--data-root", str(tiny_digits.root), "--epochs", "1", "--output-dir", str(tmp_path / "run")]
    )
    with pytest.raises(ValueError, match=r"--deq-steps\) 3: adamixer_tiny is not a DEQ detector"):
        load_detector(tmp_path / "run", test_steps=3)


def test_detect_gives_what_the_evaluation_scores(trained_run, tiny_digits):
    """detect ran each image unpadded while the evaluation pads to 32: scores differed by up to 6e-4."""
    from implicitkit_det.data import CocoDetectionDataset, collate_detection, make_eval_transforms
    from implicitkit_det.engine.evaluate import forward_eval, rescale_to_original
    from implicitkit_det.engine.predict import load_detector

    detector = load_detector(trained_run)
    transforms = make_eval_transforms(size=detector.image_size, max_size=detector.max_size)
    val = CocoDetectionDataset(tiny_digits.images("val"), tiny_digits.annotations("val"), transforms)
    for index in range(3):
        batch = collate_detection([val[index]], size_divisor=32)
        (want,) = rescale_to_original(forward_eval(detector.model, batch), batch.targets)
        file = tiny_digits.images("val") / val.image_entry(val.ids[index])["file_name"]
        (got,) = detect(detector, [read_rgb(file)])
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)
