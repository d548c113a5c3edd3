"""tools/asm_corpus/fields.py: the 28-field layout."""

from __future__ import annotations

from asm_corpus_support import ac

from tools.asm_corpus import fields


def test_field_names_are_28_unique_and_documented():
    assert ac.N_FIELDS == 28 == len(ac.FIELD_NAMES) == len(set(ac.FIELD_NAMES))
    assert len(ac.CLASS_NAMES) == 12
    assert ac.FIELD_NAMES[:12] == tuple(f"class_{c}" for c in ac.CLASS_NAMES)
    for name in ac.FIELD_NAMES[12:]:
        assert name in fields.__doc__, f"{name} is not described in the fields.py docstring"
