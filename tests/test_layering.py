"""The layout's rules (DESIGN.md section 1), checked from the imports with ``ast``.

Groups, by module path:

* algorithm: ``marl_fgmf.{protocol, stats, perturbation, attribution, explainers, scorpio, sgam,
  pgca, adv_training, metrics, adapter, sanity}``: torch, numpy, scipy, the standard library and
  each other;
* attacks: ``attacks.*``: never agents, envs, a workflow, Ray, RLlib, PettingZoo or SuperSuit;
* agents: ``agents.*``: everything but a workflow;
* envs: ``envs.*``: nothing of ours;
* util: ``marl_fgmf.io`` (atomic writes, JSON, locks) and ``marl_fgmf.viz`` (figures:
  matplotlib on arrays and tensors): for everyone but the algorithm modules, attacks and envs; a
  util module imports only util, ``marl_fgmf.protocol`` and third-party code (so that the
  training loop in ``agents`` can draw its learning curve without importing a workflow);
* workflow: ``marl_fgmf.{audit, tournament, benchmark, workflows, viz, commands, cli}``:
  anything.

And for every module: no import of another module's private name (or of a private module
from outside its package), no import cycle (counting imports inside functions), an import
inside a function only with a ``# lazy: <reason>`` comment on its line or the line above, and
no source file over 500 lines.

Each rule is also run on a small synthetic tree that breaks it, so the test shows it fails.
"""
from __future__ import annotations

import ast
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("marl_fgmf", "agents", "attacks", "envs")
ALGORITHMS = ("protocol", "stats", "perturbation", "attribution", "explainers", "scorpio", "sgam",
              "pgca", "adv_training", "metrics", "adapter", "sanity")
ALGORITHM_THIRD_PARTY = {"torch", "numpy", "scipy"}
ATTACKS_FORBIDDEN_THIRD_PARTY = {"ray", "pettingzoo", "supersuit", "gymnasium"}
UTILITIES = ("io", "viz")
MAX_LINES = 500


@dataclass(frozen=True)
class Import:
    importer: str       # module name of the importing file
    target: str         # the module imported (ours: resolved to an existing module)
    names: tuple        # names imported from it (from-imports)
    line: int
    in_function: bool
    lazy_comment: bool


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files(root: Path) -> list[Path]:
    files = []
    for pkg in PACKAGES:
        if (root / pkg).is_dir():
            files += sorted(p for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _resolve(modules: set[str], base: str) -> str:
    """``base`` itself: a module of ours, or one that does not exist (then judged by its name)."""
    return base


def collect_imports(root: Path) -> tuple[set[str], list[Import]]:
    files = source_files(root)
    modules = {module_name(root, p) for p in files}
    found: list[Import] = []
    for path in files:
        name = module_name(root, path)
        is_pkg = path.name == "__init__.py"
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text(), filename=str(path))
        parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node

        def in_function(node: ast.AST) -> bool:
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    return True
            return False

        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            here = lines[node.lineno - 1] if node.lineno <= len(lines) else ""
            above = lines[node.lineno - 2] if node.lineno >= 2 else ""
            lazy = "# lazy" in here or "# lazy" in above
            inside = in_function(node)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(Import(name, _resolve(modules, alias.name), (), node.lineno,
                                        inside, lazy))
                continue
            if node.level:
                pkg = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{node.module}" if node.module else pkg
            else:
                base = node.module or ""
            names = tuple(a.name for a in node.names)
            # `from pkg import submodule` imports the submodule
            subs = [n for n in names if f"{base}.{n}" in modules]
            for n in subs:
                found.append(Import(name, f"{base}.{n}", (), node.lineno, inside, lazy))
            rest = tuple(n for n in names if n not in subs)
            if rest or not subs:
                found.append(Import(name, _resolve(modules, base), rest, node.lineno, inside, lazy))
    return modules, found


def group(module: str) -> str:
    top, _, rest = module.partition(".")
    if top == "marl_fgmf":
        if not rest:
            return "root"
        if rest.split(".")[0] in UTILITIES:
            return "util"
        return "algorithm" if rest.split(".")[0] in ALGORITHMS else "workflow"
    if top in PACKAGES:
        return top
    return "stdlib" if top in sys.stdlib_module_names or top == "__future__" else "third_party"


