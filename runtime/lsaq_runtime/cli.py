"""`lsaq-run`: generate text from a bundle, or explain which variant would load (--dry-run).

    lsaq-run BUNDLE [PROMPT] [options]     (PROMPT "-" or absent: read stdin)
    lsaq-run verify BUNDLE                 check every file's sha256
    lsaq-run inspect BUNDLE                model, variants and files at a glance
    lsaq-run serve BUNDLE [options]        OpenAI-compatible HTTP server that re-plans the
                                           variant as free memory changes (extra: serve)

User errors print one line and exit 2; there are no tracebacks for them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import click

from .errors import LsaqRuntimeError, NoVariantFits, first_line, printable
from .sizes import format_size

DEBUG_ENV = "LSAQ_DEBUG"  # set to 1: let unexpected exceptions show their traceback

SUBCOMMANDS = ("run", "verify", "inspect", "serve")


class DefaultRunGroup(click.Group):
    """`lsaq-run BUNDLE ...` means `lsaq-run run BUNDLE ...`; subcommands win by name.
    (A bundle folder literally named like a subcommand can be given as ./verify.)"""

    def parse_args(self, ctx, args):
        if args and args[0] not in SUBCOMMANDS and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _echo_err(msg: str) -> None:
    click.echo(f"lsaq-run: {printable(msg, newlines=False)}", err=True)


def _echo(text: str = "", **kw) -> None:
    """Everything printed comes (partly) from the bundle: no raw control characters."""
    click.echo(printable(text), **kw)


@click.group(cls=DefaultRunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lsaq", message="lsaq-run %(version)s")
def cli():
    """Run an LSAQ bundle: load the most precise variant that fits this device and generate.

    lsaq-run BUNDLE [PROMPT] [OPTIONS]  (see `lsaq-run run --help` for the options)"""


@cli.command("run")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.argument("prompt", required=False)
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=0), default=128, show_default=True)
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="KV cache capacity in tokens (prompt + new tokens). Default: the bundle's "
                   "deployment.context_length.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--memory-budget", envvar="LSAQ_MEMORY_BUDGET", default=None,
              help="Cap the free memory to plan with (e.g. 6GiB, 512MB). With --dry-run it "
                   "simulates a device with this much free memory. Env: LSAQ_MEMORY_BUDGET.")
@click.option("--wait", type=click.FloatRange(min=0), default=0, show_default=True,
              help="If no variant fits, wait up to SECONDS for memory to free up.")
@click.option("--variant", default=None, help="Load this variant (by name) whatever the plan says.")
@click.option("--dry-run", is_flag=True, help="Print the decision for every variant; load nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the bundle's chat template.")
@click.option("--temperature", "-t", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0,
              show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for ONNX Runtime. Default: the physical cores this process may "
                   "use (affinity and container CPU quota respected).")
def run_cmd(bundle, prompt, max_new_tokens, context, device, memory_budget, wait, variant, dry_run,
            as_json, chat, temperature, top_k, top_p, seed, threads):
    """Generate a continuation of PROMPT (or print the plan with --dry-run)."""
    from .model import decide, load, memory_trace, stderr_log

    if dry_run:
        try:
            d = decide(bundle, context, memory_budget, device, variant, wait=0, simulate=True)
        except NoVariantFits as e:
            _print_decision(e.decision, as_json)
            raise
        _print_decision(d, as_json)
        return

    from .sampling import Sampler

    Sampler(temperature, top_k, top_p, seed)  # bad settings fail now, not after loading
    if chat:  # refused before minutes of hashing and loading, not after
        from .manifest import load_manifest

        if not load_manifest(bundle, check_sizes=False)["tokenizer"].get("chat_template"):
            raise LsaqRuntimeError(f"{bundle}: this bundle has no chat template "
                                   "(tokenizer.chat_template), so --chat cannot format a "
                                   "conversation; run without --chat, or rebuild with "
                                   "`lsaq-compile build --chat-template FILE`")
    if prompt is None or prompt == "-":
        if sys.stdin.isatty() and prompt is None:
            raise LsaqRuntimeError("no PROMPT given; pass it as an argument or pipe it on stdin (PROMPT -)")
        prompt = _read_stdin()
        if prompt.endswith("\n"):  # `echo ... |` adds one; it would change the continuation
            prompt = prompt[:-1]
    else:
        _check_argv_text(prompt, "PROMPT")
    t0 = time.perf_counter()
    model = load(bundle, context, memory_budget, device, variant, wait, threads=threads,
                 log=stderr_log)
    t_load = time.perf_counter() - t0
    stderr_log(f"loaded {model.variant} on {model.device.label} ({model.provider} graph, "
               f"context {model.context}, {model.threads} threads) in {t_load:.1f}s — "
               f"{model.reason}")
    t1 = time.perf_counter()
    tty = sys.stdout.isatty()
    pieces, count = [], 0
    for piece in model.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat):
        count += 1
        if as_json:
            pieces.append(piece)
        else:  # a terminal gets escapes shown, a pipe gets the exact text
            click.echo(printable(piece) if tty else piece, nl=False)
            sys.stdout.flush()
    dt = time.perf_counter() - t1
    if as_json:
        click.echo(json.dumps({"text": "".join(pieces), "variant": model.variant,
                               "provider": model.provider, "device": model.device.label,
                               "context": model.context, "reason": model.reason,
                               "stop": model.last_stop}))
    else:
        click.echo()
    stderr_log(f"stopped at {model.last_stop}; {dt:.1f}s generating")
    model.close()
    memory_trace("end")


MAX_STDIN_BYTES = 256 << 20   # far more text than any context window holds


def _read_stdin() -> str:
    """The prompt piped on stdin: UTF-8 text, bounded (`< /dev/zero` must not fill memory)."""
    stream = getattr(sys.stdin, "buffer", None)
    raw = stream.read(MAX_STDIN_BYTES + 1) if stream is not None else \
        sys.stdin.read(MAX_STDIN_BYTES + 1).encode("utf-8", "surrogateescape")
    if len(raw) > MAX_STDIN_BYTES:
        raise LsaqRuntimeError(f"stdin holds more than {MAX_STDIN_BYTES >> 20} MiB, more than any "
                               "prompt can be; pipe the prompt itself")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LsaqRuntimeError(f"stdin is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                               f"{e.start}); pipe UTF-8 text as the prompt") from None


def _check_argv_text(text: str, name: str) -> None:
    """Command-line text arrives decoded with surrogateescape: an undecodable byte shows up as a
    lone surrogate U+DC80..U+DCFF, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"U+{ch:04X}"
        raise LsaqRuntimeError(f"{name} is not UTF-8 text ({what} at character {e.start}); "
                               "pass UTF-8 text") from None


