#!/usr/bin/env bash
# The lifelong-editing measurements of docs/many-edits.md, one command each (CPU; hours on 2 cores).
# Usage: bash benchmarks/lifelong_study.sh [STEP ...]   (the steps: STEPS at the end, and zsre_ultraedit | zsre_memit |
# zsre_alphaedit | zsre_encore for one method of zsre1000; default: all of STEPS). Each writes its own eval.out under
# outputs/; a stopped step resumes where it stopped
# (the same command: finished methods are kept, the method in progress continues at its batch boundary).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data
COMMON=(stats.tokens=50000 "data.files=$DATA/wikipedia/wikipedia_en_sample.jsonl.gz" trainer.accelerator=cpu
  model.device=cpu)
# The sequential runs of docs/many-edits.md were made before eval.known.exclude_edited (all known facts counted,
# those about edited subjects too): exclude_edited=false in SEQ reproduces them and continues their eval.out;
# ultraedit_unrelated is the one run made with the rule. They were also made before MEMIT's and AlphaEdit's NAS
# defaults (norm_anchor=true since the nas_checks and alphaedit_range2 replications): SEQ keeps both off; the NAS
# runs switch them on.
SEQ=(stage=eval eval.mode=sequential "${COMMON[@]}" eval.known.exclude_edited=false edit.memit.norm_anchor=false
  edit.alphaedit.norm_anchor=false)

run() { echo "== $*" >&2; OMP_NUM_THREADS="${THREADS:-1}" python train.py "$@"; }

