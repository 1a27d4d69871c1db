"""FRLoRA as mathematics: residual initialisation, the reset, and updates that accumulate past rank r."""

import torch

from fedalign.algorithms import ClientState, build, registry, weighted_sum
from fedalign.algorithms.base import low_rank_delta

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
A, B = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"
D, K, R, SCALE = 24, 16, 2, 2.0


def _setup(freeze_a: bool = False):
    algorithm = build(registry()["frlora"].config_class(freeze_a=freeze_a))
    w0 = torch.randn(D, K, generator=torch.Generator().manual_seed(0))
    initial = {A: torch.randn(R, K), B: torch.zeros(D, R)}
    adapter, change = algorithm.init_from_base({MODULE: w0}, initial, {MODULE: SCALE})
    return algorithm, w0, algorithm.init_global(adapter), w0 + change[MODULE]


def test_residual_initialisation_leaves_the_function_unchanged() -> None:
    _, w0, glob, residual = _setup()
    assert torch.allclose(residual + SCALE * glob[B] @ glob[A], w0, atol=1e-5)
    # (B0, A0) is the top-r part of W0: the residual has W0's remaining singular values only.
    top = torch.linalg.svdvals(w0)
    assert torch.allclose(torch.linalg.svdvals(residual)[: K - R], top[R:], atol=1e-4)


def _round(algorithm, glob, weight, generator, freeze_a: bool):
    trained = []
    for _ in range(3):
        t = {**glob, B: glob[B] + 0.1 * torch.randn(D, R, generator=generator)}
        if not freeze_a:
            t[A] = glob[A] + 0.1 * torch.randn(R, K, generator=generator)
        trained.append(t)
    uploads = [algorithm.client_upload(0, 0, t, {}, ClientState()) for t in trained]
    summed = weighted_sum(uploads, [1 / 3] * 3)
    new = algorithm.server_step(0, 0, summed, glob)
    update = algorithm.take_base_update()
    assert update[MODULE + "::up"].shape == (D, 2 * R)  # the change travels as rank-2r factors
    weight = weight + low_rank_delta(update)[MODULE]
    return new, weight, summed


def test_the_reset_keeps_the_averaged_model_and_updates_accumulate_past_rank_r() -> None:
    algorithm, w0, glob, weight = _setup()
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        before = {k: v.clone() for k, v in glob.items()}
        glob, weight_after, summed = _round(algorithm, glob, weight, generator, freeze_a=False)
        averaged = {**before, **summed}
        # After the round: base + c·B₀A₀ equals the previous base + c·B̄Ā (the averaged adapter's model).
        assert torch.allclose(
            weight_after + SCALE * glob[B] @ glob[A], weight + SCALE * averaged[B] @ averaged[A], atol=1e-5
        )
        assert torch.equal(glob[B], before[B]) and torch.equal(glob[A], before[A])  # reset to (B₀, A₀)
        weight = weight_after
    total = weight + SCALE * glob[B] @ glob[A] - w0
    assert torch.linalg.matrix_rank(total, atol=1e-4) > R


def test_with_a_frozen_the_update_stays_within_rank_r() -> None:
    algorithm, w0, glob, weight = _setup(freeze_a=True)
    assert algorithm.trainable(0) == frozenset({"B"})
    generator = torch.Generator().manual_seed(2)
    for _ in range(4):
        glob, weight, _ = _round(algorithm, glob, weight, generator, freeze_a=True)
    total = weight + SCALE * glob[B] @ glob[A] - w0
    assert torch.linalg.matrix_rank(total, atol=1e-4) <= R
