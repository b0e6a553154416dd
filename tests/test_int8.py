"""The int8 program: export --int8, its checks, grade/package --int8, the native runner, profile and bench."""
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from mobileprune.bench import bench, profile, turns
from mobileprune.cli import main
from mobileprune.data import read_cifar_bin
from mobileprune.errors import MobilepruneError
from mobileprune.evaluate import format_grade, grade, predict
from mobileprune.export import INT8_PTE, PteModel, check_int8_pte_matches, export_int8_pte, quantize_int8
from mobileprune.models import save_pickled_model

from conftest import built_once, make_cifar_dir, tp_pruned_model

RUNNER = Path(__file__).resolve().parents[1] / "build" / "xnn_executor_runner"


@pytest.fixture(scope="session")
def int8_data(tmp_path_factory):
    # 5,150 training images: the 5,000 validation images held out, 150 left for 64 to calibrate on and 64 to check.
    return built_once(tmp_path_factory, "int8-data", lambda folder: make_cifar_dir(folder, per_batch=1030, test=48)) \
        / "cifar-10-batches-bin"


@pytest.fixture(scope="session")
def hand_in(pruned_model, int8_data, tmp_path_factory):
    """``mobileprune export MODEL --out OUT --int8`` on a small pruned model: OUT/model/ (built once a run:
    the tests here only read it)."""
    def export(out: Path):
        save_pickled_model(pruned_model, out / "in.pth")
        assert main(["--no-progress", "export", str(out / "in.pth"), "--out", str(out), "--int8", "--calibration",
                     "64", "--data", str(int8_data)]) == 0

    return built_once(tmp_path_factory, "int8-export", export) / "model"


@pytest.mark.slow
def test_export_int8_writes_a_checked_whole_xnnpack_program(hand_in):
    record = json.loads((hand_in / "mobilenet.int8.json").read_text())
    assert record["calibration_images"] == 64 and record["check_inputs"] == 64 and record["observer"] == "minmax"
    assert record["outside_delegate"] == []  # all in XNNPACK: any runner that runs the fp32 program runs this
    assert record["agreement"] >= 0.9 and record["relative_error"] <= 0.35
    # int8 weights: about a quarter of the fp32 program's bytes
    assert (hand_in / INT8_PTE).stat().st_size < 0.4 * (hand_in / "mobilenet.pte").stat().st_size


def test_the_int8_program_runs_int8_kernels_and_the_profile_says_where_time_goes(hand_in):
    rows = profile([hand_in / "mobilenet.pte", hand_in / INT8_PTE], threads=1, runs=5)
    fp32 = {r.operator: r for r in rows if r.program.endswith("/mobilenet.pte")}
    int8 = {r.operator: r for r in rows if r.program.endswith(INT8_PTE)}
    assert any("QC8" in name for name in int8) and not any("F32" in name for name in int8)
    assert any("F32" in name for name in fp32) and not any("QC8" in name for name in fp32)
    for table in (fp32, int8):
        whole = table.pop("whole execution")
        assert whole.median_ms > 0 and whole.share == 1
        # The operators' medians add up to most of the whole run's; not to half of it beside another
        # busy process (`make test`'s second worker), whose preemptions land between operators.
        assert 0.25 * whole.median_ms < sum(r.median_ms for r in table.values()) <= 1.05 * whole.median_ms
        assert sum(r.count for r in table.values()) == whole.count > 20  # one event per XNNPACK operator


def test_modules_kept_in_fp32_stay_float_and_unknown_names_are_refused(pruned_model, int8_data):
    # The quantized graph, not its lowering (15 s more): XNNPACK runs what the quantizer leaves float in fp32.
    images = read_cifar_bin(int8_data / "data_batch_1.bin")[0]
    quantized = quantize_int8(pruned_model, images[:32], keep_fp32=("classifier",), observer="histogram")
    weights = {}  # module name: what feeds its weight, a dequantized int8 tensor or the float parameter
    for node in quantized.graph.nodes:
        if node.op == "call_function" and str(node.target) in ("aten.conv2d.default", "aten.linear.default"):
            module = list(node.meta["nn_module_stack"].values())[-1][0]
            weights[module] = "dequantize" in str(getattr(node.args[1], "target", ""))
    assert weights.pop("classifier.1") is False
    assert len(weights) == 52 and all(weights.values())  # every convolution quantized
    with pytest.raises(MobilepruneError, match="no module named features.99"):
        quantize_int8(pruned_model, images[:4], keep_fp32=("features.99",))


