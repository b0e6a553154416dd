"""Writes ``lab2.ipynb`` from the cells below and executes it (``make notebook``; ``--no-execute``).

The notebook is the lab's hand-in: every answer is computed by mobileprune from saved results
(``mobileprune.report.find_results``), so the text here holds no figures of its own.
"""
import re
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# Lab 2: Prune MobileNet, filled in with mobileprune

MobileNetV2 (torchvision, classifier `Dropout(0.2), Linear(1280, 10)`) on CIFAR-10 resized 32→224.
Part 1 prunes single weights (fine-grained), Part 2 removes whole channels with Torch-Pruning and
hands in `mobilenet.pth` + `mobilenet.pte`. Every figure below is computed from the results folder
named by the first cell (the release, else a CPU run's results); cells that train run only when a
GPU is present."""),
    ("code", """import json
import os
import tempfile
from pathlib import Path

import torch
import torch_pruning as tp
from IPython.display import Image, Markdown, display

from mobileprune import finegrained as fg
from mobileprune.data import find_data_dir, read_cifar_file
from mobileprune.errors import MobilepruneError
from mobileprune.evaluate import accuracy, lab_score
from mobileprune.models import build_mobilenet_v2
from mobileprune.recipes import load_recipe
from mobileprune.report import find_results, markdown_table, project_root, prune_rows, read_schedule

os.environ.setdefault("TQDM_DISABLE", "1")
PROJECT = project_root()  # wherever the notebook is opened from
os.chdir(PROJECT)  # data and results are found relative to the project, as the CLI finds them
HAS_GPU = torch.cuda.is_available()
RESULTS = find_results(PROJECT, stages=("finegrained", "prune"))  # the notebook answers both parts
summary = {k: json.loads((RESULTS / k / "summary.json").read_text()) for k in ("baseline", "finegrained", "prune")
           if (RESULTS / k / "summary.json").is_file()}
try:
    recipe = load_recipe(RESULTS.name)
    print(f"results: {RESULTS.relative_to(PROJECT) if RESULTS.is_absolute() else RESULTS} (recipe {recipe['name']!r}: {recipe.get('description', '')})")
except MobilepruneError:
    recipe = {}
    print(f"results: {RESULTS.relative_to(PROJECT) if RESULTS.is_absolute() else RESULTS}")
print(f"GPU present: {HAS_GPU}")"""),
    ("md", """### Training (GPU only)
The whole pipeline is `mobileprune run --recipe R`: dense baseline, Part 1, Part 2, export, grade,
report, each stage resumable. On a GPU this cell trains the release recipe (baseline, then Part 2
to 20 MFLOPs) unless its results exist; on a CPU it does nothing and the cells below read the
saved results."""),
    ("code", """TRAIN_RUN = PROJECT / "runs" / "lab2-20"
if HAS_GPU and not (TRAIN_RUN / "prune" / "summary.json").is_file():
    from mobileprune.pipeline import run_pipeline

    release = {**load_recipe("baseline"), "prune": load_recipe("lab2-20")["prune"], "name": "lab2-20"}
    run_pipeline(release, find_data_dir(), TRAIN_RUN, device="cuda")
    RESULTS = TRAIN_RUN
else:
    print("no training here:", "results exist" if HAS_GPU else "no GPU, reading", RESULTS)"""),
    ("md", """## Part 1: fine-grained pruning

### Question 1: the weight distribution
What do the weight distributions of the layers have in common, and why does that help pruning?"""),
    ("code", """display(Image(RESULTS / "finegrained" / "plots" / "weights_dense.png"))"""),
    ("md", """Every layer's weights are centred near zero, most of them bell-shaped with the mass in a peak
around zero and thin tails. They differ in scale: the range shrinks several-fold with depth as
fan-in grows (read the x axes: the stem and first blocks are the widest), and the depthwise layers
(`fN.1.0`) are skewed or even two-humped. Since most weights are close to zero, zeroing the
smallest ones changes each layer's output little: that is what makes magnitude pruning work, and
the differing scales are why each layer gets its own threshold (a per-layer sparsity) rather than
one global magnitude cut."""),
    ("md", """### Question 2: `fine_grained_prune`
`mobileprune.finegrained.fine_grained_prune(tensor, sparsity)` zeroes `round(numel × sparsity)`
weights of smallest magnitude in place and returns the mask. The lab's check on its 5×5 tensor:"""),
    ("code", """import inspect

print(inspect.getsource(fg.fine_grained_prune))
test_tensor = torch.tensor([[-0.46, -0.40, 0.39, 0.19, 0.37],
                            [0.00, 0.40, 0.17, -0.15, 0.16],
                            [-0.20, -0.23, 0.36, 0.25, 0.03],
                            [0.24, 0.41, 0.07, 0.13, -0.15],
                            [0.48, -0.09, -0.36, 0.12, 0.45]])
expected_mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 1]])
pruned = test_tensor.clone()
mask = fg.fine_grained_prune(pruned, 0.75)
print("mask at sparsity 0.75:\\n", mask.int())
print("matches the lab's expected mask:", torch.equal(mask.int(), expected_mask))"""),
    ("md", """### Question 3: the sparsity that leaves 10 non-zeros
25 weights with 10 left means 15 zeros: sparsity = 15 / 25 = 0.6. Checked:"""),
    ("code", """target_sparsity = 1 - 10 / test_tensor.numel()
pruned = test_tensor.clone()
fg.fine_grained_prune(pruned, target_sparsity)
print(f"sparsity {target_sparsity:.2f} leaves {int(pruned.count_nonzero())} non-zeros of {test_tensor.numel()}")"""),
    ("md", """### Question 4: sensitivity scan
Each layer is pruned alone at each sparsity and the model's accuracy is measured on the validation
split (never the test set); the grey line is the dense accuracy and the red line each layer's
chosen sparsity."""),
    ("code", """scan = json.loads((RESULTS / "finegrained" / "sensitivity.json").read_text())
display(Image(RESULTS / "finegrained" / "plots" / "sensitivity.png"))
rows = [{"sparsity": s, "mean": sum(a[i] for a in scan["accuracy"].values()) / len(scan["accuracy"]),
         "worst": min(a[i] for a in scan["accuracy"].values())} for i, s in enumerate(scan["sparsities"])]
display(Markdown(f"Dense validation accuracy on the scan's images: {scan['dense']:.4f}\\n\\n"
                 + markdown_table(rows, {"sparsity": ".2f", "mean": ".4f", "worst": ".4f"})))"""),
    ("md", """The higher the sparsity, the lower the accuracy, and the loss grows faster than linearly
toward high sparsity. The layers are not equally sensitive: the table above shows the mean
against the worst layer. The most sensitive layers at the highest scanned sparsity up to 0.9:"""),
    ("code", """probe = max(s for s in scan["sparsities"] if s <= 0.9)
ranking = fg.sensitivity_ranking(scan, probe)
params = {n: p.numel() for n, p in fg.prunable_parameters(build_mobilenet_v2()).items()}
display(Markdown(f"Accuracy lost with one layer at sparsity {probe:g}:\\n\\n" + markdown_table(
    [{"layer": n, "loss": d, "parameters": params[n]} for n, d in ranking[:6]],
    {"layer": "", "loss": ".4f", "parameters": ","})
    + "\\n\\nLeast sensitive: " + ", ".join(f"`{n}` ({d:.4f})" for n, d in ranking[-3:])))"""),
    ("md", """### Question 5: the per-layer sparsity dict
The lab fills the dict by hand; mobileprune chooses it from the scan: starting from dense, it
raises one layer's sparsity at a time, always the step that saves the most bits per predicted
accuracy point lost, until the size target is met (`mobileprune finegrained --target-size 0.25`;
a dict by hand: `--sparsity-json`). Below, the chosen dict, then the layers it prunes hardest and
least with their parameter counts: large layers with flat curves are where bits are cheap."""),
    ("code", """sparsity = json.loads((RESULTS / "finegrained" / "sparsity.json").read_text())
display(Image(RESULTS / "finegrained" / "plots" / "sparsity.png"))
print("sparsity_dict = {")
for name, value in sparsity.items():
    print(f"    {name!r}: {value:.2f},")
print("}")
by_sparsity = sorted(sparsity.items(), key=lambda item: -item[1])
for title, chosen in (("pruned hardest", by_sparsity[:4]), ("pruned least", by_sparsity[-4:])):
    print(title + ": " + ", ".join(f"{n} {v:.2f} ({params[n]:,} params)" for n, v in chosen))
s = summary["finegrained"]
print(f"size: {s['relative_size_after']:.2%} of dense (target {s['target_size']:.0%}; "
      f"{s['size_mib']:.2f} MiB of non-zeros against {s['dense_size_mib']:.2f} MiB)")"""),
    ("md", """### Question 6: accuracy before and after fine-tuning
"Before fine-tuning" is measured after BatchNorm's running statistics are re-estimated on training
images (`[finegrained] bn_recalibration_images`): with the dense model's statistics, which no
longer fit the pruned layers, a pruned model can score at chance while its weights are mostly
intact (the summary below gives both). Fine-tuning keeps the masks (re-applied after every
optimiser step, so pruned weights stay zero), distilled from the dense model where the recipe asks
for it (`[finegrained] distill`); the epoch is chosen on the validation split."""),
    ("code", """display(Markdown((RESULTS / "finegrained" / "summary.md").read_text().split("\\n", 2)[2]))"""),
    ("md", """## Part 2: channel pruning

### The approach
- **Structure**: Torch-Pruning's dependency graph removes whole channels, keeping every residual
  connection consistent, and returns a plain torchvision MobileNetV2 (no masks): fewer channels
  are fewer FLOPs and a faster `.pte`, where Part 1's zeros were not.
- **Landing on the target**: each prune step searches Torch-Pruning's pruning ratio by bisection,
  counting MFLOPs exactly as the grader does after every candidate, then a global step over the
  cheap 14- and 7-px blocks takes it to within 0.5 MFLOPs below the step's budget.
- **Schedule**: budgets fall geometrically from 319 MFLOPs to the target in N steps, each followed
  by a short fine-tune; then a longer recovery. A model whose recovery was still climbing is
  trained further with its channels unchanged (`mobileprune recover`, kept only if validation
  improves): the `recover` rows below, when there are any. Two such checkpoints of one model can
  also be averaged weight by weight (`mobileprune average`, the interpolation kept only if it
  beats both on validation): an `average` row.
- **Recovery**: SGD with Nesterov momentum, cosine learning rate, label smoothing, and knowledge
  distillation from the dense model (KL at temperature 4 mixed with cross-entropy).

The schedule of these results (validation accuracy after each prune and fine-tune):"""),
    ("code", """schedule = read_schedule(RESULTS / "prune" / "schedule.csv")
display(Markdown(markdown_table(schedule, {"step": "", "budget": ".2f", "mflops": ".2f", "params": ",.0f",
                                           "val_pruned": ".4f", "val_finetuned": ".4f"})))
display(Image(RESULTS / "prune" / "schedule.png"))
display(Image(RESULTS / "prune" / "channels.png"))"""),
    ("md", """### What was tried, and what each bought
The channel-pruning runs of the release's small-scale study (`release/ablations/cpu-small`, 64 px on
a CPU), each one change against `prune/`, all from the same baseline to the same target:
criterion, global or per-layer ranking, resolution weighting (high-resolution blocks pruned
harder), distillation."""),
    ("code", """ABLATION = PROJECT / "release" / "ablations" / "cpu-small"
if not (ABLATION / "prune-nokd" / "summary.json").is_file():
    ABLATION = RESULTS  # no comparison here: the hand-in alone
print(f"runs in {ABLATION.relative_to(PROJECT) if ABLATION.is_absolute() else ABLATION}")
runs = prune_rows(ABLATION)
display(Markdown(markdown_table(runs, {"run": "", "MFLOPs": ".2f", "criterion": "", "global": "",
                                       "resolution weighting": "g", "KD": "", "validation": ".4f", "test": ".4f"})))
reference = next(r for r in runs if r["run"] == "prune")
for r in runs:
    if r is not reference:
        print(f"{r['run']}: validation {r['validation'] - reference['validation']:+.4f} against prune/ (the hand-in)")"""),
    ("md", """### The hand-in: MFLOPs the grader's way
The grader unpickles the whole model and counts operations with Torch-Pruning:"""),
    ("code", """handin = RESULTS / "prune"
model = torch.load(handin / "mobilenet.pth", weights_only=False)  # our own file: the grader's exact call
ops, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, 224, 224))
print(f"MFLOPs {ops / 1e6:.6f}, parameters {params:,} ({ops / 1e6 / 318.969098:.1%} of dense)")"""),
    ("md", """### The `.pte`: same predictions, accuracy, latency
The ExecuTorch (XNNPACK) program must compute what the `.pth` computes; then its accuracy on the
test batch at 224 px, as the lab's runner measures it (here on the first 1,000 test images; the
grade below has more), and its latency against the dense model's on this machine's CPU."""),
    ("code", """from mobileprune.bench import bench, format_bench
from mobileprune.export import export_pte
from mobileprune.models import build_mobilenet_v2

# Latency does not depend on the weights' values: a freshly built dense model times the same.
# Timed first, before this process loads a .pte (each timing runs in a fresh process anyway).
# The int8 program (export --int8), when there is one, is timed in the same interleaved rounds.
programs = [handin / "mobilenet.pte"] + [p for p in [handin / "mobilenet.int8.pte"] if p.is_file()]
with tempfile.TemporaryDirectory() as tmp:
    dense_pte = export_pte(build_mobilenet_v2().eval(), Path(tmp) / "dense.pte", check=False)
    timings = bench([dense_pte, *programs], threads=(1,), warmup=5, repeats=30)
print(format_bench(timings))"""),
    ("code", """from mobileprune.export import PteModel, check_pte_matches

# Eager work first: this process then loads the .pte (ExecuTorch's thread pool and torch's do not mix).
trained_px = recipe.get("prune", {}).get("finetune", {}).get("eval_resolution", 224)
try:
    images, labels = read_cifar_file(find_data_dir() / "test_batch.bin")
    images, labels = images[:1000], labels[:1000]
    at_trained = accuracy(model, images, labels, size=trained_px)
except MobilepruneError as e:
    images = None
    print(f"no test data here ({e})")
print(f"largest |pte - eager| logit difference: {check_pte_matches(model, handin / 'mobilenet.pte'):.2e}")
if images is not None:
    pte_accuracy = accuracy(PteModel(handin / "mobilenet.pte"), images, labels, batch_size=100)
    print(f".pte accuracy on the first 1,000 test images at 224 px: {pte_accuracy:.4f}")
    if trained_px != 224:
        print(f"note: recipe {recipe['name']!r} trains and validates at {trained_px} px; at {trained_px} px the same "
              f"model scores {at_trained:.4f}. The grader feeds 224 px, which this model never saw.")"""),
    ("md", """### The lab's score
Score = ((200 − MFLOPs) / 155 − 10 · max(0, 0.92 − accuracy)) × 45 %, from `mobileprune grade` on the
hand-in folder (the `.pte`'s accuracy under the runner's resize):"""),
    ("code", """grade = json.loads((RESULTS / "grade.json").read_text())
print((RESULTS / "grade.txt").read_text())
print(f"score recomputed: {lab_score(grade['mflops'], grade['score_accuracy']):.2f} %")"""),
    ("md", """### Beside the hand-in: its int8 program
`mobileprune export --int8` quantizes the same model after training (int8 weights per channel,
activations calibrated on training images) into one XNNPACK program that takes and returns floats,
so the lab's runner runs it as it runs the fp32 one; `mobileprune grade --int8` grades it the same
way. Its grade, when there is one:"""),
    ("code", """int8_grade = handin / "grade.int8.txt"
print(int8_grade.read_text() if int8_grade.is_file() else "no int8 grade here (mobileprune grade DIR --int8 --save DIR)")"""),
    ("md", """### Where the hand-in stands
Test accuracy against MFLOPs of every result here, beside the public hand-ins of this lab, the 92 %
bar and the lab score's contour lines; the star is the hand-in. Drawn from the results' files, as
`mobileprune report` draws it; every model was chosen on validation, the test set only reported."""),
    ("code", """from mobileprune.report import pareto_points, plot_pareto

points, hand_in = pareto_points(RESULTS)
display(Image(plot_pareto(points, Path(tempfile.mkdtemp()) / "accuracy_vs_mflops.png", hand_in)))"""),
]


