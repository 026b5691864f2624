"""Doc-test plumbing: the shell blocks of README.md and docs/*.md, and the world they run in.

:func:`doc_blocks` extracts every fenced block whose info string is ``sh``, ``bash``, ``shell`` or
``console`` and turns it into a :class:`DocBlock`: its command lines (``\\`` continuations joined; in
``console`` blocks only the ``$ ``-prompted lines are commands and the lines after each are its
expected output), and the ``<!-- doc-test: ... -->`` directive written on the line before the fence.

:class:`DocWorld` is what those commands see: a real ``docker-registry`` on 127.0.0.1 holding a few
small images, a scratch directory with a few local files, and an environment (``$REG``, ``$TMP``,
private caches, ``obd`` on PATH). :func:`run_block` runs one block in it with bash and reports which
line failed. The conventions themselves are documented in tests/docs/test_doc_commands.py and
docs/contributing.md.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from registry_server import RegistryServer

from fixtures import FIXTURES, REPO, materialize, require_tool, vm_cache_dir
from frontends.run.images import build_layer, busybox_rootfs, push_image

SHELL_LANGS = frozenset({"sh", "bash", "shell", "console"})
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_DIRECTIVE = re.compile(r"<!--\s*doc-test:\s*(\w[\w-]*)\s*(?:\((.*)\))?\s*-->")
#: Host paths the docs may use naturally, mapped into the scenario's private directories.
_PATH_MAP = (
    (re.compile(r"(?<![\w./$-])/tmp/"), "$TMPDIR/"),
    (re.compile(r"(?<![\w./$-])/mnt/"), "$WORK/mnt/"),
)
#: The prompt of a console block's commands (output lines never start with it).
_PROMPT = re.compile(r"^\$ ")


@dataclass
class DocBlock:
    """One fenced shell block of a Markdown file."""

    path: Path
    line: int  #: 1-based line of the opening fence
    lang: str
    commands: list[tuple[int, str]]  #: (1-based source line, command with continuations joined)
    expected: dict[int, list[str]] = field(default_factory=dict)  #: console output after each command
    directive: str | None = None  #: "skip", "write" or None
    reason: str = ""  #: the directive's parenthesis: why a block is skipped, the file a block is written to
    text: list[str] = field(default_factory=list)  #: a "write" block's lines

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def doc_files() -> list[Path]:
    """README.md and every docs/*.md present now (others add docs while this test exists)."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def doc_blocks(path: Path) -> list[DocBlock]:
    """Every shell block of ``path``, in order, with its directive."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[DocBlock] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        directive, reason = None, ""
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        d = _DIRECTIVE.search(prev)
        if d:
            directive, reason = d.group(1), (d.group(2) or "").strip()
            if directive not in ("skip", "write"):
                raise ValueError(
                    f"{path}:{start + 1}: unknown doc-test directive {directive!r} (skip, write)"
                )
            if directive == "write" and not re.fullmatch(r"[\w.-]+", reason):
                raise ValueError(
                    f"{path}:{start + 1}: doc-test: write (FILE) needs a plain file name: {reason!r}"
                )
        if directive == "write":
            blocks.append(DocBlock(path, start + 1, lang, [], directive=directive, reason=reason, text=body))
            continue
        if lang not in SHELL_LANGS:
            continue
        block = DocBlock(path, start + 1, lang, [], directive=directive, reason=reason)
        _split_body(block, body, start + 2)
        blocks.append(block)
    return blocks


def hidden_prompts(path: Path) -> list[tuple[int, str]]:
    """``$ ``-prompted lines inside fenced blocks that are *not* run (no info string, ``text``, ...):
    command lines that would escape the doc test. (line, text) pairs."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[tuple[int, str]] = []
    fence: str | None = None
    lang = ""
    for n, line in enumerate(lines, 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence, lang = m.group(2), m.group(3).lower()
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is not None and lang not in SHELL_LANGS and _PROMPT.match(line):
            found.append((n, line))
    return found


def _split_body(block: DocBlock, body: list[str], first: int) -> None:
    console = block.lang == "console"
    pending: tuple[int, str] | None = None
    for n, raw in enumerate(body, first):
        if pending is not None:
            cont = raw.rstrip()
            if cont.endswith("\\"):
                pending = (pending[0], pending[1] + " " + cont[:-1].strip())
                continue
            block.commands.append((pending[0], pending[1] + " " + cont.strip()))
            pending = None
            continue
        if console:
            if not _PROMPT.match(raw):
                if block.commands and raw.strip():
                    block.expected.setdefault(block.commands[-1][0], []).append(raw.strip())
                continue
            raw = _PROMPT.sub("", raw, count=1)
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending = (n, text[:-1].strip())
            continue
        block.commands.append((n, text))
    if pending is not None:
        block.commands.append(pending)


def write_block(block: DocBlock, work: Path, env: dict[str, str]) -> Path:
    """Write a ``write`` block's text to ``work/FILE``, each ``$REG`` replaced by the registry address."""
    out = work / block.reason
    out.write_text(
        "\n".join(line.replace("$REG", env["REG"]) for line in block.text) + "\n", encoding="utf-8"
    )
    return out


def localise(command: str) -> str:
    """``command`` with /tmp/ and /mnt/ paths moved into the scenario's private directories."""
    for pattern, repl in _PATH_MAP:
        command = pattern.sub(repl, command)
    return command


# --- the world the commands run in -----------------------------------------------------------------

BUSYBOX_CONFIG = {
    "Cmd": ["sh", "-c", "echo hello from busybox"],
    "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
}


class DocWorld:
    """A registry with the documented images, a work directory with the documented files, and an env.

    Registry (``$REG``): ``hello:obd`` (the overlaybd-converted hello-world of fixtures/aci-hello-world),
    ``hello:latest`` (its plain amd64 image), ``hello:multi`` (plain hello-world for 9 platforms, a
    Docker manifest list), ``busybox:obd`` (a busybox root as one overlaybd layer,
    bootable with ``obd run``; default command prints ``hello from busybox``) and ``busybox:latest``
    (the same root as a plain OCI image, one gzip layer). Work directory (the cwd, ``$WORK``):
    ``base.commit`` and ``app.commit`` (two sealed overlaybd layers of fixtures/overlaybd, lowest
    first), ``app.tar`` (``busybox:latest`` as a ``docker save`` archive) and ``app-layout/`` (the same
    plain image as an OCI layout, tag ``latest``).
    """

    def __init__(self, base: Path):
        self.base = base
        self.marker = uuid.uuid4().hex
        self.registry: RegistryServer | None = None
        self.docker_archive = base / "app.tar"

    def start(self) -> DocWorld:
        for tool in ("docker-registry", "mke2fs", "busybox"):
            require_tool(tool)
        self.registry = RegistryServer(self.base / "registry", "noauth")
        self.registry.start()
        reg = self.registry.host
        hello = FIXTURES / "aci-hello-world"
        self._obd("push", f"oci:{hello}:amd64-converted", f"{reg}/hello:obd", "--insecure-registry", reg)
        self._obd("push", f"oci:{hello}:amd64", f"{reg}/hello:latest", "--insecure-registry", reg)
        self._obd("push", f"oci:{hello}:docker-list", f"{reg}/hello:multi", "--insecure-registry", reg)
        self._busybox(reg)
        return self

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.stop()

    @property
    def reg(self) -> str:
        assert self.registry is not None
        return self.registry.host

    def _obd(self, *argv: str) -> None:
        res = subprocess.run(
            [str(Path(sys.executable).parent / "obd"), *argv],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"doc world set-up: obd {' '.join(argv)} failed: {res.stderr.strip()}")

    def _busybox(self, reg: str) -> None:
        root = busybox_rootfs(self.base / "busybox-root")
        layer = build_layer(root, self.base / "busybox.commit", size=64 << 20)
        push_image([layer], f"{reg}/busybox:obd", config=BUSYBOX_CONFIG, insecure=(reg,))
        layout = self.base / "busybox-layout"
        _plain_image(root, layout, self.docker_archive, "latest")
        self._obd("push", f"oci:{layout}:latest", f"{reg}/busybox:latest", "--insecure-registry", reg)

    @contextlib.contextmanager
    def scenario(self, name: str) -> Iterator[tuple[Path, dict[str, str]]]:
        """A fresh work directory and environment for one doc file; everything started in it is stopped
        afterwards (FUSE mounts under it unmounted, processes carrying this scenario's marker killed)."""
        work = self.base / f"work-{name}"
        work.mkdir()
        (work / "mnt").mkdir()
        for rel, dst in (
            ("overlaybd/lsmt/commit/L0.commit", "base.commit"),
            ("overlaybd/lsmt/commit/L1.commit", "app.commit"),
        ):
            shutil.copyfile(materialize(rel), work / dst)
        shutil.copyfile(self.docker_archive, work / "app.tar")
        shutil.copytree(self.base / "busybox-layout", work / "app-layout")
        for link in (".venv", "bench", "fixtures"):
            (work / link).symlink_to(REPO / link)
        xdg = self.base / f"xdg-{name}"
        (xdg / "obd").mkdir(parents=True)
        (xdg / "obd" / "vm").symlink_to(vm_cache_dir())
        tmpdir = Path(f"/tmp/obdd{self.marker[:6]}{name[:8]}")
        tmpdir.mkdir()
        home = self.base / f"home-{name}"
        home.mkdir()
        env = dict(os.environ)
        env.update(
            REG=self.reg,
            WORK=str(work),
            TMP=str(tmpdir),
            TMPDIR=str(tmpdir),
            HOME=str(home),
            XDG_CACHE_HOME=str(xdg),
            OBD_CACHE_DIR=str(self.base / f"cache-{name}"),
            OBD_STATE_DIR=str(self.base / f"state-{name}"),
            OBD_DOCTEST_RUN=f"{self.marker}-{name}",
            PATH=os.pathsep.join(
                [str(Path(sys.executable).parent), env.get("PATH", ""), "/usr/sbin", "/sbin"]
            ),
            REPO=str(REPO),
        )
        try:
            yield work, env
        finally:
            _unmount_under(work)
            _kill_marked(f"{self.marker}-{name}")
            shutil.rmtree(tmpdir, ignore_errors=True)


def _plain_image(root: Path, layout: Path, archive: Path, tag: str) -> None:
    """``root`` as a plain one-layer OCI image in ``layout`` (tag ``tag``) and as ``docker save`` output."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            if not path.relative_to(root).as_posix().startswith("home/alice"):
                info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if info.isfile():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    layer_tar = raw.getvalue()
    layer_gz = gzip.compress(layer_tar, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": BUSYBOX_CONFIG,
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": _digest(layer_gz),
                "size": len(layer_gz),
            }
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for data in (layer_gz, config_bytes, manifest_bytes):
        (blobs / _digest(data).split(":")[1]).write_bytes(data)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                "digest": _digest(manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    config_name = _digest(config_bytes).split(":")[1] + ".json"
    layer_name = _digest(layer_tar).split(":")[1] + "/layer.tar"
    docker_manifest = [{"Config": config_name, "RepoTags": [f"app:{tag}"], "Layers": [layer_name]}]
    entries: dict[str, bytes] = {
        "manifest.json": json.dumps(docker_manifest).encode(),
        config_name: config_bytes,
        layer_name: layer_tar,
    }
    with tarfile.open(archive, "w") as out:
        for name, blob in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            out.addfile(info, io.BytesIO(blob))


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _unmount_under(work: Path) -> None:
    """Detach loop devices backed by files under ``work``, then lazily unmount what is mounted there."""
    loops = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    for line in loops.stdout.splitlines():
        dev, _, back = line.strip().partition(" ")
        if back.strip().startswith(str(work) + "/"):
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False, timeout=30)
    with open("/proc/self/mounts", encoding="utf-8") as f:
        points = [line.split()[1] for line in f]
    for point in reversed(points):
        point = point.replace("\\040", " ")
        if point.startswith(str(work) + "/"):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=30)


def _kill_marked(marker: str) -> None:
    """SIGTERM, then SIGKILL, every process whose environment carries ``OBD_DOCTEST_RUN=marker``."""
    needle = f"OBD_DOCTEST_RUN={marker}".encode()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(entry), sig)
                    found = True
        if not found:
            return
        time.sleep(1.0)


@dataclass
class BlockResult:
    block: DocBlock
    returncode: int
    failed_line: int | None
    output: str
    seconds: float


def run_block(block: DocBlock, work: Path, env: dict[str, str], timeout: float = 600) -> BlockResult:
    """Run ``block``'s commands with ``bash -e -o pipefail`` in ``work``; which line failed, if any.

    Each command is preceded by a marker line on stderr, so a failure names its doc line; console
    blocks' outputs are captured per command for :func:`check_expected`.
    """
    script = ["set -e -o pipefail"]
    for n, cmd in block.commands:
        script.append(f"echo '@@doc-line {n}' >&2")
        script.append(f"echo '@@doc-line {n}'")
        script.append(localise(cmd))
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    seconds = time.monotonic() - started
    lines = re.findall(r"^@@doc-line (\d+)$", proc.stderr, re.M)
    failed = int(lines[-1]) if proc.returncode != 0 and lines else None
    return BlockResult(
        block, proc.returncode, failed, proc.stdout + "\n--- stderr ---\n" + proc.stderr, seconds
    )


def outputs_by_line(stdout: str) -> dict[int, str]:
    """Split a block's stdout into each command's output (keyed by doc line)."""
    out: dict[int, str] = {}
    current = None
    for line in stdout.splitlines():
        m = re.match(r"^@@doc-line (\d+)$", line)
        if m:
            current = int(m.group(1))
            out[current] = ""
        elif current is not None:
            out[current] += line + "\n"
    return out


#: Output that differs from run to run, each replaced by one token before lines are compared.
_VOLATILE = (
    (re.compile(r"\b(sha256|sha512):[0-9a-f]{8,128}"), r"\1:<hex>"),
    (re.compile(r"\b\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d(\.\d+)?)?Z?"), "<time>"),
    (re.compile(r"(?<![\w.])/[\w.+-]+(/[\w.+-]*)+"), "<path>"),
    (re.compile(r"\b\d+(\.\d+)? ?([mµ]?s|[KMG]i?B/s)\b"), "<rate-or-time>"),
)


def _normalise(line: str) -> str:
    for pattern, repl in _VOLATILE:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def check_expected(expected: list[str], actual: str, env: dict[str, str]) -> str | None:
    """Loose comparison: every expected line, ``$VAR``s expanded and ``...`` a wildcard, must match a line
    of ``actual`` in order (whitespace runs compare equal; digests, dates, absolute paths, durations and
    rates compare equal to any other); a line starting with ``…`` stands for lines the doc leaves out.
    None when it matches, else the first expected line that is missing."""
    got = [_normalise(line) for line in actual.splitlines()]
    pos = 0
    for want in expected:
        if want.startswith("…"):  # "…  (the sections shown above)": lines left out of the doc
            continue
        text = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), want)
        parts = [re.escape(_normalise(p)) for p in text.split("...")]
        pattern = re.compile(".*".join(parts))
        while pos < len(got) and not pattern.search(got[pos]):
            pos += 1
        if pos == len(got):
            return want
        pos += 1
    return None
