"""scripts/ch09_figures.py: every figure from real inputs, the rules behind them, and the bad-input errors.

The real inputs come from one tiny run of the production script (state-based FetchReach-v4, 400 steps, no
rendering), made once per module: its TensorBoard folder feeds `loss-phases`, its eval and aggregate files feed
`investigation`. `env-frame` renders the real FetchPush-v4 scene through the lab wrapper (EGL), and
`encoder-progression` runs the lab's blob measurement. Every PNG is checked against the size the script promises
(FIGURE_SIZES * DPI), read from the PNG header itself. The JSON and event-file figures are drawn once more in a
fresh interpreter that must not have imported torch, SB3 or MuJoCo.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import ch09_figures as figures
import ch09_pixel_push
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIGURES = REPO_ROOT / "scripts" / "ch09_figures.py"
ENV_ID, TAG, SEED = "FetchReach-v4", "fullstate", 0
TRAIN_STEPS, EVAL_EPISODES = 400, 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_script(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env=env)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, production) -> Path:
    """A real (tiny) training run, its evaluation and an aggregate, all under a temporary artifact root."""
    root = tmp_path_factory.mktemp("ch09_artifacts")
    production.check("train", "--full-state", "--env", ENV_ID, "--seed", str(SEED), "--total-steps", str(TRAIN_STEPS),
                     "--buffer-size", "1000", "--batch-size", "32", "--learning-starts", "100", "--eval-freq", "200",
                     "--eval-episodes", "2", "--checkpoint-freq", str(TRAIN_STEPS), "--device", "cpu",
                     "--no-progress", "--no-eval-video", "--artifact-root", str(root))
    checkpoint = root / "checkpoints" / f"ch09_{TAG}_{ENV_ID}_seed{SEED}.zip"
    # eval and aggregate in-process: saves two interpreter starts
    assert ch09_pixel_push.main(["eval", "--checkpoint", str(checkpoint), "--n-episodes", str(EVAL_EPISODES),
                                 "--device", "cpu", "--artifact-root", str(root)]) == 0
    eval_file = root / "results" / f"ch09_{TAG}_{ENV_ID}_seed{SEED}_eval.json"
    assert ch09_pixel_push.main(["aggregate", str(eval_file), "--artifact-root", str(root)]) == 0
    return root


def assert_figure_files(paths_dir: Path, figure: str) -> None:
    """PNG and SVG written; the PNG is a real PNG whose header says FIGURE_SIZES[figure] * DPI pixels."""
    stem = figures.FILE_STEMS[figure]
    png, svg = paths_dir / f"{stem}.png", paths_dir / f"{stem}.svg"
    assert svg.is_file() and svg.read_text()[:200].lstrip().startswith("<?xml"), f"{svg} is not an SVG"
    header = png.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE, f"{png} does not start with the PNG signature"
    assert header[12:16] == b"IHDR", f"{png} has no IHDR chunk first"
    width, height = struct.unpack(">II", header[16:24])
    inches = figures.FIGURE_SIZES[figure]
    assert (width, height) == (round(inches[0] * figures.DPI), round(inches[1] * figures.DPI))


# ---------------------------------------------------------------------------------------------------------------
# The four figures from real inputs
# ---------------------------------------------------------------------------------------------------------------
def test_loss_phases_from_a_real_run(artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = artifacts / "runs" / f"ch09_{TAG}" / ENV_ID / f"seed{SEED}"
    curves = figures.read_scalars(run_dir)  # TensorBoard's EventAccumulator on the production script's logs
    for tag in ("rollout/success_rate", "eval/success_rate", "train/critic_loss", "train/actor_loss"):
        assert tag in curves and curves[tag].steps.size > 0, f"{tag} missing from {sorted(curves)}"
    assert curves["eval/success_rate"].steps.max() == TRAIN_STEPS
    assert figures.main(["loss-phases", "--run", str(run_dir), "--out-dir", str(tmp_path / "auto")]) == 0
    assert_figure_files(tmp_path / "auto", "loss-phases")
    by_hand = ["loss-phases", "--run", str(run_dir), "--phases", "100,300", "--out-dir", str(tmp_path / "hand")]
    assert figures.main(by_hand) == 0
    assert_figure_files(tmp_path / "hand", "loss-phases")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[loss-phases]")]
    assert len(lines) == 2 and "Phase 2 given by hand at 100" in lines[1]
    assert f"seed{SEED}: " in lines[0] and "eval success " in lines[0]  # the milestones of this run, one line


def test_the_90_percent_milestone_is_the_first_evaluation_at_or_above_it() -> None:
    evaluations = figures.Curve("eval/success_rate", np.array([1e6, 2e6, 3e6, 3.5e6, 4e6]),
                                np.array([0.05, 0.4, 0.85, 0.9, 0.8]))
    assert figures.first_step_at(evaluations, figures.MILESTONE_SUCCESS) == 3.5e6  # 0.9 counts; the dip after not
    line = figures.milestones_line("run", {"eval/success_rate": evaluations}, [0, 2e6, 3e6, 4e6], by_hand=False)
    assert line == "[loss-phases] run: the climb (Phase 2) starts at 2M; eval success first >= 90% at 3.5M"
    never = figures.Curve("eval/success_rate", np.array([1e6, 2e6]), np.array([0.05, 0.1]))
    assert "never >= 90% (last evaluation at 2M)" in figures.milestones_line(
        "run", {"eval/success_rate": never}, [0, 2e6, 2e6, 2e6], by_hand=False)


def test_a_folder_of_several_runs_is_refused(artifacts: Path, tmp_path: Path, capsys) -> None:
    event_file = next((artifacts / "runs" / f"ch09_{TAG}" / ENV_ID / f"seed{SEED}").glob("events.out.tfevents.*"))
    for seed in (0, 1):  # a parent folder of two seeds: their curves must not be mixed
        (tmp_path / f"seed{seed}").mkdir()
        shutil.copy(event_file, tmp_path / f"seed{seed}")
    assert figures.main(["loss-phases", "--run", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 runs (seed0, seed1)" in err, err
    assert len(figures.read_scalars(tmp_path / "seed1")) > 0  # one of them is fine


def test_investigation_reads_the_results_folder_not_moved_aside_runs(artifacts: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """`train --move-old-run` moves an old run's evaluations into results/<stem>.old-<time>/: they are not the
    run's results any more. A file of ours with a field missing is named and left out, not a crash."""
    results = tmp_path / "results"
    shutil.copytree(artifacts / "results", results)
    eval_file = results / f"ch09_{TAG}_{ENV_ID}_seed{SEED}_eval.json"
    old = json.loads(eval_file.read_text())
    old.update(checkpoint_steps=TRAIN_STEPS * 10, train_seed=SEED + 1)
    (results / f"ch09_{TAG}_{ENV_ID}_seed{SEED}.old-20261204-000000").mkdir()
    (results / f"ch09_{TAG}_{ENV_ID}_seed{SEED}.old-20261204-000000" / "moved_eval.json").write_text(json.dumps(old))
    incomplete = {key: value for key, value in old.items() if key != "env_id"}
    (results / "incomplete_eval.json").write_text(json.dumps(incomplete))
    loaded = figures.load_seed_results(results)
    assert [(r.seed, r.steps) for r in loaded] == [(SEED, TRAIN_STEPS)]
    assert f"note: leaving out {results / 'incomplete_eval.json'}" in capsys.readouterr().out


