"""Client data: the four domain loaders on their real sources, the split, JSONL.

A domain whose source is missing fails its tests, unless FEDSRD_MISSING_DOMAINS
names it: scripts/with-env.sh sets that only when it could not install the source.
"""

import json
import logging
import os
import random
import re

import pytest

from fedsrd_kernels.errors import ConfigError
from fedsrd_kernels.runner import data
from fedsrd_kernels.runner.data import DOMAINS, MAX_EXAMPLE_CHARS, DomainData, load_domains, load_jsonl


def _key(example) -> str:
    return example if isinstance(example, str) else json.dumps(example, sort_keys=True)


def _size(example) -> int:
    return len(example) if isinstance(example, str) else len(example["instruction"]) + len(example["response"])


def _load_or_skip(name, caplog, **kwargs) -> DomainData:
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        loaded = load_domains((name,), **kwargs)
    if name not in loaded:
        why = " ".join(r.getMessage() for r in caplog.records) or f"{name} source not installed"
        if name in os.environ.get("FEDSRD_MISSING_DOMAINS", "").split(","):
            pytest.skip(why)
        pytest.fail(f"{why}; scripts/with-env.sh installs it (or set FEDSRD_MISSING_DOMAINS={name})")
    return loaded[name]


@pytest.mark.parametrize("name", DOMAINS)
def test_domain_on_its_real_source(name, caplog):
    domain = _load_or_skip(name, caplog, max_examples=300, heldout_fraction=0.1, seed=0)
    assert domain.name == name
    total = len(domain.train) + len(domain.heldout)
    assert 0 < total <= 300 and domain.train
    assert domain.heldout and abs(len(domain.heldout) / total - 0.1) < 0.02
    for example in domain.train + domain.heldout:
        if isinstance(example, str):
            assert example.strip() and len(example) <= MAX_EXAMPLE_CHARS
        else:
            assert set(example) == {"instruction", "response"}
            assert example["instruction"].strip() and example["response"].strip()
            assert _size(example) <= 2 * MAX_EXAMPLE_CHARS
    assert not {_key(e) for e in domain.train} & {_key(e) for e in domain.heldout}
    texts = " ".join(e if isinstance(e, str) else e["instruction"] + " " + e["response"] for e in domain.train)
    expected = {"code": r"\bdef \w+\(|\bimport \w+", "medical": r"ICD-10-(CM|PCS)", "math": r"Answer: ",
                "finance": r"\baccounts?\b"}[name]
    assert len(re.findall(expected, texts)) >= 10


@pytest.mark.parametrize("name", DOMAINS)
def test_domain_is_deterministic_and_independent_of_the_others(name, caplog):
    first = _load_or_skip(name, caplog, max_examples=120, seed=3)
    others = tuple(d for d in DOMAINS if d != name)
    assert load_domains((*others, name), max_examples=120, seed=3)[name] == first
    changed = load_domains((name,), max_examples=120, seed=4)[name]
    assert changed.train != first.train


def test_medical_mixes_all_four_tables(caplog):
    domain = _load_or_skip("medical", caplog, max_examples=400, seed=0)
    examples = domain.train + domain.heldout
    instructions = [e["instruction"] for e in examples if isinstance(e, dict)]
    assert any(isinstance(e, str) and e.startswith("ICD-10-PCS guideline") for e in examples)
    assert any("root operation" in i for i in instructions)
    assert any("ICD-10-CM" in i for i in instructions)
    assert any("seven characters" in i for i in instructions)


def test_math_holds_every_champ_problem(caplog):
    domain = _load_or_skip("math", caplog, max_examples=10_000, heldout_fraction=0.1)
    assert len(domain.train) + len(domain.heldout) == 270
    assert len(domain.heldout) == 27


