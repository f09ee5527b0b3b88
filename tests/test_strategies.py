"""The strategy catalog: DESIGN.md's table as data, each entry a well-formed pipeline of stages."""
import copy

import pytest

from engine import strategies as S
from engine.errors import InputError


def test_catalog_is_well_formed_and_covers_every_family():
    cat = S.check_catalog()
    fams = S.by_family()
    assert set(fams) == set(S.FAMILIES)
    assert all(fams[f] for f in S.FAMILIES), fams
    assert len(cat) == len(set(S.ids()))


def test_catalog_has_every_strategy_of_the_design_table():
    by_id = {s["id"]: s for s in S.catalog()}
    quant = {(st.get("method"), st.get("bits")) for s in S.catalog() for st in s["stages"] if st["stage"] == "quantize"}
    # PTQ only: INT8, NF4/FP4, GPTQ 2/3/4/8, AWQ 4, torchao int8/int4, dynamic, FP8
    for m in [("int8", None), ("nf4", None), ("fp4", None), ("gptq", 2), ("gptq", 3), ("gptq", 4), ("gptq", 8),
              ("awq", 4), ("torchao-int8", None), ("torchao-int4", None), ("w8a8", None), ("fp8", None)]:
        assert m in quant, m
    assert by_id["full-then-gptq-4bit"]["train"] == "full"
    assert [st["stage"] for st in by_id["lora-merge-gptq-4bit"]["stages"]] == ["train", "merge", "quantize", "evaluate"]
    assert [st["stage"] for st in by_id["qlora"]["stages"]][:2] == ["quantize", "train"]
    assert by_id["gptq-qlora"]["stages"][1]["base"] == "gptq"
    assert by_id["qa-lora"]["stages"][1]["group_aligned"] is True
    assert by_id["qat-int8"]["stages"][1]["stage"] == "convert"
    assert by_id["qat-lora"]["stages"][0]["lora"] is True
    assert by_id["full-finetune"]["family"] == by_id["lora"]["family"] == "finetune-only"
    assert {"bf16-baseline", "hosted-api"} == set(S.by_family()["no-change"])


def test_traits_and_mixed_precision_schemes():
    t = S.all_traits()
    assert t["ptq-gptq-4bit"] == {**t["ptq-gptq-4bit"], "family": "ptq-only", "train": "none", "quantized": True,
                                  "w_bits": 4, "a_bits": 16, "scheme": "W4A16", "calibration": True}
    assert t["ptq-dynamic-int8"]["scheme"] == "W8A8"
    assert t["ptq-fp8"]["scheme"] == "FP8" and t["ptq-fp8"]["fp8"] and t["ptq-fp8"]["gpu_only"]
    assert t["qat-int8"]["scheme"] == "W4A8"
    assert t["bf16-baseline"]["quantized"] is False and t["hosted-api"]["quantized"] is False
    assert t["qlora"]["lora"] and t["qat-lora"]["lora"] and not t["qat-int8"]["lora"]
    assert t["lora-merge-nf4"]["merge"] and not t["qlora"]["merge"]
    # which strategies keep some modules in 16-bit is part of the entry
    assert "lm_head" in S.get("ptq-nf4")["keep_16bit"]


def test_training_estimate_override_says_why():
    for s in S.catalog():
        if "train_estimate" in s:
            assert s.get("estimate_note"), s["id"]
    assert S.get("qat-lora")["train_estimate"] == "lora"


def test_unknown_strategy_lists_the_known():
    with pytest.raises(InputError, match="qlora"):
        S.get("qlora-9000")


@pytest.mark.parametrize("mutate, words", [
    (lambda c: c[0].update(family="magic"), "family"),
    (lambda c: c[3]["stages"].insert(0, {"stage": "distil"}), "stage"),
    (lambda c: c.append(copy.deepcopy(c[0])), "repeated"),
    (lambda c: c[2]["stages"].append({"stage": "quantize"}), "last stage must be evaluate"),
    (lambda c: c[0].pop("deploy"), "deploy is required"),
])
def test_check_catalog_rejects_malformed_entries(mutate, words):
    cat = copy.deepcopy(S.catalog())
    mutate(cat)
    with pytest.raises(InputError, match=words):
        S.check_catalog(cat)


def test_maturity_is_a_trait_and_checked():
    from engine import strategies
    t = strategies.all_traits()
    assert {sid for sid, tr in t.items() if tr["maturity"] == "research"} == {"qa-lora", "qa-lora-3bit", "qat-lora"}
    assert all(strategies.get(sid).get("maturity_note") for sid in ("qa-lora", "qa-lora-3bit", "qat-lora"))
    bad = [{**strategies.get("qlora"), "maturity": "beta"}]
    with pytest.raises(InputError, match="maturity of qlora"):
        strategies.check_catalog(bad)