def layer_violations(root: Path) -> list[str]:
    modules, imports = collect_imports(root)
    out = []
    for imp in imports:
        src, dst = group(imp.importer), group(imp.target)
        top = imp.target.split(".")[0]
        bad = None
        if src == "algorithm":
            if dst in ("workflow", "util", "agents", "attacks", "envs"):
                bad = f"an algorithm module imports {dst} code"
            elif dst == "third_party" and top not in ALGORITHM_THIRD_PARTY:
                bad = f"an algorithm module imports {top} (torch, numpy, scipy only)"
        elif src == "util":
            if dst in ("workflow", "agents", "attacks", "envs", "root") or (
                    dst == "algorithm" and imp.target != "marl_fgmf.protocol"):
                bad = f"a util module imports {dst} code ({imp.target})"
        elif src == "attacks":
            if dst in ("workflow", "util", "agents", "envs"):
                bad = f"attacks imports {dst} code"
            elif dst == "third_party" and top in ATTACKS_FORBIDDEN_THIRD_PARTY:
                bad = f"attacks imports {top}"
        elif src == "agents" and dst == "workflow":
            bad = "agents imports a workflow"
        elif src == "envs" and dst in ("algorithm", "workflow", "util", "root", "agents", "attacks"):
            bad = f"envs imports {dst} code"
        if bad:
            out.append(f"{imp.importer}:{imp.line} imports {imp.target}: {bad}")
    return out


def private_violations(root: Path) -> list[str]:
    modules, imports = collect_imports(root)
    out = []
    for imp in imports:
        if imp.target not in modules or imp.target == imp.importer:
            continue
        for n in imp.names:
            if n.startswith("_") and not n.startswith("__"):
                out.append(f"{imp.importer}:{imp.line} imports private {imp.target}.{n}")
        parts = imp.target.split(".")
        for k, part in enumerate(parts):
            if part.startswith("_") and not part.startswith("__"):
                owner = ".".join(parts[:k])
                if not (imp.importer == owner or imp.importer.startswith(owner + ".")):
                    out.append(f"{imp.importer}:{imp.line} imports private module {imp.target}")
                break
    return out