def test_investigation_from_real_eval_files(artifacts: Path, tmp_path: Path) -> None:
    results = figures.load_seed_results(artifacts / "results")
    eval_data = json.loads((artifacts / "results" / f"ch09_{TAG}_{ENV_ID}_seed{SEED}_eval.json").read_text())
    # The eval file wins over the aggregate of the same config: one seed, counted once.
    assert len(results) == 1 and results[0].steps == TRAIN_STEPS
    bars = figures.investigation_bars(results)
    assert len(bars) == 1 and bars[0].step is None  # fullstate is outside the 5-step arc: shown by its tag
    assert bars[0].mean == pytest.approx(eval_data["success_rate"])
    assert bars[0].ci95 == pytest.approx(tuple(eval_data["success_ci95"]), abs=1e-4)  # the eval's Wilson interval
    assert figures.main(["investigation", "--results", str(artifacts / "results"), "--out-dir", str(tmp_path)]) == 0
    assert_figure_files(tmp_path, "investigation")


def test_env_frame_measures_the_real_scene(tmp_path: Path) -> None:
    scene = figures.capture_scene(seed=0)
    assert scene["frame84"].shape == (84, 84, 3) and scene["frame480"].shape == (480, 480, 3)
    assert [k for k in scene["obs"]] == ["pixels", "proprioception", "achieved_goal", "desired_goal"]
    small, large = scene["footprints"][84], scene["footprints"][480]
    # At 84x84 after reset(seed=0) the puck covers 11 pixels, the goal marker 4 (the README's Figures section).
    assert small["puck"].pixel_count == 11 and small["goal"].pixel_count == 4
    for name in ("puck", "gripper", "goal"):
        assert large[name].pixel_count > 10 * small[name].pixel_count, f"{name} not larger at 480x480"
    figures.plot_env_frame(scene, tmp_path)
    assert_figure_files(tmp_path, "env-frame")


