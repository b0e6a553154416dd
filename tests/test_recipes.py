"""Every shipped recipe parses the way its stages will; a typo is named at load time."""
import pytest

from mobileprune.errors import MobilepruneError
from mobileprune.recipes import PROJECT_RECIPES, load_recipe


@pytest.mark.parametrize("path", sorted(PROJECT_RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipe_loads(path):
    recipe = load_recipe(path.stem)
    assert recipe["description"] and ({"baseline", "finegrained", "prune", "recover", "teacher", "students", "distill"}
                                      & set(recipe))


@pytest.mark.parametrize("table, message", [
    ('[data]\nval_sise = 10\n', "unknown [data] settings ['val_sise']"),
    ('[baseline]\nepochs = 1\nlearning_rate = 0.1\n', "unknown training settings ['learning_rate']"),
    ('[finegrained]\ntarget_size = 25\n', "target_size 25.0 must be a fraction"),
    ('[finegrained]\nbn_recalibration_images = -5\n', "bn_recalibration_images must be 0 (off) or more"),
    ('[prune]\ntarget_mflops = 20\nbn_recalibration_images = -1\n', "bn_recalibration_images must be 0"),
    ('[finegrained]\nscan_bn_recalibration_images = "all"\n', "scan_bn_recalibration_images must be 0 (off) or more"),
    ('[prune]\ntarget_mflops = 20\nbn_recalibration_images = 2.5\n', "got 2.5"),
    ('[finegrained.train]\nresize_variants = ["bicubic"]\n', "unknown resize variant 'bicubic'"),
    ('[prune]\nsteps = 2\n', "[prune] needs target_mflops"),
    ('[prune]\ntarget_mflops = 20\n[prune.prune]\nimportance = "l3"\n', "unknown importance 'l3'"),
    ('[prune]\ntarget_mflops = 20\n[prune.prune]\nglobal = true\n', "unknown prune settings ['global']"),
    ('[prune]\ntarget_mflops = 20\n[prune.recovery]\nepoch = 3\n', "unknown training settings ['epoch']"),
    ('[students]\ntargets = 20\n', "[students] targets must be a list of positive MFLOPs"),
    ('[students]\ntargets = [20]\n[students.prune]\nimportance = "l3"\n', "unknown importance 'l3'"),
    ('[teacher]\nwidth = [64]\n', "unknown [teacher] settings ['width']"),
    ('[teacher]\ndepth = 4\n', "[teacher] depth must be 2 or 3"),
    ('[distill]\nbudget_s = -1\n', "[distill] budget_s must be a positive number"),
    ('[distill]\nresize_variants = ["nearest"]\n', "unknown resize variant 'nearest'"),
    ('[distill]\nema_decay = 1.5\n', "ema_decay must be in [0, 1)"),
])
def test_recipe_mistakes_are_named_at_load(tmp_path, table, message):
    path = tmp_path / "typo.toml"
    path.write_text('description = "x"\n' + table)
    with pytest.raises(MobilepruneError) as e:
        load_recipe(path)
    assert message in str(e.value) and "typo.toml" in str(e.value)


def test_students_stem_stride_is_range_checked_when_the_recipe_loads():
    from mobileprune.channel import StudentsConfig

    assert StudentsConfig.from_dict({"stem_stride": 7}).stem_stride == 7
    with pytest.raises(MobilepruneError, match="stem stride must be a whole number from 1 to 16"):
        StudentsConfig.from_dict({"stem_stride": 40})


def test_students_take_a_stride_plan_that_agrees_with_their_stem_stride():
    from mobileprune.channel import StudentsConfig, student_name, student_strides

    config = StudentsConfig.from_dict({"strides": {"features.2": 1}, "stem_stride": 7})
    assert config.stride_plan() == {"features.2": 1, "features.0": 7}
    with pytest.raises(MobilepruneError, match="stem_stride 5 and strides features.0 = 7 disagree"):
        StudentsConfig.from_dict({"strides": {"features.0": 7}, "stem_stride": 5})
    with pytest.raises(MobilepruneError, match="not a block that downsamples"):
        StudentsConfig.from_dict({"strides": {"features.1": 1}})
    assert student_name(20, {}) == "student-20" and student_name(20, 7) == "student-20-stride7"
    assert student_name(20, {"features.0": 7, "features.2": 1}) == "student-20-f0s7-f2s1"
    assert student_strides({"stem_stride": 7}) == {"features.0": 7}  # a student.json from before stride plans
    assert student_strides({"stem_stride": 7, "strides": {"features.0": 7, "features.2": 1}}) == \
        {"features.0": 7, "features.2": 1}