ultraedit10k() {  # records 0-9,999 in batches of 100; 200 cases scored at the end
  run "${SEQ[@]}" eval.batch_size=100 eval.n=10000 'eval.methods=[none,ultraedit]' eval.eval_every=10 \
    eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 eval.out=outputs/seq10k_ultraedit
}
ultraedit_unrelated() {  # ultraedit10k again, the known facts about edited subjects set aside (the default since
  # eval.known.exclude_edited; ultraedit10k's run predates it); checkpoints as ultraedit_lr
  run "${SEQ[@]}" eval.known.exclude_edited=true eval.batch_size=100 eval.n=10000 'eval.methods=[none,ultraedit]' \
    eval.eval_every=20 eval.curve_cases=25 eval.final_cases=200 eval.generation.tokens=0 \
    eval.out=outputs/seq10k_ultraedit_unrelated
}
ultraedit_lr() {  # UltraEdit's lr against the collapse point: the same 10,000 edits at lr 1e-4 and 2e-4 (the model
  # file's 3e-4 is ultraedit10k); checkpoints every 20 batches on 25 cases, so that they cost less than the edits
  for lr in 1e-4 2e-4; do
    run "${SEQ[@]}" eval.batch_size=100 eval.n=10000 'eval.methods=[none,ultraedit]' eval.eval_every=20 \
      eval.curve_cases=25 eval.final_cases=200 eval.generation.tokens=0 "edit.ultraedit.lr=$lr" \
      "eval.out=outputs/seq10k_ultraedit_lr$lr"
  done
}
ultraedit_nullspace() {  # edit.ultraedit.preserve=nullspace (the solve on keys projected onto C's null space) against
  # the paper's shift: 1,000 edits each (checkpoints every 2 batches), then 10,000 with it (as ultraedit_lr)
  for preserve in none nullspace; do
    run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,ultraedit]' eval.eval_every=2 \
      eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 "edit.ultraedit.preserve=$preserve" \
      "eval.out=outputs/seq1000_ultraedit_$preserve"
  done
  run "${SEQ[@]}" eval.batch_size=100 eval.n=10000 'eval.methods=[none,ultraedit]' eval.eval_every=20 \
    eval.curve_cases=25 eval.final_cases=200 eval.generation.tokens=0 edit.ultraedit.preserve=nullspace \
    eval.out=outputs/seq10k_ultraedit_nullspace
}
ultraedit_covariance() {  # edit.ultraedit.preserve=covariance (MEMIT's trade-off in the solve): one batch of 100
  # at four weights mu, then 1,000 edits at mu = 100 with ultraedit_nullspace's 1,000-edit protocol (its pair), then
  # 10,000 at mu = 100 with its 10,000-edit protocol
  local mu
  for mu in 1 10 100 1000; do
    run stage=eval eval.mode=sequential "${COMMON[@]}" eval.batch_size=100 eval.n=100 \
      'eval.methods=[none,ultraedit]' eval.eval_every=1 eval.curve_cases=50 eval.final_cases=100 \
      eval.generation.tokens=0 edit.ultraedit.preserve=covariance "edit.ultraedit.covariance_weight=$mu" \
      "eval.out=outputs/seq100_ultraedit_covariance_mu$mu"
  done
  run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,ultraedit]' eval.eval_every=2 \
    eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 edit.ultraedit.preserve=covariance \
    edit.ultraedit.covariance_weight=100 eval.out=outputs/seq1000_ultraedit_covariance
  run "${SEQ[@]}" eval.batch_size=100 eval.n=10000 'eval.methods=[none,ultraedit]' eval.eval_every=20 \
    eval.curve_cases=25 eval.final_cases=200 eval.generation.tokens=0 edit.ultraedit.preserve=covariance \
    edit.ultraedit.covariance_weight=100 eval.out=outputs/seq10k_ultraedit_covariance
}
ultraedit_subject() {  # one batch of 100 (records 0-99): the paper's rows (the answer positions, layers 19-27, lr
  # 3e-4) against edit.ultraedit.position=subject (the subject's last token, MEMIT's layers 1-5) at four lrs
  run stage=eval eval.mode=sequential "${COMMON[@]}" eval.batch_size=100 eval.n=100 'eval.methods=[none,ultraedit]' \
    eval.eval_every=1 eval.curve_cases=50 eval.final_cases=100 eval.generation.tokens=0 \
    eval.out=outputs/seq100_ultraedit_answer
  for lr in 3e-4 1e-3 3e-3 1e-2; do
    run stage=eval eval.mode=sequential "${COMMON[@]}" eval.batch_size=100 eval.n=100 \
      'eval.methods=[none,ultraedit]' eval.eval_every=1 eval.curve_cases=50 eval.final_cases=100 \
      eval.generation.tokens=0 edit.ultraedit.position=subject 'edit.ultraedit.layers=[1,2,3,4,5]' \
      "edit.ultraedit.lr=$lr" "eval.out=outputs/seq100_ultraedit_subject_lr$lr"
  done
}
ultraedit_modules() {  # the release's Llama-3-8B modules (gate_proj 11-15, up_proj 18-24 of 32 layers) on SmolLM2,
  # scaled to its 30 layers (gate 10-14, up 17-23) and one kind at a time: model.arch.down_proj points every editor at
  # that projection instead of the down-projection. One batch of 50 (records 2000-2049, the model file's lr protocol)
  # per setting, the model file's down-projections beside them; then 1,000 edits with the up-projections at two lrs
  # (ultraedit_nullspace's 1,000-edit protocol, whose preserve=none run is the down-projections' comparison)
  local setting kind layers lr
  for setting in "down_proj [19,20,21,22,23,24,25,26,27] 3e-4" "up_proj [17,18,19,20,21,22,23] 1e-4" \
    "up_proj [17,18,19,20,21,22,23] 3e-4" "up_proj [17,18,19,20,21,22,23] 1e-3" "gate_proj [10,11,12,13,14] 1e-3"; do
    read -r kind layers lr <<<"$setting"
    run stage=eval eval.mode=batch "${COMMON[@]}" 'eval.methods=[ultraedit]' eval.start=2000 eval.n=50 \
      eval.generation.tokens=0 "model.arch.down_proj=mlp.$kind" "edit.ultraedit.layers=$layers" \
      "edit.ultraedit.lr=$lr" "eval.out=outputs/batch50_ultraedit_${kind}_lr$lr"
  done
  for lr in 1e-4 2e-4; do
    run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,ultraedit]' eval.eval_every=2 \
      eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 model.arch.down_proj=mlp.up_proj \
      'edit.ultraedit.layers=[17,18,19,20,21,22,23]' "edit.ultraedit.lr=$lr" \
      "eval.out=outputs/seq1000_ultraedit_up_lr$lr"
  done
}
ultraedit_gate_up() {  # the release's Llama-3-8B set in one run, as the release edits it: gate_proj 10-14 and up_proj
  # 17-23 (11-15 and 18-24 of 32, scaled to 30 layers) through model.arch.down_proj_by_layer, one lr for all twelve;
  # ultraedit_modules' protocols (one batch of 50 at three lrs, then 1,000 edits at two), and the down-projections' run
  # it is compared with
  local by_layer='model.arch.down_proj_by_layer={mlp.gate_proj: [10,11,12,13,14], mlp.up_proj: [17,18,19,20,21,22,23]}'
  local layers='edit.ultraedit.layers=[10,11,12,13,14,17,18,19,20,21,22,23]' lr
  for lr in 5e-5 1e-4 3e-4; do
    run stage=eval eval.mode=batch "${COMMON[@]}" 'eval.methods=[ultraedit]' eval.start=2000 eval.n=50 \
      eval.generation.tokens=0 "$by_layer" "$layers" "edit.ultraedit.lr=$lr" \
      "eval.out=outputs/batch50_ultraedit_gate_up_lr$lr"
  done
  for lr in 5e-5 1e-4; do
    run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,ultraedit]' eval.eval_every=2 \
      eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 "$by_layer" "$layers" "edit.ultraedit.lr=$lr" \
      "eval.out=outputs/seq1000_ultraedit_gate_up_lr$lr"
  done
  # the down-projections (the model file's layers) at lr 1e-4, where they write about as few edits as gate+up at 5e-5
  run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,ultraedit]' eval.eval_every=2 \
    eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 edit.ultraedit.lr=1e-4 \
    eval.out=outputs/seq1000_ultraedit_lr1e-4
}
ultraedit_statistics() {  # the lifelong normalisation per layer (edit.ultraedit.statistics=per_layer) against the
  # shared default, with ultraedit_nullspace's 1,000-edit protocol (its preserve=none run is the shared one)
  run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,ultraedit]' eval.eval_every=2 \
    eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 edit.ultraedit.statistics=per_layer \
    eval.out=outputs/seq1000_ultraedit_per_layer
}
known_facts_count() {  # ultraedit_nullspace's preserve=none run scored on the known facts of the first 1,000 records
  # of known_1000 (238 answered) instead of 300 (70): how well a collapse point is resolved
  run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,ultraedit]' eval.eval_every=2 \
    eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 eval.known.n=1000 \
    eval.out=outputs/seq1000_ultraedit_known1000
}
ultraedit_range2() {  # UltraEdit on records 1000-1999 with second_range's protocol (MEMIT's second range: checkpoints
  # after every batch, the known-facts rule), today's defaults
  run stage=eval eval.mode=sequential "${COMMON[@]}" eval.batch_size=100 eval.n=1000 eval.start=1000 \
    'eval.methods=[none,ultraedit]' eval.eval_every=1 eval.curve_cases=50 eval.final_cases=200 \
    eval.generation.tokens=0 eval.out=outputs/seq1000_start1000_ultraedit
}
batch1000() {  # MEMIT and AlphaEdit (and UltraEdit), 1,000 edits in batches of 100, on one curve; NAS in a second run
  run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,memit,alphaedit,ultraedit]' eval.eval_every=1 \
    eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 eval.out=outputs/seq1000_batch
  run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,memit,alphaedit]' eval.eval_every=1 \
    eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 edit.memit.norm_anchor=true \
    edit.alphaedit.norm_anchor=true eval.out=outputs/seq1000_batch_nas
}
second_range() {  # METHOD (memit or alphaedit) with and without NAS on records 1000-1999, in batches of 100 (made
  # with the known-facts rule); eval.out: outputs/seq1000_start1000_METHOD and ..._nas
  local method=$1 anchor
  for anchor in true false; do
    run stage=eval eval.mode=sequential "${COMMON[@]}" eval.batch_size=100 eval.n=1000 eval.start=1000 \
      "eval.methods=[none,$method]" "edit.$method.norm_anchor=$anchor" eval.eval_every=1 eval.curve_cases=50 \
      eval.final_cases=200 eval.generation.tokens=0 \
      "eval.out=outputs/seq1000_start1000_$method$([ "$anchor" = true ] && echo _nas)"
  done
}
nas_checks() {  # NAS against none where the 1,000-edit run leaves it open: MEMIT with and without it on a second
  # record range (1000-1999), and ROME one at a time to 300 with it (seq300's protocol)
  second_range memit
  run "${SEQ[@]}" eval.batch_size=50 eval.n=300 'eval.methods=[none,rome]' edit.v.norm_anchor=true \
    edit.nas.reference_values=1 eval.eval_every=1 \
    eval.curve_cases=50 eval.generation.tokens=0 eval.out=outputs/seq300_rome_nas
}
alphaedit_range2() {  # AlphaEdit with and without NAS on the second record range, as MEMIT's in nas_checks
  second_range alphaedit
}
rome_range2() {  # ROME one at a time with and without NAS on records 1000-1299 (rome300's protocol, with the
  # known-facts rule); eval.out: outputs/seq300_start1000_rome_nas and outputs/seq300_start1000_rome
  local anchor
  for anchor in true false; do
    run stage=eval eval.mode=sequential "${COMMON[@]}" eval.batch_size=50 eval.n=300 eval.start=1000 \
      'eval.methods=[none,rome]' "edit.v.norm_anchor=$anchor" edit.nas.reference_values=1 eval.eval_every=1 \
      eval.curve_cases=50 \
      eval.generation.tokens=0 "eval.out=outputs/seq300_start1000_rome$([ "$anchor" = true ] && echo _nas)"
  done
}
rome_reference() {  # ROME with NAS, its reference taken over the first 20 edits (edit.nas.reference_values=20)
  # instead of the first edit's alone: records 0-299 with rome300's protocol (as nas_checks' ROME run)
  run "${SEQ[@]}" eval.batch_size=50 eval.n=300 'eval.methods=[none,rome]' edit.v.norm_anchor=true \
    edit.nas.reference_values=20 eval.eval_every=1 eval.curve_cases=50 eval.generation.tokens=0 \
    eval.out=outputs/seq300_rome_nas20
}
rome_reference_range2() {  # the same on records 1000-1299 with rome_range2's protocol (the known-facts rule)
  run stage=eval eval.mode=sequential "${COMMON[@]}" eval.batch_size=50 eval.n=300 eval.start=1000 \
    'eval.methods=[none,rome]' edit.v.norm_anchor=true edit.nas.reference_values=20 eval.eval_every=1 \
    eval.curve_cases=50 eval.generation.tokens=0 eval.out=outputs/seq300_start1000_rome_nas20
}
rome300() {  # ROME one at a time to 300 edits (checkpoints every 50)
  run "${SEQ[@]}" eval.batch_size=50 eval.n=300 'eval.methods=[none,rome]' eval.eval_every=1 eval.curve_cases=50 \
    eval.generation.tokens=0 eval.out=outputs/seq300_rome
}
table300() {  # the README's 300-edit table again, now with the generative columns and every method's curve
  # (checkpoints every 50 edits: ROME's curve to 300 as well; GE, the fluency texts, is in the first table)
  run "${SEQ[@]}" eval.batch_size=50 eval.n=300 'eval.methods=[none,memit,alphaedit,rome,ultraedit]' \
    eval.eval_every=1 eval.curve_cases=50 eval.generation.tokens=0 eval.out=outputs/seq300
}
gemma1000() {  # Gemma 3 270M, the same protocol at 1,000 edits: UltraEdit (MEMIT and AlphaEdit refuse Gemma 3, whose
  # MLP output is normed before the residual add: docs/many-edits.md, "MEMIT and AlphaEdit on Gemma 3 270M")
  run "${SEQ[@]}" model.name=gemma3-270m eval.batch_size=100 eval.n=1000 'eval.methods=[none,ultraedit]' \
    eval.eval_every=1 eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 eval.out=outputs/seq1000_gemma3
}
gemma_rome300() {  # ROME one edit at a time on Gemma 3 270M, CounterFact records 0-299 (the 300-edit protocol of
  # rome300: a checkpoint every 50 edits), today's defaults (ROME's v* not norm-anchored, its default; known facts
  # about edited subjects set aside); 100 cases scored at the end (Gemma's 262k-token vocabulary makes scoring slow)
  run stage=eval eval.mode=sequential "${COMMON[@]}" model.name=gemma3-270m eval.batch_size=50 eval.n=300 \
    'eval.methods=[none,rome]' eval.eval_every=1 eval.curve_cases=50 eval.final_cases=100 eval.generation.tokens=0 \
    eval.out=outputs/seq300_rome_gemma3
}
gemma_rome_nas300() {  # the same with ROME's v* norm-anchored (NAS, its reference over the first 20 edits)
  run stage=eval eval.mode=sequential "${COMMON[@]}" model.name=gemma3-270m eval.batch_size=50 eval.n=300 \
    'eval.methods=[none,rome]' eval.eval_every=1 eval.curve_cases=50 eval.final_cases=100 eval.generation.tokens=0 \
    edit.v.norm_anchor=true eval.out=outputs/seq300_rome_nas_gemma3
}
zsre1000() {  # zsRE, UltraEdit's own dataset: the 1,000 records here (the MEND 1k train subset) in batches of 100
  # (UltraEdit's batch), today's defaults (MEMIT with NAS, known facts about edited subjects set aside); edits
  # write answers[0] (ROME's convention, eval.zsre_target=answer); one process per method into one eval.out
  # (steps zsre_ultraedit, zsre_memit, zsre_alphaedit and zsre_encore run one method each: side by side, a process
  # each; ENCORE, added later, is not among the default three).
  # MEMIT's z for 100 zsRE requests at once takes about 15 GiB: micro-batches of 25 (the same z within 1e-6)
  # leave room on a 24 GB machine
  local method methods=("$@")
  [ ${#methods[@]} -eq 0 ] && methods=(ultraedit memit alphaedit)
  for method in "${methods[@]}"; do
    run stage=eval eval.mode=sequential "${COMMON[@]}" "eval.dataset=$DATA/zsre/zsre_mend_train-1k.json" \
      eval.batch_size=100 eval.n=1000 "eval.methods=[none,$method]" eval.eval_every=1 eval.curve_cases=50 \
      eval.final_cases=200 eval.generation.tokens=0 edit.memit.micro_batch=25 eval.out=outputs/seq1000_zsre
  done
}
zsre_alt() {  # zsre1000's UltraEdit with the edits writing the counterfactual alt (MEND's and EasyEdit's convention):
  # the same questions, so the same keys, other targets; checkpoints every 2 batches
  run stage=eval eval.mode=sequential "${COMMON[@]}" "eval.dataset=$DATA/zsre/zsre_mend_train-1k.json" \
    eval.zsre_target=alt eval.batch_size=100 eval.n=1000 'eval.methods=[none,ultraedit]' eval.eval_every=2 \
    eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 eval.out=outputs/seq1000_zsre_alt
}
variants() {  # ROME's key variant chosen again by the generative numbers (case mode, 100 cases)
  run stage=eval "${COMMON[@]}" eval.n=100 eval.start=1000 eval.generation.tokens=0 \
    'eval.methods=[none,rome,rome_original,rome_rrome]' 'method.rome_original={class: rome, variant: original}' \
    'method.rome_rrome={class: rome, variant: rrome}' eval.out=outputs/variants_generative
}
templates() {  # ROME's context-template style, seeded (the default) against original, on the variants' records:
  # an edit.* setting, so one run each; compare with python benchmarks/paired_runs.py (docs/edit.md)
  local style
  for style in seeded original; do
    run stage=eval "${COMMON[@]}" eval.n=100 eval.start=1000 eval.generation.tokens=0 'eval.methods=[none,rome]' \
      "edit.templates.style=$style" "eval.out=outputs/templates_$style"
  done
}
reproducibility() {  # what running one command again changes, on Gemma 3 270M (docs/many-edits.md): C three times (1,
  # 1 and 2 threads), 20 ROME edits in sequence three times (1, 1, 2 threads; C from the first), one ROME edit at 1
  # and 2 threads; each pair compared with benchmarks/run_diff.py
  local out=outputs/reproducibility name
  local eiffel='request={"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}'
  for name in 1 1b 2; do
    THREADS=${name%b} run stage=stats "${COMMON[@]}" model.name=gemma3-270m "stats.dir=$out/stats_$name"
  done
  for name in 1 1b 2; do
    THREADS=${name%b} run stage=eval eval.mode=sequential "${COMMON[@]}" model.name=gemma3-270m eval.batch_size=10 \
      eval.n=20 'eval.methods=[none,rome]' eval.eval_every=1 eval.curve_cases=10 eval.final_cases=10 \
      eval.generation.tokens=0 "stats.dir=$out/stats_1" "eval.out=$out/seq20_$name"
  done
  for name in 1 2; do  # a ledger that exists is kept (run again, the edit would be added to it)
    [ -e "$out/edit_$name/ledger.json" ] || THREADS=$name run stage=edit "${COMMON[@]}" model.name=gemma3-270m \
      "$eiffel" "stats.dir=$out/stats_1" "edit.out=$out/edit_$name"
  done
  for pair in "stats_1 stats_1b" "stats_1 stats_2" "seq20_1 seq20_1b" "seq20_1 seq20_2" "edit_1 edit_2"; do
    set -- $pair
    echo "== $1 against $2"
    python benchmarks/run_diff.py "$out/$1" "$out/$2"
  done
}
reproducibility_smollm2() {  # the same on SmolLM2-135M, 1 thread against 2: ROME one at a time to 50 (checkpoints
  # every 25 edits on 25 cases, the 50 scored at the end) and UltraEdit to 1,000 in batches of 100 (every 500 edits
  # on 50 cases, 100 scored at the end); THREADS_LIST="1" or "2" runs one half (two processes side by side)
  local out=outputs/reproducibility threads
  for threads in ${THREADS_LIST:-1 2}; do
    THREADS=$threads run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,ultraedit]' \
      eval.eval_every=5 eval.curve_cases=50 eval.final_cases=100 eval.generation.tokens=0 \
      "eval.out=$out/ultraedit1000_smollm2_$threads"
    THREADS=$threads run "${SEQ[@]}" eval.batch_size=25 eval.n=50 'eval.methods=[none,rome]' eval.eval_every=1 \
      eval.curve_cases=25 eval.final_cases=50 eval.generation.tokens=0 "eval.out=$out/rome50_smollm2_$threads"
  done
  [ -e "$out/rome50_smollm2_1/methods/rome.json" ] && [ -e "$out/rome50_smollm2_2/methods/rome.json" ] || return 0
  for run in ultraedit1000_smollm2 rome50_smollm2; do
    echo "== ${run}_1 against ${run}_2"
    python benchmarks/run_diff.py "$out/${run}_1" "$out/${run}_2"
  done
}

reproducibility_10k() {  # where 1 and 2 threads part over UltraEdit's 10,000 edits (records 0-9,999, batches of 100):
  # the edit stage writes every batch's factors into a ledger (no checkpoints), run_diff compares them batch by
  # batch, ledger_perplexity scores both ledgers' models on one thread after N edits (and the first on two: the
  # scoring's own share)
  local out=outputs/reproducibility threads
  for threads in 1 2; do
    THREADS=$threads run stage=edit "${COMMON[@]}" edit.method=ultraedit edit.batch_size=100 \
      request=$DATA/counterfact/counterfact-edit.json edit.verify.enabled=false edit.generate_tokens=0 \
      "edit.out=$out/ultraedit10k_ledger_$threads"
  done
  python benchmarks/run_diff.py "$out/ultraedit10k_ledger_1" "$out/ultraedit10k_ledger_2"
  OMP_NUM_THREADS=1 python benchmarks/ledger_perplexity.py "$out/ultraedit10k_ledger_1" "$out/ultraedit10k_ledger_2" \
    --at 1000,6000,6500,7000,10000 --threads 1
  OMP_NUM_THREADS=2 python benchmarks/ledger_perplexity.py "$out/ultraedit10k_ledger_1" --at 7000,10000 --threads 2
}

encore1000() {  # ENCORE (configs/method/encore.yaml: MEMIT with MPES, lambda_n and the earlier batches' keys), the
  # batch1000 protocol (records 0-999 in batches of 100, a checkpoint after every batch, all 70 known facts counted)
  run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,encore]' eval.eval_every=1 eval.curve_cases=50 \
    eval.final_cases=200 eval.generation.tokens=0 eval.out=outputs/seq1000_encore
}
encore_norm20() {  # encore1000 with the release's lambda_n = 20 as it stands (10x SmolLM2's scaled 2)
  run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,encore]' eval.eval_every=1 eval.curve_cases=50 \
    eval.final_cases=200 eval.generation.tokens=0 edit.encore.norm_constraint=20 eval.out=outputs/seq1000_encore_norm20
}
encore_keys_off() {  # encore1000 without its third part (the earlier batches' keys in each solve): MPES and lambda_n
  # alone, which part keeps the known facts (the method file's own value overridden; reported under "encore")
  run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,encore]' eval.eval_every=1 eval.curve_cases=50 \
    eval.final_cases=200 eval.generation.tokens=0 method.encore.memit.preserve_edits=false \
    eval.out=outputs/seq1000_encore_keys_off
}
encore_on_range2() {  # SUFFIX [OVERRIDE ...]: ENCORE on records 1000-1999 with second_range's protocol (today's
  # defaults, the known-facts rule) and the overrides, into outputs/seq1000_start1000_encoreSUFFIX
  local suffix=$1
  shift
  run stage=eval eval.mode=sequential "${COMMON[@]}" eval.batch_size=100 eval.n=1000 eval.start=1000 \
    'eval.methods=[none,encore]' eval.eval_every=1 eval.curve_cases=50 eval.final_cases=200 \
    eval.generation.tokens=0 "$@" "eval.out=outputs/seq1000_start1000_encore$suffix"
}
encore_range2() { encore_on_range2 ""; }  # beside MEMIT's and AlphaEdit's second range