NOTEBOOK = Path(__file__).with_name("lab2.ipynb")
# Lines the ExecuTorch runtime and torch.export print to stderr on every load: not results.
RUNTIME_NOISE = re.compile(r"^\s*(\[cpuinfo_utils\.cpp|\[threadpool\.cpp|W\d{4} .*_pytree\.py)")


def build() -> nbformat.NotebookNode:
    make = {"md": new_markdown_cell, "code": new_code_cell}
    notebook = new_notebook(cells=[make[kind](text) for kind, text in CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


def execute(notebook: nbformat.NotebookNode, timeout: int = 900) -> nbformat.NotebookNode:
    """Run every cell in the project root's notebooks/ folder; raises on the first error."""
    from nbclient import NotebookClient

    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        merged = []  # ExecuTorch's C++ logs arrive in fragments: join consecutive streams first
        for output in cell.outputs:
            if output.output_type == "stream" and merged and merged[-1].get("name") == output.name:
                merged[-1]["text"] += output.text
            else:
                merged.append(output)
        cell["outputs"] = []
        for output in merged:
            if output.get("name") == "stderr":
                kept = [line for line in output.text.splitlines() if line.strip() and not RUNTIME_NOISE.match(line)]
                if not kept:
                    continue
                output["text"] = "\n".join(kept) + "\n"
            cell.outputs.append(output)
    return notebook


if __name__ == "__main__":
    notebook = build()
    if "--no-execute" not in sys.argv:
        execute(notebook)
    nbformat.write(notebook, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")
