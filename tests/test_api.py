"""The README's Python API snippet runs as written and generates what the CLI generates."""

import contextlib
import io
import os
import re

from engine import api
from tests.test_cli import ROOT, run_cli


def readme_snippet() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs_and_reports_the_kv_bytes_held():
    printed = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(printed):
        exec(readme_snippet(), scope)
    out = scope["out"]
    assert printed.getvalue().strip().endswith(str(out.kv_bytes))
    assert out.kv_bytes == out.result.kv_state.nbytes()
    assert out.context_kv_bytes < out.result.context_kv_bytes_before  # snapkv really shrank it
    assert "<|im_end|>" not in out.texts[0] and out.texts[0]


def test_api_generates_the_cli_tokens_for_a_chat_prompt_with_snapkv():
    context, question = "The letter was signed by Ada. " * 20, "Who signed the letter?"
    out = api.generate(api.load(), [context], [question],
                       compression=api.compression("snapkv", ratio=0.5), chat=True,
                       max_new_tokens=16)
    cli = run_cli(f"--context={context}", f"--question={question}", "--chat",
                  "--compress=snapkv", "--compression_ratio=0.5", "--max_new_tokens=16")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.split("\n\n[prompt")[0] == out.texts[0]
