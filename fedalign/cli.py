"""The ``fedalign`` command.

``fedalign sft RECIPE [key.path=value ...]`` runs federated SFT, ``fedalign dpo RECIPE ...`` federated DPO.
A problem with the user's inputs prints one line per problem (``error: <file or key>: <what is wrong>``)
and exits with status 2; nothing is written.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import typer
from rich.console import Console

from fedalign.errors import FedalignError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Federated alignment (SFT, DPO) of language and vision-language models with LoRA.",
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

_RECIPE = typer.Argument(..., help="recipe YAML, e.g. recipes/dolly.yaml")
_OVERRIDES = typer.Argument(None, help="dotted overrides, e.g. federation.rounds=50 lora.r=32")
_RUN_DIR = typer.Argument(..., help="a run directory under output_dir")
_RESUME_OVERRIDES = typer.Argument(
    None, help="only federation.rounds, checkpoint.every, checkpoint.keep_last, eval.every"
)


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    for line in message.splitlines() or [message]:  # user values may hold [brackets]: never markup
        err_console.print(f"[bold red]error:[/bold red] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run(runner: Callable[..., object], recipe: str, overrides: list[str] | None, load: bool = True) -> None:
    """Load the recipe (``load``; else pass the argument on as it is) and hand it to ``runner``; a user
    error becomes one line and exit status 2."""
    import signal

    from fedalign.errors import RunInterrupted
    from fedalign.recipe import load_recipe

    def terminate(signum, frame) -> None:  # SIGTERM (a scheduler, `kill`): stop as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        runner(load_recipe(recipe, overrides or []) if load else recipe, console)
    except RunInterrupted as error:
        _fail(str(error), code=130)
    except FedalignError as error:
        _fail(str(error))
    except KeyboardInterrupt:  # outside the round loop: while setting up, or while finishing
        _fail("interrupted outside the round loop (loading, or writing the final adapter); a run directory "
              "under output_dir, if one was made, continues with: fedalign resume RUN_DIR",
              code=130)  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def sft(recipe: str = _RECIPE, overrides: list[str] | None = _OVERRIDES) -> None:
    """Federated supervised fine-tuning on TRL's SFTTrainer."""
    from fedalign.runtime.sft import run_sft

    _run(run_sft, recipe, overrides)


@app.command()
def resume(run_dir: str = _RUN_DIR, overrides: list[str] | None = _RESUME_OVERRIDES) -> None:
    """Continue a stopped or killed run from its last complete checkpoint (or extend a finished one with
    federation.rounds=N); the result equals an uninterrupted run's."""
    from fedalign.runtime.resume import resume_run

    _run(lambda recipe, console: resume_run(recipe, overrides, console), run_dir, None, load=False)


@app.command()
def dpo(recipe: str = _RECIPE, overrides: list[str] | None = _OVERRIDES) -> None:
    """Federated DPO on TRL's DPOTrainer (text LMs and LLaVA-1.5)."""
    from fedalign.runtime.dpo import run_dpo

    _run(run_dpo, recipe, overrides)


flower_app = typer.Typer(
    no_args_is_help=True,
    help="Run a recipe on Flower: its simulation engine here, or real SuperLink and SuperNodes (README).",
)
app.add_typer(flower_app, name="flower")
_NODES = typer.Option(2, "--nodes", help="virtual Flower nodes; node p hosts clients p, p+N, ...")
_TASK = typer.Option("sft", "--task", help="sft or dpo")
_NODE_TIMEOUT = typer.Option(
    3600.0, "--node-timeout", help="seconds the server waits for a node's answer before dropping its clients"
)
_STATE = typer.Option(
    None, "--state-dir", help="where the nodes keep their state; default OUTPUT_DIR/flower-nodes"
)


@flower_app.command()
def simulate(
    recipe: str = _RECIPE,
    overrides: list[str] | None = _OVERRIDES,
    nodes: int = _NODES,
    task: str = _TASK,
    state_dir: str | None = _STATE,
) -> None:
    """The recipe over N virtual nodes on Flower's simulation engine (Ray)."""
    from pathlib import Path

    if task not in ("sft", "dpo"):
        _fail(f"--task {task!r}: sft or dpo")

    def run(loaded, console):
        from fedalign.flower.simulate import simulate as run_simulated

        return run_simulated(loaded, task, nodes, None if state_dir is None else Path(state_dir), console)

    _run(run, recipe, overrides)


