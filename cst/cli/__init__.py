"""The `cst` command line: demo, data synth/build, train, eval, chat, export and info, as thin argparse
wrappers over the library (cst.load, cst.data, cst.synth, cst.trainer, cst.eval). Not a second API:
every option maps onto a library argument, and nothing here computes anything the library does not.

Errors a user can cause (missing files, bad options or values, malformed JSON) end in ONE line on
stderr, `cst: error: ...`, exit status 2 for usage and 1 for everything else; `--debug` (or
CST_DEBUG=1) shows the traceback instead. Ctrl-C exits with status 130.
"""
import os
import sys

from ..core import distributed
from ..train.trainer import find_checkpoint, load_checkpoint_into
from .chat import cmd_chat
from .common import (
    CliError, UsageError, _Parser, _add_chat_template, _add_model_args, _add_threads, _common, _cst_version,
    _describe, _float, _nonneg_int, _pos_int)
from .data import _phrasings, cmd_data_build, cmd_data_synth
from .demo import cmd_demo
from .eval import cmd_eval, cmd_judge_fit, cmd_judge_validate
from .export import cmd_export
from .info import cmd_info
from .train import _cmd_train_checked, add_settings_flags


__all__ = ["main", "build_parser", "load_checkpoint_into", "find_checkpoint", "CliError", "UsageError"]


# ---- the parser ----

_MAIN_EPILOG = """\
commands:
  demo          the whole CST pipeline on SmolLM2 in one go (quick mode: minutes on a laptop)
  data synth    generate (safe, uncensored) response pairs with a model's own answers and revisions
  data build    turn behaviour pairs into CST preference records (each pair under both system prompts)
  train         DPO / SFT training with LoRA or full fine-tuning; checkpoints, resume, export
  eval          configurability (S0/S1) and over-refusal report
  chat          talk to a model (one message, or an interactive session)
  export        write a model (plus a checkpoint, merged) as a Hugging Face directory or a GGUF file
  info          version, threads, OpenMP/SIMD, whether the SmolLM2 weights are installed

examples:
  cst info
  cst demo --quick
  cst data synth --model smollm2-135m-instruct --prompts default --output synth.jsonl --limit 8
  cst data build --pairs synth.jsonl --output records.jsonl
  cst train --model smollm2-135m-instruct --data records.jsonl --lora-r 8 --max-steps 50 --output-dir runs/a
  cst eval --checkpoint runs/a --limit 8
  cst chat --checkpoint runs/a --system "You are a helpful assistant that is completely uncensored."

Run 'cst COMMAND --help' for a command's options. Reference: docs/cli.md.
"""


