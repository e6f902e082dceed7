"""The reliability catalogue: hostile and careless inputs tried against the command line, each expected to be
refused in one ``error:`` line with exit code 2, leaving every file it names as it was.

    python tests/probes.py                 # prints every probe and "N tried, N held"; exit 1 if one broke
    python tests/probes.py --write docs/reliability-probes.md

A probe "holds" when the run exits 2 with exactly one error line containing the expected words, prints no
traceback, and every protected file (the user's directory, a ledger, statistics) has the same bytes afterwards.
The probes run in this process through ``cli.main`` on a tiny random GPT-2 (no download); the ones that need a
model load it once. ``tests/test_probes.py`` runs this catalogue in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})

COUNTERFACT = HERE.parent.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}


@dataclasses.dataclass
class Probe:
    group: str
    name: str
    argv: Callable[[World], list[str]]  # built once the world exists
    expect: str  # words the one error line must contain
    protect: Callable[[World], list[Path]] = lambda w: []  # noqa: E731  files and directories that must not change
    setup: Callable[[World], None] | None = None
    teardown: Callable[[World], None] | None = None


@dataclasses.dataclass
class World:
    root: Path
    model: Path
    wiki: Path
    base: list[str]  # a working edit configuration on the tiny model
    ledger: Path  # a ledger with one edit
    stats: Path  # a statistics directory with layer 2
    user_dir: Path  # a directory of the user's


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for top in paths:
        for p in sorted([top, *top.rglob("*")] if top.is_dir() else [top]):
            h.update(str(p).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def run(argv: list[str]) -> tuple[int, list[str], str]:
    from rome import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException as crash:  # a traceback is a broken probe
            return 1, [], f"{type(crash).__name__}: {crash}"
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    return code, errors, err.getvalue()


def make_world(root: Path) -> World:
    from conftest import WIKI, build_tiny_model, tiny_args

    model = build_tiny_model("gpt2", root / "tiny-gpt2")
    wiki = root / "wiki.jsonl"
    with contextlib.closing(__import__("gzip").open(WIKI, "rt")) as f:
        wiki.write_text("".join(line for _, line in zip(range(300), f)))
    stats = root / "stats"
    base = [
        *tiny_args(model, wiki, root),
        "edit.generate_tokens=0",
        "edit.verify.enabled=false",
        "edit.v.steps=2",
        "stats.layers=[2]",
    ]
    ledger = root / "ledger"
    code, errors, text = run(
        ["stage=edit", *base, f"request={json.dumps(EIFFEL)}", f"edit.out={ledger}", f"edit.save_to={root / 'saved'}"]
    )
    assert code == 0, (errors, text[-2000:])
    user = root / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("four years of work")
    (user / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return World(root, model, wiki, base, ledger, stats, user)


def _edit(w: World, *extra: str) -> list[str]:
    return ["stage=edit", *w.base, f"request={json.dumps(EIFFEL)}", *extra]


def _ledger_copy(w: World, name: str, change: Callable[[Path], None]) -> Path:
    copy = w.root / name
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(w.ledger, copy)
    change(copy)
    return copy


def _json_edit(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _flip(path: Path, at: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def probes() -> list[Probe]:
    out: list[Probe] = []
    config = [  # (override, expected words): judged before any work
        ("stats.tokens=abc", "expects an integer"),
        ("stats.tokens=1.5", "expects an integer"),
        ("stats.tokens=null", "is not allowed"),
        ("stats.tokens=0", "must be positive"),
        ("stats.tokens=-5", "must be positive"),
        ("stats.layers=6", "expects a list"),
        ("stats.layers=[4,x]", "stats.layers[1]=x"),
        ("stats.dtype=int8", "is not one of"),
        ("stats.product=tf32", "is not one of fp32, exact"),
        ("model.dtype=int8", "is not one of"),
        ("model.dtype=half", "is not one of"),
        ("data.max_length=0", "must be positive"),
        ("data.batch_tokens=-1", "is not valid"),
        ("data.sort_window=0", "must be positive"),
        ("data.num_workers=-1", "must be zero or more"),
        ("seed=-1", "must be zero or more"),
        ("edit.verify.enabled=maybe", "expects true or false"),
        ("edit.v=3", "is a group of keys"),
        ("edit.layer=first", "expects an integer or auto"),
        ("edit.v.steps=0", "must be positive"),
        ("edit.v.lr=fast", "expects a number"),
        ("edit.batch_size=0", "must be positive"),
        ("edit.ridge=-1", "must be zero or more"),
        ("edit.layr=3", "did you mean edit.layer?"),
        ("edt.layer=3", "did you mean edit.layer?"),
        ("trace.sample=3", "did you mean trace.samples?"),
        ("stats.layer=6", "did you mean stats.layers?"),
        ("eval.n=-3", "must be positive"),
        ("eval.score_batch_size=0", "must be positive"),
        ("eval.generation.top_k=0", "must be positive"),
        ("eval.start=-1", "must be zero or more"),
        ("trace.start=-1", "must be zero or more"),
        ("trainer.num_nodes=0", "must be positive"),
        ("stats.convergence.probes=-1", "must be zero or more"),
        ("nonsense", "is not key=value"),
        ("=3", "is not key=value"),
        ("stage=stat", "did you mean stats"),
        ("stage=train", "is not one of"),
        ("model.device=cuda:7", "CUDA"),
        ("trainer.accelerator=gpu", "CUDA"),
        ("model.device=gpu0", "is not a device"),
        ("method.ft_l.lrr=1", "unknown"),
        ("method.x={class: nope}", "class 'nope'"),
        ("method.rome_x={class: rome, lr: 1}", "unknown key"),
        ("method.e2={class: encore, memit: {preserve_edit: false}}", "did you mean method.e2.memit.preserve_edits"),
    ]
    for override, expect in config:
        out.append(Probe("configuration", override, lambda w, o=override: ["stage=stats", *w.base, o], expect))
    requests = [
        ("malformed JSON", 'request={"prompt": ', "request"),
        ("no subject", 'request={"prompt": "{} is in", "target_new": "Rome"}', "subject"),
        ("subject not in prompt", 'request={"prompt": "X is in", "subject": "Y", "target_new": "Rome"}', "subject"),
        ("no target_new", 'request={"prompt": "{} is in", "subject": "Y"}', "target_new"),
        ("empty target_new", 'request={"prompt": "{} is in", "subject": "Y", "target_new": ""}', "target_new"),
        (
            "empty paraphrase",
            'request={"prompt": "{} is in", "subject": "Y", "target_new": "R", "paraphrases": [""]}',
            "paraphrase",
        ),
        ("a directory as request", "request=/tmp", "directory"),
        ("a missing request file", "request=/nonexistent/requests.json", "request"),
        ("empty request list", "request=[]", "request"),
        ("request of a number", "request=5", "request"),
        ("no request at all", "request=null", "request"),
        (
            "target equals the true object",
            'request={"prompt": "{} is in", "subject": "Y", "target_new": "Paris", "target_true": "Paris"}',
            "equals the true object",
        ),
    ]
    for name, arg, expect in requests:
        out.append(Probe("edit request", name, lambda w, a=arg: ["stage=edit", *w.base, a], expect))
    dirs = [
        (
            "trace.out is the user's directory",
            lambda w: ["stage=trace", *w.base, "prompt={} is in", "subject=Paris", f"trace.out={w.user_dir}"],
            "not written by this project",
        ),
        (
            "stats.dir is the user's directory",
            lambda w: ["stage=stats", *w.base, f"stats.dir={w.user_dir}"],
            "not written by this project",
        ),
        (
            "edit.save_to is the user's directory",
            lambda w: _edit(w, f"edit.save_to={w.user_dir}"),
            "not a model saved by this project",
        ),
        (
            "edit.save_to inside a file",
            lambda w: _edit(w, f"edit.save_to={w.user_dir / 'thesis.txt' / 'm'}"),
            "is under the file",
        ),
        ("edit.save_to is a file", lambda w: _edit(w, f"edit.save_to={w.user_dir / 'thesis.txt'}"), "is a file"),
        ("edit.save_to is the current directory", lambda w: _edit(w, "edit.save_to=."), "current directory"),
        ("edit.save_to is the base model", lambda w: _edit(w, f"edit.save_to={w.model}"), "would replace"),
        (
            "edit.save_to is the ledger",
            lambda w: _edit(w, f"edit.out={w.ledger}", f"edit.save_to={w.ledger}"),
            "would replace",
        ),
        ("edit.save_to under /proc", lambda w: _edit(w, "edit.save_to=/proc/rome-model"), "cannot be written"),
        ("edit.out is the user's directory", lambda w: _edit(w, f"edit.out={w.user_dir}"), "holds files but no ledger"),
        ("edit.out is a file", lambda w: _edit(w, f"edit.out={w.user_dir / 'thesis.txt'}"), "is a file"),
    ]
    for name, argv, expect in dirs:
        out.append(Probe("output directories", name, argv, expect, protect=lambda w: [w.user_dir, w.ledger, w.model]))

    def revert(name: str, change: Callable[[Path], None], expect: str) -> Probe:
        return Probe(
            "ledger read back",
            name,
            lambda w, n=name, c=change: [
                "stage=revert",
                f"ledger={_ledger_copy(w, 'lc-' + str(abs(hash(n))), c)}",
                "edit_id=1",
                f"edit.save_to={w.root / 'reverted'}",
            ],
            expect,
            protect=lambda w: [w.ledger, w.user_dir],
        )

    def continued(name: str, change: Callable[[Path], None], expect: str) -> Probe:
        """An edit that continues a damaged ledger: its earlier edits are re-applied, so their files are read."""
        return Probe(
            "ledger read back",
            name,
            lambda w, n=name, c=change: _edit(w, f"edit.out={_ledger_copy(w, 'ec-' + str(abs(hash(n))), c)}"),
            expect,
            protect=lambda w: [w.ledger, w.user_dir],
        )

    for field, value in (
        ("layer", 1),
        ("module", "transformer.h.1.mlp.c_proj"),
        ("denominator", 2.0),
        ("conv1d", False),
        ("sha256", None),
        ("status", "applied"),
    ):

        def change(d, f=field, v=value):
            _json_edit(d / "ledger.json", lambda data: data["entries"][0].__setitem__(f, v))

        if field != "status":
            out.append(revert(f"ledger.json: entry's {field} changed", change, "changed outside this project"))
    out += [
        revert(
            "ledger.json: a path with ..",
            lambda d: _json_edit(
                d / "ledger.json", lambda data: data["entries"][0].__setitem__("file", "../../victim.txt")
            ),
            "changed outside this project",
        ),
        revert(
            "ledger.json: truncated",
            lambda d: (d / "ledger.json").write_text((d / "ledger.json").read_text()[:50]),
            "not valid JSON",
        ),
        revert(
            "ledger.json: invalid UTF-8", lambda d: (d / "ledger.json").write_bytes(b"\xff\xfe{}"), "not valid JSON"
        ),
        revert("ledger.json: not a ledger", lambda d: (d / "ledger.json").write_text('{"a": 1}'), "not a ledger"),
        continued("edit file: 1 byte flipped", lambda d: _flip(next((d / "edits").iterdir())), "fails its checksum"),
        continued(
            "edit file: truncated",
            lambda d: (p := next((d / "edits").iterdir())).write_bytes(p.read_bytes()[:30]),
            "fails its checksum",
        ),
        continued("edit file: removed", lambda d: next((d / "edits").iterdir()).unlink(), "cannot be read"),
        revert("edit id that is not there", lambda d: None, "is not in the ledger"),
    ]
    out[-1].argv = lambda w: ["stage=revert", f"ledger={w.ledger}", "edit_id=9", f"edit.save_to={w.root / 'r9'}"]
    out += [
        Probe("ledger read back", "revert without a ledger", lambda w: ["stage=revert", "edit_id=1"], "pass ledger="),
        Probe(
            "ledger read back",
            "revert of a directory with no ledger",
            lambda w: ["stage=revert", f"ledger={w.user_dir}", "edit_id=1"],
            "no ledger",
            protect=lambda w: [w.user_dir],
        ),
        Probe(
            "ledger read back",
            "edit.out of another model's ledger",
            lambda w: _edit(w, f"edit.out={_ledger_copy(w, 'other-model', lambda d: _ledger_other(d))}"),
            "changed outside this project",
        ),
    ]

    def stats_probe(name: str, change: Callable[[Path], None], expect: str) -> Probe:
        def argv(w: World, c=change, n=name) -> list[str]:
            copy = w.root / f"stats-{abs(hash(n))}"
            if copy.exists():
                shutil.rmtree(copy)
            shutil.copytree(w.stats, copy)
            (entry,) = [p.parent for p in copy.glob("*/manifest.json")]
            c(entry)
            return _edit(w, f"edit.stats={entry}")

        return Probe("statistics read back", name, argv, expect, protect=lambda w: [w.stats, w.user_dir])

    out += [
        stats_probe(
            "manifest: a layer file outside the directory",
            lambda e: _json_edit(
                e / "manifest.json", lambda m: m["layers"]["2"].__setitem__("file", "../../../mine/thesis.txt")
            ),
            "outside",
        ),
        stats_probe(
            "manifest: an absolute path",
            lambda e: _json_edit(e / "manifest.json", lambda m: m["layers"]["2"].__setitem__("file", "/etc/passwd")),
            "not a relative path",
        ),
        stats_probe(
            "manifest: not JSON",
            lambda e: (e / "manifest.json").write_text("{not json"),
            "is not a statistics manifest",
        ),
        stats_probe(
            "manifest: entry of the wrong type",
            lambda e: _json_edit(e / "manifest.json", lambda m: m["layers"].__setitem__("2", 7)),
            "is damaged",
        ),
        stats_probe("layer file: 1 byte flipped", lambda e: _flip(e / "layer_2.safetensors"), "corrupt"),
        stats_probe("layer file: removed", lambda e: (e / "layer_2.safetensors").unlink(), "is missing"),
        stats_probe(
            "layer file of another module",
            lambda e: _json_edit(
                e / "manifest.json", lambda m: m["layers"]["2"].__setitem__("module", "transformer.h.1.mlp.c_proj")
            ),
            "are for module",
        ),
    ]
    out += [
        Probe(
            "judged before work",
            "trace a dataset without the mlp kind",
            lambda w: [
                "stage=trace",
                *w.base,
                "trace.kinds=[hidden]",
                f"trace.dataset={HERE.parent.parent / 'shared' / 'data' / 'known_1000.json'}",
            ],
            "needs the mlp kind",
        ),
        Probe(
            "output directories",
            "eval.out is the user's directory (per case)",
            lambda w: [
                "stage=eval",
                *w.base,
                f"eval.dataset={COUNTERFACT}",
                f"eval.out={w.user_dir}",
                "eval.methods=[none]",
                "eval.n=2",
            ],
            "not written by this project",
            protect=lambda w: [w.user_dir],
        ),
        Probe(
            "output directories",
            "eval.out is the user's directory (sequential)",
            lambda w: [
                "stage=eval",
                *w.base,
                "eval.mode=sequential",
                f"eval.dataset={COUNTERFACT}",
                f"eval.out={w.user_dir}",
                "eval.methods=[none]",
                "eval.n=2",
            ],
            "not written by this project",
            protect=lambda w: [w.user_dir],
        ),
        Probe(
            "judged before work",
            "eval.start past the end of the data",
            lambda w: [
                "stage=eval",
                *w.base,
                f"eval.dataset={COUNTERFACT}",
                "eval.start=999999",
                f"eval.out={w.root / 'e-past'}",
                "eval.methods=[none]",
            ],
            "past the end",
        ),
        Probe(
            "judged before work",
            "eval methods empty",
            lambda w: [
                "stage=eval",
                *w.base,
                f"eval.dataset={COUNTERFACT}",
                f"eval.out={w.root / 'e-none'}",
                "eval.methods=[]",
                "eval.n=2",
            ],
            "eval.methods is empty",
        ),
        Probe(
            "judged before work",
            "memit in the per-case eval",
            lambda w: [
                "stage=eval",
                *w.base,
                f"eval.dataset={COUNTERFACT}",
                f"eval.out={w.root / 'e-memit'}",
                "eval.methods=[memit]",
                "eval.n=2",
            ],
            "eval.mode=sequential",
        ),
        Probe(
            "judged before work", "stats.layers empty", lambda w: ["stage=stats", *w.base, "stats.layers=[]"], "empty"
        ),
        Probe("judged before work", "an edit layer out of range", lambda w: _edit(w, "edit.layer=99"), "out of range"),
        Probe(
            "judged before work",
            "trace with prompt and dataset",
            lambda w: ["stage=trace", *w.base, "prompt={} is in", "subject=X", "trace.dataset=x.json"],
            "not both",
        ),
        Probe(
            "judged before work", "trace with nothing to trace", lambda w: ["stage=trace", *w.base], "nothing to trace"
        ),
        Probe(
            "judged before work",
            "trace.kinds unknown",
            lambda w: ["stage=trace", *w.base, "prompt={} is", "subject=X", "trace.kinds=[neurons]"],
            "must be a non-empty list",
        ),
        Probe(
            "judged before work",
            "an unknown model",
            lambda w: ["stage=stats", *w.base, "model.name=/no/such/model"],
            "neither a local directory nor reachable",
        ),
        Probe("judged before work", "an unknown edit method", lambda w: _edit(w, "edit.method=magic"), "is not one of"),
        Probe("judged before work", "ft_l in the edit stage", lambda w: _edit(w, "edit.method=ft_l"), "is not one of"),
        Probe(
            "judged before work",
            "memit without a layer set",
            lambda w: _edit(w, "edit.method=memit", "edit.layers=null"),
            "layer set",
        ),
        Probe(
            "judged before work",
            "rome on a module other than the down-projection",
            lambda w: _edit(w, "model.arch.down_proj=mlp.c_fc"),
            "writes its value at the MLP's output",
        ),
        Probe(
            "judged before work",
            "a negative norm constraint for ENCORE",
            lambda w: _edit(w, "edit.method=encore", "edit.layers=[1,2]", "edit.encore.norm_constraint=-1"),
            "edit.memit.norm_constraint=-1 must be >= 0",
        ),
        Probe(
            "judged before work",
            "a negative MPES count",
            lambda w: _edit(w, "edit.v.most_probable_stop=-2"),
            "edit.v.most_probable_stop=-2 must be a count >= 0",
        ),
        Probe(
            "judged before work",
            "one layer named for two modules",
            lambda w: _edit(
                w, "edit.method=ultraedit", "model.arch.down_proj_by_layer={mlp.c_fc: [1], mlp.c_proj: [1, 2]}"
            ),
            "names layer 1 for both mlp.c_fc and mlp.c_proj",
        ),
    ]
    return out


def _ledger_other(d: Path) -> None:
    _json_edit(d / "ledger.json", lambda data: data.__setitem__("model", {"name": "other", "revision": "x"}))


def try_all(world: World, chosen: list[Probe]) -> list[tuple[Probe, bool, str]]:
    results = []
    for probe in chosen:
        if probe.setup:
            probe.setup(world)
        argv = probe.argv(world)
        protected = probe.protect(world)
        before = digest(protected)
        code, errors, text = run(argv)
        held = code == 2 and len(errors) == 1 and probe.expect in errors[0] and "Traceback" not in text
        held = held and digest(protected) == before
        results.append((probe, held, errors[0] if errors else f"exit {code}: {text.strip()[-300:]}"))
        if probe.teardown:
            probe.teardown(world)
    return results


def report(results: list[tuple[Probe, bool, str]]) -> str:
    held = sum(ok for _, ok, _ in results)
    lines = [
        "# Reliability probes",
        "",
        "Generated by `python tests/probes.py --write docs/reliability-probes.md` (the same catalogue runs in the "
        "test suite: `tests/test_probes.py`). Each probe is run through the command line on a tiny random GPT-2; "
        "it holds when the run exits 2 with exactly one error line naming the problem, prints no traceback, and "
        "every file it names is unchanged afterwards.",
        "",
        f"**{len(results)} tried, {held} held.**",
        "",
        "| group | probe | held | what the user reads |",
        "|---|---|---|---|",
    ]
    for probe, ok, line in results:
        lines.append(
            f"| {probe.group} | {probe.name.replace('|', '/')} | {'yes' if ok else 'NO'} | "
            f"{line.replace('|', '/')[:220]} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", help="write the catalogue as Markdown to this file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rome-probes-") as tmp:
        world = make_world(Path(tmp))
        results = try_all(world, probes())
    text = report(results)
    for probe, ok, line in results:
        print(f"{'held ' if ok else 'BROKE'} [{probe.group}] {probe.name}: {line[:160]}")
    held = sum(ok for _, ok, _ in results)
    print(f"{len(results)} tried, {held} held")
    if args.write:
        Path(args.write).write_text(text)
    return 0 if held == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
