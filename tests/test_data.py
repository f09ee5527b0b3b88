"""Datasets: reading JSONL/JSON/CSV, format detection, the problems validation names, the
held-out split, prompt rendering and token statistics. No torch needed."""
import json
import subprocess
import sys

import pytest

from engine.errors import InputError
from engine.runs import data
from engine.spec.run import DataSpec


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_detects_each_format(tmp_path):
    cases = {
        "text": [{"text": "hello world"}, {"text": "another line"}],
        "instruction": [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Say hi", "output": "hi"}],
        "chat": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
                 {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}]}],
        "classification": [{"text": "refund please", "label": "billing"}, {"text": "it crashes", "label": "bug"}],
    }
    for fmt, rows in cases.items():
        rep = data.validate_dataset(write_jsonl(tmp_path / f"{fmt}.jsonl", rows))
        assert rep["format"] == fmt, fmt
        assert rep["rows"] == rep["valid_rows"] == 2
        assert not data.errors_of(rep)


def test_render_templates_and_tasks():
    p, c = data.render({"instruction": "Add", "input": "1 2", "output": "3"}, "instruction")
    assert p == "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n" and c == "3"
    p, c = data.render({"instruction": "Say hi", "input": "", "output": "hi"}, "instruction")
    assert "### Input" not in p
    p, c = data.render({"text": "x", "label": "y"}, "classification")
    assert p.endswith("### Label:\n") and c == "y"
    p, c = data.render({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "chat")
    assert p == "<|user|>\nhi\n<|assistant|>\n" and c == "yo"
    assert data.render({"text": "abc"}, "text") == ("", "abc")


def test_problems_are_named_with_rows(tmp_path):
    rows = [{"text": "good", "label": "a"},
            {"text": "", "label": "a"},             # 2: empty
            {"text": "no label"},                    # 3: missing label
            "{not json",                             # 4: parse error
            {"text": "good", "label": "a"},          # 5: duplicate of 1
            {"text": "fine", "label": "b"}]
    rep = data.validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows), format="classification")
    kinds = {p["kind"]: p for p in rep["problems"]}
    assert kinds["parse"]["rows"] == [4] and kinds["parse"]["severity"] == "error"
    assert kinds["empty"]["rows"] == [2] and "text, label" in kinds["empty"]["message"]
    assert kinds["missing"]["rows"] == [3]
    assert kinds["duplicate"]["rows"] == [5] and kinds["duplicate"]["severity"] == "warning"
    assert rep["valid_rows"] == 3
    spec = DataSpec(path=str(tmp_path / "d.jsonl"), format="classification")
    with pytest.raises(InputError) as e:
        data.load(spec)
    msg = str(e.value)
    assert "1 line (4) are not valid JSON" in msg and "1 row (2) have an empty required field" in msg
    assert "1 row (3) lack a required field" in msg and e.value.field == "dataset"


def test_chat_rows_must_end_with_the_answer(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    rep = data.validate_dataset(write_jsonl(tmp_path / "c.jsonl", rows))
    kinds = {p["kind"]: p["rows"] for p in rep["problems"] if p["severity"] == "error"}
    assert kinds == {"no-answer": [1], "bad-message": [2]}


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="fields found: a, b"):
        data.validate_dataset(write_jsonl(tmp_path / "x.jsonl", [{"a": 1, "b": 2}]))
    with pytest.raises(InputError, match="not found") as e:
        data.validate_dataset(tmp_path / "nope.jsonl")
    assert e.value.field == "dataset.path"
    with pytest.raises(InputError, match="unsupported file type"):
        (tmp_path / "x.parquet").write_text("x")
        data.validate_dataset(tmp_path / "x.parquet")
    with pytest.raises(InputError, match="give path"):
        data.load(DataSpec())


