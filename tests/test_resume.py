"""Fine-tuning checkpoints and resumed runs: exact continuation, mismatched resumes, Ctrl-C and crashes."""

from __future__ import annotations

import copy
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from examples.digits import DigitsCNN, digits_dataset
from helpers import OUTPUT_FILES, SUBPROCESS_ENV, digits_recipe, restored_loggers, write_yaml
from slimmer.checkpoint import CHECKPOINT_FILE, work_dir
from slimmer.data import make_loader
from slimmer.errors import FinetuneInterrupted, InputError
from slimmer.finetune import FinetuneState, finetune
from slimmer.recipe import DataConfig, FinetuneConfig


def load_weights(output: Path) -> dict[str, torch.Tensor]:
    return torch.load(output / "model.pt", weights_only=True)["state_dict"]


def assert_same_weights(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for key in expected:
        assert torch.equal(found[key], expected[key]), key


# The finetune pass on its own: resuming from a saved state gives the uninterrupted weights.

class NoisyDigits(Dataset):
    """The first 256 digits training images plus Gaussian noise drawn from torch's global generator on each read."""

    def __init__(self) -> None:
        self.digits = digits_dataset("train")

    def __len__(self) -> int:
        return 256

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.digits[index]
        return image + 0.1 * torch.randn(image.shape), label


FINETUNE_STEPS = 20
BATCH_SIZE = 32  # 8 batches an epoch, so 20 steps cross two epoch ends


def small_digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN(width=8)


def run_finetune(model: nn.Module, teacher: nn.Module, config: FinetuneConfig,
                 resume_from: FinetuneState | None = None) -> tuple[nn.Module, list[tuple[dict, dict]]]:
    """Fine-tune ``model``; return it and a copy of the weights and state at every checkpoint.

    The last item of the list is the final weights with torch's global random state after the run.
    """
    torch.manual_seed(5)
    loader = make_loader(NoisyDigits(), DataConfig(), batch_size=config.batch_size, shuffle=True, seed=1)
    saved: list[tuple[dict, dict]] = []

    def keep(current: nn.Module, state: FinetuneState) -> None:
        saved.append((copy.deepcopy(current.state_dict()), copy.deepcopy(state.to_dict())))

    result = finetune(model, config, loader, teacher=teacher, progress=False, resume_from=resume_from,
                      on_checkpoint=keep)
    saved.append((copy.deepcopy(result.model.state_dict()), {"rng_after_run": torch.get_rng_state()}))
    return result.model, saved


@pytest.mark.parametrize(("optimizer", "resume_step"), [
    pytest.param("adamw", 0, id="adamw-start"),
    pytest.param("adamw", 8, id="adamw-epoch-end"),
    pytest.param("adamw", 13, id="adamw-mid-epoch"),
    pytest.param("sgd", 13, id="sgd-mid-epoch"),
    pytest.param("adamw", FINETUNE_STEPS, id="adamw-last-step"),
])
def test_finetune_resume_exact(optimizer: str, resume_step: int) -> None:
    config = FinetuneConfig(steps=FINETUNE_STEPS, batch_size=BATCH_SIZE, optimizer=optimizer, lr=0.01,
                            checkpoint_every=1)
    teacher = small_digits_cnn().eval()
    expected, saved = run_finetune(small_digits_cnn(), teacher, config)
    weights, state = next((weights, state) for weights, state in saved if state.get("step") == resume_step)

    model = small_digits_cnn()
    model.load_state_dict(weights)
    found, saved_again = run_finetune(model, teacher, config, resume_from=FinetuneState.from_dict(state))

    assert [state["step"] for _, state in saved[:-1]] == list(range(FINETUNE_STEPS + 1))
    assert_same_weights(found.state_dict(), expected.state_dict())
    assert torch.equal(saved_again[-1][1]["rng_after_run"], saved[-1][1]["rng_after_run"])


class FewerDigits(NoisyDigits):
    def __len__(self) -> int:
        return 128


def test_resume_rejects_changed_data() -> None:
    config = FinetuneConfig(epochs=2, batch_size=BATCH_SIZE, optimizer="adamw", checkpoint_every=1)
    teacher = small_digits_cnn().eval()
    _, saved = run_finetune(small_digits_cnn(), teacher, config)
    loader = make_loader(FewerDigits(), DataConfig(), batch_size=BATCH_SIZE, shuffle=True, seed=1)

    with pytest.raises(InputError) as raised:
        finetune(small_digits_cnn(), config, loader, teacher=teacher, progress=False,
                 resume_from=FinetuneState.from_dict(saved[5][1]))
    assert str(raised.value) == ("cannot resume fine-tuning: the checkpoint was made for 16 steps with at least 5 "
                                 "batches an epoch, but the training data now gives 8 steps and 4 batches an epoch; "
                                 "the training data changed since the checkpoint was saved")


class FetchFailsAfterInterrupt(NoisyDigits):
    """Ctrl-C arrives during read number ``interrupt_at``, and then the read fails.

    A terminal's Ctrl-C reaches DataLoader worker processes too. They exit, and the fetch fails.
    """

    def __init__(self, interrupt_at: int) -> None:
        super().__init__()
        self.interrupt_at = interrupt_at
        self.reads = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        if self.reads == self.interrupt_at:
            signal.raise_signal(signal.SIGINT)
            raise RuntimeError("DataLoader worker exited unexpectedly")
        return super().__getitem__(index)


@pytest.fixture
def python_sigint_handler():
    """Give SIGINT Python's default handler, which a test process started in the background lacks."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_during_failed_fetch(python_sigint_handler) -> None:
    config = FinetuneConfig(steps=FINETUNE_STEPS, batch_size=BATCH_SIZE, optimizer="adamw", checkpoint_every=10)
    loader = make_loader(FetchFailsAfterInterrupt(interrupt_at=12 * BATCH_SIZE + 3), DataConfig(),
                         batch_size=BATCH_SIZE, shuffle=True, seed=1)
    saved_steps: list[int] = []

    with pytest.raises(FinetuneInterrupted) as raised:
        finetune(small_digits_cnn(), config, loader, teacher=small_digits_cnn(), progress=False,
                 on_checkpoint=lambda model, state: saved_steps.append(state.step))

    assert raised.value.step == 12
    assert saved_steps == [0, 10, 12]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# Whole runs through the CLI: a crash inside fine-tuning, then --resume.

FLAKY_DATA = textwrap.dedent('''
    from pathlib import Path

    from examples.digits import digits_dataset


    class FlakyDigits:
        """The digits training split; reading fails at the read numbered fail_at while the marker file exists."""

        def __init__(self, marker, fail_at):
            self.digits = digits_dataset("train")
            self.marker = Path(marker)
            self.fail_at = fail_at
            self.reads = 0

        def __len__(self):
            return len(self.digits)

        def __getitem__(self, index):
            self.reads += 1
            if self.reads == self.fail_at and self.marker.exists():
                raise RuntimeError("simulated read failure")
            return self.digits[index]


    def flaky_digits(marker, fail_at):
        return FlakyDigits(marker, fail_at)
''')

CRASH_FINETUNE = {"steps": 60, "batch_size": 16, "optimizer": "adamw", "lr": 0.001, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def crashed_run(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run whose training data fails after 35 batches: exit code, stderr, recipe and work folder."""
    from slimmer.cli import main

    folder = tmp_path_factory.mktemp("crash")
    (folder / "flaky_resume_data.py").write_text(FLAKY_DATA, encoding="utf-8")
    marker = folder / "fail.marker"
    marker.write_text("fail")
    recipe = digits_recipe()
    recipe["model"]["python_path"].append(str(folder))
    recipe["data"]["train"] = {"callable": "flaky_resume_data:flaky_digits",
                               "kwargs": {"marker": str(marker), "fail_at": 35 * 16 + 5}}
    recipe["steps"][2] = {"finetune": CRASH_FINETUNE}
    recipe_path = write_yaml(folder / "recipe.yaml", recipe)
    output = folder / "out"
    arguments = ["apply", str(recipe_path), str(digits_checkpoint), "-o", str(output), "--quiet"]

    stderr_file = folder / "stderr.txt"
    with stderr_file.open("w") as stderr, pytest.MonkeyPatch.context() as patch, restored_loggers():
        patch.setattr(sys, "stderr", stderr)
        exit_code = main(arguments)
    marker.unlink()
    return {"exit_code": exit_code, "stderr": stderr_file.read_text(), "recipe": recipe_path, "output": output,
            "arguments": arguments, "folder": folder}


def copy_partial_work(crashed_run: dict[str, Any], tmp_path: Path) -> Path:
    """Copy the crashed run's work folder to ``tmp_path/out.partial``; return the output folder beside it."""
    shutil.copytree(work_dir(crashed_run["output"]), tmp_path / "out.partial")
    return tmp_path / "out"


def test_crash_exit_code(crashed_run: dict[str, Any]) -> None:
    assert crashed_run["exit_code"] == 1, crashed_run["stderr"]


def test_crash_names_partial_work(crashed_run: dict[str, Any]) -> None:
    last_line = crashed_run["stderr"].strip().splitlines()[-1]
    partial = work_dir(crashed_run["output"])

    assert last_line == (f"slimmer: internal error: RuntimeError: simulated read failure; partial work is in "
                         f"{partial}; resume with: slimmer {shlex.join(crashed_run['arguments'])} --resume")
    assert "Traceback" in crashed_run["stderr"]


def test_crash_keeps_last_checkpoint(crashed_run: dict[str, Any]) -> None:
    checkpoint = torch.load(work_dir(crashed_run["output"]) / CHECKPOINT_FILE, weights_only=True)

    assert not crashed_run["output"].exists()
    assert checkpoint["step_index"] == 2
    assert checkpoint["finetune"]["step"] == 30
    assert [record["pass"] for record in checkpoint["passes"]] == ["decompose", "prune"]


def test_resume_after_crash_matches_uninterrupted(crashed_run: dict[str, Any], digits_checkpoint: Path,
                                                  tmp_path: Path, run_cli) -> None:
    output = copy_partial_work(crashed_run, tmp_path)
    baseline = tmp_path / "baseline"

    resumed = run_cli("apply", crashed_run["recipe"], digits_checkpoint, "-o", output, "--quiet", "--resume")
    uninterrupted = run_cli("apply", crashed_run["recipe"], digits_checkpoint, "-o", baseline, "--quiet")

    assert resumed.exit_code == 0, resumed.stderr
    assert uninterrupted.exit_code == 0, uninterrupted.stderr
    assert sorted(path.name for path in output.iterdir()) == sorted(OUTPUT_FILES)
    assert not work_dir(output).exists()
    assert_same_weights(load_weights(output), load_weights(baseline))
    assert (output / "model.onnx").read_bytes() == (baseline / "model.onnx").read_bytes()


def test_resume_report_records_start(crashed_run: dict[str, Any], digits_checkpoint: Path, tmp_path: Path,
                                     run_cli) -> None:
    import json

    output = copy_partial_work(crashed_run, tmp_path)
    result = run_cli("apply", crashed_run["recipe"], digits_checkpoint, "-o", output, "--quiet", "--resume")
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))

    assert result.exit_code == 0, result.stderr
    assert report["resumed_from"] == {"step": "steps[2]", "finetune_step": 30}
    assert [record["pass"] for record in report["passes"]] == ["decompose", "prune", "finetune"]
    assert report["passes"][2]["stats"]["steps"] == 60
    assert report["passes"][1]["changed"], "the prune record comes from the checkpoint"


