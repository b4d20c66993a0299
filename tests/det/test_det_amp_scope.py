"""Mixed precision scoped to the backbone and the neck: the decoder runs in float32 unless asked."""

from __future__ import annotations

import pytest
import torch
from det_engine_toy import random_batch

from implicitkit_det.models import build_model

CLASSES = 10


def dtypes_seen(low_precision_decoder: bool, training: bool) -> dict[str, torch.dtype]:
    torch.manual_seed(0)
    model = build_model("deqdet_tiny", CLASSES, num_queries=6, train_steps=2, supervise_steps=(1, 2))
    model.low_precision_decoder = low_precision_decoder
    model.train(training)
    seen: dict[str, torch.dtype] = {}

    def record(name, pick):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            seen.setdefault(name, pick(output).dtype)

        return hook

    model.neck.register_forward_hook(record("neck", lambda out: out[0]))
    model.refine_layer.cls_head.register_forward_hook(record("logits", lambda out: out))
    data = random_batch(torch.Generator().manual_seed(0), batch=2, size=64, classes=CLASSES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if training:
            out = model(data.images, data.targets, mask=data.mask)
            seen["loss"] = out["loss"].dtype
            out["loss"].backward()
            assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
        else:
            model.predict(data.images, mask=data.mask)
    return seen


@pytest.mark.parametrize("training", [True, False], ids=["train", "predict"])
def test_autocast_reaches_the_decoder_only_when_asked(training):
    scoped = dtypes_seen(False, training)
    assert scoped["neck"] == torch.bfloat16 and scoped["logits"] == torch.float32
    whole = dtypes_seen(True, training)
    assert whole["neck"] == torch.bfloat16 and whole["logits"] == torch.bfloat16
    if training:
        assert scoped["loss"] == torch.float32
