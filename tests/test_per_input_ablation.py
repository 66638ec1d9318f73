"""routertune.eval.per_input_ablation (benchmarks/per_input_ablation.py drives it): the transforms of the
routers' per-input part, the wrapped routers, and the threshold bracket. References: the transforms' definitions computed by hand, the plain router module,
and a constructed step function for the search. The measuring run itself takes the default model and minutes."""

from __future__ import annotations

import pytest
import torch

from routertune import RoutedModel, RouterConfig
from routertune.eval import per_input_ablation as ablation
from tiny_lm import tiny_llama

STATS = {"sd": 2.0, "low": -1.0, "high": 3.0}


def test_transforms_change_only_the_part_as_defined():
    part = torch.tensor([-5.0, -1.5, -0.5, 0.0, 0.5, 2.5, 3.5])
    assert torch.equal(ablation.transform_part(part, STATS, "none"), part)
    assert torch.allclose(ablation.transform_part(part, STATS, "scale:0.5"), part * 0.5)
    # clip:0.5 of sd 2: the part stays within +-1
    assert ablation.transform_part(part, STATS, "clip:0.5").tolist() == [-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0]
    # fallback: outside the training range [-1, 3] the part is dropped (the prior alone), inside it is kept
    assert ablation.transform_part(part, STATS, "fallback").tolist() == [0.0, 0.0, -0.5, 0.0, 0.5, 2.5, 0.0]
    with pytest.raises(ValueError, match="unknown transform"):
        ablation.transform_part(part, STATS, "clamp:1")


def test_wrapped_routers_score_prior_plus_transformed_part_and_are_restored():
    routed = RoutedModel(tiny_llama(), RouterConfig(layers=[1, 2, 3]))
    torch.manual_seed(0)
    with torch.no_grad():
        for router in routed.routers.values():
            router.weight.normal_()
            router.bias.normal_()
    pooled = torch.randn(5, 32)
    stats = {}
    for idx, router in routed.routers.items():
        mean = torch.randn(32)
        prior = float(router.weight.detach().view(-1) @ mean + router.bias.detach())
        stats[idx] = {"mean": mean, "prior": prior, "sd": 1.0, "low": -0.5, "high": 0.5}
    plain = {idx: router(pooled).detach() for idx, router in routed.routers.items()}
    with ablation.transformed(routed, stats, "none"):
        for idx, router in routed.routers.items():
            assert torch.allclose(router(pooled), plain[idx])
    with ablation.transformed(routed, stats, "scale:0"):
        for idx, router in routed.routers.items():
            assert torch.allclose(router(pooled), torch.full((5,), stats[idx]["prior"]).sigmoid())
    with ablation.transformed(routed, stats, "clip:0.25"):
        for idx, router in routed.routers.items():
            logit = torch.logit(plain[idx].double()).float()
            expected = (stats[idx]["prior"] + (logit - stats[idx]["prior"]).clamp(-0.25, 0.25)).sigmoid()
            assert torch.allclose(router(pooled), expected, atol=1e-5)
    for idx, router in routed.routers.items():
        assert torch.equal(router(pooled), plain[idx])
        assert "forward" not in vars(router)  # Router.forward itself again, not a leftover wrapper


def test_bracket_holds_the_target_within_the_width():
    def skip_of(t):  # a monotone staircase, as measured skips are
        return min(1.0, max(0.0, round((t - 0.3) * 2.5, 2)))

    thresholds = ablation.bracketing_thresholds(skip_of, [0.2, 0.3], width=0.015, max_new=40)
    for target in (0.2, 0.3):
        low = max((t for t in thresholds if skip_of(t) <= target), key=skip_of)
        high = min((t for t in thresholds if skip_of(t) > target), key=skip_of)
        assert skip_of(high) - skip_of(low) <= 0.015
    with pytest.raises(ValueError, match="does not hold"):
        ablation.bracketing_thresholds(skip_of, [0.3], width=0.015, max_new=5, low=0.5)