def test_csv_and_json_array(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nrefund me,billing\nit broke,technical\n,billing\n")
    rep = data.validate_dataset(tmp_path / "d.csv")
    assert rep["format"] == "classification" and rep["valid_rows"] == 2
    assert [p["rows"] for p in rep["problems"] if p["kind"] == "empty"] == [[3]]
    assert rep["stats"]["labels"] == {"billing": 1, "technical": 1}
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert data.validate_dataset(tmp_path / "a.json")["format"] == "text"


def test_structured_outputs_and_stats(tmp_path):
    rows = [{"instruction": "extract", "input": f"order {i}", "output": json.dumps({"id": i, "city": "Oslo"})}
            for i in range(9)] + [{"instruction": "extract", "input": "junk", "output": "not json"}]
    rep = data.validate_dataset(write_jsonl(tmp_path / "s.jsonl", rows))
    assert rep["task"] == "structured" and rep["stats"]["json_object_outputs"] == 0.9
    st = rep["stats"]
    assert st["tokens_counted_by"].startswith("estimated")
    # hand-computed estimate: '{"id": 0, "city": "Oslo"}' is 25 chars -> round(25 / 4) = 6 tokens;
    # "not json" is 8 chars -> 2 tokens
    assert st["completion_tokens"]["min"] == 2 and st["completion_tokens"]["max"] == 6
    # fewer JSON outputs -> plain generation
    rows2 = rows[:5] + [{"instruction": "say", "output": f"word {i}"} for i in range(5)]
    assert data.validate_dataset(write_jsonl(tmp_path / "g.jsonl", rows2))["task"] == "generation"


def test_token_counts_with_a_real_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "bye": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": "hello world bye bye"}])
    rep = data.validate_dataset(path, tokenizer=tmp_path)
    assert rep["stats"]["total_tokens"] == {"min": 2, "mean": 3.0, "p50": 4, "p95": 4, "max": 4}
    assert rep["stats"]["sum_tokens"] == 6
    with pytest.raises(InputError, match="no tokenizer.json"):
        data.validate_dataset(path, tokenizer=tmp_path / "missing")


def test_split_is_seeded_deduplicated_and_sized(tmp_path):
    rows = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(50)] + [{"text": "row 0", "label": "a"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = data.load(DataSpec(path=str(path)))
    b = data.load(DataSpec(path=str(path)))
    c = data.load(DataSpec(path=str(path), seed=1))
    assert len(a.train) == 40 and len(a.eval) == 10                    # 50 distinct rows, 20% held out
    assert [e.prompt for e in a.eval] == [e.prompt for e in b.eval]
    assert [e.prompt for e in a.eval] != [e.prompt for e in c.eval]
    assert not {e.prompt for e in a.train} & {e.prompt for e in a.eval}
    assert a.task == "classification" and a.labels == ["a", "b"]
    d = data.load(DataSpec(path=str(path), max_examples=10, eval_fraction=0.3))
    assert len(d.train) == 7 and len(d.eval) == 3
    with pytest.raises(InputError, match="at least 2"):
        data.load(DataSpec(path=str(write_jsonl(tmp_path / "one.jsonl", [{"text": "x"}]))))


def test_demo_datasets_are_deterministic_and_valid():
    from engine.runs import demo
    t1, t2 = demo.dataset_rows("tickets", 50), demo.dataset_rows("tickets", 50)
    assert t1 == t2 and len({r["text"] for r in t1}) == 50
    counts = {}
    for r in t1:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    assert counts == {"account": 10, "billing": 10, "feature_request": 10, "shipping": 10, "technical": 10}
    j = demo.dataset_rows("json-extraction", 20)
    for r in j:
        obj = json.loads(r["output"])
        assert set(obj) == {"name", "city", "item", "quantity"}
        assert obj["name"] in r["input"] and obj["city"] in r["input"] and str(obj["quantity"]) in r["input"]
    rep = data.validate_rows(j, "auto")
    assert rep["format"] == "instruction" and rep["task"] == "structured" and not rep["problems"]
    with pytest.raises(InputError, match="known: tickets, json-extraction"):
        demo.dataset_rows("nope")


def test_no_torch_on_import():
    code = ("import sys; import engine.runs.data, engine.runs.demo, engine.runs.stages; "
            "from engine.runs import data; "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'torchao', 'gptqmodel') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert r.returncode == 0, r.stdout + r.stderr


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_renders_each_prompt_as_a_user_turn(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path))
    t = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", bos_token="<s>")
    ds = data.load(DataSpec(demo="tickets", max_examples=20))
    assert data.with_chat_template(ds, tok) is ds                      # no template: the plain prompts stay
    tok.chat_template = CHATML
    chat = data.with_chat_template(ds, tok)
    assert chat.chat_template and data.with_chat_template(chat, tok) is chat and len(chat.eval) == len(ds.eval)
    for raw, ex in zip(ds.train + ds.eval, chat.train + chat.eval):
        text = raw.prompt.split("### Text:\n", 1)[1].split("\n\n### Label:", 1)[0]
        assert ex.prompt == ("<|im_start|>user\nRoute the message to one queue: billing, shipping, technical, account "
                             f"or feature_request.\n\n{text}<|im_end|>\n<|im_start|>assistant\n")
        assert (ex.completion, ex.label) == (raw.completion, raw.label)
    js = data.with_chat_template(data.load(DataSpec(demo="json-extraction", max_examples=10)), tok)
    ex = js.train[0]
    assert ex.prompt.startswith('<|im_start|>user\nExtract the order as JSON with the keys "name"') and ex.fields
    assert ex.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and json.loads(ex.completion) == ex.fields
    text = data.load(DataSpec(demo="python-docs", max_examples=10))
    assert data.with_chat_template(text, tok) is text                  # plain text has no prompt to render
