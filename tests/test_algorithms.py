"""FedAvg-LoRA and FFA-LoRA on the linear protocol, against hand-computed tensors."""

import torch

from fedalign.algorithms import ClientState, build, payload_bytes, registry, weighted_sum

A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _run_round(name: str, glob: dict, trained: list[dict], weights: list[float]) -> tuple[dict, list[dict]]:
    """One round of a one-stage algorithm, driven exactly as the runtime drives it."""
    algorithm = build(registry()[name].config_class(name=name))
    uploads = [algorithm.client_upload(0, 0, t, {}, ClientState()) for t in trained]
    return algorithm.server_step(0, 0, weighted_sum(uploads, weights), glob), uploads


def test_registry_has_the_foundation_algorithms() -> None:
    assert {"fedavg", "ffa"} <= set(registry())


def test_fedavg_averages_each_factor_with_example_weights() -> None:
    glob = {A: torch.zeros(1, 2), B: torch.zeros(2, 1)}
    trained = [
        {A: torch.tensor([[1.0, 2.0]]), B: torch.tensor([[4.0], [0.0]])},
        {A: torch.tensor([[3.0, 4.0]]), B: torch.tensor([[0.0], [8.0]])},
    ]
    new, uploads = _run_round("fedavg", glob, trained, [0.25, 0.75])
    assert torch.equal(new[A], torch.tensor([[2.5, 3.5]]))
    assert torch.equal(new[B], torch.tensor([[1.0], [6.0]]))
    assert all(set(u) == {A, B} for u in uploads)
    # The product of averages is not the average of products: FedAvg-LoRA is inexact.
    dense = 0.25 * trained[0][B] @ trained[0][A] + 0.75 * trained[1][B] @ trained[1][A]
    assert not torch.allclose(new[B] @ new[A], dense)


def test_ffa_trains_and_moves_only_b_and_is_exact() -> None:
    algorithm = registry()["ffa"](registry()["ffa"].config_class())
    assert algorithm.trainable(0) == frozenset({"B", "full"})  # a fully trained module trains too
    frozen_a = torch.tensor([[1.0, -1.0]])
    glob = {A: frozen_a, B: torch.zeros(2, 1)}
    assert set(algorithm.broadcast(0, glob)) == {B}
    trained = [
        {A: frozen_a, B: torch.tensor([[2.0], [0.0]])},
        {A: frozen_a, B: torch.tensor([[0.0], [6.0]])},
    ]
    new, uploads = _run_round("ffa", glob, trained, [0.5, 0.5])
    assert all(set(u) == {B} for u in uploads)
    assert torch.equal(new[A], frozen_a)
    assert torch.equal(new[B], torch.tensor([[1.0], [3.0]]))
    dense = 0.5 * trained[0][B] @ frozen_a + 0.5 * trained[1][B] @ frozen_a
    assert torch.equal(new[B] @ new[A], dense)


def test_payload_bytes_counts_tensor_data() -> None:
    assert (
        payload_bytes({A: torch.zeros(4, 16), B: torch.zeros(16, 4, dtype=torch.bfloat16)}) == 4 * 64 + 2 * 64
    )


def _drive(name: str, glob: dict, trained: list[dict], weights: list[float], round_idx: int, **config):
    """One round of a one-stage algorithm, as the runtime drives it: uploads, weighted sum, server step."""
    algorithm = build(registry()[name].config_class(name=name, **config))
    algorithm.init_global(glob)
    uploads = [algorithm.client_upload(0, round_idx, t, {}, ClientState()) for t in trained]
    return algorithm, algorithm.server_step(0, round_idx, weighted_sum(uploads, weights), glob), uploads


def test_rolora_alternates_by_round_index_and_aggregates_exactly() -> None:
    algorithm = build(registry()["rolora"].config_class())
    assert [algorithm.trainable(t) - {"full"} for t in range(4)] == [frozenset({"B"}), frozenset({"A"})] * 2
    assert build(registry()["rolora"].config_class(first="A")).trainable(0) == frozenset({"A", "full"})
    g = torch.Generator().manual_seed(0)
    shared_a, shared_b = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g)
    glob = {A: shared_a, B: shared_b}
    weights = [0.2, 0.5, 0.3]
    # Round 0 trains B against the shared A; round 1 trains A against the shared B.
    for round_idx, factor in ((0, B), (1, A)):
        trained = [
            {**glob, factor: glob[factor] + torch.randn(glob[factor].shape, generator=g)} for _ in weights
        ]
        _, new, uploads = _drive("rolora", glob, trained, weights, round_idx)
        assert all(set(u) == {factor} for u in uploads)
        dense = sum(w * t[B] @ t[A] for w, t in zip(weights, trained, strict=True))
        assert torch.allclose(new[B] @ new[A], dense, atol=1e-6)