encore_lambda() {  # encore1000 with MEMIT's lambda (the pull towards C) at 2x and 4x the model file's 1500, lambda_n
  # scaled with it (the model file's ratio): does a stronger pull keep the known facts, and at what efficacy?
  # One eval.out per value; the steps encore_lambda3000 / encore_lambda6000 run one value each (side by side)
  for lambda in "$@"; do
    run "${SEQ[@]}" eval.batch_size=100 eval.n=1000 'eval.methods=[none,encore]' eval.eval_every=1 \
      eval.curve_cases=50 eval.final_cases=200 eval.generation.tokens=0 "edit.memit.mom2_update_weight=$lambda" \
      "edit.encore.norm_constraint=$((lambda / 750))" "eval.out=outputs/seq1000_encore_lambda$lambda"
  done
}
encore_lambda3000() { encore_lambda 3000; }
encore_lambda6000() { encore_lambda 6000; }
encore_keys_off_range2() {  # encore_keys_off on encore_range2's records and protocol: do the earlier batches'
  # keys keep the known facts on a second range too?
  encore_on_range2 _keys_off method.encore.memit.preserve_edits=false
}

STEPS=(ultraedit10k ultraedit_unrelated ultraedit_lr ultraedit_nullspace ultraedit_covariance ultraedit_subject
  ultraedit_modules ultraedit_gate_up ultraedit_statistics known_facts_count ultraedit_range2 batch1000 encore1000 encore_norm20
  encore_keys_off encore_range2 encore_lambda3000 encore_lambda6000 encore_keys_off_range2 nas_checks
  alphaedit_range2 rome_range2 rome_reference rome_reference_range2 rome300 table300 gemma1000 gemma_rome300
  gemma_rome_nas300 zsre1000 zsre_alt variants templates reproducibility reproducibility_smollm2 reproducibility_10k)
ZSRE_STEPS=(zsre_ultraedit zsre_memit zsre_alphaedit zsre_encore)  # one method of zsre1000 each
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=("${STEPS[@]}")
for step in "${steps[@]}"; do  # every name checked before the first (hours-long) step runs
  case " ${STEPS[*]} ${ZSRE_STEPS[*]} " in
    *" $step "*) ;;
    *) echo "error: unknown step '$step' (${STEPS[*]} ${ZSRE_STEPS[*]})" >&2; exit 2 ;;
  esac
done
for step in "${steps[@]}"; do
  case " ${ZSRE_STEPS[*]} " in
    *" $step "*) zsre1000 "${step#zsre_}" ;;
    *) "$step" ;;
  esac
done
