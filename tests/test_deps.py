"""dvc.yaml's deps cover what each stage really runs and reads.

DVC reruns a stage only when something it lists changes. Two drifts make it silently skip reruns:

- code: a stage imports a project module (condenser/..., tasks/...) that its `deps:` do not list, e.g.
  through a lazy import inside a function; changing that module reruns nothing;
- params: a stage lists its params.yaml section key by key, and a new field of the section's model is
  not among the keys; changing that field reruns nothing.

The checkers are plain functions of a project root (and of the `Params` model), so the tests below also
run them on small synthetic projects and show that each one reports a planted miss.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pydantic
import pytest
import yaml

from condenser.core.config import Params

ROOT = Path(__file__).resolve().parents[1]

# Top-level packages whose modules count as project code (folders under the project root).
LOCAL_PACKAGES = ("condenser", "tasks")
PARAMS_FILE = "params.yaml"


# --- What DVC sees ----------------------------------------------------------------------------------


@dataclass
class StageDeps:
    """One resolved stage (foreach items expanded), as DVC reads it."""

    name: str  # e.g. "lora@bold"
    cmds: list[str]
    dvcfile: Path  # absolute path of the dvc.yaml that defines it
    dep_paths: list[Path] = field(default_factory=list)  # absolute, normalised; params deps excluded
    # params.yaml keys it lists (e.g. "lora.seed", or "prepare" for the whole section); None: the whole file.
    params_keys: list[str] | None = field(default_factory=list)


def dvc_stages(root: Path) -> list[StageDeps]:
    """The stages with a `cmd` of the DVC project at `root`, resolved by DVC itself."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = Path(os.path.realpath(root))
    params_file = root / PARAMS_FILE
    stages = []
    with contextlib.chdir(root), Repo(str(root)) as repo:
        for stage in repo.index.stages:
            if not stage.cmd:
                continue
            cmds = [stage.cmd] if isinstance(stage.cmd, str) else list(stage.cmd)
            info = StageDeps(stage.name, cmds, Path(os.path.realpath(stage.dvcfile.path)))
            for dep in stage.deps:
                path = Path(os.path.realpath(os.path.join(stage.wdir, dep.def_path)))
                if isinstance(dep, ParamsDependency):
                    if path != params_file:
                        continue
                    if not dep.params:  # `- params.yaml:` with no keys: the whole file
                        info.params_keys = None
                    elif info.params_keys is not None:
                        info.params_keys.extend(dep.params)
                else:
                    info.dep_paths.append(path)
            stages.append(info)
    return stages


def _raw_stage(dvcfile: Path, name: str, cache: dict[Path, dict]) -> dict:
    if dvcfile not in cache:
        cache[dvcfile] = yaml.safe_load(dvcfile.read_text()) or {}
    return (cache[dvcfile].get("stages") or {}).get(name.split("@")[0]) or {}


# --- Test 1: code deps --------------------------------------------------------------------------------


def module_file(root: Path, dotted: str) -> Path | None:
    """The file a project module's code lives in (`a/b.py` or `a/b/__init__.py`); None if not project code."""
    parts = dotted.split(".")
    if not parts or parts[0] not in LOCAL_PACKAGES or not all(parts):
        return None
    base = Path(root, *parts)
    for candidate in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_files(root: Path, dotted: str) -> set[Path]:
    """Importing `a.b.c` runs `a/__init__.py`, `a/b/__init__.py` and `a/b/c.py`: the project files of each."""
    parts = dotted.split(".")
    found = (module_file(root, ".".join(parts[:i])) for i in range(1, len(parts) + 1))
    return {f for f in found if f is not None}


def _module_name(root: Path, file: Path) -> tuple[list[str], bool]:
    """The dotted parts of `file`'s module, and whether it is a package (`__init__.py`)."""
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return parts[:-1], True
    return parts, False


