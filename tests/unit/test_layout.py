"""The floor plan holds: imports run one way between farm's rooms, the job plane needs no
Ray, and a model family's name stays in its own module and the few places that list
models for a person (see ../shared/design.md, "Where code lives")."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

FARM = Path(__file__).resolve().parents[2] / "farm"
SKIPPED = ("v1", "migrations")  # generated code; Alembic's revision scripts

# Rooms by floor: a room imports rooms on its own floor or below, never above.
FLOORS = {
    "__main__": 4,
    "api": 3, "serve": 3, "cli": 3, "client": 3,
    "jobs": 2, "render": 2, "metering": 2, "planning": 2,
    "engines": 1, "postproc": 1, "storage": 1,
    "config": 0, "families": 0, "domain": 0, "tracing": 0,
}
# The ground floor has an order of its own: config reads the families' defaults, and both
# speak the domain's vocabulary; tracing stands apart (it imports nothing of farm).
GROUND_ORDER = {"domain": 0, "tracing": 0, "families": 1, "config": 2}
JOB_PLANE = ("jobs", "api", "metering", "planning")

# Each family's name as it appears in code and prose, and the most modules that may say it:
# its family module, the registry, and two that list models for a person. A new family
# adds its line here with its module.
FAMILY_NAMES = {
    "ltx-video": re.compile(r"ltx[-_ ]?video|LTXPipeline|LTXImage", re.IGNORECASE),
    "cogvideox": re.compile(r"cogvideo", re.IGNORECASE),
    "wan": re.compile(r"\b[Ww]an\b|\b[Ww]an_|\bWan[A-Z0-9]|\bWAN\b"),
    "ltx-2": re.compile(r"ltx[-_ ]?2", re.IGNORECASE),
    "hunyuanvideo-1.5": re.compile(r"hunyuan", re.IGNORECASE),
    "stable-video-diffusion": re.compile(r"stable[-_ ]video|StableVideo|\bsvd\b", re.IGNORECASE),
    "animatediff": re.compile(r"animatediff|animate_diff|MotionAdapter", re.IGNORECASE),
}
MAX_MODULES_NAMING_A_FAMILY = 4
MAX_SERVICER_LINES = 200


def module_name(path: Path) -> str:
    parts = list(path.relative_to(FARM.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in FARM.rglob("*.py") if not set(p.relative_to(FARM).parts) & set(SKIPPED)}


def imported(name: str, path: Path) -> set[str]:
    """Every module of farm that `name` imports: at the top, inside functions, or for type checking."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules():
                target = target.rpartition(".")[0]  # `from farm.x import name`: the module is farm.x
            if target and target != name and target.startswith("farm."):
                found.add(target)
    return found


@cache
def file_graph() -> dict[str, set[str]]:
    return {name: imported(name, path) for name, path in modules().items()}


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_room_is_on_a_floor():
    rooms = {room(m) for m in modules() if m != "farm"}
    assert rooms <= set(FLOORS), f"rooms without a floor in this test: {sorted(rooms - set(FLOORS))}"


def test_no_file_imports_itself_in_a_circle():
    assert cycles(file_graph()) == []


def test_no_room_imports_another_in_a_circle():
    rooms: dict[str, set[str]] = defaultdict(set)
    for module, targets in file_graph().items():
        rooms[room(module)] |= {room(t) for t in targets if room(t) != room(module)}
    assert cycles(rooms) == []


def test_imports_run_down_the_floors():
    upward = []
    for module, targets in file_graph().items():
        here = room(module)
        for target in targets:
            there = room(target)
            if here == there or here == "farm":
                continue
            if FLOORS[there] > FLOORS[here] or (
                FLOORS[here] == FLOORS[there] == 0 and GROUND_ORDER[there] > GROUND_ORDER[here]
            ):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_domain_imports_nothing_of_farm_but_itself():
    outside = [f"{m} -> {t}" for m, targets in file_graph().items() if room(m) == "domain"
               for t in targets if room(t) != "domain"]
    assert outside == []


def test_engines_import_nothing_of_the_job_plane_or_serve():
    reaching = [f"{m} -> {t}" for m, targets in file_graph().items() if room(m) == "engines"
                for t in targets if room(t) in ("api", "jobs", "serve")]
    assert reaching == []


@pytest.mark.parametrize("plane_room", JOB_PLANE)
def test_the_job_plane_imports_no_ray(plane_room):
    with_ray = []
    for module, path in modules().items():
        if room(module) != plane_room:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            with_ray += [f"{module}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert with_ray == []


def test_every_served_family_has_its_names_here():
    from farm.families import Family

    assert {family.value for family in Family} == set(FAMILY_NAMES)


@pytest.mark.parametrize("family", sorted(FAMILY_NAMES))
def test_a_family_is_named_in_few_modules(family):
    naming = sorted(m for m, path in modules().items() if FAMILY_NAMES[family].search(path.read_text()))
    assert len(naming) <= MAX_MODULES_NAMING_A_FAMILY, f"{family} is named in {naming}"


def test_the_servicer_only_converts_and_delegates():
    lines = (FARM / "api" / "servicer.py").read_text().count("\n")
    assert lines < MAX_SERVICER_LINES, f"farm/api/servicer.py has {lines} lines"