@flower_app.command(name="run-config")
def flower_run_config(
    recipe: str = _RECIPE,
    overrides: list[str] | None = _OVERRIDES,
    nodes: int = _NODES,
    task: str = _TASK,
    node_timeout: float = _NODE_TIMEOUT,
) -> None:
    """Print the run config (TOML) for `flwr run flower-app SUPERLINK --run-config FILE`: the resolved
    recipe, the task and how many nodes the server waits for."""
    if task not in ("sft", "dpo"):
        _fail(f"--task {task!r}: sft or dpo")

    def show(loaded, console):
        import tomli_w

        config = {
            "recipe": loaded.resolved_yaml(),
            "task": task,
            "nodes": nodes,
            "node-timeout-s": node_timeout,
        }
        print(tomli_w.dumps(config), end="")

    _run(show, recipe, overrides)


_REPORT_RUNS = typer.Argument(..., help="one or more run directories; several are compared side by side")
_REPORT_OUT = typer.Option(
    None, "--out", help="folder for the report; default RUN_DIR/report for one run, ./report for several"
)
_REPORT_PRIVATE = typer.Option(
    False,
    "--private",
    help="also plot DP runs' client-private records (training loss, per-client ε), which ε does not cover",
)


@app.command()
def report(
    run_dirs: list[str] = _REPORT_RUNS, out: str | None = _REPORT_OUT, private: bool = _REPORT_PRIVATE
) -> None:
    """Plots (training and held-out metrics, ε, bytes per round) and a Markdown summary of finished runs."""
    from pathlib import Path

    from fedalign.reporting import write_report

    folder = Path(out) if out else Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else Path("report")
    try:
        written = write_report([Path(d) for d in run_dirs], folder, include_private=private)
    except FedalignError as error:
        _fail(str(error))
    for path in written:
        console.print(str(path), highlight=False)


eval_app = typer.Typer(
    no_args_is_help=True,
    help="Evaluate a checkpoint (a run directory: its base and tuned model side by side).",
)
app.add_typer(eval_app, name="eval")
_TARGET = typer.Argument(..., help="a fedalign run directory, or a base model (local folder or hub id)")
_ADAPTER = typer.Option(None, "--adapter", help="a PEFT adapter folder to evaluate on the base model")
_EVAL_OVERRIDES = typer.Argument(
    None,
    help="settings, e.g. data.path=./gsm8k/test.jsonl limit=200 shots=8 variant=gsm8k_cot mode=corrected",
)


def _evaluate_math(benchmark: str, target: str, adapter: str | None, overrides: list[str] | None) -> None:
    from fedalign.evaluation.math import evaluate_math, parse_overrides

    _quiet_libraries()
    try:
        evaluate_math(benchmark, target, adapter, parse_overrides(overrides or []), console)
    except FedalignError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail("interrupted; finished responses are cached, and rerunning the command continues", code=130)


@eval_app.command()
def gsm8k(
    target: str = _TARGET, overrides: list[str] | None = _EVAL_OVERRIDES, adapter: str | None = _ADAPTER
) -> None:
    """GSM8K exact match as lm-evaluation-harness scores it (strict-match, flexible-extract)."""
    _evaluate_math("gsm8k", target, adapter, overrides)


_TASKS = typer.Option(..., "--tasks", help="lm-eval task names, comma-separated, e.g. mmlu,drop")
_LM_EVAL_SETTINGS = typer.Argument(
    None, help="include_path=DIR (local task YAMLs), limit=N, num_fewshot=N, batch_size=N, out=DIR"
)


@eval_app.command(name="lm-eval")
def lm_eval_tasks(
    target: str = _TARGET,
    tasks: str = _TASKS,
    overrides: list[str] | None = _LM_EVAL_SETTINGS,
    adapter: str | None = _ADAPTER,
) -> None:
    """Any lm-evaluation-harness task, through lm-eval's own HF backend (optional: pip install lm-eval)."""
    import yaml

    from fedalign.evaluation.lm_eval_bridge import evaluate_lm_eval

    _quiet_libraries()
    settings = {}
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep:
            _fail(f"eval: {override!r}: expected key=value")
        settings[key] = yaml.safe_load(value)
    try:
        evaluate_lm_eval(target, adapter, [t for t in tasks.split(",") if t], settings, console)
    except FedalignError as error:
        _fail(str(error))


@eval_app.command()
def gsmhard(
    target: str = _TARGET, overrides: list[str] | None = _EVAL_OVERRIDES, adapter: str | None = _ADAPTER
) -> None:
    """GSM-hard accuracy (PAL's tolerance) on the answers GSM8K's filters extract."""
    _evaluate_math("gsmhard", target, adapter, overrides)