def imported_files(root: Path, file: Path) -> set[Path]:
    """The project files that `file`'s import statements (anywhere in it, lazy ones too) would run."""
    tree = ast.parse(file.read_text(), filename=str(file))
    parts, is_package = _module_name(root, file)
    package = parts if is_package else parts[:-1]
    found: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= module_files(root, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package):
                    continue  # beyond the top-level package: Python refuses it too
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    base = base + node.module.split(".")
            else:
                base = node.module.split(".")
            if not base:
                continue
            dotted = ".".join(base)
            found |= module_files(root, dotted)
            for alias in node.names:
                if alias.name != "*":
                    # `from pkg import name`: a submodule if there is one; else a name in pkg/__init__.py.
                    sub = module_file(root, f"{dotted}.{alias.name}")
                    if sub is not None:
                        found.add(sub)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            # importlib.import_module("condenser.x") / __import__("condenser.x") with a literal name.
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found |= module_files(root, node.args[0].value)
    return found


def _holds_code(file: Path) -> bool:
    return not (file.name == "__init__.py" and file.stat().st_size == 0)


def import_closure(root: Path, module: str) -> set[Path]:
    """Every project file that running `python -m <module>` can import, statically (lazy imports included).

    Zero-byte `__init__.py` files are left out: they hold no code.
    """
    root = Path(os.path.realpath(root))
    todo = list(module_files(root, module))
    seen: set[Path] = set()
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo.extend(imported_files(root, file) - seen)
    return {f for f in seen if _holds_code(f)}


def _python_entry(cmd: str, root: Path) -> tuple[str | None, Path | None]:
    """The module of `python -m X ...` or the script of `python X.py ...` in a stage's cmd."""
    try:
        tokens = shlex.split(cmd)
    except ValueError:
        tokens = cmd.split()
    for i, token in enumerate(tokens):
        if not re.fullmatch(r"python[\d.]*", Path(token).name):
            continue
        args = iter(tokens[i + 1:])
        for arg in args:
            if arg == "-m":
                return next(args, None), None
            if arg.startswith("-m") and len(arg) > 2:
                return arg[2:], None
            if arg.endswith(".py"):
                return None, Path(os.path.realpath(root / arg))
            if not arg.startswith("-"):
                break
    return None, None


def stage_code(root: Path, stage: StageDeps) -> set[Path]:
    """The project files a stage's cmd runs."""
    files: set[Path] = set()
    for cmd in stage.cmds:
        module, script = _python_entry(cmd, root)
        if module:
            files |= import_closure(root, module)
        elif script is not None and script.is_file():
            try:
                parts, _ = _module_name(root, script)
            except ValueError:
                continue  # a script outside the project
            if parts and parts[0] in LOCAL_PACKAGES:
                files |= import_closure(root, ".".join(parts))
            else:  # a script elsewhere in the project: what it imports still counts
                for imported in imported_files(root, script):
                    files |= import_closure(root, ".".join(_module_name(root, imported)[0]))
    return files


def is_covered(file: Path, dep_paths: list[Path]) -> bool:
    """A dep covers a file if it is that file or a folder holding it."""
    return any(file == dep or file.is_relative_to(dep) for dep in dep_paths)


def uncovered_modules(root: Path) -> dict[str, list[str]]:
    """Per stage name (`lora@bold`), the project module files it runs but does not list in its deps."""
    root = Path(os.path.realpath(root))
    report = {}
    for stage in dvc_stages(root):
        missing = sorted(f.relative_to(root).as_posix() for f in stage_code(root, stage)
                         if not is_covered(f, stage.dep_paths))
        if missing:
            report[stage.name] = missing
    return report


def describe_uncovered_modules(report: dict[str, list[str]]) -> str:
    # One line per stage, foreach items with the same misses on one line.
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for name, files in report.items():
        grouped.setdefault((name.split("@")[0], tuple(files)), []).append(name)
    lines = ["dvc.yaml: these stages import project modules that their `deps:` do not list, so changing "
             "those modules reruns nothing:"]
    for (base, files), names in grouped.items():
        via = "" if names == [base] else f"  (items: {', '.join(n.partition('@')[2] for n in names)})"
        lines.append(f"  {base}: {', '.join(files)}{via}")
    lines.append("Add each file, or the folder holding it (e.g. condenser/core), to that stage's `deps:` in "
                 "dvc.yaml (for a foreach stage, under its `do: deps:`).")
    return "\n".join(lines)