@pytest.mark.parametrize(("extra", "fragments"), [
    pytest.param(("steps[2].finetune.lr=0.01",), ("the recipe differs", "at steps[2].finetune.lr;"), id="recipe"),
    pytest.param(("seed=3", "steps[0].decompose.rank.ratio=0.25"),
                 ("at seed, steps[0].decompose.rank.ratio;",), id="two_settings"),
    pytest.param(("steps[2].finetune.steps=61",), ("at steps[2].finetune.steps;",), id="step_count"),
])
def test_resume_rejects_changed_recipe(crashed_run: dict[str, Any], digits_checkpoint: Path, tmp_path: Path,
                                       run_cli, extra: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    output = copy_partial_work(crashed_run, tmp_path)
    result = run_cli("apply", crashed_run["recipe"], digits_checkpoint, "-o", output, "--resume", *extra)

    assert result.exit_code == 2
    assert len(result.stderr_lines) == 1, result.stderr
    assert result.stderr_lines[0].startswith(f"slimmer: error: cannot resume from {work_dir(output)}: ")
    for fragment in fragments:
        assert fragment in result.stderr_lines[0]
    assert "--force" in result.stderr_lines[0]
    assert not output.exists()
    assert (work_dir(output) / CHECKPOINT_FILE).is_file()


def test_resume_rejects_other_model(crashed_run: dict[str, Any], trained_digits: nn.Module, tmp_path: Path,
                                    run_cli) -> None:
    output = copy_partial_work(crashed_run, tmp_path)
    other = copy.deepcopy(trained_digits)
    with torch.no_grad():
        other.classifier.bias.add_(0.01)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.pt")

    result = run_cli("apply", crashed_run["recipe"], tmp_path / "other.pt", "-o", output, "--resume")

    assert result.exit_code == 2
    assert result.stderr_lines == [f"slimmer: error: cannot resume from {work_dir(output)}: its checkpoint was made "
                                   "from a model with other weights; pass the input model of the interrupted run, or "
                                   "start over without --resume and with --force (resume=False, force=True from "
                                   "Python)"]


def test_resume_allows_export_changes(crashed_run: dict[str, Any], digits_checkpoint: Path, tmp_path: Path,
                                      run_cli) -> None:
    output = copy_partial_work(crashed_run, tmp_path)
    result = run_cli("apply", crashed_run["recipe"], digits_checkpoint, "-o", output, "--quiet", "--resume",
                     "export.parity.samples=8", "steps[2].finetune.checkpoint_every=5")

    assert result.exit_code == 0, result.stderr


def test_resume_without_checkpoint(crashed_run: dict[str, Any], digits_checkpoint: Path, tmp_path: Path,
                                   run_cli) -> None:
    output = tmp_path / "out"
    result = run_cli("apply", crashed_run["recipe"], digits_checkpoint, "-o", output, "--resume")

    assert result.exit_code == 2
    assert result.stderr_lines == [f"slimmer: error: cannot resume: no checkpoint found at "
                                   f"{work_dir(output) / CHECKPOINT_FILE}; run without --resume (resume=False from "
                                   "Python) to start over"]
    assert not work_dir(output).exists()


def test_resume_corrupt_checkpoint(crashed_run: dict[str, Any], digits_checkpoint: Path, tmp_path: Path,
                                   run_cli) -> None:
    output = copy_partial_work(crashed_run, tmp_path)
    checkpoint = work_dir(output) / CHECKPOINT_FILE
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])

    result = run_cli("apply", crashed_run["recipe"], digits_checkpoint, "-o", output, "--resume")

    assert result.exit_code == 2
    assert len(result.stderr_lines) == 1, result.stderr
    assert "corrupt or truncated" in result.stderr_lines[0]