def cycles(root: Path) -> list[list[str]]:
    modules, imports = collect_imports(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.target in modules and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    # a submodule importing its own package's __init__ (re-exports) is not counted
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def lazy_violations(root: Path) -> list[str]:
    _, imports = collect_imports(root)
    return [f"{i.importer}:{i.line} imports {i.target} inside a function without a "
            f"'# lazy: <reason>' comment" for i in imports if i.in_function and not i.lazy_comment]


def size_violations(root: Path) -> list[str]:
    out = []
    for p in source_files(root):
        n = len(p.read_text().splitlines())
        if n > MAX_LINES:
            out.append(f"{p.relative_to(root)} has {n} lines (at most {MAX_LINES})")
    return out


CHECKS = {"layers": layer_violations, "private": private_violations,
          "cycles": lambda r: [" -> ".join(c) for c in cycles(r)], "lazy": lazy_violations,
          "size": size_violations}


DEBT_FILE = Path(__file__).with_name("layering_debt.txt")
"""Violations that predate the rules, one per line as ``rule: key`` (keys without line
numbers). The list may only shrink: a new violation fails, and so does a listed one that is
gone (delete its line). Regenerate with ``python tests/test_layering.py --debt``."""


def violation_key(rule: str, message: str) -> str:
    key = re.sub(r":\d+ ", " ", message)
    if rule == "size":
        key = re.sub(r" has \d+ lines .*", " is over the size limit", key)
    return f"{rule}: {key}"


def current_keys(root: Path, rule: str) -> set[str]:
    return {violation_key(rule, m) for m in CHECKS[rule](root)}


def debt(rule: str) -> set[str]:
    if not DEBT_FILE.is_file():
        return set()
    lines = (line.strip() for line in DEBT_FILE.read_text().splitlines())
    return {line for line in lines if line.startswith(f"{rule}: ")}


@pytest.mark.parametrize("rule", sorted(CHECKS))
def test_the_code_follows_the_rule(rule):
    found, known = current_keys(ROOT, rule), debt(rule)
    new, paid = sorted(found - known), sorted(known - found)
    assert not new, f"{len(new)} new violation(s) of '{rule}':\n" + "\n".join(new)
    assert not paid, (f"{len(paid)} violation(s) of '{rule}' are fixed: delete them from "
                      f"{DEBT_FILE.name}:\n" + "\n".join(paid))


def test_the_debt_list_only_names_known_rules():
    if DEBT_FILE.is_file():
        for line in DEBT_FILE.read_text().splitlines():
            assert line.split(":")[0] in CHECKS, f"{DEBT_FILE.name}: unknown rule in {line!r}"


# --------------------------------------------------------------------------- the rules can fail
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


GOOD = {
    "marl_fgmf/protocol.py": "import torch\n",
    "marl_fgmf/scorpio.py": "from marl_fgmf.protocol import check_obs\n",
    "attacks/pgd.py": "from marl_fgmf.protocol import check_obs\nimport torch\n",
    "agents/train.py": "from marl_fgmf import scorpio\nfrom marl_fgmf.viz import plot\nimport ray\n",
    "marl_fgmf/viz/__init__.py": "from marl_fgmf.protocol import to_unit\nimport matplotlib\n",
    "marl_fgmf/io.py": "import json\n",
    "marl_fgmf/tournament/driver.py": "from agents import train\n",
    "envs/beacon.py": "import numpy\nfrom envs._preprocess import check_int\n",
    "envs/_preprocess.py": "def check_int(): pass\n",
}

BROKEN = {
    "layers": [
        {"marl_fgmf/scorpio.py": "from agents import train\n"},          # algorithm -> agents
        {"marl_fgmf/sgam.py": "import ray\n"},                           # algorithm -> Ray
        {"marl_fgmf/pgca.py": "from marl_fgmf.tournament import driver\n"},
        {"attacks/pgd.py": "import pettingzoo\n"},                       # attacks -> pettingzoo
        {"attacks/pgd.py": "from agents.train import x\n"},              # attacks -> agents
        {"agents/train.py": "from marl_fgmf.audit import run\n"},        # agents -> workflow
        {"marl_fgmf/viz/plots.py": "from marl_fgmf.pgca import explain\n"},  # util -> algorithm
        {"marl_fgmf/io.py": "from agents import train\n"},                # util -> agents
        {"attacks/pgd.py": "from marl_fgmf.io import atomic_write_text\n"},  # attacks -> util
        {"envs/beacon.py": "from marl_fgmf.protocol import check_obs\n"},
    ],
    "private": [
        {"attacks/pgd.py": "from marl_fgmf.protocol import _hidden\n"},
        {"agents/train.py": "from envs._preprocess import check_int\n"},  # private module
    ],
    "cycles": [
        {"marl_fgmf/pgca.py": "from marl_fgmf.metrics import ghr\n",
         "marl_fgmf/metrics.py": "def f():\n    # lazy: test\n    from marl_fgmf.pgca import explain\n"},
    ],
    "lazy": [
        {"agents/train.py": "def f():\n    import ray\n"},
    ],
    "size": [
        {"agents/big.py": "x = 1\n" * (MAX_LINES + 1)},
    ],
}


@pytest.mark.parametrize("rule", sorted(CHECKS))
def test_a_clean_synthetic_tree_passes(tmp_path, rule):
    root = _tree(tmp_path, GOOD)
    assert CHECKS[rule](root) == []


@pytest.mark.parametrize("rule,case", [(r, i) for r in sorted(BROKEN) for i in range(len(BROKEN[r]))])
def test_each_rule_fails_on_a_tree_that_breaks_it(tmp_path, rule, case):
    root = _tree(tmp_path, {**GOOD, **BROKEN[rule][case]})
    problems = CHECKS[rule](root)
    assert len(problems) == 1, f"rule {rule!r} on {BROKEN[rule][case]}: {problems}"


if __name__ == "__main__":  # python tests/test_layering.py --debt: rewrite the debt list
    if sys.argv[1:] == ["--debt"]:
        keys = sorted(k for rule in CHECKS for k in current_keys(ROOT, rule))
        DEBT_FILE.write_text("".join(k + "\n" for k in keys))
        print(f"{len(keys)} violations written to {DEBT_FILE}")
