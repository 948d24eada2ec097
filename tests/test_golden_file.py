"""The golden file itself: every case kind is one the tests check (none is skipped silently)."""

from goldenlib import KNOWN_KINDS, META_KEYS, golden, golden_path


def test_every_case_kind_is_checked():
    unknown = sorted(set(golden()) - KNOWN_KINDS - META_KEYS)
    assert not unknown, f"{golden_path()} has case kinds no test checks: {unknown}"


def test_file_has_cases():
    assert set(golden()) & KNOWN_KINDS, f"{golden_path()} holds no known case"
