"""Models from the Hugging Face Hub by name, without the internet: a stand-in Hub on 127.0.0.1 (HF_ENDPOINT points
at it) answers as the Hub does for a few repositories (`/api/models/{repo}` with `siblings`, HEAD/GET
`/{repo}/resolve/{rev}/{file}` with ETag, X-Repo-Commit and the length, the Hub's X-Error-Code on errors) and
counts the requests; `huggingface_hub` itself does the downloading and the caching. Each test has its own
HF_HOME and edgellm cache."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edgellm.runtime.errors import HubError
from edgellm.runtime.hub import HubRef, parse_ref, select_gguf, split_info

from tiny_models import write_tiny_llama
from test_bad_input import assert_clean_error

TOKEN = "hf_test_token"


class StandInHub:
    """The Hub's download protocol for in-memory repositories: {repo: {"sha", "files": {name: bytes}, "gated"}}."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo: str, files: dict[str, bytes], gated: bool = False):
        sha = hashlib.sha1(json.dumps(sorted(files)).encode() + repo.encode()).hexdigest()
        self.repos[repo] = {"sha": sha, "files": files, "gated": gated}

    def downloads(self) -> list[str]:
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    @staticmethod
    def _send(h, status: int, headers: dict, data: bytes, body: bool):
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _error(self, h, status, code, body):
        self._send(h, status, {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"},
                   json.dumps({"error": code}).encode(), body)

    def answer(self, h, body: bool):
        path = h.path.split("?")[0]
        self.requests.append((h.command, path))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo = self.repos.get(m.group(1))
            if repo is None:  # the Hub answers 401 to anonymous requests for unknown (or private) repositories
                return self._error(h, 401, "RepoNotFound", body)
            info = {"id": m.group(1), "sha": repo["sha"], "private": False, "gated": "manual" if repo["gated"] else False,
                    "siblings": [{"rfilename": f} for f in sorted(repo["files"])]}
            return self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None:
            return self._error(h, 404, "NotFound", body)
        repo = self.repos.get(m.group(1))
        if repo is None:
            return self._error(h, 401, "RepoNotFound", body)
        if m.group(2) not in ("main", repo["sha"]):
            return self._error(h, 404, "RevisionNotFound", body)
        if repo["gated"] and h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(h, 401, "GatedRepo", body)
        data = repo["files"].get(m.group(3))
        if data is None:
            return self._error(h, 404, "EntryNotFound", body)
        self._send(h, 200, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": repo["sha"],
                            "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}, data, body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def split_gguf(src: Path, out_dir: Path, max_tensors: int) -> list[Path]:
    """Shards of a GGUF as llama.cpp's gguf-split writes them (gguf-py's split writer)."""
    import gguf
    r = gguf.GGUFReader(src)
    arch = r.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    w = gguf.GGUFWriter(out_dir / src.name, arch, split_max_tensors=max_tensors)
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != gguf.Keys.General.ARCHITECTURE:
            w.add_key_value(f.name, f.contents(), f.types[0],
                            sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(out_dir.glob(src.stem + "-*-of-*.gguf"))


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    import gguf
    d = tmp_path_factory.mktemp("ggufs")
    q8 = write_tiny_llama(d / "tiny-llama-Q8_0.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    q4 = write_tiny_llama(d / "tiny-llama-q4_0.gguf", qtype=gguf.GGMLQuantizationType.Q4_0)
    full = write_tiny_llama(d / "tiny-llama-F32.gguf")
    (d / "split").mkdir()
    shards = split_gguf(full, d / "split", max_tensors=8)
    assert len(shards) == 3
    return {"q8": q8, "q4": q4, "f32": full, "shards": shards}


@pytest.fixture(scope="module")
def hub(ggufs):
    h = StandInHub()
    rb = lambda p: Path(p).read_bytes()  # noqa: E731
    h.add("test/tiny-GGUF", {"README.md": b"# tiny\n", "tiny-llama-Q8_0.gguf": rb(ggufs["q8"]),
                             "tiny-llama-q4_0.gguf": rb(ggufs["q4"]), "mmproj-tiny-llama-Q8_0.gguf": b"not a model"})
    h.add("test/split-GGUF", {s.name: rb(s) for s in ggufs["shards"]})
    h.add("test/gated-GGUF", {"tiny-llama-Q8_0.gguf": rb(ggufs["q8"])}, gated=True)
    h.add("test/empty", {"README.md": b"nothing here"})
    yield h
    h.close()


@pytest.fixture
def env(hub, tmp_path):
    """The environment of an `edgellm` process using the stand-in Hub, with fresh caches."""
    hub.requests.clear()
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGINGFACE_HUB_CACHE"}
    e.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), EDGELLM_CACHE=str(tmp_path / "edgellm"),
             HF_HUB_DISABLE_TELEMETRY="1", EDGELLM_DEBUG="")
    return e


def run(env, *args, **extra):
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True,
                          env=dict(env, **extra), timeout=300)


def dead_endpoint() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# -- names and the choice of file (as llama.cpp's -hf) ------------------------------------------------------------

def test_parse_ref():
    assert parse_ref("user/repo") == HubRef("user/repo", None)
    assert parse_ref("bartowski/Llama-3.2-1B-Instruct-GGUF:q4_k_m") == HubRef("bartowski/Llama-3.2-1B-Instruct-GGUF",
                                                                              "q4_k_m")
    assert parse_ref("hf.co/user/repo:Q8_0") == HubRef("user/repo", "Q8_0")
    for not_a_repo in ("model.gguf", "dir/model.gguf", "/abs/path", "./user/repo", "a/b/c", "user/repo:Q4 K", "x"):
        assert parse_ref(not_a_repo) is None, not_a_repo


FILES = ["README.md", "Model-IQ4_XS.gguf", "Model-Q4_K_M.gguf", "Model-Q8_0.gguf", "mmproj-Model-f16.gguf",
         "Model-F16-00002-of-00002.gguf", "Model-F16-00001-of-00002.gguf", "Model.imatrix.gguf"]


def test_select_gguf_as_llama_cpp():
    assert select_gguf(FILES, None) == ["Model-Q4_K_M.gguf"]                     # default: Q4_K_M
    assert select_gguf([f for f in FILES if "Q4_K_M" not in f], None) == ["Model-Q8_0.gguf"]   # then Q8_0
    assert select_gguf(["b-Q5_K_S.gguf", "mmproj-a.gguf", "a-Q6_K.gguf"], None) == ["a-Q6_K.gguf"]  # then the first
    assert select_gguf(FILES, "q8_0") == ["Model-Q8_0.gguf"]                       # case-insensitive
    assert select_gguf(FILES, "f16") == ["Model-F16-00001-of-00002.gguf", "Model-F16-00002-of-00002.gguf"]
    assert select_gguf(["Q4_K_M/Big-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/Big-Q4_K_M-00002-of-00002.gguf"],
                       "Q4_K_M") == ["Q4_K_M/Big-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/Big-Q4_K_M-00002-of-00002.gguf"]
    with pytest.raises(HubError, match=r"no GGUF file for quant Q5_K_M \(quants there: F16, IQ4_XS, Q4_K_M, Q8_0\)"):
        select_gguf(FILES, "Q5_K_M", "u/r")
    with pytest.raises(HubError, match="no GGUF file for quant Q4_0"):   # Q4_0 is not IQ4_0
        select_gguf(["m-IQ4_0.gguf"], "Q4_0")
    with pytest.raises(HubError, match="shard"):
        select_gguf(["m-F16-00001-of-00003.gguf", "m-F16-00003-of-00003.gguf"], "F16")
    assert split_info("a/Model-Q4_K_M-00002-of-00003.gguf") == split_info("a/Model-Q4_K_M-00002-of-00003.gguf")
    s = split_info("a/Model-q4_k_m-00002-of-00003.gguf")
    assert (s.prefix, s.tag, s.index, s.count) == ("a/Model-q4_k_m", "Q4_K_M", 2, 3)


# -- fetching through the stand-in Hub ------------------------------------------------------------------------

def test_pull_quant_then_cache_then_offline(env, hub, ggufs, tmp_path):
    r = run(env, "pull", "test/tiny-GGUF:q8_0")
    assert r.returncode == 0, r.stderr
    p = Path(r.stdout.strip())
    assert p.name == "tiny-llama-Q8_0.gguf" and p.read_bytes() == ggufs["q8"].read_bytes()
    assert str(p).startswith(str(tmp_path / "hf" / "hub" / "models--test--tiny-GGUF"))   # the Hub's own cache
    assert hub.downloads() == ["/test/tiny-GGUF/resolve/main/tiny-llama-Q8_0.gguf"]
    # again: one look at the repository, nothing downloaded (not even a HEAD)
    hub.requests.clear()
    r = run(env, "pull", "test/tiny-GGUF:Q8_0")
    assert r.returncode == 0 and Path(r.stdout.strip()) == p, r.stderr
    assert hub.requests == [("GET", "/api/models/test/tiny-GGUF")]
    # offline: from the cache, no request at all; an uncached quant is a clear error
    hub.requests.clear()
    r = run(env, "inspect", "test/tiny-GGUF:Q8_0", "--json", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["path"] == str(p) and info["architecture"] == "llama" and hub.requests == []
    r = run(env, "pull", "test/tiny-GGUF:Q4_0", HF_HUB_OFFLINE="1")
    assert_clean_error(r)
    assert "Q4_0" in r.stderr and "quants there: Q8_0" in r.stderr   # what the cache has
    # the server gone: the cache still serves
    r = run(env, "pull", "test/tiny-GGUF:Q8_0", HF_ENDPOINT=dead_endpoint())
    assert r.returncode == 0 and Path(r.stdout.strip()) == p, r.stderr


def test_default_quant_run_and_list(env, hub, ggufs):
    # no quant: Q4_K_M is not there, so Q8_0 (never the mmproj file); and a run by name
    r = run(env, "run", "test/tiny-GGUF", "-p", "hello", "-n", "3", "--temp", "0", "--threads", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert hub.downloads() == ["/test/tiny-GGUF/resolve/main/tiny-llama-Q8_0.gguf"]
    # listed with the catalog: the Hub cache holds Q8_0 (with its size), not Q4_0
    r = run(env, "pull", "--list")
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m-instruct-q4_1" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if "test/tiny-GGUF" in ln)
    assert "Q8_0" in line and "kB" in line and "Q4_0" not in line


def test_clear_errors(env, hub):
    cases = [
        (("pull", "test/no-such-repo"), "no repository test/no-such-repo"),
        (("pull", "test/tiny-GGUF:Q5_K_M"), r"no GGUF file for quant Q5_K_M \(quants there: Q4_0, Q8_0\)"),
        (("pull", "test/empty"), "no GGUF file and no Hugging Face checkpoint"),
        (("pull", "test/gated-GGUF"), "gated.*HF_TOKEN"),
        (("pull", "not a/valid name"), "unknown model"),
    ]
    for args, pattern in cases:
        r = run(env, *args)
        assert_clean_error(r)
        assert re.search(pattern, r.stderr), (args, r.stderr)
    r = run(env, "pull", "test/tiny-GGUF", HF_ENDPOINT=dead_endpoint())
    assert_clean_error(r)
    assert "cannot reach the Hugging Face Hub" in r.stderr and "not in the cache" in r.stderr
    r = run(env, "pull", "test/tiny-GGUF", HF_HUB_OFFLINE="1")
    assert_clean_error(r)
    assert "HF_HUB_OFFLINE=1" in r.stderr
    r = run(env, "pull", "test/gated-GGUF:Q8_0", HF_TOKEN=TOKEN)   # the gated repository with a token
    assert r.returncode == 0 and Path(r.stdout.strip()).name == "tiny-llama-Q8_0.gguf", r.stderr


def test_split_model_is_joined_once(env, hub, ggufs):
    from edgellm.runtime.engine import Engine
    from edgellm.runtime.gguf_file import GGUFFile
    r = run(env, "pull", "test/split-GGUF:F32")
    assert r.returncode == 0, r.stderr
    joined = Path(r.stdout.strip())
    assert joined.name == "tiny-llama-F32.gguf" and len(hub.downloads()) == 3
    a, b = GGUFFile(ggufs["f32"]), GGUFFile(joined)
    assert list(a.tensors) == list(b.tensors)
    assert {k: v for k, v in b.metadata.items() if not k.startswith("split.")} == \
        {k: v for k, v in a.metadata.items() if not k.startswith("split.")}
    toks = [5, 17, 42, 7]
    la = Engine(ggufs["f32"], n_ctx=32, threads=1).prefill(toks)
    lb = Engine(joined, n_ctx=32, threads=1).prefill(toks)
    np.testing.assert_array_equal(la, lb)
    hub.requests.clear()
    r = run(env, "pull", "test/split-GGUF:f32")
    assert r.returncode == 0 and Path(r.stdout.strip()) == joined and hub.downloads() == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edgellm.bench.make_checkpoints import make
    d = make(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "tiny-llama", tokenizer_gguf=str(model_path))
    return {f.name: f.read_bytes() for f in Path(d).iterdir() if f.is_file()}


@pytest.mark.slow
def test_checkpoint_repo_converts_once(env, hub, checkpoint, tmp_path):
    hub.add("test/tiny-llama-hf", dict(checkpoint, **{"README.md": b"# tiny", "onnx/model.onnx": b"not fetched"}))
    r = run(env, "pull", "test/tiny-llama-hf:q8_0")
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip())
    assert "converting test/tiny-llama-hf" in r.stderr and out.name == "tiny-llama-hf-Q8_0.gguf"
    assert str(out).startswith(str(tmp_path / "edgellm" / "hub"))
    assert not any("onnx" in p or "README" in p for p in hub.downloads())
    mtime = out.stat().st_mtime_ns
    hub.requests.clear()
    r = run(env, "run", "test/tiny-llama-hf:Q8_0", "-p", "Hello", "-n", "2", "--temp", "0", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "converting" not in r.stderr and out.stat().st_mtime_ns == mtime and hub.downloads() == []
    r = run(env, "pull", "test/tiny-llama-hf:Q8_0", HF_HUB_OFFLINE="1")   # offline: the conversion, no request
    assert r.returncode == 0 and Path(r.stdout.strip()) == out and hub.requests[1:] == [], r.stderr
    r = run(env, "pull", "test/tiny-llama-hf:q5_k_m")
    assert_clean_error(r)
    assert "output type" in r.stderr
    # listed with the catalog: the Hub cache's repositories with sizes, and the conversion
    r = run(env, "pull", "--list", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert listed["catalog"][0]["name"] == "smollm2-135m-instruct-q4_1"
    repo = next(x for x in listed["hub"] if x["repo"] == "test/tiny-llama-hf")
    assert repo["checkpoint"] and repo["size_on_disk"] > 1e6 and repo["derived"][0]["file"] == str(out)


def test_load_by_name_from_python(env, hub):
    """edgellm.load takes the same name (huggingface_hub reads HF_ENDPOINT / HF_HOME when imported: a fresh process)."""
    code = ("import edgellm; e = edgellm.load('test/tiny-GGUF:Q4_0', n_ctx=32, threads=1); "
            "print(e.prefill([1, 2, 3]).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert hub.downloads() == ["/test/tiny-GGUF/resolve/main/tiny-llama-q4_0.gguf"]
