"""The secret randomness behind DP noise and sampling: its draws, its keys and where the keys are kept."""

import stat

import pytest
import torch

from fedalign.privacy.randomness import RunSecrets, SecretRandomness


def test_gaussian_draws_have_the_asked_scale_and_are_replayable_only_with_the_key() -> None:
    key = SecretRandomness.fresh()
    draw = key.child("noise", 3).gaussian(200_001, std=0.7)
    assert draw.shape == (200_001,) and draw.dtype == torch.float32
    assert float(draw.std()) == pytest.approx(0.7, rel=0.01) and abs(float(draw.mean())) < 0.01
    tail = float((draw.abs() > 2 * 0.7).float().mean())
    assert tail == pytest.approx(0.0455, abs=0.003)  # Gaussian tails, not a uniform's
    assert torch.equal(draw, key.child("noise", 3).gaussian(200_001, std=0.7))
    assert not torch.equal(draw, key.child("noise", 4).gaussian(200_001, std=0.7))
    assert not torch.equal(draw, SecretRandomness.fresh().child("noise", 3).gaussian(200_001, std=0.7))


def test_poisson_and_fixed_size_draws() -> None:
    key = SecretRandomness.fresh()
    kept = [len(key.child(i).bernoulli(1000, 0.03)) for i in range(300)]
    assert sum(kept) / len(kept) == pytest.approx(30, rel=0.05)
    cohorts = [key.child("c", i).sample_without_replacement(10, 3) for i in range(500)]
    assert all(len(set(c)) == 3 and c == sorted(c) and max(c) < 10 for c in cohorts)
    counts = torch.bincount(torch.tensor([c for cohort in cohorts for c in cohort]), minlength=10)
    assert int(counts.min()) > 100  # every client is drawn (expected 150 each)


def test_fresh_keys_come_from_os_entropy_and_seeded_keys_from_the_seed() -> None:
    assert SecretRandomness.fresh().hex() != SecretRandomness.fresh().hex()
    assert len(bytes.fromhex(SecretRandomness.fresh().hex())) == 32  # 256 bits
    assert SecretRandomness.from_seed(5, "server").hex() == SecretRandomness.from_seed(5, "server").hex()
    assert SecretRandomness.from_seed(5, "server").hex() != SecretRandomness.from_seed(6, "server").hex()
    assert "hidden" in repr(SecretRandomness.fresh())


def test_torch_cpu_generators_are_seeded_by_32_bits_which_is_why_none_is_used_for_noise() -> None:
    """Why the noise is not a seeded torch.Generator: 2^32 seeds can be tried (checked on torch 2.13)."""
    low = torch.randn(8, generator=torch.Generator().manual_seed(12345))
    high = torch.randn(8, generator=torch.Generator().manual_seed(12345 + 2**32))
    assert torch.equal(low, high)


def test_run_secrets_are_written_owner_only_and_read_back(tmp_path) -> None:
    secrets = RunSecrets.create("secret", num_clients=4, seed=0)
    assert len({c.hex() for c in secrets.clients} | {secrets.server.hex()}) == 5  # one key per client
    path = secrets.save(tmp_path / "private")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = RunSecrets.load(tmp_path / "private")
    assert again.mode == "secret" and again.server.hex() == secrets.server.hex()
    assert [c.hex() for c in again.clients] == [c.hex() for c in secrets.clients]
    seeded = RunSecrets.create("seeded", num_clients=4, seed=0)
    assert seeded.client(2).hex() == RunSecrets.create("seeded", num_clients=4, seed=0).client(2).hex()
