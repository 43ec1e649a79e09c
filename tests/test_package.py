"""The package's shape: clean imports (no flags, no cycles, lazy imports included), the command
lines and the console script, the summary."""

import ast
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from sda_jax.stopwatch import Stopwatch
from sda_jax.workdir import run_summary
from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "sda_jax"
MODULES = sorted(
    ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
)


def test_importing_any_module_defines_no_flags():
    # Libraries (absl, orbax) define flags of their own on import; ours are defined only when a
    # command starts. tfds_afqmc imports TensorFlow (it registers a TFDS builder); it is only imported on demand.
    modules = [m for m in MODULES if not m.startswith("sda_jax.data.tfds.afqmc")]
    assert "sda_jax.commands" in modules and "sda_jax.train" in modules and "sda_jax.export" in modules
    code = (
        "import importlib, sys\n"
        "from absl import flags\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "ours = [f for f in flags.FLAGS if (flags.FLAGS.find_module_defining_flag(f) or '').startswith(('sda_jax', 'configs'))]\n"
        "print(sorted(ours))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout


def _imports_of(path: pathlib.Path) -> set[str]:
    """The sda_jax modules a file imports anywhere: at module level, inside functions (lazy) and in
    its `__main__` block, since each of them closes a circle as surely when it runs."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES}


def test_no_import_cycles():
    graph = {
        ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): _imports_of(path)
        for path in PACKAGE.rglob("*.py")
    }
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return
        assert module not in visiting, f"import cycle: {' -> '.join([*visiting[visiting.index(module):], module])}"
        visiting.append(module)
        for dependency in graph.get(module, ()):
            if dependency != module and not module.startswith(dependency + "."):
                visit(dependency)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_tfds_modules_import_each_other_one_way():
    # The source imports the builder (to register it); the builder package nothing of the source.
    for path in (PACKAGE / "data" / "tfds" / "afqmc").glob("*.py"):
        assert "sda_jax.data.tfds.source" not in _imports_of(path), path
    assert "ClueAfqmc" not in (PACKAGE / "data" / "tfds" / "source.py").read_text()  # no isinstance checks on our builder


def test_the_config_layer_imports_no_data_or_model_module():
    assert _imports_of(PACKAGE / "config.py") <= {"sda_jax.errors"}


def _imports_of_folder(folder: pathlib.Path) -> set[str]:
    return set().union(*(_imports_of(path) for path in folder.rglob("*.py")))


def _under(modules: set[str], *packages: str) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)}


def test_the_stages_import_down_the_data_flow_only():
    """data -> models (+ kernels) -> step -> evaluation -> hf: data asks no model, and the model
    files compute the recipe's plain blocks, the GPU forms reaching them only as a value."""
    assert not _under(_imports_of_folder(PACKAGE / "data"), "sda_jax.models", "sda_jax.kernels", "sda_jax.step")
    assert not _under(_imports_of_folder(PACKAGE / "models"), "sda_jax.kernels", "sda_jax.step", "sda_jax.data")
    assert not _under(_imports_of_folder(PACKAGE / "kernels"), "sda_jax.step", "sda_jax.run", "sda_jax.evaluation")


def _all_imports(folder: pathlib.Path) -> set[str]:
    """Every module name a folder's Python files import (any package)."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
    return found


def test_nothing_imports_the_tests_and_benchmarks_and_tests_keep_apart():
    """The PyTorch oracle lives in reference/, which both the tests and the benchmarks read; only
    the benchmarks' own tests (tests/benchmarks/) import a benchmark."""
    is_tests = lambda names: {n for n in names if n == "tests" or n.startswith("tests.")}
    is_benchmarks = lambda names: {n for n in names if n == "benchmarks" or n.startswith("benchmarks.")}
    assert not is_tests(_all_imports(PACKAGE)) and not is_benchmarks(_all_imports(PACKAGE))
    assert not is_tests(_all_imports(REPO_ROOT / "benchmarks"))
    for folder in (REPO_ROOT / "tests").iterdir():
        if folder.is_dir() and folder.name != "benchmarks":
            assert not is_benchmarks(_all_imports(folder)), folder
    assert not is_tests(_all_imports(REPO_ROOT / "reference")) and not is_benchmarks(_all_imports(REPO_ROOT / "reference"))


def test_no_test_imports_another_test():
    """Shared helpers live in tests/conftest.py or a helper module (tests/e2e/resume_runs.py), not in a test file."""
    for path in (REPO_ROOT / "tests").rglob("test_*.py"):
        imported = [name for name in _all_imports(path.parent) if name.split(".")[-1].startswith("test_")]
        assert not imported, (path.parent, imported)


ROOT_MODULES = {"__init__", "cli", "commands", "config", "errors", "export", "merge_sweeps", "pretrain", "stopwatch", "train"}


def test_the_package_root_holds_the_commands_the_config_and_the_ground_floor():
    assert {path.stem for path in PACKAGE.glob("*.py")} == ROOT_MODULES
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert folders == {"data", "models", "kernels", "step", "evaluation", "hf", "run", "parallel", "workdir"}


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(REPO_ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def _code_strings(path: pathlib.Path) -> list[str]:
    """The string constants of a module's code: its docstrings and comments left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body and isinstance(node.body[0], ast.Expr)
    }  # fmt: skip
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_the_workdir_layout_is_known_to_one_module():
    """The names of a run folder's files and folders are written in workdir/layout.py alone."""
    files = ("settings.json", "metrics.jsonl", "training_curves.png", "summary.json", "model/config.json", "checkpoints/")
    folders = ("tensorboard", "checkpoints")  # as path parts: strings of their own
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() != "workdir/layout.py":
            strings = _code_strings(path)
            found = [f for text in strings for f in files if f in text] + [d for d in folders if d in strings]
            assert not found, (path, found)


@pytest.fixture
def train(cli):
    return lambda *args, cwd: cli.run("sda_jax.train", *args, cwd=cwd, timeout=300)


def test_a_bare_config_name_is_read_from_the_shipped_configs(tmp_path, train):
    # From another folder, `--config afqmc_small.py` finds configs/afqmc_small.py: the override
    # below is then checked against that config (a missing file would fail before that).
    result = train("--config", "afqmc_small.py", "--config.data.bucket_lengths=(16,80)", f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: config key data.bucket_lengths")
    missing = train("--config", "nope.py", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: nope.py: no such config file here or in {REPO_ROOT / 'configs'}"]
    # A file of that name in the current folder wins over the shipped one.
    (tmp_path / "afqmc_small.py").write_text("def get_config():\n    raise ValueError('the local one')\n")
    local = train("--config", "afqmc_small.py", cwd=tmp_path)
    assert local.returncode == 2 and "the local one" in local.stderr
    assert not (tmp_path / "w").exists()


def test_help_says_where_bare_config_names_come_from(train):
    result = train("--helpfull", cwd=REPO_ROOT)
    assert "a bare name not found here is read from" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("command", "own_flags"),
    [("sda_jax.train", ["--config", "--workdir", "--fresh"]), ("sda_jax.pretrain", ["--config", "--workdir", "--fresh"]),
     ("sda_jax.export", ["--workdir", "--out", "--params", "--seed", "--model", "--values", "--while_training"])],
)  # fmt: skip
def test_help_lists_the_commands_own_flags_and_exits_0(cli, command, own_flags):
    result = cli.run(command, "--help", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  --")]
    assert listed == own_flags, result.stdout
    assert "--jax_" not in result.stdout and "--logtostderr" not in result.stdout  # absl's and JAX's stay in --helpfull
    if command != "sda_jax.export":
        assert "--config.optim.learning_rate=3e-5" in result.stdout and "docs/configuration.md" in result.stdout
        assert "python -m sda_jax.config" in result.stdout


def test_the_console_script_runs_both_commands(cli):
    """`sda-jax train|export` (pyproject's [project.scripts]) are the two command lines."""
    script = shutil.which("sda-jax", path=str(pathlib.Path(sys.executable).parent))
    assert script, "the package is installed without its console script"
    run = lambda *args: subprocess.run([script, *args], cwd=REPO_ROOT, env=cli.env(), capture_output=True, text=True, timeout=120, check=False)
    assert run("train", "--config", "nope.py").stderr.strip().splitlines() == [
        f"error: nope.py: no such config file here or in {REPO_ROOT / 'configs'}"
    ]
    assert "no_model_dir: not an sda-jax run folder" in run("export", "--workdir=no_model_dir", "--out=x").stderr
    usage = run("serve")
    assert usage.returncode == 2 and usage.stderr.startswith("usage: sda-jax train")
    helped = run("train", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: sda-jax train --config FILE"), helped.stdout[:300]
    assert run("--help").returncode == 0


def test_stopwatch_phases_add_up_and_nest():
    clock = Stopwatch()
    with clock.phase("outer"):
        time.sleep(0.05)
        with clock.phase("inner"):
            time.sleep(0.05)
        clock.add("compile", 0.02)  # measured elsewhere, inside "outer"
        partial = clock.breakdown()  # an open phase counts what it has taken so far
    assert partial["outer"] == pytest.approx(0.03, abs=0.03) and partial["compile"] == 0.02
    assert sum(v for k, v in partial.items() if k != "wall") == pytest.approx(partial["wall"], rel=1e-6)
    times = clock.breakdown()
    assert times["inner"] == pytest.approx(0.05, abs=0.03)
    assert times["outer"] == pytest.approx(0.03, abs=0.03)  # 0.1 minus inner minus compile
    assert times["compile"] == 0.02
    assert sum(v for k, v in times.items() if k != "wall") == pytest.approx(times["wall"], rel=1e-6)


class _Settings:
    class model:
        from_scratch = True

    class data:
        label_names = ("0", "1")


class _Splits:
    class dev:
        labels = np.array([0, 0, 0, 1])


def test_summary_flags_one_class_predictions_and_explains_from_scratch_runs():
    notes = run_summary.notes({"test_predictions_by_label": {"0": 10, "1": 0}}, _Settings, _Splits)
    assert notes[0].startswith("warning: every test prediction is label '0'")
    assert "from scratch" in notes[1] and "0.750" in notes[1] and "pretrained" in notes[1]
    _Settings.model.from_scratch = False
    try:
        assert run_summary.notes({"test_predictions_by_label": {"0": 6, "1": 4}}, _Settings, _Splits) == []
    finally:
        _Settings.model.from_scratch = True