# --- Test 2: params deps ------------------------------------------------------------------------------


def _foreach_keys(raw: dict) -> list[str]:
    """The params keys a foreach/matrix stage iterates over (`foreach: ${lora.concepts}` -> lora.concepts)."""
    values = []
    if "foreach" in raw:
        values.append(raw["foreach"])
    if isinstance(raw.get("matrix"), dict):
        values.extend(raw["matrix"].values())
    keys = []
    for value in values:
        match = re.fullmatch(r"\$\{\s*([^}\s]+)\s*\}", value) if isinstance(value, str) else None
        if match:
            keys.append(match.group(1))
    return keys


def uncovered_fields(section: str, model: type, keys: list[str] | None) -> list[str]:
    """The fields of a params section's model that none of the listed params keys covers.

    `section`, `section.f` and `section.f.<anything>` cover field `f`; None (the whole file) covers all.
    """
    if keys is None or section in keys:
        return []
    if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
        # Not a model: only the whole section, or keys under it, can cover it.
        return [] if any(k.startswith(f"{section}.") for k in keys) else [f"({section}, the whole section)"]
    missing = []
    for name, info in model.model_fields.items():
        key = f"{section}.{info.alias or name}"
        if not any(k == key or k.startswith(f"{key}.") for k in keys):
            missing.append(info.alias or name)
    return missing


def uncovered_params(root: Path, params_model: type) -> dict[str, list[str]]:
    """Per stage name, the fields of its params.yaml section (a field of `params_model`) it does not list."""
    report = {}
    raw_cache: dict[Path, dict] = {}
    for stage in dvc_stages(root):
        section = stage.name.split("@")[0]
        info = params_model.model_fields.get(section)
        if info is None:
            continue  # no params section for this stage
        keys = stage.params_keys
        if keys is not None:
            keys = keys + _foreach_keys(_raw_stage(stage.dvcfile, stage.name, raw_cache))
        missing = uncovered_fields(section, info.annotation, keys)
        if missing:
            report[stage.name] = missing
    return report


def describe_uncovered_params(report: dict[str, list[str]]) -> str:
    lines = ["dvc.yaml: these stages do not list every field of their params.yaml section, so changing "
             "those fields reruns nothing:"]
    for name, fields in report.items():
        lines.append(f"  {name}: {', '.join(fields)}")
    lines.append("List the section whole under the stage's `params:` (e.g. `- lora`), or add the missing "
                 "keys (e.g. `- lora.<field>`).")
    return "\n".join(lines)


# --- Synthetic projects -------------------------------------------------------------------------------


def make_project(root: Path, files: dict[str, str], dvc_yaml: dict, params: dict | None = None) -> Path:
    """A DVC project (no SCM) at `root` with the given files, dvc.yaml and params.yaml."""
    from dvc.repo import Repo

    root.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(root):
        Repo.init(str(root), no_scm=True).close()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (root / PARAMS_FILE).write_text(yaml.safe_dump(params or {}, sort_keys=False))
    return root


CODE_FILES = {
    "tasks/__init__.py": "",
    "tasks/alpha.py": (
        "import os\n"
        "import condenser.core.helpers\n"
        "from condenser.core import helpers\n\n\n"
        "def main():\n"
        "    from condenser.extra import thing  # lazy: runs only when main() does\n"
        "    return thing + helpers.value + len(os.sep)\n"
    ),
    "tasks/beta.py": (
        "import sys\n"
        "from condenser import models\n"
        "from . import shared\n\n\n"
        "def main():\n"
        "    import importlib\n"
        "    return importlib.import_module('condenser.plugin'), shared, sys.argv\n"
    ),
    "tasks/shared.py": "VALUE = 1\n",
    "condenser/__init__.py": '"""The synthetic library."""\n',
    "condenser/core/__init__.py": "",
    "condenser/core/helpers.py": "from .util import value\n",
    "condenser/core/util.py": "value = 1\n",
    "condenser/core_extra.py": "# never imported; `condenser/core` as a dep must not cover it\n",
    "condenser/extra.py": "thing = 2\n",
    "condenser/models/__init__.py": "from .net import Net\n",
    "condenser/models/net.py": "import torch  # not project code: ignored\n\nclass Net: ...\n",
    "condenser/plugin.py": "PLUGIN = True\n",
}