_JUDGE = typer.Option(
    "keyword",
    "--judge",
    help="openai:MODEL (key from $OPENAI_API_KEY), openai:MODEL@URL (a local vllm/transformers serve), "
    "hf:PATH (a local model), replay:JUDGE_ID (cached verdicts only) or keyword (a labelled refusal proxy)",
)
_SAFETY_SETTINGS = typer.Argument(
    None,
    help="settings, e.g. data.path=./MM-SafetyBench limit=50 mode=faithful judge.concurrency=8 "
    "judge.images=false image_types=[SD_TYPO] tiny=true samples=3 reference=./spavl-refs",
)


def _evaluate_safety(
    benchmark: str, target: str, adapter: str | None, judge: str, overrides: list[str] | None
) -> None:
    from fedalign.evaluation.safety.common import parse_settings
    from fedalign.evaluation.safety.runner import evaluate, evaluate_suite

    _quiet_libraries()
    try:
        settings = parse_settings(overrides or [])
        if benchmark == "safety":
            evaluate_suite(target, adapter, judge, settings, console)
        else:
            evaluate(benchmark, target, adapter, judge, settings, console)
    except FedalignError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail(
            "interrupted; finished responses and verdicts are cached, and rerunning the command continues",
            130,
        )


@eval_app.command()
def safety(
    target: str = _TARGET,
    overrides: list[str] | None = _SAFETY_SETTINGS,
    adapter: str | None = _ADAPTER,
    judge: str = _JUDGE,
) -> None:
    """The safety suite: MM-SafetyBench, SIUO, BeaverTails-V, SPA-VL and an over-refusal control."""
    _evaluate_safety("safety", target, adapter, judge, overrides)


@eval_app.command(name="mm-safetybench")
def mm_safetybench(
    target: str = _TARGET,
    overrides: list[str] | None = _SAFETY_SETTINGS,
    adapter: str | None = _ADAPTER,
    judge: str = _JUDGE,
) -> None:
    """MM-SafetyBench attack success rate per scenario and image type."""
    _evaluate_safety("mm-safetybench", target, adapter, judge, overrides)


@eval_app.command()
def siuo(
    target: str = _TARGET,
    overrides: list[str] | None = _SAFETY_SETTINGS,
    adapter: str | None = _ADAPTER,
    judge: str = _JUDGE,
) -> None:
    """SIUO safe / effective rates (judged) and multiple-choice accuracy."""
    _evaluate_safety("siuo", target, adapter, judge, overrides)


@eval_app.command(name="beavertails-v")
def beavertails_v(
    target: str = _TARGET,
    overrides: list[str] | None = _SAFETY_SETTINGS,
    adapter: str | None = _ADAPTER,
    judge: str = _JUDGE,
) -> None:
    """BeaverTails-V harmlessness and helpfulness win rates against the base model."""
    _evaluate_safety("beavertails-v", target, adapter, judge, overrides)


@eval_app.command(name="spa-vl")
def spa_vl(
    target: str = _TARGET,
    overrides: list[str] | None = _SAFETY_SETTINGS,
    adapter: str | None = _ADAPTER,
    judge: str = _JUDGE,
) -> None:
    """SPA-VL HarmEval harm score and HelpEval win rate (align-anything's protocol)."""
    _evaluate_safety("spa-vl", target, adapter, judge, overrides)


def _quiet_libraries() -> None:
    """Keep the terminal for fedalign's own progress: no per-map progress bars or deprecation chatter."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


def main() -> None:
    """The console entry point. An exception fedalign did not raise itself (a bug, or an input no check
    caught yet) is one line and exit status 1; ``--debug`` (anywhere on the command line) or
    ``FEDALIGN_DEBUG=1`` shows its traceback instead."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = "--debug" in sys.argv[1:] or os.environ.get("FEDALIGN_DEBUG") == "1"
    sys.argv = [a for a in sys.argv if a != "--debug"]
    if len(sys.argv) > 1 and sys.argv[1] in ("sft", "dpo", "resume"):
        _quiet_libraries()
    try:
        app()
    except SystemExit as exit_:
        sys.exit(exit_.code)
    except Exception as error:  # not fedalign's own: those are caught per command
        if debug:
            raise
        from rich.markup import escape

        first = escape((str(error).strip().splitlines() or [""])[0][:300])
        err_console.print(
            f"[bold red]error:[/bold red] unexpected {type(error).__name__}: {first} (not a problem fedalign "
            "checks for yet; rerun with --debug for the traceback, and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
