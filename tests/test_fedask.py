"""FedASK (double-sketched LoRA aggregation), driven exactly as the runtime drives a two-stage algorithm."""

import gc
import time

import torch

from fedalign.algorithms import ClientState, build, payload_bytes, registry, weighted_sum
from fedalign.algorithms.fedask import FedASK, FedASKConfig, omega


def _keys(i: int) -> tuple[str, str, str]:
    module = f"base_model.model.model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj"
    return module, f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def _round(algorithm, glob: dict, trained: list[dict], weights: list[float]) -> tuple[dict, dict]:
    """broadcast → uploads(0) → Σ → server(0) → uploads(1, reply) → Σ → server(1); returns (new, bytes)."""
    sent = algorithm.broadcast(0, glob)
    reply: dict = {}
    sizes = {"broadcast": payload_bytes(sent)}
    for stage in range(algorithm.num_stages):
        uploads = [algorithm.client_upload(stage, 0, t, reply, ClientState()) for t in trained]
        sizes[f"up{stage}"] = payload_bytes(uploads[0])
        result = algorithm.server_step(stage, 0, weighted_sum(uploads, weights), glob)
        del uploads
        if stage < algorithm.num_stages - 1:
            reply = result
            sizes[f"reply{stage}"] = payload_bytes(reply)
        else:
            glob = result
    return glob, sizes


def _weights(m: int, gen: torch.Generator) -> list[float]:
    sizes = torch.randint(10, 1000, (m,), generator=gen).double()
    return (sizes / sizes.sum()).tolist()


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _low_rank_rel(b: torch.Tensor, a: torch.Tensor, b_ref: torch.Tensor, a_ref: torch.Tensor) -> float:
    """‖BA − B₀A₀‖_F / ‖B₀A₀‖_F without forming a d×k matrix: for M = LR with L = [B, −B₀] and R = [A; A₀],
    ‖M‖²_F = tr((LᵀL)(RRᵀ)), a 2r×2r product (float64: its rounding, ~1e-16·‖L‖²‖R‖², is far below the
    1e-10·‖B₀A₀‖² the 1e-5 bound squares to)."""
    left = torch.cat([b.double(), -b_ref.double()], dim=1)
    right = torch.cat([a.double(), a_ref.double()], dim=0)
    err2 = torch.trace((left.T @ left) @ (right @ right.T))
    ref2 = torch.trace((b_ref.double().T @ b_ref.double()) @ (a_ref.double() @ a_ref.double().T))
    return float(err2.clamp(min=0).sqrt() / ref2.sqrt())


def _problem(n_modules: int, d: int, k: int, r: int, m: int, seed: int, shared_a: bool):
    gen = torch.Generator().manual_seed(seed)
    glob, trained = {}, [{} for _ in range(m)]
    for i in range(n_modules):
        _, a_key, b_key = _keys(i)
        glob[a_key] = torch.randn(r, k, generator=gen) / k**0.5
        glob[b_key] = torch.zeros(d, r)
        for t in trained:
            t[a_key] = glob[a_key].clone() if shared_a else torch.randn(r, k, generator=gen) / k**0.5
            t[b_key] = torch.randn(d, r, generator=gen) * 0.01
    return glob, trained, _weights(m, gen)


def _dense_target(trained: list[dict], weights: list[float], a_key: str, b_key: str) -> torch.Tensor:
    return sum(w * t[b_key].double() @ t[a_key].double() for t, w in zip(trained, weights, strict=True))


def test_registered_and_protocol_shape() -> None:
    algorithm = build(FedASKConfig())
    assert isinstance(algorithm, FedASK) and registry()["fedask"] is FedASK
    assert algorithm.num_stages == 2 and FedASK.client_level_dp is False
    assert algorithm.trainable(0) == frozenset({"B"})
    assert build(FedASKConfig(train_a=True)).trainable(0) == frozenset({"A", "B"})