def _print_decision(d, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(d.to_json(), indent=1))
    else:
        _echo(d.table())


@cli.command("verify")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(bundle, as_json):
    """Check the manifest, every file's size and sha256, and every graph against the manifest."""
    from .manifest import verify_bundle

    problems = verify_bundle(bundle)
    if as_json:
        click.echo(json.dumps({"bundle": bundle, "ok": not problems, "problems": problems}))
    if problems:
        if not as_json:
            for p in problems:
                _echo_err(f"problem: {p}")
        raise LsaqRuntimeError(f"{bundle}: {len(problems)} problem(s) (damaged, missing or "
                               "mismatched files, listed above); rebuild or copy the bundle again")
    if not as_json:
        _echo(f"{bundle}: ok (every file matches its size and sha256; every graph matches the "
              "manifest and the weight store)")


@cli.command("inspect")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
def inspect_cmd(bundle):
    """Model, deployment assumptions, variants and files of a bundle."""
    from .manifest import load_manifest

    m = load_manifest(bundle)
    mo, dep = m["model"], m["deployment"]
    _echo(f"{mo['name']} ({mo['architecture']}): {mo['num_layers']} layers, hidden "
          f"{mo['hidden_size']}, vocab {mo['vocab_size']}, max_context {mo['max_context']}")
    _echo(f"created by {m.get('created_by', '?')}; deployment: context {dep['context_length']}, "
          f"batch {dep['batch_size']}")
    for v in m["variants"]:
        c = v["layer_counts"]
        provs = ", ".join(f"{p}: {format_size(i['resident_bytes'])}" for p, i in v["providers"].items())
        q = v.get("quality") or {}
        q = (f"  KL {q['kl_fp16']:.4f}" if "kl_fp16" in q else "") + \
            (f"  ppl {q['perplexity']:.3f}" if "perplexity" in q else "")
        t = v.get("tables") or {}
        tables = "/".join(dict.fromkeys(t.get(k, "fp16") for k in ("embed_tokens", "lm_head")))
        _echo(f"  {v['name']:<10} fp16 {c['fp16']:>3} int8 {c['int8']:>3} int4 {c['int4']:>3} "
              f"mixed {c.get('mixed', 0):>3}  tables {tables:<9} {v['avg_bits']:.2f} bits{q}  "
              f"resident {provs}")
    total = sum(f["bytes"] for f in m["files"])
    _echo(f"{len(m['files'])} files, {format_size(total)}")


@cli.command("serve")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="0 picks a free port (the address is printed).")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="KV cache capacity in tokens: prompt + completion of one request. Default: "
                   "the bundle's deployment.context_length.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--memory-budget", envvar="LSAQ_MEMORY_BUDGET", default=None,
              help="Cap the memory to plan with (e.g. 6GiB). Env: LSAQ_MEMORY_BUDGET.")
@click.option("--memory-budget-file", type=click.Path(dir_okay=False, path_type=str),
              default=None, help="Read the budget from FILE at every probe ('300MB', 'none'): "
                                 "rewrite it to squeeze or free the server while it runs.")
