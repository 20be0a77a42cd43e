"""Text classification three ways, in one run: the tokenizer in the model's processing.py, client-side ids,
and a middleman service.

The model: a small text classifier exported with TensorFlow (fixed seed): input `ids` int64 [-1, 32] (padded),
embedding, mean over the non-pad ids, dense -> `scores` float32 [-1, K] (softmax) and `classes` int64 [-1]
(argmax). Its version folder holds the vocabulary (vocab.txt, 5,000 made-up words), the label names
(labels.txt) and a processing.py written by this bench: the tokenizer of bench/peers/text_tokenizer.py
(lowercase, split, vocabulary lookup with an OOV id, pad or truncate to 32; it reads vocab.txt from
`model.path`) and the signatures `classify_text` (per request: text in, label names out) and
`classify_text_batched` (the same function declared `batched=True`).

The set-ups, against one pyserving process started with --enable_python_processing (the same flags for all):
  (a) processing.py: POST {"signature_name": "classify_text", "instances": ["<sentence>"]} to
      /v1/models/m:predict; pyserving tokenizes, runs the model, maps classes to names;
  (a') the same with "classify_text_batched" (batching on only: there the server merges requests before
      the function);
  (b) client-side ids: POST {"instances": [[32 ids]]} to /v1/models/m:predict; the answer is the raw
      scores and classes. wrk sends precomputed bytes, so the client's tokenizing and label mapping are NOT
      in the measurement (they would be on the client's CPU);
  (c) middleman: a FastAPI service (bench/peers/middleman.py, one uvicorn worker, its own virtualenv made by
      bench/setup) receives {"text": "<sentence>"}, tokenizes with the same code, calls (b)'s URL with an
      httpx.AsyncClient (keep-alive pool) and maps classes to names. It runs on the same machine, so its CPU
      is shared with pyserving and wrk.
Each point runs the set-ups in turn (a b c, then c b a, ...), wrk with 1 thread and a Lua body script, at 16
and 64 connections; medians of the repeats. One answer of each set-up is checked first for the same labels
(and against a numpy forward pass of the same weights). "CPU ms/req" is the CPU time of pyserving's process
per answered request, from /proc (for (c): pyserving + the middleman).

    bench/setup && .venv/bin/python bench/processing.py            # 3 x 10 s per point, batching off and on
    .venv/bin/python bench/processing.py --quick                     # 1 x 3 s per point, batching off
Writes bench/results/<time>-processing.md and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import tensorflow as tf  # noqa: E402
from _harness import free_port, running  # noqa: E402
from compare import BATCHING, median_point, serve, wrk  # noqa: E402
from text_tokenizer import LENGTH, PAD_ID, Tokenizer  # noqa: E402

VOCABULARY = 5000
DIM = 64
LABELS = ["sports", "politics", "science", "business", "health", "travel", "music", "food"]
WORDS_PER_SENTENCE = 12
# wrk's per-request timeout: long enough that a queueing middleman's slow answers count in p99, not as errors.
WRK_TIMEOUT = 30
MIDDLEMAN_PYTHON = HERE / ".venvs" / "middleman" / "bin" / "python"

# The part of the model's processing.py after the tokenizer's source (see write_processing).
SIGNATURES = """

# -- written by bench/processing.py: the signatures ---------------------------------------------------

from pyserving import processing

_TOKENIZERS = {}  # version folder (model.path) -> its Tokenizer, built on the first call


def _tokenizer(model):
    tokenizer = _TOKENIZERS.get(model.path)
    if tokenizer is None:
        tokenizer = _TOKENIZERS[model.path] = Tokenizer(model.path)
    return tokenizer


def _classify(model, text):
    tokenizer = _tokenizer(model)
    out = model.predict("serving_default", {"ids": tokenizer.encode(text)})
    return {"labels": tokenizer.label_bytes[out["classes"]]}


@processing.signature("classify_text", inputs={"text": ("string", [-1])}, outputs={"labels": ("string", [-1])})
def classify_text(model, text):
    return _classify(model, text)