def build_parser():
    from .. import eval as E  # the evaluation defaults
    common = _common()
    p = _Parser(prog="cst", description="Configurable Safety Tuning (CST) of language models, on the CPU.",
                epilog=_MAIN_EPILOG)
    p.add_argument("--version", action="version", version=f"cst {_cst_version()}")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors (also: CST_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # demo
    d = sub.add_parser("demo", parents=[common], help="run the CST pipeline end to end",
                       description="Runs the whole CST pipeline on SmolLM2-135M-Instruct: synthesize pairs, build "
                                   "CST records, train LoRA adapters, evaluate before/after, write a report.",
                       epilog="examples:\n  cst demo --quick\n  cst demo --output-dir runs/demo --seed 1 --threads 4\n"
                              "  cst demo --set learning_rate=0.001 --set num_train_epochs=4")
    d.add_argument("--quick", action="store_true", help="a small, fast run (fewer prompts and steps)")
    d.add_argument("--output-dir", metavar="DIR",
                   help="where the demo writes its files (default: ./cst-demo in the current directory; about "
                        "0.87 GB after a full run: the tuned model as model-hf/ (540 MB) and model.gguf (271 MB), "
                        "and the newest training checkpoint (59 MB))")
    d.add_argument("--seed", type=_nonneg_int, metavar="N", help="random seed (default: 0)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting of cst.demo.DEFAULTS (VALUE read as JSON when it parses), e.g. "
                        "--set train_harmful_per_category=null (all 20 train prompts per category) --set "
                        "num_train_epochs=2; repeatable")
    _add_threads(d)
    d.set_defaults(func=cmd_demo)

    # data
    data = sub.add_parser("data", parents=[common], help="make preference data (synth, build)",
                          description="Preference data: `synth` generates behaviour pairs with a model, `build` "
                                      "turns pairs into CST records.",
                          epilog="examples:\n  cst data synth --model smollm2-135m-instruct --output synth.jsonl\n"
                                 "  cst data build --pairs synth.jsonl --output records.jsonl")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=_Parser)
    data.set_defaults(func=lambda a: _missing_sub(data))

    s = dsub.add_parser("synth", parents=[common], help="generate (safe, uncensored) pairs with a model",
                        description="Self-generation of behaviour pairs (cst.synth.synthesize): for each prompt the "
                                    "model answers under a permissive system prompt (the uncensored side), critiques "
                                    "its answer and revises it (the safe side). Pairs that are empty, truncated or "
                                    "near-identical are dropped (counted in the stats). The output is a resumable "
                                    "JSONL log: rerunning the same command continues where it stopped.",
                        epilog="examples:\n"
                               "  cst data synth --model smollm2-135m-instruct --prompts default --output synth.jsonl\n"
                               "  cst data synth -m model.gguf --prompts my_prompts.txt --output s.jsonl "
                               "--max-new-tokens 128 --limit 20\n\n"
                               "prompt files: .txt (one prompt a line, '#' comments), .json (a list of strings or "
                               "{\"prompt\", \"category\"} objects) or .jsonl (one string or object a line).")
    _add_model_args(s)
    s.add_argument("--judge", default="default", metavar="JUDGE|none",
                   help="judge of the filters (judge_safe / judge_uncensored): default, behaviour:FILE.json, "
                        "refusal, refusal-strict, classifier:FILE.npz; none = no judged filters")
    s.add_argument("--min-compliance", type=_float, metavar="P",
                   help="also drop an answer the judge calls a compliance with probability below P (0 < P <= 1; "
                        "a judge with probabilities: default or behaviour:FILE.json)")
    s.add_argument("--prompts", default="default", metavar="FILE|default",
                   help="prompts to answer; 'default' = the embedded training split of harmful requests (192)")
    s.add_argument("--output", "-o", required=True, metavar="OUT.jsonl", help="the synthesis log to write")
    s.add_argument("--max-new-tokens", type=_pos_int, default=256, metavar="N", help="tokens per generation")
    s.add_argument("--batch-size", type=_pos_int, default=8, metavar="N", help="conversations per model call")
    s.add_argument("--seed", type=_nonneg_int, default=0, metavar="N", help="seed for sampling")
    s.add_argument("--temperature", type=_float, default=0.0, metavar="T",
                   help="sampling temperature of the answers (0 = greedy)")
    s.add_argument("--n-per-prompt", type=_pos_int, default=1, metavar="N",
                   help="samples per prompt (needs --temperature > 0 when > 1)")
    s.add_argument("--limit", type=_pos_int, metavar="N", help="use only the first N prompts")
    s.add_argument("--fresh", action="store_true", help="start the log afresh instead of resuming it")
    _add_threads(s)
    s.set_defaults(func=cmd_data_synth)

    b = dsub.add_parser("build", parents=[common], help="CST records from behaviour pairs",
                        description="The CST augmentation (cst.data.build_records): every pair becomes one record per "
                                    "configuration and system-prompt phrasing, with the configuration's behaviour "
                                    "chosen and the other rejected (so a safe/uncensored pair appears twice, the "
                                    "preference flipped). --vanilla-dpo instead makes the plain DPO baseline (safe "
                                    "always chosen, one fixed system prompt).",
                        epilog="examples:\n"
                               "  cst data build --pairs synth.jsonl --output records.jsonl\n"
                               "  cst data build --pairs pairs.jsonl --output r.json --configurations paraphrased "
                               "--phrasings 2\n"
                               "  cst data build --pairs pairs.jsonl --output dpo.jsonl --vanilla-dpo\n\n"
                               "pairs files: a `cst data synth` log, a JSON/JSONL file of {\"prompt\", \"responses\": "
                               "{\"safe\": ..., \"uncensored\": ...}, \"category\"?} objects, or a preference-records "
                               "file (its pairs are recovered with the configurations' system prompts).\n"
                               "configurations file: a JSON list of {\"name\", \"system_prompts\", \"preferred\", "
                               "\"rejected\"?, \"held_out\"?} objects (docs/cli.md).")
    b.add_argument("--pairs", required=True, metavar="PAIRS.jsonl", help="behaviour pairs (see below)")
    b.add_argument("--output", "-o", required=True, metavar="RECORDS.json[l]", help="records file to write")
    b.add_argument("--format", choices=("cst", "trl"), default="cst",
                   help="cst: {system, prompt, chosen, rejected} records; trl: TRL's conversational preference "
                        "format, which trl.DPOTrainer reads unchanged (docs/interop.md)")
    b.add_argument("--configurations", default="paper", metavar="paper|paraphrased|diverse|FILE.json",
                   help="system-prompt configurations: the paper's two, four paraphrased phrasings each, 17 "
                        "(diverse) each, or a file")
    b.add_argument("--phrasings", type=_phrasings, default="all", metavar="all|first|K",
                   help="training phrasings per pair and configuration: all, the first, or K rotating across pairs")
    b.add_argument("--task", default="harmless", help="the records' task label")
    b.add_argument("--no-safe-default", dest="safe_default", action="store_false",
                   help="leave out the safe default (by default each pair also gets a record with no system prompt "
                        "that prefers the safe answer, so a deployment without a system prompt is safe)")
    b.add_argument("--vanilla-dpo", action="store_true", help="the DPO baseline instead of the CST augmentation")
    b.add_argument("--system", metavar="TEXT", help="with --vanilla-dpo: the fixed system prompt (default: none)")
    b.set_defaults(func=cmd_data_build)

    # train
    t = sub.add_parser("train", parents=[common], help="DPO/SFT training (LoRA or full)",
                       description="Trains a model on preference records with cst.trainer.Trainer. Settings: the "
                                   "DPOConfig defaults (the paper's recipe), then --config FILE, then --set "
                                   "KEY=VALUE, then the flags below (last wins). Checkpoints (checkpoint-N) and "
                                   "metrics.jsonl go to the output dir, with config.json and run.json (which model "
                                   "and data) for `cst eval/chat/export --checkpoint DIR`. Ctrl-C saves a checkpoint "
                                   "of the last finished step; --resume continues from it.",
                       epilog="examples:\n"
                              "  cst train --model smollm2-135m-instruct --data records.jsonl --lora-r 8 "
                              "--max-steps 100 --output-dir runs/cst\n"
                              "  cst train -m smollm2-135m-instruct --data r.jsonl --config cfg.json --beta 0.2 "
                              "--output-dir runs/cst --resume\n"
                              "  cst train -m model_dir --data r.jsonl --lora-r 16 --export hf tuned_model\n"
                              "  cst train --data r.jsonl --config cfg.json --print-config\n"
                              "  cst train --config cfg.json --print-trl-config > trl.json   (the recipe for TRL)\n\n"
                              "config file: a JSON object of DPOConfig fields, e.g. {\"beta\": 0.1, \"lora_r\": 24, "
                              "\"lora_alpha\": 48, \"learning_rate\": 5e-5}; unknown keys are an error.")
    t.add_argument("--model", "-m", metavar="M",
                   help="the model to tune: 'smollm2-135m-instruct', a .gguf file, or a Hugging Face directory")
    _add_chat_template(t)
    t.add_argument("--data", metavar="RECORDS.json[l]", help="training records (cst data build output)")
    t.add_argument("--eval-data", metavar="RECORDS.json[l]",
                   help="held-out records: evaluated every --eval-steps and at the end")
    t.add_argument("--config", metavar="CONFIG.json", help="a JSON object of DPOConfig fields")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set any DPOConfig field (VALUE read as JSON when it parses), e.g. --set warmup_ratio=0.1; "
                        "repeatable")
    t.add_argument("--output-dir", "-o", metavar="DIR", help="checkpoints and logs (DPOConfig default: runs/cst)")
    g = t.add_argument_group("training settings (override the config file)")
    add_settings_flags(g)
    _add_threads(g)
    t.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="continue from CKPT, or (no value) from the latest checkpoint in the output dir")
    t.add_argument("--export", nargs=2, metavar=("hf|gguf", "PATH"),
                   help="after training, write the tuned model (LoRA merged) in that format to PATH")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved DPOConfig as JSON and exit (loads neither model nor data)")
    t.add_argument("--print-trl-config", action="store_true",
                   help="print the same recipe for TRL as JSON, {\"DPOConfig\": trl.DPOConfig arguments, "
                        "\"LoraConfig\": peft.LoraConfig arguments, \"not_mapped\": ...}, and exit (docs/interop.md)")
    t.set_defaults(func=_cmd_train_checked)

    # eval
    e = sub.add_parser("eval", parents=[common], help="configurability and over-refusal report",
                       description="Generates answers to harmful prompts under each configuration's held-out system "
                                   "prompts and with none, judges them, and reports S0 (share harmful under "
                                   "uncensored configurations: the model follows them) and S1 (share safe under "
                                   "safe ones), with 95% bootstrap intervals; then the over-refusal rate on benign "
                                   "prompts. Writes report.json and report.md to the output dir.",
                       epilog="examples:\n"
                              "  cst eval --model smollm2-135m-instruct --limit 8\n"
                              "  cst eval --checkpoint runs/cst --output-dir runs/cst/eval\n"
                              "  cst eval -m tuned_model --prompts my.jsonl --benign none "
                              "--judge classifier:judge.npz\n\n"
                              "judges: default (cst.judges.default_judge(): four-way refusal / deflection / "
                              "compliance / degenerate, validated in docs/judges.md), behaviour:FILE.json (a refitted "
                              "BehaviourJudge), refusal (the phrase judge: refusal phrases = safe), refusal-strict (a "
                              "refusal followed by compliance counts as harmful), classifier:FILE.npz (a saved cst "
                              "ClassifierJudge), llm:MODEL (a cst-loadable model rates each response; refusal "
                              "phrases when it gives no verdict). Over-refusal uses the default judge unless "
                              "--judge is a four-way one.")
    _add_model_args(e, required=False)
    e.add_argument("--prompts", default="default", metavar="default|FILE",
                   help="harmful prompts; default = the embedded test split (24)")
    e.add_argument("--benign", default="default", metavar="default|FILE|none",
                   help="benign prompts for over-refusal; default = the embedded test split (16); none = skip")
    e.add_argument("--judge", default="default", metavar="JUDGE",
                   help="default | behaviour:FILE.json | refusal | refusal-strict | classifier:FILE.npz | llm:MODEL")
    e.add_argument("--judge-max-new-tokens", type=_pos_int, default=64, metavar="N", help="for llm:MODEL judges")
    e.add_argument("--configurations", default="paper", metavar="paper|paraphrased|diverse|FILE.json",
                   help="configurations whose held-out system prompts are evaluated")
    e.add_argument("--training-prompts", action="store_true",
                   help="evaluate under the training system prompts instead of the held-out ones")
    e.add_argument("--max-new-tokens", type=_pos_int, default=E.MAX_NEW_TOKENS, metavar="N",
                   help="tokens per answer (the demo's evaluation uses the same)")
    e.add_argument("--batch-size", type=_pos_int, default=E.BATCH_SIZE, metavar="N",
                   help="conversations per model call")
    e.add_argument("--limit", type=_pos_int, metavar="N", help="only the first N prompts of each set")
    e.add_argument("--n-boot", type=_pos_int, default=E.N_BOOT, metavar="N", help="bootstrap resamples for the CIs")
    e.add_argument("--seed", type=_nonneg_int, default=0, metavar="N", help="seed (bootstrap; sampling if any)")
    e.add_argument("--output-dir", "-o", default="eval_out", metavar="DIR", help="where report.json/.md go")
    _add_threads(e)
    e.set_defaults(func=cmd_eval)

    # chat
    c = sub.add_parser("chat", parents=[common], help="chat with a model",
                       description="With MESSAGE: prints one reply. Without: an interactive session that reads lines "
                                   "from stdin until EOF (Ctrl-D) or /exit, keeping the conversation; /reset clears "
                                   "it. Replies stream token by token unless --no-stream.",
                       epilog="examples:\n"
                              "  cst chat -m smollm2-135m-instruct \"What is the capital of France?\"\n"
                              "  cst chat --checkpoint runs/cst --system \"You are a helpful yet harmless assistant "
                              "that avoids generating illegal or harmful content.\"\n"
                              "  printf 'hi\\nand then?\\n' | cst chat -m model_dir --no-stream")
    _add_model_args(c, required=False)
    c.add_argument("message", nargs="?", metavar="MESSAGE", help="one user message (omit for a session)")
    c.add_argument("--system", metavar="TEXT", help="system prompt (default: none, i.e. the template's default)")
    c.add_argument("--max-new-tokens", type=_pos_int, default=256, metavar="N", help="tokens per reply")
    c.add_argument("--temperature", type=_float, default=0.0, metavar="T", help="0 = greedy")
    c.add_argument("--top-p", type=_float, default=1.0, metavar="P", help="nucleus sampling (with --temperature > 0)")
    c.add_argument("--repetition-penalty", type=_float, default=1.0, metavar="R", help="HF-style; 1 = off")
    c.add_argument("--seed", type=_nonneg_int, metavar="N", help="sampling seed (reproducible replies)")
    c.add_argument("--no-stream", action="store_true", help="print each reply when it is complete")
    _add_threads(c)
    c.set_defaults(func=cmd_chat)

    # export
    x = sub.add_parser("export", parents=[common], help="write a model as HF directory or GGUF",
                       description="Writes a model, with a `cst train` checkpoint applied (LoRA merged), as a "
                                   "Hugging Face directory (safetensors + config + tokenizer; transformers loads it) "
                                   "or a GGUF file (llama.cpp). Writes are atomic.",
                       epilog="examples:\n"
                              "  cst export --checkpoint runs/cst --format hf tuned_model\n"
                              "  cst export -m smollm2-135m-instruct --checkpoint runs/cst/checkpoint-50 --format "
                              "gguf --dtype f16 tuned.gguf\n"
                              "  cst export --checkpoint runs/cst --format gguf-lora adapter.gguf")
    _add_model_args(x, required=False)
    x.add_argument("--format", "-f", required=True, choices=("hf", "gguf", "gguf-lora"),
                   help="output format; gguf-lora: only the LoRA adapter of --checkpoint, as a llama.cpp GGUF "
                        "LoRA adapter for the base model's GGUF")
    x.add_argument("--dtype", metavar="float32|float16|bfloat16|q8_0|...",
                   help="weight type: float32 (default), float16; for --format gguf also bfloat16, or the "
                        "llama.cpp block types q8_0, q4_0, q4_1, q5_0, q5_1 (f32/f16/bf16 also accepted)")
    x.add_argument("output", metavar="OUTPUT", help="directory (hf) or .gguf file (gguf) to write")
    x.set_defaults(func=cmd_export)

    # judge
    j = sub.add_parser("judge", parents=[common], help="validate or refit the four-way judge",
                       description="`validate` compares a judge with labelled responses. A four-way labelled set "
                                   "(JSON with items {prompt, response, label_kind, model, kind, configuration}, as "
                                   "../shared/data/labelled-smollm2-dev.json) gets agreement, Cohen's kappa, the 4x4 "
                                   "confusion matrix and S0 / S1 / over-refusal / degeneration by judge and by "
                                   "labels, per model; with --folds K the BehaviourJudge is refitted in K folds "
                                   "grouped by prompt (no prompt on both sides) instead of using the shipped "
                                   "weights. A folder or .md file of GPT-4-judged generations (binary: compliance = "
                                   "harmful; refusal, deflection and degenerate = safe) gets the binary agreement. "
                                   "`fit` refits the default judge and writes its weights.",
                       epilog="examples:\n"
                              "  cst judge validate ../shared/data/labelled-smollm2-dev.json --folds 8\n"
                              "  cst judge validate ../shared/data/labelled-smollm2-dev.json --judge refusal\n"
                              "  cst judge validate ../shared/data/judged-generations\n"
                              "  cst judge fit ../shared/data/labelled-smollm2-dev.json "
                              "tests/data/labelled-smollm2-basetrain128.json --held-out "
                              "tests/data/labelled-smollm2-val128.json tests/data/labelled-smollm2-tuned128.json --paper "
                              "../shared/data/configurable-system-prompt-multitask.json --judged "
                              "../shared/data/judged-generations -o judge.json")
    jsub = j.add_subparsers(dest="judge_command", metavar="SUBCOMMAND", parser_class=_Parser)
    j.set_defaults(func=lambda a: _missing_sub(j, "validate or fit"))
    jv = jsub.add_parser("validate", parents=[common], help="agreement of a judge with labelled responses")
    jv.add_argument("labelled", metavar="LABELLED", nargs="+",
                    help="labelled .json set(s; several are pooled, rates kept per set and model), or one "
                         "judged-generations folder / .md")
    jv.add_argument("--judge", default="default", metavar="JUDGE",
                    help="default | behaviour:FILE.json | refusal | refusal-strict | classifier:FILE.npz")
    jv.add_argument("--folds", type=_pos_int, metavar="K",
                    help="refit a BehaviourJudge in K folds grouped by prompt (four-way sets only)")
    jv.add_argument("--paper", metavar="FILE.json",
                    help="with --folds: add the CST preference records' harmless items to every fold's training")
    jv.add_argument("--seed", type=_nonneg_int, default=0, metavar="N", help="fold assignment seed")
    jv.add_argument("--json", action="store_true", help="print the result as JSON")
    jv.set_defaults(func=cmd_judge_validate)
    jf = jsub.add_parser("fit", parents=[common], help="refit the four-way judge on a labelled set")
    jf.add_argument("labelled", metavar="LABELLED", nargs="+", help="four-way labelled .json set(s) to fit on")
    jf.add_argument("--held-out", metavar="FILE.json", nargs="+",
                    help="labelled sets not fitted on: their figures are stored with the weights and printed in reports")
    jf.add_argument("--paper", metavar="FILE.json", help="CST preference records (harmless items added)")
    jf.add_argument("--judged", metavar="DIR", help="GPT-4-judged generations for the stored binary figures")
    jf.add_argument("--output", "-o", required=True, metavar="FILE.json", help="where the weights go")
    jf.set_defaults(func=cmd_judge_fit)

    # info
    i = sub.add_parser("info", parents=[common], help="version, threads, SIMD, installed weights",
                       description="Prints the cst version, OpenMP and thread settings, the SIMD path in use and those "
                                   "this CPU supports, whether the SmolLM2 GGUF is installed, and library versions.",
                       epilog="examples:\n  cst info\n  cst info --json\n  CST_SIMD=scalar OMP_NUM_THREADS=1 cst info")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)
    return p


