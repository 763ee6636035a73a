"""Models from the Hugging Face Hub by name: `user/repo[:QUANT]`, through `huggingface_hub`.

A repository of GGUF files: the file whose quant tag matches QUANT (case-insensitive), chosen as llama.cpp's
`-hf user/repo[:quant]` chooses it (common/download.cpp `find_best_model`): without a QUANT, Q4_K_M, then Q8_0,
then the first GGUF; projector, imatrix and draft files are never the model; a model split into
`-00001-of-0000N.gguf` shards is downloaded whole and joined into one file. A repository holding a Hugging Face
checkpoint (config.json + safetensors) is converted to GGUF with edgellm's converter, QUANT choosing the output
type (default f16), once per upstream commit.

Downloads go to the Hub's own cache (`HF_HOME`, `HF_HUB_CACHE`), so files fetched by other tools (transformers,
huggingface-cli, llama.cpp) are not fetched again; huggingface_hub shows the progress bars, reads `HF_TOKEN`
for gated and private repositories and `HF_ENDPOINT` for the server, and `HF_HUB_OFFLINE=1` (or an
unreachable server) makes everything come from the cache. What edgellm derives (joined shards, conversions)
lives beside its catalog models: `<edgellm cache>/hub/models--user--repo/<commit>/`.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from .dirs import atomic_output, cache_dir
from .errors import EdgeLLMError, HubError
from .progress import progress_bar

DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")   # llama.cpp's choice when no quant is given (then the first GGUF)
NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")   # GGUFs that are never the model
GGUF = ".gguf"
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_QUANT = re.compile(r"[A-Za-z0-9_]+")
_SPLIT = re.compile(r"^(.+)-(\d{5})-of-(\d{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Za-z0-9_]+)$")
_PREFIXES = ("hf://", "hf.co/", "huggingface.co/", "https://huggingface.co/")
# the files of a Hugging Face checkpoint that the converter reads (at the repository's top level)
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja")
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
CONVERT_DEFAULT = "f16"


@dataclass(frozen=True)
class HubRef:
    """`user/repo[:QUANT]`."""
    repo_id: str
    quant: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f":{self.quant}" if self.quant else "")


def parse_ref(text: str) -> HubRef | None:
    """`user/repo[:QUANT]` (also written `hf.co/user/repo:QUANT`, as ollama does) -> HubRef; None when the
    text is not a repository name (e.g. a path with more folders, or a .gguf file name)."""
    s = str(text).strip()
    for p in _PREFIXES:
        if s.lower().startswith(p):
            s = s[len(p):]
            break
    repo, colon, quant = s.partition(":")
    if not _REPO.fullmatch(repo) or repo.lower().endswith(GGUF) or ".." in repo or "--" in repo:
        return None
    if colon and not _QUANT.fullmatch(quant):
        return None
    return HubRef(repo, quant or None)


# -- choosing the GGUF file -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitInfo:
    prefix: str   # the name without the shard suffix and .gguf
    tag: str      # quant tag of the name, upper case ("" if none)
    index: int    # 1-based shard number
    count: int    # shards in all (1: not split)


def split_info(path: str) -> SplitInfo:
    """`Model-Q4_K_M-00001-of-00003.gguf` -> SplitInfo("Model-Q4_K_M", "Q4_K_M", 1, 3)."""
    prefix = path[:-len(GGUF)] if path.lower().endswith(GGUF) else path
    index = count = 1
    m = _SPLIT.match(prefix)
    if m:
        prefix, index, count = m.group(1), int(m.group(2)), int(m.group(3))
    t = _TAG.search(prefix)
    return SplitInfo(prefix, t.group(1).upper() if t else "", index, count)


def is_model_gguf(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.lower().endswith(GGUF) and not any(k in name for k in NOT_MODELS)


def quant_tags(files: list[str]) -> list[str]:
    """The quant tags of the model GGUFs in a file list (in order, each once); a file without a tag by name."""
    out = []
    for f in files:
        if is_model_gguf(f) and split_info(f).index == 1:
            t = split_info(f).tag or f
            if t not in out:
                out.append(t)
    return out


def select_gguf(files: list[str], quant: str | None, repo: str = "") -> list[str]:
    """The files of the model to fetch for `quant` (one name, or every shard in order), as llama.cpp's `-hf`
    chooses: the first model GGUF whose path has the tag followed by '.' or '-' (case-insensitive; here also
    preceded by a separator, so that Q4_0 does not match IQ4_0); without a quant, Q4_K_M, then Q8_0, then
    the first model GGUF."""
    models = sorted((f for f in files if is_model_gguf(f)), key=str.lower)
    first = [f for f in models if split_info(f).index == 1]
    pick = None
    for tag in ([quant] if quant else DEFAULT_QUANTS):
        pat = re.compile(rf"(?<![A-Za-z0-9]){re.escape(tag)}[.-]", re.IGNORECASE)
        pick = next((f for f in first if pat.search(f)), None)
        if pick:
            break
    if pick is None and not quant and first:
        pick = first[0]
    if pick is None:
        what = f"no GGUF file for quant {quant}" if quant else "no GGUF model file"
        raise HubError(f"{repo or 'the repository'} has {what} (quants there: {', '.join(quant_tags(models)) or 'none'})")
    info = split_info(pick)
    if info.count == 1:
        return [pick]
    shards = {split_info(f).index: f for f in models
              if split_info(f).prefix == info.prefix and split_info(f).count == info.count}
    missing = [i for i in range(1, info.count + 1) if i not in shards]
    if missing:
        raise HubError(f"{repo}: {pick} is split into {info.count} shards but shard(s) "
                       f"{', '.join(map(str, missing))} are not in the repository")
    return [shards[i] for i in range(1, info.count + 1)]


def is_checkpoint(files: list[str]) -> bool:
    """A Hugging Face checkpoint the converter reads: config.json and safetensors weights at the top level."""
    return "config.json" in files and (SAFETENSORS in files or SAFETENSORS_INDEX in files)


# -- the Hub and its cache ----------------------------------------------------------------------------------

def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise EdgeLLMError("models from the Hugging Face Hub need huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def _network_errors() -> tuple:
    """Exceptions meaning 'the server could not be reached' (requests in huggingface_hub 0.x, httpx in 1.x,
    httpx2 in 2.x)."""
    from huggingface_hub.errors import OfflineModeIsEnabled
    errs: list = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import requests
        errs += [requests.ConnectionError, requests.Timeout]
    with contextlib.suppress(ImportError):
        import httpx
        errs.append(httpx.TransportError)
    with contextlib.suppress(ImportError):
        import httpx2   # huggingface_hub 2
        errs.append(httpx2.TransportError)
    return tuple(errs)


def endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def hub_cache() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _unreachable(repo: str, err: BaseException | None) -> HubError:
    from huggingface_hub.errors import OfflineModeIsEnabled
    if offline() or isinstance(err, OfflineModeIsEnabled):
        return HubError(f"{repo} is not in the Hugging Face cache ({hub_cache()}) and HF_HUB_OFFLINE=1 forbids "
                        f"downloading it")
    why = ""
    if err is not None:   # the innermost reason ("[Errno 111] Connection refused") rather than urllib3's story
        m = re.search(r"\[Errno -?\d+\][^'\")]*", str(err))
        why = f" ({m.group(0).strip() if m else type(err).__name__})"
    return HubError(f"cannot reach the Hugging Face Hub at {endpoint()}{why}; {repo} is not in the cache "
                    f"({hub_cache()}) (check the network, or HF_ENDPOINT)")


def _token() -> bool:
    from huggingface_hub import get_token
    return get_token() is not None


@contextlib.contextmanager
def _hub_errors(repo: str, what: str = ""):
    """The Hub's exceptions as one clear HubError line."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        yield
    except GatedRepoError:
        token = "the token given (HF_TOKEN) has no access to it" if _token() else "set HF_TOKEN"
        raise HubError(f"{repo} is a gated repository: accept its terms on the Hub and {token}") from None
    except RepositoryNotFoundError:
        private = "" if _token() else " (a private one needs HF_TOKEN)"
        raise HubError(f"no repository {repo} on the Hugging Face Hub at {endpoint()}{private}") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo} has no such revision") from None
    except LocalEntryNotFoundError as e:   # not cached, and offline or the server unreachable
        raise _unreachable(f"{repo} {what}".strip(), e.__cause__ or e) from None
    except EntryNotFoundError:
        raise HubError(f"{repo} has no file {what}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise HubError(f"the Hugging Face Hub answered HTTP {status} for {repo} {what}".rstrip()) from None
    except _network_errors() as e:
        raise _unreachable(f"{repo} {what}".strip(), e) from None


@dataclass
class Listing:
    """What a repository holds: from the Hub (online), else from the cache's snapshot of its main branch."""
    repo: str
    commit: str
    files: list
    online: bool


def cached_listing(repo: str) -> Listing | None:
    """The files of `repo` in the Hub cache (the snapshot its main branch points at), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        folder = Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return Listing(repo, folder.name, files, online=False)


def listing(repo: str) -> Listing:
    """The repository's files: asked of the Hub, or (offline, server unreachable or failing) from the cache."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    err = None
    try:
        info = HfApi().model_info(repo)
        return Listing(repo, info.sha, sorted(s.rfilename for s in info.siblings or []), online=True)
    except _network_errors() as e:
        err = e
    except HfHubHTTPError as e:
        if e.response is None or e.response.status_code < 500:
            with _hub_errors(repo):
                raise
        err = e   # the Hub failing: the cache may still serve
    cached = cached_listing(repo)
    if cached is None:
        raise _unreachable(repo, err)
    return cached


def download(lst: Listing, filename: str) -> Path:
    """A file of the repository in the Hub cache: no request at all when the listed commit's copy is there."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    hit = try_to_load_from_cache(lst.repo, filename, revision=lst.commit)
    if isinstance(hit, str):
        return Path(hit)
    if not lst.online:
        raise _unreachable(f"{lst.repo} {filename}", None)
    with _hub_errors(lst.repo, filename):
        return Path(hf_hub_download(lst.repo, filename))   # the main branch, so the cache's ref is kept


# -- edgellm's derived files --------------------------------------------------------------------------------

def derived_dir(repo: str, commit: str) -> Path:
    return cache_dir() / "hub" / ("models--" + repo.replace("/", "--")) / commit


def join_shards(shards: list[Path], out: Path) -> Path:
    """One GGUF from the shards of a split model (llama.cpp's `gguf-split` layout: the first shard holds the
    metadata, every shard its `split.*` keys and some tensors), written atomically with gguf-py."""
    import gguf
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys
    split_keys = {Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT}
    readers = []
    for i, p in enumerate(shards):
        try:
            r = GGUFReader(p)
        except (ValueError, OSError) as e:
            raise HubError(f"shard {p.name} is not a valid GGUF file: {e}") from None
        no, count = r.get_field(Keys.Split.LLM_KV_SPLIT_NO), r.get_field(Keys.Split.LLM_KV_SPLIT_COUNT)
        if no is None or count is None or int(no.contents()) != i or int(count.contents()) != len(shards):
            raise HubError(f"{p.name} is not shard {i + 1} of {len(shards)} (its split.* keys disagree)")
        readers.append(r)
    want = readers[0].get_field(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    have = sum(len(r.tensors) for r in readers)
    if want is not None and int(want.contents()) != have:
        raise HubError(f"the shards of {out.name} hold {have} tensors, the first shard says {int(want.contents())}")
    arch = readers[0].get_field(Keys.General.ARCHITECTURE)
    if arch is None:
        raise HubError(f"{shards[0].name} has no {Keys.General.ARCHITECTURE}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        w = GGUFWriter(tmp, arch.contents())
        for f in readers[0].fields.values():
            if f.name.startswith("GGUF.") or f.name in split_keys or f.name == Keys.General.ARCHITECTURE:
                continue
            if f.name == Keys.General.ALIGNMENT:
                w.add_custom_alignment(int(f.contents()))
                continue
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
        for r in readers:
            for t in r.tensors:
                w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


class CheckpointConverter(Protocol):
    """How a Hugging Face checkpoint becomes a GGUF file: the `edgellm.converters` package is one. The runtime does
    not import the converters (they sit above it); the top level (`edgellm.load`, the CLI) hands them in."""
    OUTTYPES: Sequence[str]

    def convert_to_gguf(self, src, out, outtype: str = "f16", force: bool = False, progress=None) -> Path:
        ...


def convert_checkpoint(lst: Listing, quant: str | None, converter: CheckpointConverter | None) -> Path:
    """The GGUF of a checkpoint repository (converted once per commit and output type, then reused)."""
    outtype = (quant or CONVERT_DEFAULT).lower()
    out = derived_dir(lst.repo, lst.commit) / f"{lst.repo.split('/')[1]}-{outtype.upper()}.gguf"
    if out.exists():
        return out
    if converter is None:
        raise EdgeLLMError(f"{lst.repo} is a Hugging Face checkpoint; converting it needs the converters (the "
                           "convert extra: pip install 'edgellm[convert]'; from Python, edgellm.load converts)")
    if outtype not in converter.OUTTYPES:
        raise HubError(f"{lst.repo} is a Hugging Face checkpoint (converted on use): its quant must be an output "
                       f"type of the converter ({', '.join(t.upper() for t in converter.OUTTYPES)}), not {quant}")
    names = [f for f in CHECKPOINT_FILES if f in lst.files]
    if SAFETENSORS_INDEX in lst.files:
        index = download(lst, SAFETENSORS_INDEX)
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HubError(f"{lst.repo}: {SAFETENSORS_INDEX} is not a safetensors index ({e})") from None
        names += [SAFETENSORS_INDEX] + shards
    else:
        names.append(SAFETENSORS)
    src = {download(lst, n).parent for n in names}
    if len(src) != 1:
        raise HubError(f"{lst.repo} changed on the Hub while its files were downloaded; try again")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"edgellm: converting {lst.repo} (commit {lst.commit[:10]}) to a {outtype.upper()} GGUF, once: {out}",
          file=sys.stderr)
    with progress_bar("convert", "tensors") as update:
        return converter.convert_to_gguf(src.pop(), out, outtype=outtype, progress=lambda i, n, name: update(i, n))


def fetch(ref: HubRef | str, converter: CheckpointConverter | None = None) -> Path:
    """The local GGUF for `user/repo[:QUANT]`: downloaded (or found in the cache), joined, or converted (a
    checkpoint, by `converter`; without one only a conversion already in the cache is found)."""
    _hf()
    if isinstance(ref, str):
        parsed = parse_ref(ref)
        if parsed is None:
            raise HubError(f"{ref!r} is not a Hugging Face repository name (user/repo[:QUANT])")
        ref = parsed
    lst = listing(ref.repo_id)
    if any(is_model_gguf(f) for f in lst.files):
        names = select_gguf(lst.files, ref.quant, ref.repo_id)
        paths = [download(lst, n) for n in names]
        if len(paths) == 1:
            return paths[0]
        out = derived_dir(ref.repo_id, lst.commit) / (split_info(names[0]).prefix.rsplit("/", 1)[-1] + GGUF)
        if not out.exists():
            print(f"edgellm: joining the {len(paths)} shards of {names[0]} into one GGUF, once: {out}", file=sys.stderr)
            join_shards(paths, out)
        return out
    if is_checkpoint(lst.files):
        return convert_checkpoint(lst, ref.quant, converter)
    where = "in the cache's copy of" if not lst.online else "in"
    raise HubError(f"no GGUF file and no Hugging Face checkpoint (config.json + *.safetensors) {where} {ref.repo_id}")


# -- what the caches hold (edgellm pull --list) -------------------------------------------------------------

def cached_models() -> list[dict]:
    """Model repositories in the Hub cache (whichever tool fetched them): repo, size on disk, the GGUF quants
    and whether a checkpoint is there, plus the files edgellm derived from them (joined, converted)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound
    out = []
    try:
        info = scan_cache_dir(hub_cache())
    except CacheNotFound:
        info = None
    for repo in sorted(info.repos if info else [], key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        files = {}
        for rev in repo.revisions:
            for f in rev.files:
                files[f.file_path.relative_to(rev.snapshot_path).as_posix()] = f.size_on_disk
        ggufs = sorted(f for f in files if is_model_gguf(f))
        out.append({"repo": repo.repo_id, "size_on_disk": repo.size_on_disk, "path": str(repo.repo_path),
                    "quants": {split_info(f).tag or f: sum(files[g] for g in ggufs if split_info(g).prefix ==
                                                           split_info(f).prefix) for f in ggufs
                               if split_info(f).index == 1},
                    "checkpoint": is_checkpoint(list(files)), "derived": []})
    derived = derived_files()
    for d in out:
        d["derived"] = derived.pop(d["repo"], [])
    for repo, files in sorted(derived.items()):   # derived from a repository no longer in the Hub cache
        out.append({"repo": repo, "size_on_disk": 0, "path": None, "quants": {}, "checkpoint": False, "derived": files})
    return out


def derived_files() -> dict[str, list[dict]]:
    """repo -> the GGUFs edgellm made from it: [{"file", "commit", "size"}]."""
    root = cache_dir() / "hub"
    out: dict[str, list[dict]] = {}
    for p in sorted(root.glob(f"models--*/*/*{GGUF}")):
        repo = p.parent.parent.name[len("models--"):].replace("--", "/", 1)
        out.setdefault(repo, []).append({"file": str(p), "commit": p.parent.name, "size": p.stat().st_size})
    return out