@processing.signature(
    "classify_text_batched", inputs={"text": ("string", [-1])}, outputs={"labels": ("string", [-1])}, batched=True
)
def classify_text_batched(model, text):
    return _classify(model, text)
"""


# -- the model ----------------------------------------------------------------------------------------


def make_words(count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct made-up lowercase words of 2 to 4 syllables."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: dict[str, None] = {}
    while len(words) < count:
        words["".join(rng.choice(syllables, rng.integers(2, 5)))] = None
    return list(words)


def export_classifier(base: Path) -> tuple[Path, dict[str, np.ndarray], list[str]]:
    """Write the model to base/1; return (version folder, its weights, the vocabulary)."""
    rng = np.random.default_rng(0)
    tf.random.set_seed(0)
    words = make_words(VOCABULARY, rng)
    weights = {
        "embedding": rng.standard_normal((VOCABULARY + 2, DIM)).astype(np.float32),
        "kernel": (rng.standard_normal((DIM, len(LABELS))) / np.sqrt(DIM)).astype(np.float32),
        "bias": (rng.standard_normal(len(LABELS)) * 0.1).astype(np.float32),
    }
    module = tf.Module()
    module.embedding = tf.Variable(weights["embedding"], name="embedding")
    module.kernel = tf.Variable(weights["kernel"], name="kernel")
    module.bias = tf.Variable(weights["bias"], name="bias")

    @tf.function(input_signature=[tf.TensorSpec([None, LENGTH], tf.int64, name="ids")])
    def classify(ids):
        mask = tf.cast(tf.not_equal(ids, PAD_ID), tf.float32)[:, :, None]
        summed = tf.reduce_sum(tf.gather(module.embedding, ids) * mask, axis=1)
        mean = summed / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        scores = tf.nn.softmax(tf.matmul(mean, module.kernel) + module.bias)
        return {"scores": scores, "classes": tf.argmax(scores, axis=1, output_type=tf.int64)}

    module.classify = classify
    folder = base / "1"
    tf.saved_model.save(module, str(folder), signatures={"serving_default": classify})
    (folder / "vocab.txt").write_text("".join(word + "\n" for word in words), encoding="utf-8")
    (folder / "labels.txt").write_text("".join(name + "\n" for name in LABELS), encoding="utf-8")
    write_processing(folder)
    return folder, weights, words


def write_processing(folder: Path) -> None:
    """The model's processing.py: the shared tokenizer's source, then the signatures that use it."""
    source = (HERE / "peers" / "text_tokenizer.py").read_text(encoding="utf-8")
    (folder / "processing.py").write_text(source + SIGNATURES, encoding="utf-8")


def reference_labels(weights: dict[str, np.ndarray], ids: np.ndarray) -> list[str]:
    """The model's answer computed with numpy, to check the servers against."""
    mask = (ids != PAD_ID).astype(np.float32)[:, :, None]
    mean = (weights["embedding"][ids] * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
    return [LABELS[c] for c in np.argmax(mean @ weights["kernel"] + weights["bias"], axis=1)]


def make_sentences(words: list[str], count: int) -> list[str]:
    """Sentences of WORDS_PER_SENTENCE words from the vocabulary, in mixed case, one word out of it each."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        chosen = [str(w) for w in rng.choice(words, WORDS_PER_SENTENCE - 1)]
        chosen.insert(int(rng.integers(0, len(chosen))), "Qwxz")  # OOV
        chosen[0] = chosen[0].capitalize()
        out.append(" ".join(chosen))
    return out


# -- the set-ups ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def middleman(predict_url: str, folder: Path, work: Path):
    """Start bench/peers/middleman.py; yield its /classify URL."""
    port = free_port()
    command = [str(MIDDLEMAN_PYTHON), str(HERE / "peers" / "middleman.py"), str(port), predict_url, str(folder)]
    with running(command, port, work / "middleman.log", work, timeout=60) as proc:
        yield proc, f"http://127.0.0.1:{port}/classify"


def bodies(sentence: str, tokenizer: Tokenizer) -> dict[str, bytes]:
    return {
        "a": json.dumps({"signature_name": "classify_text", "instances": [sentence]}).encode(),
        "a2": json.dumps({"signature_name": "classify_text_batched", "instances": [sentence]}).encode(),
        "b": json.dumps({"instances": tokenizer.encode([sentence]).tolist()}).encode(),
        "c": json.dumps({"text": sentence}).encode(),
    }


def labels_of(setup: str, answer: dict, tokenizer: Tokenizer) -> list[str]:
    """The label names in one set-up's JSON answer."""
    if setup == "c":
        return answer["labels"]
    predictions = answer["predictions"]
    if setup == "b":
        return tokenizer.names(p["classes"] for p in predictions)
    return [p["labels"] if isinstance(p, dict) else p for p in predictions]


def check(urls: dict[str, str], sentences: list[str], tokenizer, weights) -> None:
    """Every set-up answers every sentence with the numpy reference's label; raises otherwise."""
    expected = reference_labels(weights, tokenizer.encode(sentences))
    for sentence, want in zip(sentences, expected, strict=True):
        for setup, url in urls.items():
            body = bodies(sentence, tokenizer)[setup]
            response = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
            if response.status_code != 200:
                raise RuntimeError(f"({setup}) answered {response.status_code}: {response.text[:300]!r}")
            got = labels_of(setup, response.json(), tokenizer)
            if got != [want]:
                raise RuntimeError(f"({setup}) labelled {sentence!r} {got}, expected [{want!r}]")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the run ------------------------------------------------------------------------------------------

NAMES = {
    "a": "(a) processing.py in pyserving",
    "a2": "(a') processing.py, batched=True form",
    "b": "(b) client-side ids (tokenizing not measured)",
    "c": "(c) FastAPI middleman -> pyserving REST",
}


def run_phase(label: str, flags: tuple[str, ...], args, model: Path, folder: Path, work: Path):
    """One pyserving process (and the middleman in front of it) for every point of one phase."""
    tokenizer = Tokenizer(folder)
    weights, sentences = args.weights, args.sentences
    sentence = sentences[0]
    results: dict[tuple[str, int], dict] = {}
    kind = "pyserving batching" if label == "on" else "pyserving"
    with serve(kind, model, work, flags) as (url, _), contextlib.ExitStack() as stack:
        server_pid = _server_pid(work)
        predict = f"{url}/v1/models/m:predict"
        middle, middle_url = stack.enter_context(middleman(predict, folder, work))
        urls = {"a": predict, "a2": predict, "b": predict, "c": middle_url}
        urls = {s: u for s, u in urls.items() if s in args.setups and (s != "a2" or label == "on")}
        check(urls, sentences, tokenizer, weights)
        body = bodies(sentence, tokenizer)
        for conns in args.connections:
            runs: dict[str, list[dict]] = {s: [] for s in urls}
            order = list(urls)
            for repeat in range(args.repeats):
                for setup in order if repeat % 2 == 0 else order[::-1]:
                    before = cpu_seconds(server_pid), cpu_seconds(middle.pid)
                    point = wrk(urls[setup], body[setup], conns, args.seconds, work, timeout=WRK_TIMEOUT)
                    requests_done = max(point["rps"] * args.seconds, 1)
                    point["cpu"] = (cpu_seconds(server_pid) - before[0]) / requests_done * 1e3
                    point["cpu_middleman"] = (cpu_seconds(middle.pid) - before[1]) / requests_done * 1e3
                    runs[setup].append(point)
            for setup in urls:
                point = median_point(runs[setup])
                point["runs"] = [r["rps"] for r in runs[setup]]
                results[(setup, conns)] = point
                print(label, NAMES[setup], conns, {k: v for k, v in point.items() if k != "runs"}, flush=True)
        if any(point["errors"] for point in results.values()):  # what the servers said about the failures
            _print_logs(work)
    return results, body


def _print_logs(work: Path) -> None:
    for log in sorted(work.glob("*.log")):
        print(f"--- {log.name} (last 40 lines)", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr, flush=True)


def _server_pid(work: Path) -> int:
    """The pid of the pyserving process serve() started (the newest child of this process running pyserving)."""
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    for pid in reversed(children):
        with contextlib.suppress(OSError):
            if "pyserving" in Path(f"/proc/{pid}/cmdline").read_text():
                return int(pid)
    raise RuntimeError("pyserving's process not found")


def render(tables: dict[str, dict], body: dict[str, bytes], args) -> str:
    lines = [
        "# Text classification: processing.py vs client-side ids vs a middleman "
        f"({datetime.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"{os.cpu_count()} CPUs, 127.0.0.1, wrk with 1 thread, {args.seconds:g} s per point, median of "
        f"{args.repeats}; batch-1 requests of one {WORDS_PER_SENTENCE}-word sentence; the set-ups take turns "
        "within each repeat against one pyserving process per batching setting. "
        "x (a): median of the per-repeat ratios of req/s to (a). CPU ms/req: CPU time of pyserving's process "
        "per answered request (from /proc), plus the middleman's for (c). (b)'s client-side tokenizing and "
        "label mapping are not measured: wrk sends precomputed ids. Batching on: --enable_batching with "
        f"`{BATCHING}`.",
        "",
        "Request bodies: "
        + ", ".join(f"{NAMES[s].split()[0]} {len(b)} bytes" for s, b in body.items() if s in args.setups),
        "",
    ]
    for label, table in tables.items():
        lines += [
            f"## batching {label}",
            "",
            "| set-up | connections | req/s | p50 ms | p99 ms | errors | x (a) | CPU ms/req |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for conns in args.connections:
            base = table.get(("a", conns))
            for setup in NAMES:
                point = table.get((setup, conns))
                if point is None:
                    continue
                ratio = ""
                if base and setup != "a":
                    pairs = [x / y for x, y in zip(point["runs"], base["runs"], strict=True) if y]
                    ratio = f"{statistics.median(pairs):.2f}" if pairs else ""
                cpu = f"{point['cpu']:.2f}"
                if setup == "c":
                    cpu += f" + {point['cpu_middleman']:.2f}"
                lines.append(
                    f"| {NAMES[setup]} | {conns} | {point['rps']:.0f} | {point['p50']:.2f} | {point['p99']:.2f} | "
                    f"{point['errors']:.0f} | {ratio} | {cpu} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 x 3 s per point, batching off only")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--connections", help="comma-separated connection counts (default 16,64)")
    parser.add_argument(
        "--batching",
        choices=["off", "on", "both"],
        help="pyserving's --enable_batching for the whole phase (default: both; off with --quick)",
    )
    parser.add_argument(
        "--setups", default="a,a2,b,c", help="comma-separated subset of a,a2,b,c (a2 runs with batching on only)"
    )
    args = parser.parse_args()
    args.setups = args.setups.split(",")
    args.seconds = args.seconds or (3 if args.quick else 10)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.connections = [int(c) for c in (args.connections or "16,64").split(",")]
    batching = args.batching or ("off" if args.quick else "both")
    if not MIDDLEMAN_PYTHON.exists():
        sys.exit("the middleman's virtualenv is missing: run bench/setup")
    work = Path(tempfile.mkdtemp(prefix="pyserving-processing-bench-"))
    try:
        folder, args.weights, words = export_classifier(work / "m")
        args.sentences = make_sentences(words, 8)
        print("sentence:", args.sentences[0], flush=True)
        uses_processing = {"a", "a2"} & set(args.setups)
        flags = ("--shutdown_delay_seconds=0",) + (("--enable_python_processing",) if uses_processing else ())
        tables: dict[str, dict] = {}
        for label in ("off", "on") if batching == "both" else (batching,):
            tables[label], body = run_phase(label, flags, args, work / "m", folder, work)
        report = render(tables, body, args)
    except BaseException:
        _print_logs(work)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    suffix = "-quick-processing" if args.quick else "-processing"
    out = HERE / "results" / f"{datetime.datetime.now():%Y-%m-%d-%H%M}{suffix}.md"
    out.write_text(report)
    print(report)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
