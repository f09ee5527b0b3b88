"""docs/advisor.md's worked examples are the advisor's answers for the preset scenarios, as
bench/advisor_examples.py generates them (regenerate: python bench/advisor_examples.py --write)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("advisor_examples", ROOT / "bench" / "advisor_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_worked_examples_in_the_doc_are_the_advisors_answers(monkeypatch):
    monkeypatch.setenv("TUNEQUANT_CALIBRATION", "off")
    tool = _tool()
    ids = tool.scenario_ids()
    assert len(ids) >= 6
    doc = tool.DOC.read_text()
    blocks = {sid: tool.block(sid) for sid in ids}
    for sid, text in blocks.items():
        assert f"<!-- example:{sid} -->\n{text}\n<!-- /example:{sid} -->" in doc, (
            f"docs/advisor.md's worked example {sid} differs from the advisor's answer; regenerate with "
            "python bench/advisor_examples.py --write")
    assert tool.render(doc, blocks) == doc