def code_dvc_yaml(alpha_deps: list[str], beta_deps: list[str]) -> dict:
    return {"stages": {
        "alpha": {"cmd": "python -m tasks.alpha", "deps": alpha_deps, "outs": ["out/alpha"]},
        "beta": {"foreach": ["x", "y"],
                 "do": {"cmd": "python -m tasks.beta ${item}", "deps": beta_deps, "outs": ["out/beta/${item}"]}},
    }}


ALPHA_DEPS = ["tasks/alpha.py", "condenser/__init__.py", "condenser/core"]  # not condenser/extra.py
BETA_DEPS = ["tasks/beta.py", "condenser/__init__.py", "condenser/models/"]  # not tasks/shared.py, plugin.py


def test_import_closure_follows_every_kind_of_import(tmp_path):
    root = make_project(tmp_path, CODE_FILES, code_dvc_yaml(ALPHA_DEPS, BETA_DEPS))
    rel = lambda files: sorted(f.relative_to(root).as_posix() for f in files)  # noqa: E731
    # Lazy imports count; the zero-byte tasks/__init__.py and condenser/core/__init__.py hold no code.
    assert rel(import_closure(root, "tasks.alpha")) == [
        "condenser/__init__.py", "condenser/core/helpers.py", "condenser/core/util.py",
        "condenser/extra.py", "tasks/alpha.py"]
    # `from condenser import models` (a sub-package), its relative import, `from . import shared`, and
    # importlib.import_module with a literal name.
    assert rel(import_closure(root, "tasks.beta")) == [
        "condenser/__init__.py", "condenser/models/__init__.py", "condenser/models/net.py",
        "condenser/plugin.py", "tasks/beta.py", "tasks/shared.py"]


def test_planted_code_miss_is_reported_then_fixed(tmp_path):
    root = make_project(tmp_path / "missing", CODE_FILES, code_dvc_yaml(ALPHA_DEPS, BETA_DEPS))
    missing_beta = ["condenser/plugin.py", "tasks/shared.py"]
    # Each foreach item is a stage of its own, resolved by DVC.
    assert uncovered_modules(root) == {"alpha": ["condenser/extra.py"], "beta@x": missing_beta,
                                       "beta@y": missing_beta}
    message = describe_uncovered_modules(uncovered_modules(root))
    assert "  alpha: condenser/extra.py\n" in message
    assert "  beta: condenser/plugin.py, tasks/shared.py  (items: x, y)\n" in message

    fixed = make_project(tmp_path / "fixed", CODE_FILES,
                         code_dvc_yaml(ALPHA_DEPS + ["condenser/extra.py"], BETA_DEPS + missing_beta))
    assert uncovered_modules(fixed) == {}


def test_folder_dep_covers_only_what_it_holds(tmp_path):
    assert is_covered(tmp_path / "condenser/core/util.py", [tmp_path / "condenser/core"])
    assert is_covered(tmp_path / "condenser/extra.py", [tmp_path / "condenser/extra.py"])
    assert not is_covered(tmp_path / "condenser/core_extra.py", [tmp_path / "condenser/core"])
    assert not is_covered(tmp_path / "condenser/__init__.py", [tmp_path / "condenser/core"])


def test_real_stages_list_every_module_they_import():
    report = uncovered_modules(ROOT)
    if report:
        pytest.fail(describe_uncovered_modules(report), pytrace=False)


# --- Params -------------------------------------------------------------------------------------------


def _section_model(params_model: type, section: str) -> type:
    return params_model.model_fields[section].annotation


