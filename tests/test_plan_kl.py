"""PlanKL: the KL of a plan measured through its cache equals fake quantization done directly,
and a PlanKL sharing another's cache measures the same as one with its own."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitsearch.io.loading import load_model
from bitsearch.io.plan import BitPlan
from bitsearch.models import find_targets, model_fingerprint
from bitsearch.quantize import fake_quantize_model
from bitsearch.search.kl import PlanKL

MENU = [2, 3, 4, 8]


def _widths(model, seed):
    rng = np.random.default_rng(seed)
    return {t.name: rng.choice(MENU, size=t.out_features) for t in find_targets(model)}


def test_plan_kl_matches_fake_quantization_and_sharing(llama_dir):
    model = load_model(llama_dir)
    targets = find_targets(model)
    g = torch.Generator().manual_seed(0)
    search = torch.randint(0, model.config.vocab_size, (4, 32), generator=g)
    held = torch.randint(0, model.config.vocab_size, (3, 32), generator=g)
    kl = PlanKL(model, targets, search, MENU, 32, micro_batch=2)
    shared = PlanKL(model, targets, held, MENU, 32, micro_batch=2, share=kl)
    assert shared.stack is kl.stack
    own = PlanKL(model, targets, held, MENU, 32, micro_batch=2)
    w = _widths(model, 1)
    assert shared(w) == pytest.approx(own(w), rel=1e-6)
    # against fake-quantizing a copy of the model under the same widths
    plan = BitPlan(
        model=model_fingerprint(model, targets),
        group_size=32,
        menu=MENU,
        bits={n: b.astype(np.uint8) for n, b in w.items()},
    )
    quant = fake_quantize_model(load_model(llama_dir), plan)
    with torch.no_grad():
        p = F.log_softmax(model(input_ids=held).logits[:, :-1].float(), -1)
        q = F.log_softmax(quant(input_ids=held).logits[:, :-1].float(), -1)
    assert shared(w) == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)
    with pytest.raises(ValueError):
        PlanKL(model, targets, held, [2, 3], 32, share=kl)
