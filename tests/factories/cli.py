"""The two commands run in process, as a user types them."""

from __future__ import annotations


def run_cli(capsys, which: str, args: list) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lsaq-run` (which="run") or `lsaq-compile` in process."""
    from lsaq_compile.cli import main as compile_main
    from lsaq_runtime.cli import main as run_main

    if which == "run":
        code = run_main([str(a) for a in args])
    else:
        try:
            compile_main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    return code, out, err
