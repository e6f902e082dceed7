"""How much of an unrelated fact's key a batch's update responds to: ``python benchmarks/key_overlap.py``.

A least-squares update over a batch's keys H [m, d_ff] (UltraEdit's ridge solve, ΔW = Vᵀ(HHᵀ + λI)⁻¹H) changes
the layer's output at any key k by Vᵀ(HHᵀ + λI)⁻¹Hk: what it writes for the edits, it also writes for k, in
proportion to k's energy inside the keys' span. Per layer this prints that share, kᵀPk / kᵀk with the ridge
"hat" P = Hᵀ(HHᵀ + λI)⁻¹H, for the edits' own keys (≈ 1) and for the facts the unedited model answers
(known_1000, as the many-edit runs check them), at two sites:

- ``answer``: the positions UltraEdit reads (the last prompt token, predicting the object), in its layers;
- ``subject``: the subject's last token (where ROME and MEMIT read their keys), in MEMIT's layers.

A random key would put m / d_ff of its energy in the span; a share far above that means the keys of different
facts at that site lie in one common subspace, so an update written there reaches every fact's answer
(docs/many-edits.md, "Why the known facts go").

``--nullspace`` adds, at the answer site, the shares under ``edit.ultraedit.preserve=nullspace``'s solve: the
keys projected onto C's null space (H̃ = HP, P from C's eigendecomposition), the hat H̃ᵀ(H̃H̃ᵀ + λI)⁻¹H̃. C comes
from the statistics cache (computed when missing) with the overrides given after the options, e.g.
``python benchmarks/key_overlap.py --nullspace stats.tokens=50000 data.files=...``.

``--alphaedit`` asks the same of AlphaEdit's null-space projector P (eigenvalues of C below
``edit.alphaedit.nullspace_threshold`` x the mean) at the subject site in MEMIT's layers. AlphaEdit applies ΔP,
so a key k feeds the update only through Pk: per layer it prints the share kᵀPk / kᵀk for the edits' keys (what
the edits can be written through), for the known facts' keys (what they are exposed to), for every token of the
held-out articles (``eval.heldout``: text C never read; energy-weighted) and, for reference, C's own share
tr(PC) / tr(C) (the text C was read from); ``--thresholds 0.5,0.1`` compares thresholds.

``--fact-form N`` asks whether a preservation statistic of the facts' own form would tell the two kinds of key
apart at the answer site, where Wikipedia's C does not: C from the answer-position keys of N statements of
``counterfact-train.json`` (another 10,000 CounterFact records than the edits'; those about a subject of
known_1000 left out), then per UltraEdit layer the shares of the solve on the keys with C's r strongest
directions removed (r = 0, 1, 5, 20, 100, 400), for the edits' keys and the known facts' keys, and their ratio: what
an update kept off those directions can still write, against what it still reaches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rome.pipeline.core.hooks import Trace, TraceDict, get_module  # noqa: E402
from rome.pipeline.core.loading import configure, load_configured  # noqa: E402
from rome.pipeline.core.subject import fill_prompt, subject_token_range  # noqa: E402
from rome.pipeline.evaluation.cases import load_cases  # noqa: E402
from rome.pipeline.evaluation.retention import known_facts  # noqa: E402
from rome.pipeline.tracing.facts import load_facts  # noqa: E402


def keys_at(loaded, texts: list[tuple[str, int]], layer: int) -> torch.Tensor:
    """The down-projection inputs [len(texts), d_ff] (float64) of ``layer`` at each (text, token index)."""
    module = get_module(loaded.model, loaded.spec.down_proj_name(layer))
    out = []
    for text, index in texts:
        ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
        with torch.no_grad(), Trace(module, retain_input=True, stop=True) as trace:
            loaded.model(input_ids=ids, use_cache=False)
        out.append(trace.input[0, index].double())
    return torch.stack(out)


def hat_share(h: torch.Tensor, k: torch.Tensor, ridge: float) -> torch.Tensor:
    """kᵀPk / kᵀk per row of ``k``, P = Hᵀ(HHᵀ + λI)⁻¹H: the share of each key's energy the update responds to."""
    system = h @ h.T + ridge * torch.eye(len(h), dtype=h.dtype)
    response = (h.T @ torch.linalg.solve(system, h @ k.T)).T
    return (response * k).sum(1) / (k * k).sum(1)