def test_exact_with_shared_frozen_a_small() -> None:
    for p in (0, 2):
        glob, trained, weights = _problem(6, 64, 64, 4, 10, seed=p, shared_a=True)
        new, _ = _round(build(FedASKConfig(oversampling=p)), glob, trained, weights)
        for i in range(6):
            _, a_key, b_key = _keys(i)
            err = _rel(new[b_key] @ new[a_key], _dense_target(trained, weights, a_key, b_key))
            print(f"p={p} module {i}: rel err {err:.2e}")
            assert err < 1e-5


def test_exact_with_shared_frozen_a_llama7b_shapes() -> None:
    """d = k = 4096, r = 16, 64 modules (q_proj + v_proj of 32 layers), 10 clients; one module at a time.

    The maths is exact for any p ≥ 0, but in float32 the range sketch's rounding (~6e-8) is amplified by
    cond(AΩ): with p = 0, AΩ is a square r×r Gaussian-like matrix whose condition number has a heavy tail
    (measured error ≈ 4e-8·cond(AΩ), worst ~2e-5 over 64 modules); p = 2 conditions it and keeps every module
    below 1e-5. So p = 2 is held to 1e-5 and p = 0 to 1e-4. The error is computed from the factors (no
    d×k matrix), checked against the dense difference on the first module.
    """
    d = k = 4096
    r, m, n_modules = 16, 10, 64
    algorithms = {p: build(FedASKConfig(oversampling=p)) for p in (0, 2)}
    gen = torch.Generator().manual_seed(7)
    weights = _weights(m, gen)
    started, worst = time.perf_counter(), {0: 0.0, 2: 0.0}
    for i in range(n_modules):
        _, a_key, b_key = _keys(i)
        a = torch.randn(r, k, generator=gen) / k**0.5
        glob = {a_key: a, b_key: torch.zeros(d, r)}
        trained = [{a_key: a, b_key: torch.randn(d, r, generator=gen) * 0.01} for _ in range(m)]
        b_bar = sum(w * t[b_key].double() for t, w in zip(trained, weights, strict=True))  # Σ wᵢBᵢA = B̄A
        for p, algorithm in algorithms.items():
            new, _ = _round(algorithm, glob, trained, weights)
            err = _low_rank_rel(new[b_key], new[a_key], b_bar, a)
            if i == 0:
                dense = _rel(new[b_key] @ new[a_key], b_bar @ a.double())
                assert abs(err - dense) < 1e-3 * dense, (err, dense)
            worst[p] = max(worst[p], err)
            del new
        del glob, trained, b_bar
        gc.collect()
    elapsed = time.perf_counter() - started
    print(f"7B shapes, {n_modules} modules: worst err p=0 {worst[0]:.2e}, p=2 {worst[2]:.2e}, {elapsed:.1f}s")
    assert worst[2] < 1e-5
    assert worst[0] < 1e-4


def test_trainable_a_fedavg_inexact_fedask_best_rank_r() -> None:
    """Clients also train A: FedAvg-LoRA is inexact; FedASK with s ≥ m·r gives the best rank-r
    approximation of Σ wᵢBᵢAᵢ (lossy, §1.5: the output is truncated to rank r), never worse than FedAvg."""
    d = k = 64
    r, m = 4, 10
    glob, trained, weights = _problem(3, d, k, r, m, seed=11, shared_a=False)
    fedavg_new, _ = _round(build(registry()["fedavg"].config_class()), glob, trained, weights)
    fedask_new, _ = _round(build(FedASKConfig(train_a=True, oversampling=m * r - r)), glob, trained, weights)
    for i in range(3):
        _, a_key, b_key = _keys(i)
        target = _dense_target(trained, weights, a_key, b_key)
        u, sv, vh = torch.linalg.svd(target)
        best = (u[:, :r] * sv[:r]) @ vh[:r]
        avg_err = _rel(fedavg_new[b_key] @ fedavg_new[a_key], target)
        ask_err = _rel(fedask_new[b_key] @ fedask_new[a_key], target)
        best_err = _rel(best, target)
        print(f"module {i}: fedavg {avg_err:.3e}, fedask {ask_err:.3e}, best rank-{r} {best_err:.3e}")
        assert avg_err > 1e-3
        assert abs(ask_err - best_err) < 1e-4
        assert _rel(fedask_new[b_key] @ fedask_new[a_key], best) < 1e-4
        assert ask_err <= avg_err + 1e-6