def test_partial_work_blocks_fresh_run(crashed_run: dict[str, Any], digits_checkpoint: Path, tmp_path: Path,
                                       run_cli) -> None:
    output = copy_partial_work(crashed_run, tmp_path)
    result = run_cli("apply", crashed_run["recipe"], digits_checkpoint, "-o", output)

    assert result.exit_code == 2
    assert result.stderr_lines == [f"slimmer: error: partial work of an interrupted run is in {work_dir(output)}; "
                                   "pass --resume (resume=True from Python) to continue it, or --force (force=True) "
                                   "to discard it"]
    assert (work_dir(output) / CHECKPOINT_FILE).is_file()


def test_force_discards_partial_work(crashed_run: dict[str, Any], digits_checkpoint: Path, tmp_path: Path,
                                     run_cli) -> None:
    output = copy_partial_work(crashed_run, tmp_path)
    result = run_cli("apply", crashed_run["recipe"], digits_checkpoint, "-o", output, "--quiet", "--force")

    assert result.exit_code == 0, result.stderr
    assert not work_dir(output).exists()
    assert (output / "model.pt").is_file()


def test_api_resume(crashed_run: dict[str, Any], trained_digits: nn.Module, tmp_path: Path) -> None:
    import slimmer

    output = copy_partial_work(crashed_run, tmp_path)
    _, report = slimmer.apply(trained_digits, crashed_run["recipe"], output_dir=output, progress=False, resume=True)

    assert report["resumed_from"]["finetune_step"] == 30
    assert (output / "model.pt").is_file()
    assert not work_dir(output).exists()