def test_missing_domain_is_skipped_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_DATA_DIRS", str(tmp_path))  # no GnuCash guide there

    def missing(rng, max_examples):
        raise data._SourceMissing("not installed here (pip install something)")

    monkeypatch.setitem(data._SOURCES, "medical", missing)
    monkeypatch.setitem(data._SOURCES, "math", lambda rng, n: [[{"instruction": "1+1?", "response": "2"}]] * 5)
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        loaded = load_domains(("medical", "finance", "math"), max_examples=10)
    assert list(loaded) == ["math"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "'medical' skipped" in messages[0] and "pip install something" in messages[0]
    assert "'finance' skipped" in messages[1] and "gnucash-docs" in messages[1]


def test_finance_reads_a_docbook_guide(monkeypatch, tmp_path):
    guide = tmp_path / "help" / "C" / "gnucash-guide"
    guide.mkdir(parents=True)
    (guide / "gnc.dtd").write_text(
        '<!ENTITY appname "GnuCash">\n<!ENTITY app "<application>&appname;</application>">\n'
        '<!ENTITY % gm.act "<guimenu>Actions</guimenu>">\n<!ENTITY act "%gm.act;">\n')
    body = "".join(f"<sect1 id='s{i}'><title>Section {i}</title><para>In &app; an account {i} holds "
                   f"<emphasis>money</emphasis>.<indexterm><primary>hidden</primary></indexterm></para>"
                   f"<para>Select <menuchoice>&act;<guimenuitem>Stock Split</guimenuitem></menuchoice> "
                   f"&amp; go &rsquo;&undefined;</para></sect1>" for i in range(12))
    (guide / "ch_x.xml").write_text(f'<?xml version="1.0"?>\n<!DOCTYPE chapter SYSTEM "gnc.dtd">\n'
                                    f"<chapter><title>Money</title><!-- comment -->{body}</chapter>")
    (guide / "legal.xml").write_text("<para>licence text</para>")
    monkeypatch.setenv("XDG_DATA_DIRS", str(tmp_path))
    domain = load_domains(("finance",), heldout_fraction=0.25)["finance"]
    assert len(domain.heldout) == 3 and len(domain.train) == 10  # 13 documents: the chapter title and 12 sections
    text = "\n".join(domain.train + domain.heldout)
    assert "Section 5\n\nIn GnuCash an account 5 holds money.\n\nSelect Actions > Stock Split & go \u2019" in text
    assert not re.search(r"[<>&]\w|hidden|licence|comment", text.replace("> Stock", ""))


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="unknown domains"):
        load_domains(("code", "legal"))
    with pytest.raises(ConfigError, match="repeat"):
        load_domains(("math", "math"))
    with pytest.raises(ConfigError, match="heldout_fraction"):
        load_domains(("math",), heldout_fraction=1.0)
    with pytest.raises(ConfigError, match="max_examples"):
        load_domains(("math",), max_examples=1)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
def test_split_keeps_documents_on_one_side(fraction):
    documents = [[f"d{d}c{c}" for c in range(1 + d % 4)] for d in range(40)]
    train, heldout = data._split([list(d) for d in documents], 50, fraction, random.Random(0))
    kept = len(train) + len(heldout)
    assert len(heldout) == (0 if fraction == 0 else max(1, round(fraction * 50)))
    assert kept <= 50 and len(set(train + heldout)) == kept
    sides = {}
    for side, examples in (("train", train), ("heldout", heldout)):
        for example in examples:
            assert sides.setdefault(example.split("c")[0], side) == side


def test_pack_respects_the_limit_and_loses_nothing():
    rng = random.Random(0)
    lines = ["x" * rng.choice([1, 5, 80, 700, 3000]) + "\n" for _ in range(60)]
    text = "".join(lines)
    chunks = data._pack(text.splitlines(keepends=True), "", limit=1000)
    assert all(0 < len(c) <= 1000 and c in text for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")  # only whitespace-only chunks are dropped
    paragraphs = data._pack(["a" * 600, "b" * 600, "c" * 100], "\n\n", limit=1000)
    assert paragraphs == ["a" * 600, "b" * 600 + "\n\n" + "c" * 100]


def test_jsonl_reads_both_formats_and_chunks_long_text(tmp_path):
    pytest.importorskip("datasets")
    long_text = "\n".join(f"line {i} " + "y" * 90 for i in range(60))
    path = tmp_path / "client.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"text": "short text"}, {"instruction": "What is 2+2?", "response": "4", "id": 7}, {"text": long_text},
    ]) + "\n")
    examples = load_jsonl(path)
    assert examples[0] == "short text"
    assert examples[1] == {"instruction": "What is 2+2?", "response": "4"}
    assert all(isinstance(e, str) and len(e) <= MAX_EXAMPLE_CHARS for e in examples[2:])
    assert "".join(examples[2:]) == long_text and len(examples) > 3


def test_jsonl_errors_name_the_file_and_record(tmp_path):
    pytest.importorskip("datasets")
    bad_record = tmp_path / "bad_record.jsonl"
    bad_record.write_text('{"text": "ok"}\n{"question": "no"}\n')
    with pytest.raises(ConfigError, match=r"bad_record.jsonl: record 2 has neither"):
        load_jsonl(bad_record)
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ConfigError, match="bad_json.jsonl: not valid JSONL"):
        load_jsonl(bad_json)
    with pytest.raises(ConfigError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert load_jsonl(empty) == []