def test_fedsa_keeps_b_on_the_client_and_gives_it_back() -> None:
    algorithm = build(registry()["fedsa"].config_class())
    glob = algorithm.init_global({A: torch.ones(1, 2), B: torch.zeros(2, 1)})
    received = algorithm.broadcast(0, glob)
    assert set(received) == {A}
    state = ClientState()
    start = algorithm.local_start(0, received, state)
    assert torch.equal(start[B], torch.zeros(2, 1))  # first visit: the shared initial B
    trained = {A: torch.full((1, 2), 3.0), B: torch.tensor([[5.0], [7.0]])}
    assert set(algorithm.client_upload(0, 0, trained, {}, state)) == {A}
    state = algorithm.local_end(0, trained, state)
    again = algorithm.local_start(1, {A: torch.full((1, 2), 2.0)}, state)
    assert torch.equal(again[B], trained[B]) and torch.equal(again[A], torch.full((1, 2), 2.0))
    _, new, _ = _drive("fedsa", glob, [trained, {**trained, A: torch.ones(1, 2)}], [0.5, 0.5], 0)
    assert torch.equal(new[A], torch.full((1, 2), 2.0)) and torch.equal(new[B], glob[B])


def test_fedprox_pulls_towards_the_global_adapter() -> None:
    received = {A: torch.ones(1, 2), B: torch.zeros(2, 1)}
    term = build(registry()["fedprox"].config_class(mu=0.5)).gradient_term(0, received, ClientState())
    assert term is not None
    assert torch.equal(term(A, torch.full((1, 2), 3.0)), torch.full((1, 2), 1.0))  # 0.5 * (3 - 1)
    assert build(registry()["fedprox"].config_class(mu=0.0)).gradient_term(0, received, ClientState()) is None


def test_scaffold_variates_follow_option_two() -> None:
    from fedalign.algorithms import RunContext

    context = RunContext(num_clients=4, clients_per_round=2, local_steps=2, learning_rate=0.5)
    algorithm = build(registry()["scaffold"].config_class(), context)
    glob = algorithm.init_global({A: torch.zeros(1, 2), B: torch.zeros(2, 1)})
    trained = [
        {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[0.0], [2.0]])},
        {A: torch.tensor([[3.0, 0.0]]), B: torch.tensor([[2.0], [0.0]])},
    ]
    states, uploads = [ClientState(), ClientState()], []
    for state, t in zip(states, trained, strict=True):
        received = algorithm.broadcast(0, glob)
        assert torch.equal(received[A + "::scaffold_c"], torch.zeros(1, 2))
        start = algorithm.local_start(0, received, state)
        assert set(start) == {A, B}
        term = algorithm.gradient_term(0, received, state)
        assert torch.equal(term(A, torch.ones(1, 2)), torch.zeros(1, 2))  # zero variates: plain FedAvg
        uploads.append(algorithm.client_upload(0, 0, t, {}, state))
        algorithm.local_end(0, t, state)
    # c_i+ = c_i - c + (x - y_i) / (K * lr) = -y_i with K * lr = 1.
    assert torch.equal(states[0].tensors[A + "::scaffold_c"], torch.tensor([[-1.0, 0.0]]))
    assert set(states[0].tensors) == {A + "::scaffold_c", B + "::scaffold_c"}
    new = algorithm.server_step(0, 0, weighted_sum(uploads, [0.5, 0.5]), glob)
    assert set(new) == {A, B} and torch.equal(new[A], torch.tensor([[2.0, 0.0]]))
    # c += (m / N) * sum_i w_i dc_i = 0.5 * mean(-y_i)
    assert torch.equal(algorithm.control[A], torch.tensor([[-1.0, 0.0]]))
    next_term = algorithm.gradient_term(1, algorithm.broadcast(1, new), states[0])
    assert torch.equal(next_term(A, torch.zeros(1, 2)), torch.tensor([[0.0, 0.0]]))  # c - c_0 = -1 - (-1)
