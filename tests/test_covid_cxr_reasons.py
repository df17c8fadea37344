"""Tests for covid_cxr/reasons.py: stable, described codes, and no code anywhere that bypasses the catalogue."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_architecture import ALLOWED

from covid_cxr.reasons import Reason, ReasonKind

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tuple(ALLOWED)
CATALOGUE = REPO_ROOT / "covid_cxr" / "reasons.py"
CODE_NAMES = {"reason", "default_reason"}
SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")

#: Every code released so far: stored rows and operators' scripts match on them, so none may change.
RELEASED = {
    "not_dicom", "truncated", "no_pixel_data", "not_an_image", "unsupported_transfer_syntax", "decode_failed",
    "unsupported_photometric", "wrong_modality", "wrong_body_part", "lateral_view", "multi_frame", "too_large",
    "internal_error", "duplicate_instance", "sop_instance_conflict", "corrupt_image", "missing_image",
    "preprocessing_mismatch", "inference_error", "worker_lost", "error", "bad_configuration", "rejected",
    "bad_dataset", "model_error", "model_integrity", "no_active_model", "database_error", "unsupported_dialect",
    "schema_out_of_date", "bad_labels_file", "png_not_written", "dataset_not_found", "bad_csv", "unknown_labels",
    "missing_files", "empty_dataset", "one_class_only", "unreadable_images", "bad_split", "sha256_mismatch",
    "version_conflict", "model_not_found", "artifact_missing", "artifact_exists", "artifact_incomplete",
    "unsafe_or_invalid", "wrong_io", "imagenet_weights_unavailable", "weights_file_missing", "weights_file_invalid",
    "unknown_window", "no_predictions", "bad_filter", "bad_model_reference", "bad_training_options",
    "bad_trainable_from", "undecodable", "not_utf8", "ignored_column", "bad_row", "missing_key", "several_keys",
    "bad_key", "unknown_label", "bad_source", "bad_date", "duplicate_key", "unknown_key",
}


def test_codes_are_unique_stable_snake_case_and_described() -> None:
    assert len(Reason.__members__) == len(list(Reason)), "two members share a code (the second is an alias)"
    assert {reason.value for reason in Reason} >= RELEASED
    for reason in Reason:
        assert SNAKE_CASE.fullmatch(reason.value), reason
        assert isinstance(reason.kind, ReasonKind)
        assert reason.description.strip() == reason.description and "\n" not in reason.description, reason
        assert reason.description and not reason.description.endswith("."), reason


def test_a_member_is_its_code_wherever_text_is_expected() -> None:
    assert Reason.NOT_DICOM == "not_dicom" and str(Reason.NOT_DICOM) == "not_dicom"
    assert f"[{Reason.NO_ACTIVE_MODEL}]" == "[no_active_model]"
    assert json.dumps({Reason.WORKER_LOST: Reason.CORRUPT_IMAGE}) == '{"worker_lost": "corrupt_image"}'


def test_lookup_finds_stored_codes_and_tolerates_unknown_ones() -> None:
    assert Reason.lookup("sop_instance_conflict") is Reason.SOP_INSTANCE_CONFLICT
    assert Reason.lookup("not_chest") is None  # a row written by an older release
    assert Reason.lookup(None) is None


def test_every_member_is_used_by_the_code() -> None:
    used = {node.attr for _, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Reason"}
    assert set(Reason.__members__) - used == set(), "catalogued but never stored or raised"


# --- drift: no code outside the catalogue ----------------------------------------------------------


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if path != CATALOGUE:
                yield str(path.relative_to(REPO_ROOT)), ast.parse(path.read_text(), str(path))


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else None


def _is_literal(node: ast.expr | None) -> bool:
    """Text written in place: a string, an f-string, or one picked by ``or`` / ``if`` / ``+``."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BoolOp):
        return any(_is_literal(value) for value in node.values)
    if isinstance(node, ast.IfExp):
        return _is_literal(node.body) or _is_literal(node.orelse)
    if isinstance(node, ast.BinOp):
        return _is_literal(node.left) or _is_literal(node.right)
    if isinstance(node, ast.Set | ast.List | ast.Tuple):
        return any(_is_literal(element) for element in node.elts)
    return False