def test_api_resume_pickled_model(crashed_run: dict[str, Any], trained_digits: nn.Module, tmp_path: Path) -> None:
    """Without an architecture the checkpoint pickles the model, and resuming loads it back."""
    import slimmer

    recipe = yaml.safe_load(crashed_run["recipe"].read_text(encoding="utf-8"))
    marker = tmp_path / "fail.marker"
    marker.write_text("fail")
    recipe["data"]["train"]["kwargs"]["marker"] = str(marker)
    output = tmp_path / "out"

    with pytest.raises(RuntimeError, match="simulated read failure") as raised:
        slimmer.apply(trained_digits, recipe, output_dir=output, progress=False, architecture=None)
    marker.unlink()
    _, report = slimmer.apply(trained_digits, recipe, output_dir=output, progress=False, architecture=None,
                              resume=True)

    assert raised.value.partial_work == work_dir(output)
    assert report["resumed_from"] == {"step": "steps[2]", "finetune_step": 30}
    assert isinstance(slimmer.load_compressed(output / "model.pt", allow_pickle=True), nn.Module)


def test_api_resume_needs_output(crashed_run: dict[str, Any], trained_digits: nn.Module) -> None:
    import slimmer

    with pytest.raises(slimmer.InputError, match="resume needs output_dir"):
        slimmer.apply(trained_digits, crashed_run["recipe"], resume=True)


