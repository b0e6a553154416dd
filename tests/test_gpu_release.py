"""benchmarks/gpu_release.sh, the script the GPU calls run, end to end on tiny data on the CPU.

A GPU session has no time to debug it: the machine goes back after 30 s idle. This runs its
`start` and `wait` on generated data with tiny recipes and checks what it packs for the trip back.
"""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import make_cifar_dir
from mobileprune.models import build_mobilenet_v2, save_state_with_layout

ROOT = Path(__file__).resolve().parents[1]
TRAIN = """epochs = 1
batch_size = 20
lr = 0.01
warmup_epochs = 0
resolutions = [32]
eval_resolution = 32
eval_batch_size = 50
bf16 = false
"""


def recipe(tmp_path: Path, name: str, target: float, steps: int) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""description = "tiny"
[data]
val_size = 10
[baseline]
{TRAIN}
[finegrained]
target_size = 0.25
scan_sparsities = [0.5, 0.9]
scan_images = 10
eval_resolution = 32
[finegrained.train]
{TRAIN}kd_alpha = 0.5
[prune]
target_mflops = {target}
steps = {steps}
distill = true
[prune.finetune]
{TRAIN}kd_alpha = 0.5
[prune.recovery]
{TRAIN}kd_alpha = 0.5
""")
    return path


SCRIPT = ["bash", str(ROOT / "benchmarks" / "gpu_release.sh")]
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("setsid") is None,
                                reason="needs bash and setsid")


def release_env(tmp_path: Path, **settings: str) -> dict:
    """What a device call's environment would hold, on tiny data and recipes; results in tmp_path/out."""
    (tmp_path / "out").mkdir(exist_ok=True)
    return {**os.environ, "OUT": str(tmp_path / "out"), "RUN": str(tmp_path / "runs" / "tiny"), "THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DATA_DIR": str(make_cifar_dir(tmp_path / "d", per_batch=12, test=6)),
            "RECIPE_BASELINE": str(recipe(tmp_path, "base", 150, 1)),
            "RECIPE_20": str(recipe(tmp_path, "r20", 150, 2)), "RECIPE_45": str(recipe(tmp_path, "r45", 200, 1)),
            **settings}


def packed_names(tmp_path: Path) -> set[str]:
    pieces = sorted((tmp_path / "out").glob("results.tgz.*"))
    assert pieces
    (tmp_path / "results.tgz").write_bytes(b"".join(p.read_bytes() for p in pieces))
    with tarfile.open(tmp_path / "results.tgz") as tar:
        return set(tar.getnames())


@needs_bash
@pytest.mark.slow
def test_release_script_runs_and_packs_what_comes_back(tmp_path):
    env = release_env(tmp_path)
    run = Path(env["RUN"])

    # On a bare machine (the last one went back) there is nothing to wait for: say so at once.
    bare = subprocess.run(SCRIPT + ["wait", "5"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bare.returncode == 3 and "no pipeline" in bare.stderr

    subprocess.run(SCRIPT + ["start"], cwd=ROOT, env=env, check=True, capture_output=True)
    waited = subprocess.run(SCRIPT + ["wait", "600"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "pipeline DONE" in waited.stdout, waited.stdout + waited.stderr
    for log in run.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()

    names = packed_names(tmp_path)
    for stage in ("baseline", "finegrained", "prune", "prune-45", "prune-nokd"):
        assert f"tiny/{stage}/summary.json" in names, stage
    assert {"tiny/prune/mobilenet.pt", "tiny/prune/mobilenet.layout.json", "tiny/prune-45/mobilenet.pt",
            "tiny/finegrained/mobilenet.pt", "tiny/baseline/best.pt", "tiny/prune.log"} <= names
    # Only the last finished step's model travels (what a resumed schedule needs), no optimiser
    # states, no pickles: the .pth/.pte are rebuilt here with the pinned versions.
    assert "tiny/prune/step_2/finetune/best.pt" in names and "tiny/prune/step_1/finetune/best.pt" not in names
    assert not any(n.endswith(("last.pt", ".pth", ".pte", "pruned.pt")) for n in names)


@needs_bash
def test_release_script_runs_only_the_parts_asked_for(tmp_path):
    torch.manual_seed(0)
    weights, _ = save_state_with_layout(build_mobilenet_v2(), tmp_path, "dense")
    misspelt = subprocess.run(SCRIPT + ["start"], cwd=ROOT, env=release_env(tmp_path, PARTS="prune prune45"),
                              capture_output=True, text=True)
    assert misspelt.returncode == 2 and "unknown part 'prune45'" in misspelt.stderr

    env = release_env(tmp_path, PARTS="prune", BASELINE=str(weights))
    subprocess.run(SCRIPT + ["start"], cwd=ROOT, env=env, check=True, capture_output=True)
    waited = subprocess.run(SCRIPT + ["wait", "600"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "pipeline DONE" in waited.stdout, waited.stdout + waited.stderr
    stages = {name.split("/")[1] for name in packed_names(tmp_path) if name.endswith("/summary.json")}
    assert stages == {"prune"}  # no baseline trained (one was given), and none of the other three parts