def test_an_int8_program_of_another_model_is_refused(hand_in, int8_data):
    other = tp_pruned_model(seed=1)
    with pytest.raises(MobilepruneError, match="differs from eager"):
        check_int8_pte_matches(other, hand_in / INT8_PTE, int8_data)


@pytest.mark.slow
def test_grade_int8_measures_the_int8_program_as_it_measures_the_fp32_one(hand_in, int8_data, tmp_path):
    result = grade(hand_in, data=int8_data, int8=True, progress=False)
    assert result.pte_file.endswith(INT8_PTE)
    images, labels = read_cifar_bin(int8_data / "test_batch.bin")
    for variant, found in result.pte_accuracy.items():
        assert found == (predict(PteModel(hand_in / INT8_PTE), images, variant) == labels).float().mean().item()
    assert ".int8.pte" in format_grade(result)
    assert main(["--no-progress", "grade", str(hand_in), "--int8", "--no-runner", "--data", str(int8_data),
                 "--save", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "grade.int8.json").read_text())["pte_file"].endswith(INT8_PTE)
    assert not (tmp_path / "grade.json").exists()  # the fp32 grade is not overwritten


def test_grade_and_package_int8_without_an_int8_program_say_how_to_make_one(pruned_model, int8_data, tmp_path,
                                                                              capsys):
    save_pickled_model(pruned_model, tmp_path / "mobilenet.pth")
    assert main(["grade", str(tmp_path), "--int8", "--data", str(int8_data)]) == 2
    assert main(["package", "--id", "x", "--model-dir", str(tmp_path), "--int8", "--data", str(int8_data)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("mobilenet.int8.pte" in line and "--int8" in line for line in lines)


def test_package_int8_hands_in_the_int8_program_as_model_mobilenet_pte(hand_in, int8_data, tmp_path):
    from mobileprune.package import package

    archive, result = package("s1", hand_in, tmp_path, data=int8_data, runner=tmp_path / "none", progress=False,
                              int8=True)
    with zipfile.ZipFile(archive) as z:
        assert z.read("model/mobilenet.pte") == (hand_in / INT8_PTE).read_bytes()
    assert result.images == 48 and result.pte_accuracy is not None


def test_the_native_runner_runs_the_int8_program(hand_in, int8_data, tmp_path):
    if not RUNNER.is_file():
        pytest.skip("runner not built: make runner")
    folder = tmp_path / "submission"
    (folder / "model").mkdir(parents=True)
    (folder / "data").mkdir()
    shutil.copy(hand_in / INT8_PTE, folder / "model" / "mobilenet.pte")  # as package --int8 lays it out
    shutil.copy(int8_data / "test_batch.bin", folder / "data" / "test_batch.bin")
    out = subprocess.run([str(RUNNER), "--model_path", "model/mobilenet.pte", "--predictions", "p.txt"], cwd=folder,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ours = [int(line) for line in (folder / "p.txt").read_text().split()]
    images, _ = read_cifar_bin(int8_data / "test_batch.bin")
    assert ours == predict(PteModel(hand_in / INT8_PTE), images, "torchvision").tolist()


def test_bench_turns_interleave_the_models_and_rotate_their_order():
    order = turns(3, warmup=10, repeats=8, rounds=3)
    assert len(order) == 9
    rounds = [order[i:i + 3] for i in range(0, 9, 3)]
    assert [[model for model, _, _ in r] for r in rounds] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    for model in range(3):
        mine = [(warmup, count) for m, warmup, count in order if m == model]
        assert sum(count for _, count in mine) == 8 and mine[0][0] == 10 and all(w == 1 for w, _ in mine[1:])


def test_bench_times_fp32_and_int8_side_by_side(hand_in):
    results = bench([hand_in / "mobilenet.pte", hand_in / INT8_PTE], threads=(1,), warmup=1, repeats=4, rounds=2)
    assert [Path(r.model).name for r in results] == ["mobilenet.pte", INT8_PTE]
    assert all(0 < r.median_ms <= r.p90_ms for r in results)
    with pytest.raises(MobilepruneError, match="rounds 5 must be between 1 and"):
        bench([hand_in / INT8_PTE], repeats=4, rounds=5)