def subject_end(tokenizer, prompt: str, subject: str) -> tuple[str, int]:
    text, start, end = fill_prompt(prompt, subject)
    return text, subject_token_range(tokenizer, text, start, end)[1] - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model.name (default: the embedded SmolLM2)")
    parser.add_argument("--edits", type=int, default=100, help="the dataset's records 0..N-1: one batch")
    parser.add_argument(
        "--dataset",
        default="../shared/data/counterfact/counterfact-edit.json",
        help="the edits' records: CounterFact or zsRE (as eval.dataset; zsRE's prompts are its questions)",
    )
    parser.add_argument("--nullspace", action="store_true", help="also the shares of the null-space solve")
    parser.add_argument("--alphaedit", action="store_true", help="AlphaEdit's null-space shares (subject site)")
    parser.add_argument(
        "--fact-form", type=int, default=0, metavar="N", help="answer-site C from N CounterFact-train statements"
    )
    parser.add_argument(
        "--thresholds", default=None, help="with --alphaedit: comma-separated thresholds (default: the config's)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for the statistics")
    args = parser.parse_args(argv)
    cfg = configure([f"model.name={args.model}", *args.overrides])
    loaded = load_configured(cfg.model, "cpu")
    tok = loaded.tokenizer
    requests = [c.request for c in load_cases(args.dataset, args.edits)[0]]
    facts = known_facts(loaded.model, tok, load_facts(cfg.eval.known.dataset, int(cfg.eval.known.n)))
    ridge = float(cfg.edit.ultraedit.ridge)
    sites = {
        "answer": (
            list(cfg.edit.ultraedit.layers or cfg.edit.layers),
            [(t, len(tok(t)["input_ids"]) - 1) for t in (r.text for r in requests)],
            [(t, len(tok(t)["input_ids"]) - 1) for t in (fill_prompt(f.prompt, f.subject)[0] for f in facts)],
        ),
        "subject": (
            list(cfg.edit.layers),
            [subject_end(tok, r.prompt, r.subject) for r in requests],
            [subject_end(tok, f.prompt, f.subject) for f in facts],
        ),
    }
    print(
        f"{args.model}: one batch of {len(requests)} edits of {Path(args.dataset).name}, {len(facts)} known facts, "
        f"ridge {ridge}"
    )
    shared = sum(1 for f in facts if f.prompt in {r.prompt for r in requests})
    print(f"known facts whose prompt template is one of the batch's: {shared} of {len(facts)}")
    if args.alphaedit:
        thresholds = args.thresholds or str(cfg.edit.alphaedit.nullspace_threshold)
        return alphaedit_shares(cfg, loaded, sites["subject"], [float(t) for t in thresholds.split(",")])
    if args.fact_form:
        return fact_form_shares(loaded, sites["answer"], args.fact_form, ridge, cfg.eval.known.dataset)
    projectors = {}
    if args.nullspace:
        answer_layers = sites["answer"][0]
        threshold = float(cfg.edit.ultraedit.nullspace_threshold)
        projectors = null_space_projectors(layer_spectra(cfg, loaded, answer_layers), threshold)
        for layer, (projector, own) in projectors.items():
            print(f"layer {layer}: null space of rank {round(float(projector.trace()))}, {own:.1%} of C's key energy")
    print("site     layer  d_ff  chance  edits' keys  known facts' keys (mean / median / min)")
    for site, (layers, edit_texts, fact_texts) in sites.items():
        for layer in layers:
            h, k = keys_at(loaded, edit_texts, layer), keys_at(loaded, fact_texts, layer)
            nullspace = site == "answer" and projectors
            solves = {site: h, f"{site}, P": h @ projectors[layer][0]} if nullspace else {site: h}
            for name, keys in solves.items():
                own, other = hat_share(keys, h, ridge), hat_share(keys, k, ridge)
                print(
                    f"{name:<9}{layer:>5} {h.shape[1]:>5} {len(h) / h.shape[1]:>7.3f} {own.mean():>12.3f}  "
                    f"{other.mean():.3f} / {other.median():.3f} / {other.min():.3f}"
                )
    return 0


def layer_spectra(cfg, loaded, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """C's cached eigendecomposition (eigenvalues, eigenvectors) per layer, read once: every threshold's P is built
    from it."""
    from rome.modules.statistics import layer_statistics
    from rome.pipeline.stats.spectrum import cached_eigendecomposition

    stats = layer_statistics(cfg, loaded)(layers)
    spectra = {}
    for layer in layers:
        spectra[layer] = cached_eigendecomposition(stats[layer])
        print(f"layer {layer}: C from {stats[layer].path.name}")
    return spectra


def null_space_projectors(
    spectra: dict[int, tuple[torch.Tensor, torch.Tensor]], threshold: float
) -> dict[int, tuple[torch.Tensor, float]]:
    """(P, tr(PC) / tr(C)) per layer at ``threshold``, P as AlphaEdit and ``edit.ultraedit.preserve=nullspace``
    build it."""
    from rome.pipeline.stats.spectrum import null_space_projector, null_space_share

    out = {}
    for layer, (values, vectors) in spectra.items():
        projector, _ = null_space_projector(values, vectors, threshold)
        out[layer] = projector.double(), null_space_share(values, threshold)
    return out


def token_keys(loaded, texts: list[str], layer: int, max_length: int) -> torch.Tensor:
    """The down-projection inputs (float64) at every token of each text's first ``max_length`` tokens."""
    module = get_module(loaded.model, loaded.spec.down_proj_name(layer))
    out = []
    for text in texts:
        ids = torch.tensor([loaded.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]])
        with torch.no_grad(), Trace(module, retain_input=True, stop=True) as trace:
            loaded.model(input_ids=ids, use_cache=False)
        out.append(trace.input[0].double())
    return torch.cat(out)


