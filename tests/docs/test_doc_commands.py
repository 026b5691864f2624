"""Every command line in README.md and docs/*.md runs: a doc that lies is a bug.

What runs
    Every fenced block whose info string is ``sh``, ``bash``, ``shell`` or ``console``. Lines ending in
    ``\\`` are joined with the next; blank lines and ``#`` comment lines are skipped; in ``console``
    blocks only lines after a ``$ `` prompt are commands, and the lines below each are its expected
    output, compared loosely: in order; whitespace runs equal; ``...`` matches anything; ``$VAR``
    expanded; digests, dates, absolute paths, durations and rates match any other; a line starting
    with ``…`` stands for lines the doc leaves out. Each doc file is one scenario: its blocks run in
    order, each block as one ``bash -e -o pipefail`` script (so variables set in a block hold for the
    rest of it), all in one fresh work directory; a failure names the doc line. Blocks with another
    info string (output, toml, yaml, python, none) are not run.

Placeholders a doc may use (set in the environment of every block)
    ``$REG``   the local registry's ``host:port`` (Debian's docker-registry on 127.0.0.1, plain HTTP:
               pass ``--insecure-registry "$REG"``). It holds
               ``$REG/hello:obd``     overlaybd-converted hello-world (fixtures/aci-hello-world, amd64),
               ``$REG/hello:latest``  the plain OCI hello-world it was converted from,
               ``$REG/hello:multi``   plain hello-world for 9 platforms (a Docker manifest list),
               ``$REG/busybox:obd``   busybox as one overlaybd layer (``sh``, ``ls``, ...: boots with
                                      ``obd run``; its default command prints ``hello from busybox``),
               ``$REG/busybox:latest`` the same root as a plain OCI image (one gzip layer).
    ``$WORK``  the work directory (the cwd), which holds ``base.commit`` and ``app.commit`` (two sealed
               overlaybd layers, lowest first), ``app.tar`` (``busybox:latest`` as ``docker save``
               output), ``app-layout/`` (the same plain image as an OCI layout, tag ``latest``) and
               an empty ``mnt/``; and symlinks to the repository's ``.venv``, ``bench`` and ``fixtures``,
               so repository-relative lines (``.venv/bin/python bench/bench_fuse.py``) run as written.
    ``$TMP``   a private scratch directory (also ``$TMPDIR``); ``$REPO`` the repository checkout.
    Paths starting ``/tmp/`` and ``/mnt/`` are rewritten to ``$TMPDIR/`` and ``$WORK/mnt/``, so docs may
    show natural socket and mount-point paths. ``obd`` is the venv's; caches, state and HOME are private.
    Processes a scenario leaves running (``obd nbd`` servers, ``obd mount``) are stopped, and mounts
    under ``$WORK`` unmounted, when the scenario ends.

Files a doc shows
    ``<!-- doc-test: write (FILE) -->`` before any fenced block (``yaml``, ``toml``, ``json``, ...)
    writes its text to ``$WORK/FILE`` when the scenario reaches it, ``$REG`` replaced by the registry
    address, so later shell blocks can use the file as the doc shows it (a Sandboxfile, hosts.toml).

Lines that cannot run here
    Put ``<!-- doc-test: skip (why; run by tests/PART/test_X.py::test_name) -->`` on the line before
    the block (a blank line between is fine). Keep such blocks few and small: move the lines that do
    run into a block of their own. Every skip must name the test that runs those commands (or their
    equivalent) for real; :func:`test_every_skip_names_a_test_that_exists` checks it, and the run
    prints every skip with its reason. Use it for: setup.sh installs, apt, the internet, a VM image
    that takes minutes, commands whose ``...`` stands for the reader's own arguments.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from doccmd import (
    DocWorld,
    check_expected,
    doc_blocks,
    doc_files,
    hidden_prompts,
    outputs_by_line,
    run_block,
    write_block,
)

from fixtures import REPO, require_tool

pytestmark = pytest.mark.timeout(1800)

_TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    for tool in ("qemu-system-x86_64", "nbdkit", "fusermount3", "debugfs"):
        require_tool(tool)
    w = DocWorld(tmp_path_factory.mktemp("doc-world")).start()
    try:
        yield w
    finally:
        w.stop()


def _files_with_blocks() -> list[Path]:
    return [p for p in doc_files() if any(b.commands for b in doc_blocks(p))]


def test_every_skip_names_a_test_that_exists(capsys):
    """A skipped block says why and which test runs its commands; that test exists."""
    skips, problems = [], []
    for path in doc_files():
        for block in doc_blocks(path):
            if block.directive != "skip":
                continue
            skips.append(block)
            refs = _TEST_REF.findall(block.reason)
            if not refs:
                problems.append(
                    f"{block.where}: skip reason names no tests/...py::test_name: {block.reason!r}"
                )
            for file, name in refs:
                target = REPO / file
                if not target.is_file() or not re.search(
                    rf"^\s*(async )?def {name}\b", target.read_text(), re.M
                ):
                    problems.append(f"{block.where}: {file}::{name} does not exist")
    with capsys.disabled():
        print(f"\ndoc-test: {len(skips)} skipped block(s), {sum(len(b.commands) for b in skips)} line(s):")
        for b in skips:
            print(f"  {b.where}: {b.reason}")
    assert not problems, "\n".join(problems)


def test_no_prompted_command_hides_in_a_block_that_does_not_run():
    """A ``$ obd ...`` line in an untagged (or ``text``) block would escape this test: tag it ``console``."""
    hidden = [f"{p.relative_to(REPO)}:{n}: {line}" for p in doc_files() for n, line in hidden_prompts(p)]
    assert not hidden, "mark these blocks ```console:\n" + "\n".join(hidden)


def test_the_parser_joins_continuations_reads_prompts_and_directives(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "text\n\n```sh\nobd a \\\n   --b c   # note\n# a comment\n\nobd d\n```\n\n"
        "<!-- doc-test: skip (needs the internet; run by tests/x.py::test_y) -->\n\n"
        "```console\n$ obd e\nout 1\n  out  2\n$ obd f \\\n  g\n```\n```text\n$ not run\n```\n"
    )
    first, second = doc_blocks(md)
    assert first.commands == [(4, "obd a --b c   # note"), (8, "obd d")] and first.directive is None
    assert second.directive == "skip" and "tests/x.py::test_y" in second.reason
    assert second.commands == [(14, "obd e"), (17, "obd f g")]
    assert second.expected == {14: ["out 1", "out  2"]}
    assert check_expected(["out ... 1", "$X 2"], "zz\nout is 1\nnope\nhere  2\n", {"X": "here"}) is None
    assert check_expected(["b", "a"], "a\nb\n", {}) == "a"
    volatile = "evicted sha256:15bc517dffea (1.1 MiB) at 2024-06-07 17:40:35 from /home/me/x in 0.3 s"
    assert (
        check_expected(
            [volatile],
            "evicted sha256:" + "ab" * 32 + " (1.1 MiB) at 2026-12-07 05:34:39 from /tmp/y/z in 12.0 s",
            {},
        )
        is None
    )
    assert check_expected([volatile], "evicted sha256:ab (1.2 MiB) at", {}) == volatile


@pytest.mark.parametrize("path", _files_with_blocks(), ids=lambda p: p.name)
def test_doc_commands_run(world, path, capsys):
    """Every shell block of one doc file, in order, in one scenario; all failures reported together."""
    blocks = doc_blocks(path)
    started = time.monotonic()
    failures: list[str] = []
    ran = skipped = lines = 0
    with world.scenario(path.stem) as (work, env):
        for block in blocks:
            if block.directive == "skip":
                skipped += 1
                continue
            if block.directive == "write":
                write_block(block, work, env)
                continue
            ran += 1
            lines += len(block.commands)
            result = run_block(block, work, env)
            if result.returncode != 0:
                where = f"{block.path.relative_to(REPO)}:{result.failed_line or block.line}"
                command = dict(block.commands).get(result.failed_line or -1, "?")
                failures.append(f"{where}: exit {result.returncode}: {command}\n{result.output[-3000:]}")
                continue
            outputs = outputs_by_line(result.output.split("\n--- stderr ---\n", 1)[0])
            for line, want in block.expected.items():
                missing = check_expected(want, outputs.get(line, ""), env)
                if missing is not None:
                    where = f"{block.path.relative_to(REPO)}:{line}"
                    failures.append(f"{where}: output lacks {missing!r}:\n{outputs.get(line)}")
    with capsys.disabled():
        print(
            f"\ndoc-test {path.relative_to(REPO)}: {ran} block(s) / {lines} line(s) run, {skipped} skipped, "
            f"{len(failures)} failure(s), {time.monotonic() - started:.1f} s"
        )
    assert not failures, "\n\n".join(failures)