def _reason_positions(trees: list[ast.Module]) -> dict[str, int]:
    """Callables with a ``reason`` parameter (functions, methods, ``__init__``, dataclass fields) -> its position."""
    positions: dict[str, int] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                fields = [item.target.id for item in node.body
                          if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)]
                if "reason" in fields:
                    positions[node.name] = fields.index("reason")
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        names = [arg.arg for arg in item.args.posonlyargs + item.args.args][1:]
                        if "reason" in names:
                            positions[node.name] = names.index("reason")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name != "__init__":
                names = [arg.arg for arg in node.args.posonlyargs + node.args.args]
                if names[:1] in (["self"], ["cls"]):
                    names = names[1:]
                if "reason" in names:
                    positions[node.name] = names.index("reason")
    return positions


def _assigned(targets: list[ast.expr], value: ast.expr | None) -> Iterator[tuple[ast.expr, ast.expr | None]]:
    for target in targets:
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            yield from zip(target.elts, value.elts, strict=True)
        else:
            yield target, value


def ad_hoc_codes(modules: list[tuple[str, ast.Module]]) -> list[str]:
    """``path:line: what`` for every reason code written as text instead of a :class:`Reason` member."""
    positions = _reason_positions([tree for _, tree in modules])
    found: list[str] = []
    for path, tree in modules:
        for node in ast.walk(tree):
            hits: list[str] = []
            if isinstance(node, ast.Call):
                hits += [f"{keyword.arg}=" for keyword in node.keywords
                         if keyword.arg in CODE_NAMES and _is_literal(keyword.value)]
                callee = _name(node.func)
                index = positions.get(callee or "")
                if index is not None and index < len(node.args) and _is_literal(node.args[index]):
                    hits.append(f"{callee}(...) positional reason")
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                hits += [f"{_name(target)} = ..." for target, value in _assigned(targets, node.value)
                         if _name(target) in CODE_NAMES and _is_literal(value)]
            elif isinstance(node, ast.Dict):
                hits += ['{"reason": ...}' for key, value in zip(node.keys, node.values, strict=True)
                         if isinstance(key, ast.Constant) and key.value == "reason"
                         and isinstance(value, ast.Constant) and isinstance(value.value, str)
                         and SNAKE_CASE.fullmatch(value.value)]
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(_name(side) in CODE_NAMES for side in sides) and any(_is_literal(side) for side in sides):
                    hits.append("reason compared with text")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                arguments = node.args.posonlyargs + node.args.args
                defaults = list(zip(arguments[len(arguments) - len(node.args.defaults):], node.args.defaults,
                                    strict=True))
                defaults += [(arg, default) for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults,
                                                                     strict=True) if default is not None]
                hits += [f"default {arg.arg}=" for arg, default in defaults
                         if arg.arg in CODE_NAMES and _is_literal(default)]
            found += [f"{path}:{getattr(node, 'lineno', '?')}: {hit}" for hit in hits]
    return found


def test_no_reason_code_is_written_outside_the_catalogue() -> None:
    assert ad_hoc_codes(list(_modules())) == [], "use a covid_cxr.reasons.Reason member (add one if needed)"


AD_HOC = '''
class ShinyError(CovidCxrError):
    default_reason = "shiny"

@dataclass
class Problem:
    line: int
    reason: str

def fail(ids, reason, message="failed"): ...

raise ModelError("gone", reason="model_gone")
raise ModelError("gone", reason=code or "model_gone")
session.execute(update(Instance).values(state="failed", reason=f"{kind}_lost"))
instance.reason = "lost"
state, reason = "rejected", "not_chest"
problems.append(Problem(3, "bad_line"))
fail([1], "worker_gone", "gone")
write_reason(path, {"reason": "not_chest", "message": "a hand"})
skipped = [p for p in problems if p.reason == "bad_line"]
def give_up(ids, *, reason="gave_up"): ...
'''
CLEAN = '''
class ShinyError(CovidCxrError):
    default_reason = Reason.ERROR

raise ModelError("gone", reason=Reason.MODEL_NOT_FOUND)
session.execute(update(Instance).values(state="failed", reason=failure.reason, message="gone"))
fail([1], Reason.WORKER_LOST, "gone")
drift = {"status": "not_applicable", "reason": "the reference describes images"}
skipped = [p for p in problems if p.reason is Reason.UNDECODABLE and p.message == "x"]
'''


@pytest.mark.parametrize("source, expected", [(AD_HOC, 11), (CLEAN, 0)])
def test_the_drift_check_finds_each_way_of_writing_a_code_by_hand(source: str, expected: int) -> None:
    assert len(ad_hoc_codes([("example.py", ast.parse(source))])) == expected
