"""Credentials: never printed at any verbosity, never forwarded to another host on a redirect.

Two registries hold the aci-hello-world converted image: Debian's docker-registry with htpasswd
(Basic) auth, and one with token auth (the distribution JWT flow, tokens from
:class:`registry_server.TokenServer`). ``obd`` runs as a user runs it — a subprocess, with
``--creds``, with ``$OBD_REGISTRY_USER``/``_PASSWORD``, with a wrong password — at no ``-v``,
``-v``, ``-vv`` and ``-vv --debug``, and everything it prints (stdout and stderr) is scanned for
the password, the base64 ``user:password`` of the Basic header, and every bearer token the token
server issued. A secret found counts as *wrong bytes*.

For redirects, :class:`registry_server.FaultProxy` answers the authenticated blob GETs with a 307
to :class:`registry_server.BlobStore`, another host that (like S3 or GCS) refuses any request that
carries ``Authorization``; ``obd export`` must succeed and the store must see no Authorization
header. A forwarded header counts as *wrong bytes*.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from registry_server import BlobStore, FaultProxy, RegistryServer, TokenServer, is_blob_get

from faults.tally import Clock, Tally
from fixtures import FIXTURES, REPO
from obd.observability.stats import Stats
from obd.registry import AsyncRunner, Credentials, RegistryClient
from obd.registry.push import push_layout

ACI = FIXTURES / "aci-hello-world"
TAG = "amd64-converted"
LAYER = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
USER, PASSWORD = "reliable", "Pw-k3ep-0ut-of-logs-9f2"
WRONG = "Wr0ng-pw-n0t-t0-be-printed"


def obd(args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int | None, str]:
    """Run ``python -m obd ARGS``; its exit code (None on timeout) and everything it printed."""
    try:
        p = subprocess.run(
            [sys.executable, "-m", "obd", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env, PYTHONPATH=str(REPO)),
            cwd=REPO,
        )
    except subprocess.TimeoutExpired as e:
        return None, str(e.stdout or "") + str(e.stderr or "")
    return p.returncode, p.stdout + p.stderr


def secrets_in(text: str, secrets: list[str]) -> list[str]:
    return [s[:6] + "…" for s in secrets if s and s in text]


def push(host: str, user: str, password: str) -> None:
    runner = AsyncRunner("reliability-creds")
    try:
        c = RegistryClient(credentials=Credentials(user, password), insecure=True, stats=Stats())
        runner.run(push_layout(c, f"oci:{ACI}:{TAG}", f"{host}/aci/hello"), 120)
        runner.run(c.aclose(), 10)
    finally:
        runner.close()


def run(seconds: float, *, quick: bool) -> list[Tally]:
    clock = Clock(seconds)
    printed = Tally("credentials: printed at -v/-vv")
    forwarded = Tally("credentials: cross-host redirect")
    verbosities: list[list[str]] = [[], ["-v"], ["-vv"], ["-vv", "--debug"]]
    scanned: dict[str, int] = {}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OBD_REGISTRY_")}
    with tempfile.TemporaryDirectory(prefix="obd-creds-") as tmp:
        work = Path(tmp)
        base_env["HOME"] = str(work / "home")  # no ~/.docker/config.json of the machine's user
        ts = TokenServer(work, {USER: PASSWORD}, {USER: [("*", {"pull", "push"})]}).start()
        basic = RegistryServer(work / "basic", "htpasswd", users={USER: PASSWORD}).start()
        token = RegistryServer(work / "token", "token", token_server=ts).start()
        store = BlobStore().start()
        store.blobs[LAYER] = (ACI / "blobs" / "sha256" / LAYER[7:]).read_bytes()
        proxy = FaultProxy(basic.url, store).start()
        try:
            for reg in (basic, token):
                push(reg.host, USER, PASSWORD)
            b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            b64_wrong = base64.b64encode(f"{USER}:{WRONG}".encode()).decode()
            cases = []
            for reg in (basic, token):
                ref = f"{reg.host}/aci/hello:{TAG}"
                common = ["--insecure-registry", reg.host, "--no-cache"]
                env_creds = {"OBD_REGISTRY_USER": USER, "OBD_REGISTRY_PASSWORD": PASSWORD}
                out_img = str(work / "out.img")
                cases += [
                    (
                        f"{reg.mode} --creds inspect",
                        ["inspect", ref, "--creds", f"{USER}:{PASSWORD}", *common],
                        {},
                        0,
                    ),
                    (
                        f"{reg.mode} env creds export",
                        ["export", ref, "-o", out_img, "-q", *common],
                        env_creds,
                        0,
                    ),
                    (
                        f"{reg.mode} wrong password",
                        ["inspect", ref, "--creds", f"{USER}:{WRONG}", *common],
                        {},
                        1,
                    ),
                ]
            for i, (name, args, extra, want_rc) in enumerate(cases):
                # quick: each case at one verbosity, taking turns, so that every level is seen
                for v in [verbosities[i % len(verbosities)]] if quick else verbosities:
                    if clock.left() <= 0:
                        break
                    rc, out = obd([*v, *args], dict(base_env, **extra))
                    level = " ".join(v) or "default"
                    scanned[level] = scanned.get(level, 0) + len(out)
                    leaked = secrets_in(out, [PASSWORD, b64, WRONG, b64_wrong, *(i.token for i in ts.issued)])
                    label = f"{name} {' '.join(v) or '(default)'}"
                    if rc is None:
                        printed.add("hang", label)
                    elif leaked:
                        printed.add("wrong bytes", f"{label}: printed {leaked}")
                    elif rc != want_rc or (rc and "Traceback" in out and "--debug" not in v):
                        printed.add("crash", f"{label}: exit {rc}: {out.strip()[-300:]}")
                    elif rc:
                        printed.add("clear error")
                    else:
                        printed.add("correct")
            printed.notes.append(
                "characters of output scanned: " + ", ".join(f"{k} {n}" for k, n in scanned.items())
            )
            if printed.trials < len(cases) * (1 if quick else len(verbosities)):
                printed.notes.append(f"stopped by the time budget after {printed.trials} runs")
            if not ts.issued:
                printed.notes.append("the token server issued no token: the token cases did not authenticate")
            # cross-host redirect: the layer GETs (with Authorization) are sent to the blob store
            proxy.add("redirect", times=None, match=lambda r: is_blob_get(r) and "Authorization" in r.headers
                      and r.path.endswith(LAYER))  # fmt: skip
            for v in verbosities[3:] if quick else verbosities:
                before_req, before_auth = store.requests, store.with_auth
                args = ["export", f"{proxy.host}/aci/hello:{TAG}", "-o", str(work / "r.img"), "-q"]
                args += ["--insecure-registry", proxy.host, "--no-cache", "--creds", f"{USER}:{PASSWORD}"]
                rc, out = obd([*v, *args], base_env)
                label = f"redirect export {' '.join(v) or '(default)'}"
                if rc is None:
                    forwarded.add("hang", label)
                elif store.with_auth > before_auth:
                    forwarded.add("wrong bytes", f"{label}: Authorization reached the other host")
                elif rc != 0 or store.requests == before_req:
                    got = store.requests - before_req
                    forwarded.add("crash", f"{label}: exit {rc}, {got} store requests: {out.strip()[-300:]}")
                else:
                    forwarded.add("correct")
        finally:
            proxy.stop()
            store.stop()
            token.stop()
            basic.stop()
            ts.stop()
    return [printed, forwarded]
