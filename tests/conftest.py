"""Shared fixtures: tiny randomly initialised models of every family, saved as real HF directories.

No download: a byte-level BPE tokenizer is trained in a second on the shared Wikipedia sample, and the
models are built from configs.  ``tiny_model_dir(family)`` is what ``model.name=`` takes in CLI tests.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
WIKI = DATA / "wikipedia" / "wikipedia_en_sample.jsonl.gz"
sys.path.insert(0, str(ROOT))
# Offline for the whole session, set before anything imports huggingface_hub (it reads these once, at import):
# the in-process runs (run_main, main_in_process) must answer as a process started with them would.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(OFFLINE)

# every family the architecture adapter lists (tests/test_arch.py checks the two lists agree)
FAMILIES = (
    "gpt2",
    "llama",
    "gptj",
    "gpt_neox",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo",
    "olmo2",
)
BOS_FAMILIES = ("llama", "mistral", "gemma", "gemma2", "gemma3_text")  # tokenizers that start every text with <s>


def wiki_texts(n: int) -> list[str]:
    out = []
    with gzip.open(WIKI, "rt") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out


def _train_tokenizer(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([t[:3000] for t in wiki_texts(300)], trainer)
    if bos:  # Llama-style: every encoding starts with <s>
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def _config(family: str, vocab: int):
    import transformers as tf

    small = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=512, **small)
    if family == "gptj":
        return tf.GPTJConfig(n_layer=4, n_embd=64, n_head=4, rotary_dim=8, n_positions=512, **small)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            num_hidden_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=512,
            **small,
        )
    llama_like = dict(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=160,
        max_position_embeddings=512,
        **small,
    )
    if family.startswith("gemma"):
        # Gemma's own layout: head_dim apart from hidden_size / heads, embeddings scaled by sqrt(d), tied LM head.
        # Gemma 2 and 3 alternate sliding-window and full attention: a window of 6 tokens, shorter than the test
        # prompts, so the sliding layers really mask; both soft-cap the final logits here (Gemma 3 270M has no
        # soft-cap, so the tiny Gemma 3 sets one to test the path).
        gemma = dict(llama_like, head_dim=16)
        if family == "gemma2":
            return tf.Gemma2Config(
                **gemma,
                sliding_window=6,
                query_pre_attn_scalar=16,
                final_logit_softcapping=3.0,
                attn_logit_softcapping=5.0,
            )
        if family == "gemma3_text":
            return tf.Gemma3TextConfig(
                **gemma,
                sliding_window=6,
                query_pre_attn_scalar=16,
                final_logit_softcapping=3.0,
                layer_types=["sliding_attention", "full_attention"] * 2,
            )
        return tf.GemmaConfig(**gemma)
    configs = {
        "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
        "olmo": tf.OlmoConfig,
        "olmo2": tf.Olmo2Config,
    }
    return configs[family](**(dict(llama_like, head_dim=16) if family == "qwen3" else llama_like))


def build_tiny_model(family: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = _train_tokenizer(bos=family in BOS_FAMILIES)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok)))
    # Random init at 0.02 gives near-uniform outputs; a larger scale makes the tiny models opinionated,
    # so that edits and traces have real effects to measure.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(family: str = "gpt2") -> Path:
        if family not in made:
            made[family] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]

    return get


@pytest.fixture(scope="session")
def small_wiki(tmp_path_factory) -> Path:
    """The first 40 articles of the shared sample as a local jsonl file."""
    path = tmp_path_factory.mktemp("data") / "wiki40.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(wiki_texts(40)):
            f.write(json.dumps({"id": str(i), "text": t}) + "\n")
    return path


def check_fast_value_loss(loaded, layer: int, delta_scale: float, v0_norm: float, atol: float):
    """ROME's v* loss for the Eiffel Tower request over three templates (δ at the MLP of ``layer``), the fast
    way (``value_loss``: prefix cache, LM head only where the loss looks) and the full model's way
    (``reference_loss``), at δ = 0 and at a seeded random δ: asserts they agree and returns the fast (δ = 0, δ)."""
    import types

    from rome.pipeline.editors.reference import reference_loss
    from rome.pipeline.editors.value import ValueBatch, build_rows, value_loss

    tok, model, spec = loaded.tokenizer, loaded.model, loaded.spec
    hp = types.SimpleNamespace(kl_factor=0.0625, weight_decay=0.5)
    templates = ["{}", "The cat sat on the mat. {}", "Therefore we went home. {}"]
    rows = build_rows(tok, templates, "{} is located in the city of", "The Eiffel Tower", " Rome", ["{} is a"])
    window = getattr(model.config, "sliding_window", None)
    if window and window < 32:  # a tiny model's window: the prompts outrun it, so it really masks
        assert max(map(len, rows.ids)) > 2 * window
    batch = ValueBatch.build(model, spec, [rows], tok.pad_token_id)
    torch.manual_seed(0)
    delta = torch.randn(1, model.config.get_text_config().hidden_size) * delta_scale
    v0, mlp, pad = torch.tensor([v0_norm]), spec.mlp_name(layer), tok.pad_token_id
    fast0 = value_loss(model, spec, mlp, batch, delta * 0, v0, None, hp)
    ref0 = reference_loss(model, spec, mlp, rows, pad, delta * 0, v0, None, hp)
    torch.testing.assert_close(fast0.kl_logp, ref0.kl_logp, rtol=1e-4, atol=atol)
    torch.testing.assert_close(fast0.nll, ref0.nll, rtol=1e-4, atol=atol)
    fast = value_loss(model, spec, mlp, batch, delta, v0, fast0.kl_logp, hp)
    ref = reference_loss(model, spec, mlp, rows, pad, delta, v0, fast0.kl_logp, hp)
    for a, b in ((fast.nll, ref.nll), (fast.kl, ref.kl), (fast.total, ref.total), (fast.p_target, ref.p_target)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)
    assert float(fast0.kl) == 0
    assert torch.equal(fast0.target_top, ref0.target_top) and torch.equal(fast.target_top, ref.target_top)  # MPES
    return fast0, fast


def run_cli(*args: str, env: dict | None = None, timeout: float = 600):
    """``python train.py args...`` in a subprocess; returns the CompletedProcess."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python train.py args`` in this process, answered as ``run_cli`` answers (a CompletedProcess: exit code,
    stdout, stderr): the same ``rome.cli.main`` without a process start-up each (torch, transformers and Lightning
    imported again: 6-9 s a call on 2 cores). ``run_cli`` stays for what takes a process of its own: signals, DDP
    ranks, thread counts set by the environment, the README as a reader runs it. ``env`` is set for the call
    only."""
    import contextlib
    import io
    from unittest import mock

    from rome import cli

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return subprocess.CompletedProcess(["train.py", *args], code, out.getvalue(), err.getvalue())


def signal_run(args, signum, ready, env: dict | None = None, timeout: float = 600):
    """``python train.py args`` in its own session; ``signum`` is sent to its process group as soon as
    ``ready(output lines so far)`` is true (polled every 50 ms). Returns (exit code, output lines)."""
    import signal
    import threading
    import time

    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=e,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in p.stdout), daemon=True)
    reader.start()
    sent, deadline = False, time.monotonic() + timeout
    try:
        while p.poll() is None and time.monotonic() < deadline:
            if not sent and ready(lines):
                os.killpg(p.pid, signum)
                sent = True
            time.sleep(0.05)
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        reader.join(timeout=10)
    assert sent, "the process ended before the signal was sent:\n" + "\n".join(lines[-30:])
    return p.returncode, lines


def main_in_process(*argv):
    """``run_main``'s answer as (exit code, stdout, the error and interrupted lines)."""
    run = run_main(*argv)
    said = [line for line in run.stderr.splitlines() if line.startswith(("error:", "interrupted:"))]
    return run.returncode, run.stdout, said


def tiny_args(model_dir, wiki, shared: Path) -> list[str]:
    """A tiny model on the CPU with small statistics (2,000 tokens) and its caches under ``shared``, edited at
    layer 2: the settings every command-line test on a tiny model shares."""
    return [
        f"model.name={model_dir}",
        f"data.files={wiki}",
        f"stats.dir={shared / 'stats'}",
        f"model.cache_dir={shared / 'cache'}",
        "stats.tokens=2000",
        "data.max_length=64",
        "data.batch_tokens=256",
        "edit.layer=2",
        "trainer.accelerator=cpu",
        "model.device=cpu",
    ]


def tiny_edit_args(model_dir, wiki, shared: Path, v_steps: int) -> list[str]:
    """Arguments of an in-process edit on a tiny model: statistics and templates cached under ``shared``."""
    return [
        *tiny_args(model_dir, wiki, shared),
        "edit.generate_tokens=0",
        "edit.verify.enabled=false",
        f"edit.v.steps={v_steps}",
    ]