def test_encoder_progression_from_the_lab_measurement(tmp_path: Path) -> None:
    measured = figures.measure_encoders()
    assert [row["size"] for row in measured["NatureCNN"]] == [84, 20, 9, 7]
    assert [row["size"] for row in measured["ManipulationCNN"]] == [84, 42, 42, 42, 21]
    assert measured["ManipulationCNN"][-1]["footprint"] > measured["NatureCNN"][-1]["footprint"]
    assert figures.main(["encoder-progression", "--out-dir", str(tmp_path)]) == 0
    assert_figure_files(tmp_path, "encoder-progression")


LIGHT_FIGURES = """
import sys
import ch09_figures
run, results, out = sys.argv[1:]
assert ch09_figures.main(["loss-phases", "--run", run, "--out-dir", out]) == 0
assert ch09_figures.main(["investigation", "--results", results, "--out-dir", out]) == 0
heavy = sorted(name for name in ("torch", "stable_baselines3", "mujoco", "gymnasium_robotics") if name in sys.modules)
print("heavy modules:", heavy)
"""


def test_json_and_event_figures_import_no_torch_sb3_or_mujoco(artifacts: Path, tmp_path: Path) -> None:
    run_dir = artifacts / "runs" / f"ch09_{TAG}" / ENV_ID / f"seed{SEED}"
    proc = subprocess.run([sys.executable, "-c", LIGHT_FIGURES, str(run_dir), str(artifacts / "results"),
                           str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": "scripts"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heavy modules: []" in proc.stdout, proc.stdout
    assert_figure_files(tmp_path, "loss-phases")
    assert_figure_files(tmp_path, "investigation")


# ---------------------------------------------------------------------------------------------------------------
# The rules the figures apply (pure functions)
# ---------------------------------------------------------------------------------------------------------------
def test_phase_rule_on_a_hockey_stick() -> None:
    steps = np.arange(0, 100) * 1000
    success = np.interp(steps, [0, 40_000, 80_000, 99_000], [0.05, 0.05, 0.85, 0.85])  # flat, climb, plateau
    # Phase 2 from the last point at or below 10% (42K: 0.09, 43K: 0.11);
    # Phase 3 from the first point at 90% of the 0.85 maximum (76K: 0.77 >= 0.765)
    assert figures.detect_phases(steps, success) == (42_000, 76_000)
    blip = success.copy()
    blip[10] = 0.15  # one lucky evaluation early in Phase 1 does not start Phase 2
    assert figures.detect_phases(steps, blip) == (42_000, 76_000)
    assert figures.detect_phases(steps, np.full(steps.shape, 0.05)) is None  # no hockey stick: all Phase 1


def seed_result(tag: str, steps: int, rate: float, seed: int = 0) -> figures.SeedResult:
    return figures.SeedResult(tag, "FetchPush-v4", seed, steps, rate, 100, (0.0, 1.0))


def test_investigation_maps_tags_to_steps_and_finds_the_breakthrough() -> None:
    results = [seed_result("nature", 2_000_000, 0.05), seed_result("manip_noDrQ", 2_000_000, 0.06),
               seed_result("manip_noDrQ_criticEnc", 2_000_000, 0.30, seed=0),
               seed_result("manip_noDrQ_criticEnc", 2_000_000, 0.20, seed=1),
               seed_result("manip_noDrQ_criticEnc", 4_400_000, 0.95), seed_result("manip_criticEnc", 2_000_000, 0.03),
               seed_result("fullstate", 2_000_000, 0.89)]
    bars = figures.investigation_bars(results)
    assert [(b.step, b.tag) for b in bars] == [(0, "nature"), (1, "manip_noDrQ"), (2, "manip_noDrQ_criticEnc"),
                                              (3, "manip_noDrQ_criticEnc"), (4, "manip_criticEnc"),
                                              (None, "fullstate")]
    assert len(bars[2].seeds) == 2 and bars[2].mean == pytest.approx(0.25)
    assert figures.find_breakthrough(bars) == 3  # +65 points over the best earlier step
    assert figures.find_breakthrough(bars[:2]) is None  # no step beats the earlier ones by 25 points


def test_the_experiment_card_alone_is_step_3_and_a_seed_that_stopped_early_is_named() -> None:
    """Step 3 is Step 2's configuration trained past the investigation's budget, whatever else was run: the
    reproduce sweep's 5M results alone are Step 3. A seed evaluated only at a smaller budget is left out of its
    bar, and the bar says so, instead of turning the other seeds into 'Step 3'."""
    card = [seed_result("manip_noDrQ_criticEnc", 5_000_000, 0.9, seed=seed) for seed in range(3)]
    assert [(b.step, b.steps, len(b.seeds)) for b in figures.investigation_bars(card)] == [(3, 5_000_000, 3)]
    stopped = [seed_result("nature", 2_000_000, 0.1, seed=0), seed_result("nature", 2_000_000, 0.2, seed=1),
               seed_result("nature", 1_200_000, 0.9, seed=2),
               seed_result("manip_noDrQ_criticEnc", 2_000_000, 0.3, seed=0),
               seed_result("manip_noDrQ_criticEnc", 2_000_000, 0.4, seed=1),
               seed_result("manip_noDrQ_criticEnc", 1_000_000, 0.1, seed=2)]
    bars = figures.investigation_bars(stopped)
    assert [(b.step, b.steps, [s.seed for s in b.seeds]) for b in bars] == [(0, 2_000_000, [0, 1]),
                                                                            (2, 2_000_000, [0, 1])]
    assert [[(s.seed, s.steps) for s in b.left_out] for b in bars] == [[(2, 1_200_000)], [(2, 1_000_000)]]


def test_a_bar_refuses_seeds_of_different_step_counts() -> None:
    """aggregate's rule (stats.common_step_count): seeds a few steps apart fall into one bar, which names them."""
    results = [seed_result("manip_noDrQ_criticEnc", 2_000_000, 0.30, seed=0),
               seed_result("manip_noDrQ_criticEnc", 2_000_004, 0.20, seed=1)]
    results[1].source = "ch09_manip_noDrQ_criticEnc_FetchPush-v4_seed1_eval.json"
    with pytest.raises(figures.FigureInputError) as refused:
        figures.investigation_bars(results)
    assert str(refused.value).startswith("The results were evaluated at 2 different step counts "
                                         "(manip_noDrQ_criticEnc seed 0 at 2,000,000 steps, "
                                         "ch09_manip_noDrQ_criticEnc_FetchPush-v4_seed1_eval.json at 2,000,004 steps)")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one sentence on stderr, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------------------------
def test_missing_run_folder_is_one_sentence_from_the_command_line(tmp_path: Path) -> None:
    result = run_script(FIGURES, "loss-phases", "--run", str(tmp_path / "runs" / "nope"), "--out-dir",
                        str(tmp_path), timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], result.stderr


@pytest.mark.parametrize("figure, option, make", [
    ("loss-phases", "--run", lambda p: p.mkdir()),  # empty run folder
    ("investigation", "--results", lambda p: None),  # missing results folder
    ("investigation", "--results", lambda p: p.mkdir()),  # empty results folder
    ("investigation", "--results", lambda p: (p.mkdir(), (p / "notes.json").write_text("{}"))),  # nothing of ours
])
def test_bad_folders_give_one_sentence(figure, option, make, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "input"
    make(folder)
    assert figures.main([figure, option, str(folder), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(folder) in err, err
    assert not (tmp_path / "out").exists()


def test_phases_past_the_end_of_the_run_are_refused(artifacts: Path, tmp_path: Path, capsys) -> None:
    run_dir = artifacts / "runs" / f"ch09_{TAG}" / ENV_ID / f"seed{SEED}"
    assert figures.main(["loss-phases", "--run", str(run_dir), "--phases", "1M,2M", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "goes past the last step" in err and "400" in err, err
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("figure, option", [("loss-phases", "--run"), ("investigation", "--results")])
def test_a_file_where_a_folder_belongs_is_named(figure: str, option: str, tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "ch09_fullstate_FetchReach-v4_seed0_eval.json"
    a_file.write_text("{}")
    assert figures.main([figure, option, str(a_file), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file; pass the" in err and str(tmp_path) in err, err


@pytest.mark.parametrize("option, value", [("--phases", "2M"), ("--phases", "3M,1M"), ("--phases", "a,b"),
                                           ("--smoothing", "1.5")])
def test_bad_phase_options_are_one_sentence(option: str, value: str, tmp_path: Path, capsys) -> None:
    assert figures.main(["loss-phases", "--run", str(tmp_path), option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: ch09_figures.py loss-phases: {option}"), err


def test_a_misspelled_required_flag_is_named_not_reported_missing(capsys) -> None:
    """argparse reports a missing required flag before an unknown one: ``--chekpoint`` was answered "the following
    arguments are required: --checkpoint", never naming the typo."""
    with pytest.raises(SystemExit) as exit_info:
        figures.main(["rollout", "--chekpoint", "run.zip"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "unrecognized arguments: --chekpoint run.zip (did you mean --checkpoint?)" in err
    with pytest.raises(SystemExit):  # with nothing misspelled, the missing flag is still what is said
        figures.main(["rollout"])
    assert "the following arguments are required: --checkpoint" in capsys.readouterr().err


def test_each_figures_help_prints_its_text_as_written(capsys: pytest.CaptureFixture) -> None:
    """A subcommand's --help shows its description unformatted; the list of figures formats it ("95%%" -> "95%")."""
    for argv in (["investigation", "--help"], ["--help"]):
        with pytest.raises(SystemExit):
            figures.build_parser().parse_args(argv)
        out = capsys.readouterr().out
        assert "95% confidence intervals" in out and "%%" not in out, out