@click.option("--wait", type=click.FloatRange(min=0), default=60, show_default=True,
              help="While no variant fits, a request waits up to SECONDS in the queue, then "
                   "fails with 503.")
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests that may wait behind the running one; more get 503.")
@click.option("--poll", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between memory probes.")
@click.option("--upgrade-after", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Switch to a better variant only after it has fitted for SECONDS.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for ONNX Runtime (default: the physical cores).")
@click.option("--model-name", default=None,
              help="The model id clients send (default: the bundle's model name, lower case).")
@click.option("--api-key", envvar="LSAQ_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (OpenAI clients send their "
                   "api_key so). Env: LSAQ_API_KEY.")
@click.option("--access-log", is_flag=True, help="Log every HTTP request (uvicorn).")
@click.option("--max-connections", type=click.IntRange(min=1), default=None,
              help="Most HTTP connections open at once (default 2048, within the descriptor "
                   "limit); at the cap the one waiting longest for its request is closed.")
def serve_cmd(bundle, host, port, context, device, memory_budget, memory_budget_file, wait,
              max_queue, poll, upgrade_after, threads, model_name, api_key, access_log,
              max_connections):
    """Serve BUNDLE over the OpenAI API, re-planning the variant as free memory changes.

    One generation at a time from a FIFO queue. Switches down at once when the loaded
    variant no longer fits, up after --upgrade-after seconds, and pauses (requests wait up to
    --wait) when nothing fits; every switch is logged with its numbers."""
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise LsaqRuntimeError(f"lsaq-run serve needs {' and '.join(missing)}, which the plain "
                               'runtime leaves out: pip install "lsaq[serve]"')
    from .adaptive import Engine, FileBudget
    from .model import resolve_budget, stderr_log
    from .probe import check_threads
    from .server import bind, model_id, serve, url_of

    if memory_budget is not None and memory_budget_file is not None:
        raise LsaqRuntimeError("give --memory-budget or --memory-budget-file, not both")
    if api_key is None and os.environ.get("LSAQ_API_KEY") is not None:
        api_key = os.environ["LSAQ_API_KEY"]   # click reads a set but empty variable as unset
    _check_api_key(api_key)
    check_threads(threads)
    budget = (FileBudget(memory_budget_file, log=stderr_log) if memory_budget_file
              else resolve_budget(memory_budget))
    sock = bind(host, port)
    try:
        engine = Engine(bundle, context=context, device=device, budget=budget, wait=wait,
                        max_queue=max_queue, poll=poll, upgrade_after=upgrade_after,
                        threads=threads, log=stderr_log).start()
    except BaseException:
        sock.close()
        raise
    name = model_name or model_id(engine.manifest)
    stderr_log(f"serving '{name}' on {url_of(sock)}/v1 (one generation at a time, up to "
               f"{max_queue} waiting; memory probed every {poll:g}s) — Ctrl-C stops")
    serve(engine, sock, name, access_log, api_key, max_connections)


def _check_api_key(key: str | None) -> None:
    """An empty key would be no key (every request passes); a key HTTP cannot carry as a
    header (non-ASCII, controls) would lock every client out."""
    if key is None:
        return
    if not key.strip():
        raise LsaqRuntimeError("--api-key (or LSAQ_API_KEY) is empty, which would turn "
                               "authentication off; give a non-empty key, or leave both out to "
                               "serve without one")
    if not all(32 < ord(c) < 127 for c in key):
        raise LsaqRuntimeError("--api-key must be printable ASCII without spaces (clients send "
                               "it in an HTTP header)")


def main(argv=None) -> int:
    """Every failure ends as one line on stderr and exit code 2 (130 when interrupted)."""
    code = 0
    try:
        cli.main(args=argv, prog_name="lsaq-run", standalone_mode=False)
    except LsaqRuntimeError as e:
        _echo_err(f"error: {e}")
        code = 2
    except click.exceptions.Abort:
        _echo_err("aborted")
        code = 130
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except KeyboardInterrupt:
        _echo_err("interrupted")
        code = 130
    except BrokenPipeError:  # `lsaq-run ... | head`
        code = 0
    except click.exceptions.Exit as e:
        code = e.exit_code
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        _echo_err(f"error: {describe_unexpected(e)}")
        code = 2
    return code


def describe_unexpected(e: BaseException) -> str:
    """One line for an exception no check anticipated: what kind, where, and what to do."""
    if isinstance(e, MemoryError):
        return "out of memory; free memory, use a smaller variant (--memory-budget) or --context"
    if isinstance(e, RecursionError):
        return "input nested too deeply to process"
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or first_line(e)}; check the path, its permissions and free disk"
    return (f"unexpected {type(e).__name__}: {first_line(e)}; this is a bug in lsaq, please report "
            f"it (set {DEBUG_ENV}=1 to see the traceback)")


if __name__ == "__main__":
    sys.exit(main())