def _with_new_field(params_model: type, section: str, name: str = "new_knob") -> type:
    """A `Params` variant whose `section` model has one more field, as a developer would add it."""
    base = _section_model(params_model, section)
    planted = pydantic.create_model(f"Planted{base.__name__}", __base__=base, **{name: (int, 0)})
    return pydantic.create_model(f"Planted{params_model.__name__}", __base__=params_model,
                                 **{section: (planted, planted())})


@pytest.mark.parametrize(("keys", "missing"), [
    (["lora"], []),
    (None, []),
    (["lora.seed", "lora.steps.x"], ["probe_steps"]),
    (["lora.seed", "lora.steps", "lora.probe_steps"], []),
    (["lora.seed", "lora.steps", "lora.probe_steps_old"], ["probe_steps"]),
    (["lorax", "lora.seed", "lora.steps"], ["probe_steps"]),
])
def test_uncovered_fields_rules(keys, missing):
    model = pydantic.create_model("M", seed=(int, 0), steps=(dict, {}), probe_steps=(int, 1))
    assert uncovered_fields("lora", model, keys) == missing


def params_project(root: Path, params_model: type) -> Path:
    """dvc.yaml as the real lora and distill_data stages wrote it (key by key), and a whole-section stage."""
    lora_fields = [f for f in _section_model(params_model, "lora").model_fields if f != "concepts"]
    distill_fields = [f for f in _section_model(params_model, "distill_data").model_fields if f != "concepts"]
    dvc_yaml = {"stages": {
        "prepare": {"cmd": "python -m tasks.prepare", "params": ["prepare"]},
        # lora.concepts is covered by the foreach that iterates over it.
        "lora": {"foreach": "${lora.concepts}",
                 "do": {"cmd": "python -m tasks.lora ${item}", "params": [f"lora.{f}" for f in lora_fields]}},
        # distill_data.concepts is covered by distill_data.concepts.${key}, whatever the foreach.
        "distill_data": {"foreach": ["bold", "thin"],
                         "do": {"cmd": "python -m tasks.distill_data ${item}",
                                "params": [f"distill_data.{f}" for f in distill_fields]
                                + ["distill_data.concepts.${item}"]}},
    }}
    params = {"lora": {"concepts": ["bold", "italic"]}}
    return make_project(root, {}, dvc_yaml, params)


def test_planted_params_field_is_reported(tmp_path):
    params_model = Params
    root = params_project(tmp_path, params_model)
    # Key by key, every field listed: covered (concepts through the foreach and through concepts.<item>).
    assert uncovered_params(root, params_model) == {}

    # A new lora field is not among lora's keys: both lora items report it, nothing else.
    report = uncovered_params(root, _with_new_field(params_model, "lora"))
    assert report == {"lora@bold": ["new_knob"], "lora@italic": ["new_knob"]}
    message = describe_uncovered_params(report)
    assert "lora@bold: new_knob" in message and "List the section whole" in message

    report = uncovered_params(root, _with_new_field(params_model, "distill_data"))
    assert report == {"distill_data@bold": ["new_knob"], "distill_data@thin": ["new_knob"]}


def test_whole_section_is_always_covered(tmp_path):
    params_model = Params
    root = params_project(tmp_path, params_model)
    assert uncovered_params(root, _with_new_field(params_model, "prepare")) == {}


def test_dvc_reports_params_keys_as_listed(tmp_path):
    """The DVC API this file relies on: ParamsDependency.params holds the keys as dvc.yaml lists them."""
    root = make_project(tmp_path, {}, {"stages": {
        "a": {"cmd": "python -m tasks.a", "params": ["a", "b.x"]},
        "c": {"cmd": "python -m tasks.c", "params": [{PARAMS_FILE: None}, {"other.yaml": ["c"]}]},
    }})
    keys = {s.name: s.params_keys for s in dvc_stages(root)}
    assert keys == {"a": ["a", "b.x"], "c": None}


def test_real_stages_list_every_params_field():
    params_model = Params
    report = uncovered_params(ROOT, params_model)
    # A field added to a section model later fails this test until dvc.yaml lists it (or the section whole).
    if report:
        pytest.fail(describe_uncovered_params(report), pytrace=False)
