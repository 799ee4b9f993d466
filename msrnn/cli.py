"""The `msrnn` command: every argparse line of every subcommand lives here; each subcommand calls one function of
its feature module with the parsed arguments (and, where it needs one, a `load()` that returns (model, tokenizer)).

    msrnn generate --chat "What is the capital of France?" --policy tova --states 64
    msrnn chat | info | eval ppl|stream|needle|recall | inspect | bench       (each has its own --help)

Options that mean the same thing everywhere are declared once: the model (--model --dtype --threads --device), the
policy (--policy --states --positions, and --prefill where a prompt is read). Errors msrnn raises on purpose
(MsrnnError) end as one line, "msrnn: error: ...", and exit code 2, like argparse's own usage errors; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import InputError, MsrnnError
from .model import PREFILL_MODES
from .policies import FULL, POLICIES, POSITION_SCHEMES, parse_states
from .quant import FORMATS

BUNDLED = "the bundled SmolLM2-135M-Instruct GGUF"
POLICY_FORMS = (f"{FULL}, {', '.join(POLICIES)}; settings in parentheses (\"tova-decay(gamma=0.8)\"); or your own class "
                "as path/to/file.py:ClassName (the file is run, as an import would)")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default once and keeps the descriptions' line breaks. An option whose help already names
    its default "(default: ...)", a required one, a flag, or one without a default (None: its help says what
    happens without it) gets no second "(default: ...)"."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "(default" in help or action.required or action.default is None or isinstance(action.default, bool):
            return help
        return super()._get_help_string(action)


# --- options shared by several commands --------------------------------------------------------------------------
def model_options(p, dtype: str = "fp32") -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help=f"checkpoint directory, .gguf file or hub id (default: {BUNDLED})")
    p.add_argument("--dtype", default=dtype, choices=FORMATS,
                   help="weights: fp32 (the exact reference), bf16, int8/int4 (weight-only, CPU; the rest computes in "
                        "fp32), auto (the checkpoint's own: a GGUF's Q4 blocks as int4, Q8_0 as int8; bf16 on a GPU)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads (default: the machine's physical cores, or OMP_NUM_THREADS if set)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"), help="where the model runs")


def compile_option(p) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token step (Transformer.compile): fewer, fused operations per token; "
                        "the first tokens take tens of seconds to compile, cached on disk for the next run "
                        "(~/.cache/msrnn/compile or $MSRNN_CACHE/compile; delete it to clear); on the CPU it needs a "
                        "C++ compiler")


def states_arg(text: str):
    """--states K or "[k0,k1,...]" (msrnn.policies.parse_states), its message shown by argparse if it is wrong."""
    try:
        return parse_states(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def policy_options(p, policy: str | None, states: int | None, note: str = "", prefill: bool = True,
                   several_positions: bool = False) -> None:
    p.add_argument("--policy", default=policy, help=f"which states to keep: {POLICY_FORMS}{note}")
    p.add_argument("--states", type=states_arg, default=states, metavar="K",
                   help='the policy\'s budget: states per layer, one per layer as "[96,64,32]" (layer 0 first), one per kv '
                        'head of each layer as "[[512,64,64],...]", or a budgets .json file (msrnn calibrate)')
    if several_positions:  # checked by the command (msrnn.stream.parse_positions)
        p.add_argument("--positions", default=None, metavar="SCHEMES",
                       help=f"position schemes of the kept states, comma-separated to compare several "
                            f"({', '.join(POSITION_SCHEMES)}; default: the policy's own, absolute)")
    else:
        p.add_argument("--positions", default=None, choices=POSITION_SCHEMES,
                       help="position scheme of the kept states (default: the policy's own, absolute)")
    if prefill:
        p.add_argument("--prefill", default="exact", choices=PREFILL_MODES,
                       help="exact: the prompt runs as the recurrence (evicting per token, layer-major); fast: one "
                            "parallel pass, then one eviction")


def sampling_options(p, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N", help="stop after N tokens")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy; > 0 samples")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="sample within the top probability mass P (nucleus)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="> 1 discourages tokens already in the prompt or answer (CTRL's rule; 1.1-1.3 typical)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="end the answer before this text (repeatable)")


def text_options(p, out: str) -> None:
    """--text and --out; an `out` with "<text name>" in it is the command's default folder, made from the text's
    file name by the command (None here), so that runs on two texts do not share a folder."""
    p.add_argument("--text", required=True, metavar="FILE", help="a UTF-8 text file")
    if "<text name>" in out:
        p.add_argument("--out", default=None, metavar="DIR", help=f"output folder (default: {out})")
    else:
        p.add_argument("--out", default=out, metavar="DIR", help="output folder")


# --- the commands ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msrnn", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Transformers are Multi-State RNNs: run a Llama/Mistral checkpoint as a bounded recurrence "
                    "(TOVA, H2O, window, sinks...).",
        epilog='example:\n  msrnn generate --chat "What is the capital of France?" --policy tova --states 64\n'
               "run `msrnn COMMAND --help` for each command's options.")
    parser.add_argument("--version", action="version", version=f"msrnn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (msrnn --debug CMD)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "generate", formatter_class=Formatter, help="continue a prompt, streaming the text",
        description="Continue a prompt with the model run as a (bounded) multi-state RNN, streaming the text to "
                    "stdout. Greedy by default (reproducible); --temperature > 0 samples.",
        epilog='example:\n  msrnn generate --chat "What is the capital of France?" --policy tova --states 64\n'
               '  msrnn generate "Once upon a time" --temperature 0.8 --top-p 0.9 --seed 0 --max-new-tokens 200')
    p.add_argument("prompt", help="the text to continue (with --chat: the user's message)")
    model_options(p, dtype="auto")
    policy_options(p, None, None, " (default: none, the unbounded transformer)")
    sampling_options(p, max_new_tokens=128)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    compile_option(p)
    p.add_argument("--verbose", "-v", action="store_true", help="report tokens/s and the state size on stderr")
    p.set_defaults(run="generate:run_generate")

    from .chat import CHAT_DEFAULT_POLICY, CHAT_DEFAULT_STATES

    p = sub.add_parser(
        "chat", formatter_class=Formatter, help="talk with a chat model; one bounded state for the whole conversation",
        description="A chat REPL: type a message, get the answer. /help lists the commands (/state, /reset, /quit); "
                    "Ctrl-C stops an answer (the part written stays in the conversation), Ctrl-D or /quit ends the "
                    "chat; in a terminal the arrow keys edit the line and recall earlier ones (readline). The whole "
                    "conversation lives in ONE bounded multi-state: each turn feeds only its new tokens, and the "
                    "policy keeps at most --states per layer, so the chat can run past the model's context length in "
                    "constant memory. --policy full is the unbounded transformer.",
        epilog='example:\n  msrnn chat --policy tova --states 256 --system "Answer in one sentence." --verbose')
    model_options(p, dtype="auto")
    policy_options(p, None, None, f" (default: {CHAT_DEFAULT_POLICY} with {CHAT_DEFAULT_STATES} states)")
    sampling_options(p, max_new_tokens=256)
    p.add_argument("--system", help="a system message that opens the conversation")
    compile_option(p)
    p.add_argument("--verbose", "-v", action="store_true", help="print the state size after each answer (stderr)")
    p.set_defaults(run="chat:run_chat")

    p = sub.add_parser(
        "info", formatter_class=Formatter, help="a model's config, size and state memory per budget",
        description="Print a checkpoint's config, parameter count and dtype, and what its multi-state costs: bytes "
                    "per remembered token, for budgets of 64..2048 states, and at the full context length.",
        epilog="example:\n  msrnn info\n  msrnn info --model path/to/checkpoint --dtype bf16")
    model_options(p)
    p.set_defaults(run="info:run_info")

    add_eval(sub)

    p = sub.add_parser(
        "calibrate", formatter_class=Formatter, help="rank the kv heads by how much a far fact needs them (retrieval)",
        description="Which kv heads fetch a fact from far back: on pass-key prompts it generates itself (random\n"
                    "words, never the novels), each head is cut to sinks + recent states at the question and the\n"
                    "answer's loss measured, jointly (backward elimination). Writes into --out:\n"
                    "  calibration.json   the ranking (for --policy \"retrieval(calibration='.../calibration.json')\")\n"
                    "  budgets.json       budgets per layer and kv head for a mean of --states (--states budgets.json)\n"
                    "  heads.png          layers x kv heads\n"
                    "  summary.txt        the top heads and how long it took",
        epilog="example:\n  msrnn calibrate --prompts 8 --length 1024 --states 256 --out out/calibrate")
    model_options(p)
    p.add_argument("--prompts", type=int, default=8, metavar="N", help="pass-key prompts (one batch)")
    p.add_argument("--length", type=int, default=1024, metavar="T", help="tokens per prompt")
    p.add_argument("--stream", type=int, default=64, metavar="S", help="states a cut head keeps: sinks + recent")
    p.add_argument("--sinks", type=int, default=4, metavar="N", help="first tokens a cut head keeps")
    p.add_argument("--states", type=int, default=256, metavar="K", help="mean budget of budgets.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts")
    p.add_argument("--out", default="out/calibrate", metavar="DIR", help="output folder")
    p.set_defaults(run="calibrate:run_calibrate")

    p = sub.add_parser(
        "inspect", formatter_class=Formatter, help="which tokens a policy keeps, and for how long (HTML, PNG, table)",
        description="Run a text through the model as a bounded multi-state RNN and record, for every token and\n"
                    "layer, how many steps it stayed in the state. Writes into --out:\n"
                    "  retention.html          the text, each token shaded by the share of the steps it could stay\n"
                    "                          (to the end of the text) that it stayed\n"
                    "  retention.png           heatmap of that share, layers x tokens\n"
                    "  retention_by_kind.md    mean retention of the first token, punctuation, newlines, 's,\n"
                    "  retention_by_kind.csv   closing quotes, proper nouns and other tokens\n"
                    "  tokens.csv              one row per token",
        epilog="example:\n  msrnn inspect --text ../shared/data/frankenstein.txt --policy tova --states 64 "
               "--tokens 1024 --out out/inspect")
    text_options(p, "out/inspect")
    model_options(p)
    policy_options(p, "tova", 64, prefill=False)
    p.add_argument("--layer", type=int, metavar="L", help="shade by layer L only (default: mean over layers)")
    p.add_argument("--tokens", type=int, default=512, metavar="N", help="use the first N tokens")
    p.set_defaults(run="inspect:run_inspect")

    p = sub.add_parser(
        "bench", formatter_class=Formatter,
        help="decode/prefill speed, throughput under a KV budget and memory, vs transformers",
        description="Speed and memory of msrnn next to transformers in the same process, with the machine's\n"
                    "weight-reading floor timed in turn. Example: msrnn bench --compare transformers --out "
                    "docs/results/bench")
    model_options(p, dtype="auto")
    p.add_argument("--compare", default="transformers", choices=["transformers", "llama.cpp", "none"],
                   help="also time transformers in the same process, or llama.cpp's llama-bench on the same GGUF")
    p.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench executable (default: on PATH)")
    p.add_argument("--policy", default="tova", help=f"bounded policy to time: {POLICY_FORMS}")
    p.add_argument("--states", default="256",
                   help="its budgets, comma-separated (a row and a line each); one per layer in brackets, e.g. "
                        "128,256 or 64,[96,64,32]")
    p.add_argument("--positions", default="16,512,2000", help="stream positions for the unbounded decode timings")
    p.add_argument("--bounded-positions", default="2000,8000,20000", help="stream positions for the bounded timings")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timing (median of the rounds)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill timing")
    p.add_argument("--budget-context", type=int, default=2048, help="the full cache whose KV memory is the budget")
    p.add_argument("--budget-states", default="256,512,1024,2048", help="state sizes for the throughput table")
    p.add_argument("--stream-tokens", type=int, default=70000,
                   help="resident memory along a bounded stream this long (0: skip)")
    p.add_argument("--stream-states", type=int, default=512, help="the stream's budget")
    p.add_argument("--out", default="out/bench", help="folder for bench.json, bench.md and bench.png")
    compile_option(p)
    p.set_defaults(run="bench:run", loads_itself=True)
    return parser


def add_eval(sub) -> None:
    from .ppl import DEFAULT_BATCH, DEFAULT_POLICIES

    p = sub.add_parser("eval", help="perplexity of bounded policies (the paper's Table 3), long streams, needle and "
                                    "recall tasks",
                       description="The paper's language-modelling experiments, and tasks with one right answer. See "
                                   "`msrnn eval ppl|stream|needle|recall --help`.")
    ev = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    q = ev.add_parser(
        "ppl", formatter_class=Formatter, help="PPL of policies x budgets on chunks of a text (Table 3)",
        description="Cut a text into chunks of --context tokens, run each chunk from an empty state with every\n"
                    "policy and budget, and report perplexity (with a bootstrap 95 % interval over chunks), top-1\n"
                    "agreement with the full model and KL(full || policy) per token. Writes into --out: table.md\n"
                    "(the paper's Table 3 layout), table.csv, results.json, ppl.png, and results.jsonl (each\n"
                    "finished unit as it completes: interrupt freely, then --resume).\n\n"
                    "--prefill exact: the recurrence, every next token scored (the paper).\n"
                    "--prefill fast: the first --prompt tokens (default context/2) in one parallel pass, compressed\n"
                    "once, then the recurrence; only tokens after the prompt are scored. Compare with an exact run\n"
                    "given the same --prompt.\n\n"
                    "Bigger grids: `torchrun --nproc_per_node N -m msrnn eval ppl ...` deals the batches of chunks\n"
                    "out to N processes (on one machine or several) and writes the same table.",
        epilog="example:\n  msrnn eval ppl --text ../shared/data/pride-and-prejudice.txt --context 2048 --chunks 2 "
               "--out out/eval-pp")
    text_options(q, "out/eval-<text name>")
    model_options(q)
    q.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"comma-separated policies: {POLICY_FORMS}; full is always measured")
    q.add_argument("--states", default="64,128,256,512",
                   help="comma-separated budgets k; one per layer in brackets, e.g. 64,[96,64,32]")
    q.add_argument("--positions", default=None, choices=POSITION_SCHEMES, help="position scheme of every policy")
    q.add_argument("--context", type=int, default=2048, metavar="T", help="tokens per chunk")
    q.add_argument("--chunks", type=int, default=2, metavar="N",
                   help="evaluate N chunks spread evenly over the text (0 = every full chunk)")
    q.add_argument("--prefill", default="exact", choices=PREFILL_MODES, help="see above")
    q.add_argument("--prompt", type=int, default=None, metavar="P",
                   help="score only after the first P tokens of each chunk (default 0 exact, context/2 fast)")
    q.add_argument("--batch", type=int, default=DEFAULT_BATCH, metavar="N",
                   help="chunks run together in one batch state; results are saved after each batch")
    q.add_argument("--compare", default=None, metavar="POLICY",
                   help="also give every policy's PPL relative to this one of --policies, and the share of its gap "
                        "to full closed, paired over the same chunks (bootstrap 95 %%)")
    q.add_argument("--resume", action="store_true", help="continue the run in --out (its settings must match)")
    q.add_argument("--backend", default="msrnn", choices=("msrnn", "transformers"),
                   help="what runs the model: msrnn's own, or transformers with the policy in a msrnn.hf.PolicyCache")
    q.set_defaults(run="ppl:run_ppl")

    s = ev.add_parser(
        "stream", formatter_class=Formatter, help="PPL and memory along one long stream, past the trained context",
        description="Feed ONE long stream through the bounded recurrence and report PPL per window, peak and\n"
                    "current RSS and state size, next to the full model on the first --full-tokens tokens (its\n"
                    "trained context by default). --positions a,b,... runs one batch row per position scheme over\n"
                    "the same text. --control N reads the last N windows again from an empty state (each after\n"
                    "--control-warmup tokens of the text before it, the policy at absolute positions) and reports\n"
                    "stream / fresh per window and pooled. The text is repeated if it is shorter than --tokens (the\n"
                    "output says so). Writes stream.md, stream.csv, stream.json and stream.png into --out.",
        epilog="example:\n  msrnn eval stream --text ../shared/data/pride-and-prejudice.txt --policy tova --states 512 "
               "--tokens 70000 --positions absolute,shift,rebase --control 10 --full-tokens 0")
    text_options(s, "out/stream-<text name>")
    model_options(s)
    policy_options(s, "tova", 512, prefill=False, several_positions=True)
    s.add_argument("--tokens", type=int, default=70000, metavar="N", help="stream length")
    s.add_argument("--window", type=int, default=1000, metavar="W", help="tokens per reported window")
    s.add_argument("--full-tokens", type=int, default=None, metavar="N",
                   help="run the full model on the first N tokens (default min(max_position_embeddings, --tokens))")
    s.add_argument("--control", type=int, default=0, metavar="N",
                   help="fresh-read controls for the last N windows (0: none)")
    s.add_argument("--control-warmup", type=int, default=1000, metavar="W",
                   help="unscored tokens read before each control window (the text just before it)")
    s.add_argument("--control-batch", type=int, default=8, metavar="N", help="control windows run together")
    s.set_defaults(run="stream:run_stream")

    from .qa import DEFAULT_TASK_POLICIES
    from .tasks import NEEDLE, NEEDLE_QUESTION, RECALL_QUESTION

    n = ev.add_parser(
        "needle", formatter_class=Formatter, help="needle in a haystack: is one fact found, by policy and budget",
        description="Hide a sentence with a random number (--needle) at depth d % of a passage of --text, the\n"
                    "prompt exactly L tokens through the chat template, ask --question, and score the greedy\n"
                    "answer's first number by exact match. --seeds trials (passage and number) per length x depth,\n"
                    "for every policy x budget; full (the ceiling) is always run. Writes into --out: table.md\n"
                    "(accuracy with Wilson 95 % intervals), cells.csv, results.json, needle-POLICY.png (the heatmap\n"
                    "of depth x length per budget), results.jsonl (every answer; --resume) and, with\n"
                    "--trace-failures N, trace.md and trace-*.png: which layers dropped the needle the full model\n"
                    "found.",
        epilog="example:\n  msrnn eval needle --text ../shared/data/pride-and-prejudice.txt --lengths 512,1024 "
               "--depths 0,25,50,75,100 --seeds 3 --policies tova,h2o,window,sinks --states 128,256 --out out/needle")
    text_options(n, "out/needle")
    task_options(n, DEFAULT_TASK_POLICIES, "128,256")
    n.add_argument("--lengths", default="512,1024", help="comma-separated prompt lengths L in tokens")
    n.add_argument("--depths", default="0,25,50,75,100", help="comma-separated needle depths, %% of the passage")
    n.add_argument("--needle", default=NEEDLE, help="the fact; {value} is replaced by the number")
    n.add_argument("--question", default=NEEDLE_QUESTION, help="asked after the passage")
    n.add_argument("--digits", type=int, default=5, help="digits of the random number")
    n.add_argument("--trace-failures", type=int, default=0, metavar="N",
                   help="rerun up to N needles full found and a policy lost under the retention recorder")
    n.set_defaults(run="qa:run_needle")

    r = ev.add_parser(
        "recall", formatter_class=Formatter, help="associative recall: N key-value pairs, then questions",
        description="N key-value pairs (common nouns -> distinct 4-digit numbers, as a JSON object) in a user's\n"
                    "message, then --queries questions about distinct keys, each asked of the same state after the\n"
                    "pairs; greedy answers, exact match of the first number. Accuracy as N and the budget vary,\n"
                    "for every policy x budget; full (the ceiling) is always run. Writes table.md, cells.csv,\n"
                    "results.json, recall.png and results.jsonl (--resume) into --out.",
        epilog="example:\n  msrnn eval recall --pairs 4,8,16,32 --seeds 4 --queries 4 --policies tova,h2o,window,sinks "
               "--states 32,64 --out out/recall")
    r.add_argument("--out", default="out/recall", metavar="DIR", help="output folder")
    task_options(r, DEFAULT_TASK_POLICIES, "32,64")
    r.add_argument("--pairs", default="4,8,16,32", help="comma-separated numbers of key-value pairs N")
    r.add_argument("--queries", type=int, default=4, metavar="Q", help="questions per context (distinct keys)")
    r.add_argument("--question", default=RECALL_QUESTION, help="asked after the pairs; {key} is replaced by the key")
    r.set_defaults(run="qa:run_recall")


def task_options(p, policies: str, states: str) -> None:
    """What `eval needle` and `eval recall` share: the model, the grid, trials per cell, batching and resuming."""
    model_options(p)
    p.add_argument("--policies", default=policies, help=f"comma-separated policies: {POLICY_FORMS}; full is always run")
    p.add_argument("--states", default=states, help="comma-separated budgets k")
    p.add_argument("--positions", default=None, choices=POSITION_SCHEMES, help="position scheme of every policy")
    p.add_argument("--prefill", default="exact", choices=PREFILL_MODES,
                   help="how the context is read: exact (the recurrence) or fast (one pass, one eviction); the "
                        "question always comes after")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="trials (seeds) per cell")
    p.add_argument("--batch", type=int, default=5, metavar="N",
                   help="trials run together (x every cell); results are saved after each batch")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="longest answer")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (its settings must match)")


# --- running -----------------------------------------------------------------------------------------------------
def physical_cores() -> int:
    """Cores, not hyper-threads (torch's matrix products gain nothing from a core's second thread)."""
    try:
        cores = {line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("core id")}
        sockets = {line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("physical id")}
        if cores:
            return max(1, len(cores) * max(1, len(sockets)))
    except OSError:
        pass
    return os.cpu_count() or 1


def configure(args) -> None:
    """--threads, --device and --out, checked before anything is loaded (or a policy file is run)."""
    import torch
    from pathlib import Path

    threads = getattr(args, "threads", None)
    if threads is not None and (threads < 1 or threads > 4096):
        raise InputError(f"--threads {threads}: give a positive number of threads (this machine has "
                         f"{os.cpu_count()} logical cores).")
    if threads is not None or "OMP_NUM_THREADS" not in os.environ:  # an explicit OMP_NUM_THREADS is respected
        torch.set_num_threads(threads or physical_cores())
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out {out} is an existing file; --out names a folder to write into: give another path.")
    device = getattr(args, "device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device here (a CPU build of torch, or no GPU); "
                         "use --device cpu.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: no Apple GPU is available here; use --device cpu.")


def load_model_and_tokenizer(args):
    """(model, tokenizer) from --model/--dtype, on --device: the one place the commands load a checkpoint."""
    from .quant import check_device, device_dtype
    from .weights import load

    if sys.stderr.isatty():
        print(f"msrnn: loading {args.model or BUNDLED}...", file=sys.stderr, flush=True)
    if getattr(args, "backend", "msrnn") == "transformers":  # the same interface, run by transformers (msrnn.hf)
        from .hf import load as load_transformers

        return load_transformers(args.model, args.dtype, args.device)
    model, tokenizer = load(args.model, dtype=device_dtype(args.dtype, args.device))
    check_device(model, args.device)
    model = model.to(args.device)
    return (model.compile() if getattr(args, "compile", False) else model), tokenizer


def main(argv: list[str] | None = None) -> int:
    """Run `msrnn ARGS`; returns 0, or exits with code 2 (after one line on stderr) on a usage or msrnn error."""
    import importlib

    parser = build_parser()
    args = parser.parse_args(argv)
    module, function = args.run.split(":")
    run = getattr(importlib.import_module(f"msrnn.{module}"), function)
    try:
        configure(args)
        if getattr(args, "loads_itself", False):
            run(args)
        else:
            run(args, lambda: load_model_and_tokenizer(args))
    except MsrnnError as e:
        if args.debug:
            raise
        parser.exit(2, f"msrnn: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\n")
    except BrokenPipeError:  # `msrnn generate ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