def alphaedit_shares(cfg, loaded, site: tuple[list[int], list, list], thresholds: list[float]) -> int:
    """``--alphaedit``: the share of each kind of key inside AlphaEdit's null space, per MEMIT layer and threshold."""
    from rome.pipeline.evaluation.retention import heldout_texts

    layers, edit_texts, fact_texts = site
    articles, _ = heldout_texts(cfg.data.files, int(cfg.eval.heldout.articles), cfg.data.text_field)
    share = lambda p, k: (k @ p * k).sum(1) / (k * k).sum(1)
    keys = {
        layer: (
            keys_at(loaded, edit_texts, layer),
            keys_at(loaded, fact_texts, layer),
            token_keys(loaded, articles, layer, int(cfg.eval.heldout.max_length)),
        )
        for layer in layers
    }
    print(
        "threshold  layer  rank  C's own  held-out tokens  edits' keys (mean / median)  "
        "known facts' keys (mean / median / max)  edits / facts"
    )
    spectra = layer_spectra(cfg, loaded, layers)
    for threshold in thresholds:
        for layer, (p, own) in null_space_projectors(spectra, threshold).items():
            h, k, text = keys[layer]
            heldout = float((text @ p * text).sum() / (text * text).sum())
            edits, facts = share(p, h), share(p, k)
            print(
                f"{threshold:>9g} {layer:>6} {round(float(p.trace())):>5} {own:>8.4f} {heldout:>16.4f}  "
                f"{edits.mean():>13.4f} / {edits.median():.4f}  {facts.mean():>20.4f} / {facts.median():.4f} / "
                f"{facts.max():.4f}  {edits.mean() / facts.mean():>13.2f}"
            )
    return 0


def answer_keys(loaded, texts: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """Per layer, the down-projection inputs [len(texts), d_ff] (float64) at each text's last token: one forward
    a text for all the layers."""
    names = [loaded.spec.down_proj_name(layer) for layer in layers]
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for text in texts:
        ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
        with torch.no_grad(), TraceDict(loaded.model, names, retain_input=True, stop=names[-1]) as traces:
            loaded.model(input_ids=ids, use_cache=False)
        for layer, name in zip(layers, names):
            out[layer].append(traces[name].input[0, -1].double())
    return {layer: torch.stack(keys) for layer, keys in out.items()}


def fact_form_shares(loaded, site: tuple[list[int], list, list], n: int, ridge: float, known_path: str) -> int:
    """``--fact-form N``: the answer-site shares with the strongest directions of a fact-form C removed."""
    import json

    layers, edit_texts, fact_texts = site
    known_subjects = {f.subject for f in load_facts(known_path, None)}
    train = Path(known_path).parent / "counterfact" / "counterfact-train.json"
    records = json.loads(train.read_text())
    pool = [r["prompt"] for r in records if r["subject"] not in known_subjects][:n]
    print(f"C at the answer position from {len(pool)} statements of {train.name} (none about a known_1000 subject)")
    edits = answer_keys(loaded, [t for t, _ in edit_texts], layers)
    facts = answer_keys(loaded, [t for t, _ in fact_texts], layers)
    statements = answer_keys(loaded, pool, layers)
    removed = (0, 1, 5, 20, 100, 400)
    print("layer  " + "  ".join(f"r={r}: edits / facts (ratio)" for r in removed))
    for layer in layers:
        c = statements[layer].T @ statements[layer] / len(pool)
        _, vectors = torch.linalg.eigh(c)  # ascending: the strongest directions last
        cells = []
        for r in removed:
            kept = vectors[:, : vectors.shape[1] - r]
            h = edits[layer] @ kept @ kept.T
            own, other = hat_share(h, edits[layer], ridge).mean(), hat_share(h, facts[layer], ridge).mean()
            cells.append(f"{own:>9.3f} / {other:.3f} ({own / other:.1f})")
        print(f"{layer:>5}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
