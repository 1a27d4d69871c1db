"""DP runs always finish: the paper recipe's sampling and budget schedule, replayed without training.

``recipes/fedask-dolly-dp.yaml`` (10 clients, 2 per round, 800 rounds, 10 local steps, ε = 3) is replayed
with the runtime's own pieces: the recipe loader, the partitioner, the example-level DP plan (σ calibrated
by the recipe's accountant), the budget checks and the mechanism's cohort selection. The only stand-in is
local training: a visit spends its ``local_steps`` private steps on the client's ledger, as a trained
visit does (empty Poisson draws are steps too). Dolly-15k cannot be downloaded here, so its 15,011 rows are
stood in for by their category labels in the real per-category counts (the recipe's IID split only needs
the count; truncation at ``max_length`` is not modelled).
"""

from pathlib import Path

import numpy as np
import pytest

from fedalign.data.partition import make_partition
from fedalign.privacy.example_level import ExampleLevelDP
from fedalign.privacy.mechanism import ExampleLevel
from fedalign.recipe import load_recipe
from fedalign.runtime.federation import Federation  # noqa: F401 (the round that drives the mechanism)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fedask-dolly-dp.yaml"
DOLLY_CATEGORIES = {  # databricks-dolly-15k, per category
    "open_qa": 3742,
    "general_qa": 2191,
    "classification": 2136,
    "closed_qa": 1773,
    "brainstorming": 1766,
    "information_extraction": 1506,
    "summarization": 1188,
    "creative_writing": 709,
}


class _Row:
    def __init__(self, row_id: int, label: str) -> None:
        self.row_id, self.label, self.origin = row_id, label, row_id


def _replay(seed: int) -> tuple[int, ExampleLevelDP, int]:
    """(rounds completed, the DP state at the end, rounds whose cohort was short) for one seed."""
    recipe = load_recipe(RECIPE, [f"seed={seed}"])
    labels = [label for label, count in DOLLY_CATEGORIES.items() for _ in range(count)]
    kept = len(labels) - round(len(labels) * recipe.data.holdout)
    rows = [_Row(i, labels[i]) for i in range(kept)]
    partition = make_partition(rows, recipe.partition, recipe.federation.num_clients, recipe.seed)
    dp = ExampleLevelDP.plan(recipe.privacy, recipe.federation, recipe.train, partition.sizes())
    mechanism = ExampleLevel(recipe.federation, dp, secrets=None)  # type: ignore[arg-type] (no visits here)
    sampler = np.random.default_rng(np.random.SeedSequence([recipe.seed, 1]))  # as the round's
    done = short = 0
    for round_idx in range(recipe.federation.rounds):
        if not dp.anyone_can_visit():
            break
        with_budget = len(dp.clients_with_budget())
        cohort = mechanism.select(round_idx, sampler)
        assert cohort.clients, f"seed {seed}: round {round_idx} has no client while some have budget"
        if len(cohort.clients) < recipe.federation.clients_per_round:  # only when too few have budget
            assert len(cohort.clients) == with_budget, f"seed {seed}: round {round_idx} short needlessly"
            short += 1
        for client in cohort.clients:  # stand-in for a visit: it spends exactly its local steps
            assert dp.can_visit(client)
            dp.record_visit(client, recipe.federation.local_steps)
        done = round_idx + 1
    return done, dp, short


def test_the_fedask_dp_recipe_completes_every_round_within_budget_for_20_seeds() -> None:
    recipe = load_recipe(RECIPE)
    assert (recipe.privacy.unit, recipe.federation.rounds) == ("example", 800)
    exhausted = 0
    for seed in range(20):
        done, dp, short = _replay(seed)
        assert done == recipe.federation.rounds, f"seed {seed}: stopped after {done} rounds"
        assert short < 50, f"seed {seed}: {short} rounds with fewer than clients_per_round clients"
        spent = [dp.epsilon(c) for c in range(recipe.federation.num_clients)]
        assert max(spent) <= recipe.privacy.target_epsilon, f"seed {seed}: ε {max(spent)}"
        exhausted += sum(not dp.can_visit(c) for c in range(recipe.federation.num_clients))
    # the schedule does bite: some clients run out of budget before the end, and the run goes on anyway
    assert exhausted > 0


@pytest.mark.parametrize("accountant", ["pld"])
def test_the_schedule_also_completes_under_the_default_accountant(accountant: str) -> None:
    """One seed under the default (PLD) accountant: its budget checks take the same path."""
    recipe = load_recipe(RECIPE, [f"privacy.accountant={accountant}", "federation.rounds=200"])
    labels = [label for label, count in DOLLY_CATEGORIES.items() for _ in range(count)]
    rows = [_Row(i, labels[i]) for i in range(len(labels) - round(len(labels) * recipe.data.holdout))]
    partition = make_partition(rows, recipe.partition, recipe.federation.num_clients, recipe.seed)
    dp = ExampleLevelDP.plan(recipe.privacy, recipe.federation, recipe.train, partition.sizes())
    mechanism = ExampleLevel(recipe.federation, dp, secrets=None)  # type: ignore[arg-type] (no visits here)
    sampler = np.random.default_rng(np.random.SeedSequence([recipe.seed, 1]))  # as the round's
    for round_idx in range(recipe.federation.rounds):
        for client in mechanism.select(round_idx, sampler).clients:
            dp.record_visit(client, recipe.federation.local_steps)
    assert dp.max_epsilon() <= recipe.privacy.target_epsilon