def test_no_checkpoints_without_finetune(trained_digits: nn.Module, tmp_path: Path) -> None:
    import slimmer

    recipe = digits_recipe(steps=[{"decompose": {"rank": {"ratio": 0.5}}}])
    slimmer.apply(trained_digits, recipe, output_dir=tmp_path / "out", progress=False)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


# Ctrl-C in a separate process, as a shell user would press it.

INTERRUPT_FINETUNE = {"steps": 600, "batch_size": 16, "optimizer": "adamw", "lr": 0.001, "checkpoint_every": 50}


def saved_finetune_step(checkpoint: Path) -> int:
    """Return the fine-tune step of the checkpoint at ``checkpoint``, or -1 while there is none."""
    if not checkpoint.is_file():
        return -1
    return torch.load(checkpoint, weights_only=True)["finetune"]["step"]


def default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps it ignored; a terminal user's
    # process has the default action, which Python turns into KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_then_resume(digits_checkpoint: Path, tmp_path: Path, run_cli) -> None:
    recipe = digits_recipe()
    recipe["steps"][2] = {"finetune": INTERRUPT_FINETUNE}
    write_yaml(tmp_path / "recipe.yaml", recipe)
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("earlier results")
    checkpoint = tmp_path / "out.partial" / CHECKPOINT_FILE
    arguments = ["apply", "recipe.yaml", str(digits_checkpoint), "-o", "out", "--force", "--quiet"]

    process = subprocess.Popen([sys.executable, "-m", "slimmer.cli", *arguments], cwd=tmp_path, env=SUBPROCESS_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 240
        while saved_finetune_step(checkpoint) < INTERRUPT_FINETUNE["checkpoint_every"]:
            assert process.poll() is None, "the run ended before its first periodic checkpoint"
            assert time.monotonic() < deadline, "no periodic checkpoint within 240 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    step = saved_finetune_step(checkpoint)
    resume_command = f"slimmer {shlex.join(arguments)} --resume"

    assert process.returncode == 130, stderr
    assert INTERRUPT_FINETUNE["checkpoint_every"] <= step < INTERRUPT_FINETUNE["steps"]
    assert stderr.strip().splitlines()[-1] == (f"slimmer: interrupted after fine-tune step {step} of 600; no output "
                                               f"was written; partial work is in out.partial; resume with: "
                                               f"{resume_command}")
    assert sorted(path.name for path in output.iterdir()) == ["keep.txt"]
    assert (output / "keep.txt").read_text() == "earlier results"
    assert list(tmp_path.glob(".out.partial-*")) == []

    resumed = subprocess.run([sys.executable, "-m", "slimmer.cli", *shlex.split(resume_command)[1:]], cwd=tmp_path,
                             env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    uninterrupted = run_cli("apply", tmp_path / "recipe.yaml", digits_checkpoint, "-o", tmp_path / "baseline",
                            "--quiet")

    assert resumed.returncode == 0, resumed.stderr
    assert uninterrupted.exit_code == 0, uninterrupted.stderr
    assert sorted(path.name for path in output.iterdir()) == sorted(OUTPUT_FILES)
    assert not checkpoint.parent.exists()
    assert_same_weights(load_weights(output), load_weights(tmp_path / "baseline"))
    assert (output / "model.onnx").read_bytes() == (tmp_path / "baseline" / "model.onnx").read_bytes()


@pytest.mark.parametrize("lr", [1.0e+6, 1.0e+12])
def test_diverged_finetune_says_start_over(digits_checkpoint: Path, tmp_path: Path, run_cli, lr: float) -> None:
    recipe = digits_recipe()
    recipe["steps"][2] = {"finetune": {"steps": 50, "batch_size": 16, "optimizer": "sgd", "lr": lr}}
    path = write_yaml(tmp_path / "recipe.yaml", recipe)
    output = tmp_path / "out"

    result = run_cli("apply", path, digits_checkpoint, "-o", output, "--quiet")

    assert result.exit_code == 3
    assert len(result.stderr_lines) == 1, result.stderr
    assert result.stderr_lines[0].startswith("slimmer: error: fine-tuning diverged")
    assert "lower finetune.lr" in result.stderr_lines[0]
    assert result.stderr_lines[0].endswith(f"; after fixing the cause, start over with --force, which discards the "
                                           f"partial work in {work_dir(output)}: slimmer apply {path} "
                                           f"{digits_checkpoint} -o {output} --quiet --force")
    assert "--resume" not in result.stderr
    assert not output.exists()

    recipe["steps"][2]["finetune"]["lr"] = 0.001
    write_yaml(path, recipe)
    start_over = shlex.split(result.stderr_lines[0].rsplit(": slimmer ", 1)[1])
    rerun = run_cli(*start_over)

    assert rerun.exit_code == 0, rerun.stderr
    assert sorted(child.name for child in output.iterdir()) == sorted(OUTPUT_FILES)
    assert not work_dir(output).exists()


def test_diverged_finetune_resume_note_dropped(digits_checkpoint: Path, tmp_path: Path, run_cli) -> None:
    recipe = digits_recipe()
    recipe["steps"][2] = {"finetune": {"steps": 50, "batch_size": 16, "optimizer": "sgd", "lr": 1.0e+6}}
    path = write_yaml(tmp_path / "recipe.yaml", recipe)
    output = tmp_path / "out"
    assert run_cli("apply", path, digits_checkpoint, "-o", output, "--quiet").exit_code == 3

    result = run_cli("apply", path, digits_checkpoint, "-o", output, "--quiet", "--resume")

    assert result.exit_code == 3
    assert result.stderr_lines[0].endswith(f"-o {output} --quiet --force")