def test_splits_same_product_and_scale_preserving_keeps_norm_of_a() -> None:
    glob, trained, weights = _problem(4, 96, 64, 8, 5, seed=3, shared_a=True)
    for i in range(4):  # a non-unit, module-dependent scale of A, as after real rounds
        _, a_key, _ = _keys(i)
        glob[a_key] = glob[a_key] * (2.0 + i)
        for t in trained:
            t[a_key] = glob[a_key].clone()
    balanced, _ = _round(build(FedASKConfig(split="balanced", oversampling=2)), glob, trained, weights)
    preserving, _ = _round(build(FedASKConfig(oversampling=2)), glob, trained, weights)
    for i in range(4):
        _, a_key, b_key = _keys(i)
        product = balanced[b_key] @ balanced[a_key]
        assert _rel(preserving[b_key] @ preserving[a_key], product) < 1e-5
        before, after = float(glob[a_key].norm()), float(preserving[a_key].norm())
        print(
            f"module {i}: ‖A‖ before {before:.4f}, balanced {float(balanced[a_key].norm()):.4f}, "
            f"scale_preserving {after:.4f}"
        )
        assert abs(after - before) / before < 1e-5


def test_zero_aggregate_keeps_a_and_zero_b() -> None:
    glob, _, _ = _problem(2, 32, 32, 4, 1, seed=5, shared_a=True)
    new, _ = _round(build(FedASKConfig()), glob, [dict(glob), dict(glob)], [0.5, 0.5])
    for i in range(2):
        _, a_key, b_key = _keys(i)
        assert torch.equal(new[a_key], glob[a_key]) and not new[b_key].any()


def test_message_bytes_match_algorithms_md_section_5() -> None:
    d, k, r, p, n_modules = 96, 64, 8, 3, 4
    s = r + p
    glob, trained, weights = _problem(n_modules, d, k, r, 3, seed=1, shared_a=True)
    algorithm = build(FedASKConfig(oversampling=p))
    _, sizes = _round(algorithm, glob, trained, weights)
    assert sizes == {
        "broadcast": 4 * n_modules * r * (d + k),
        "up0": 4 * n_modules * d * s,
        "reply0": 4 * n_modules * d * s,
        "up1": 4 * n_modules * k * s,
    }
    upload = algorithm.client_upload(0, 0, trained[0], {}, ClientState())
    module, _, _ = _keys(0)
    assert upload[f"{module}.sketch_Y"].shape == (d, s)


def test_omega_deterministic_and_per_module() -> None:
    m0, m1 = _keys(0)[0], _keys(1)[0]
    assert torch.equal(omega(0, m0, 64, 6), omega(0, m0, 64, 6))
    assert not torch.equal(omega(0, m0, 64, 6), omega(0, m1, 64, 6))
    assert not torch.equal(omega(0, m0, 64, 6), omega(1, m0, 64, 6))
    one, two = build(FedASKConfig(seed=4, oversampling=0)), build(FedASKConfig(seed=4, oversampling=0))
    cached = one.omega(m0, 64, 4, torch.device("cpu"))
    assert cached is one.omega(m0, 64, 4, torch.device("cpu"))
    assert torch.equal(cached, two.omega(m0, 64, 4, torch.device("cpu")))
    assert cached.shape == (64, 4)
    assert abs(float(omega(0, m0, 4096, 16).std()) - 1.0) < 0.02