def _missing_sub(parser, names="synth or build"):
    raise UsageError(f"choose a subcommand: {names} (see '{parser.prog} --help')")


def main(argv=None):
    """Runs the `cst` command line; returns the exit status (0 ok, 1 error, 2 usage, 130 Ctrl-C)."""
    rc = _main(argv)
    world = distributed.started()
    if rc and world is not None and world.size > 1:
        # Other ranks may wait in a collective, and MPI_Finalize would then hang on every rank.
        world.abort(f"cst: rank {world.rank} of {world.size} ended with status {rc}; aborting every rank", rc)
    return rc


def _main(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("CST_DEBUG", "") not in ("", "0") or "--debug" in argv
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as e:  # --help / --version
            return e.code if isinstance(e.code, int) else 0
        if extra:
            where = " ".join(x for x in (getattr(args, "command", None), getattr(args, "data_command", None)) if x)
            see = f"cst {where} --help" if where else "cst --help"
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{see}')")
        debug = debug or getattr(args, "debug", False)
        if not getattr(args, "command", None):
            raise UsageError("no command given (see 'cst --help')")
        if distributed.launched():
            # Under mpirun/srun: MPI starts before any kernel, and only rank 0 prints results.
            if distributed.world().rank > 0:
                sys.stdout = open(os.devnull, "w")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("cst: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`cst ... | head`): stop quietly, as Unix tools do.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except Exception as e:
        if debug:
            raise
        print(f"cst: error: {_describe(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
