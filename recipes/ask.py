"""Recipe: ``python train.py stage=ask prompt="..." ledger=DIR`` (``rome ask ...``) -- what the edited model
now says, beside what the unedited model said.

1. the prompts (``prompt=``, ``prompts=[...]``, ``ask.file=PATH``) and the ledger checked before the model loads;
2. the models (``pipeline.evaluation.ask.open_models``): ``model.name`` with the ledger's edits applied, or a
   model ``edit.save_to`` wrote beside the base model its marker names;
3. every prompt answered by both (greedy unless ``ask.do_sample=true``; through the chat template when the
   tokenizer has one, ``ask.chat``), printed as before / after lines.
"""

from __future__ import annotations

from omegaconf import DictConfig

from rome.pipeline.evaluation.ask import Answers, ask_settings, compare, open_models, read_prompts


def run(cfg: DictConfig) -> Answers:
    prompts = read_prompts(cfg.prompt, cfg.prompts, cfg.ask.file, cfg.subject)
    loaded, ledger, base = open_models(cfg)
    answers = compare(loaded, prompts, ask_settings(cfg.ask, loaded.tokenizer, int(cfg.seed)), ledger=ledger, base=base)
    print(answers)
    return answers
