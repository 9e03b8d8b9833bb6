"""The registry of released models: fetched by name, checked, cached, usable offline.

    from diffsr import weights
    weights.fetch("osediff")            # -> Path of osediff.pkl (downloaded and checked on first use)
    weights.fetch("sd21-base")          # -> Path of the diffusers folder (Hugging Face cache)
    weights.path("osediff")             # the cached path, never downloads
    weights.verify("osediff")           # re-hashes; [] when good, else one line per problem
    weights.resolve("osediff", "weights", method="osediff")   # a name -> path; paths and hub ids pass through

Items and their sources are data in registry.yaml ($DIFFSR_REGISTRY names another file). Caches:
Hugging Face sources use huggingface_hub's (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE); the others
$DIFFSR_HOME/weights (default ~/.cache/diffsr). Offline (offline=True or HF_HUB_OFFLINE=1) only the caches
are used. Every failure is a diffsr.WeightsError with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffsr.errors import BaseModelError, WeightsError
from diffsr.weights.checks import check_file, diffsr_home, expected, remembered
from diffsr.weights.fetching import download_url, fetch_command, fetch_item, find_cached, is_offline, item_root
from diffsr.weights.registry import FileSpec, Item, Registry, Source

__all__ = ["Registry", "Item", "FileSpec", "Source", "fetch", "path", "verify", "resolve", "resolve_method",
           "status", "needed_by", "hub_base", "download_url", "diffsr_home", "is_offline"]


def _registry(registry: Registry | None) -> Registry:
    return registry if registry is not None else Registry.load()


def fetch(name: str, offline: bool | None = None, progress: bool = True, registry: Registry | None = None) -> Path:
    """The local path of item `name`: its file for one-file items, else its folder. Fetched from the first
    source that delivers a copy matching the registry's hashes (unless cached and intact already)."""
    return fetch_item(_registry(registry).get(name), offline=offline, progress=progress)


def path(name: str, registry: Registry | None = None) -> Path:
    """The cached, checked local path of `name`; never downloads (a missing item is a WeightsError)."""
    item = _registry(registry).get(name)
    if find_cached(item) is None:
        raise WeightsError(f"'{item.name}' is not in the cache: run `{fetch_command(item)}`")
    return fetch_item(item, offline=True, progress=False)


def verify(name: str, registry: Registry | None = None, progress: bool = False) -> list[str]:
    """Re-hash the cached copy of `name`: [] when every file matches, else one line per problem."""
    item = _registry(registry).get(name)
    found = find_cached(item)
    if found is None:
        return [f"{item.name}: not in the cache (run `{fetch_command(item)}`)"]
    _, paths = found
    return [f"{p}: {why}" for p, spec in zip(paths, item.files)
            if (why := check_file(p, spec, rehash=True, progress=progress)) is not None]


@dataclass
class Status:
    item: Item
    cached: bool
    verified: str  # yes | no | not yet (cached, never hashed) | partly / unchecked (no published hash) | -
    location: Path | None


def status(item: Item) -> Status:
    """Cached or not and checked or not, from the remembered hashes (no re-hashing)."""
    found = find_cached(item)
    if found is None:
        return Status(item, False, "-", None)
    _, paths = found
    states = set()
    for p, spec in zip(paths, item.files):
        if not expected(spec):
            states.add("unchecked")
        elif remembered(p) is None:
            states.add("not yet")
        else:
            states.add("yes" if check_file(p, spec) is None else "no")
    if "no" in states or "not yet" in states:
        verified = "no" if "no" in states else "not yet"
    elif "unchecked" in states:
        verified = "partly" if "yes" in states else "unchecked"
    else:
        verified = "yes"
    return Status(item, True, verified, item_root(item, paths))


def looks_like_path(value: str) -> bool:
    """A local path (existing, or written as one), not a registry name or a hub id."""
    return Path(value).expanduser().exists() or value.startswith((".", "/", "~")) or "\\" in value


def resolve(value: str | Path | None, kind: str, method: str | None = None, offline: bool | None = None,
            progress: bool = True, registry: Registry | None = None) -> Path | None:
    """A --base / --weights / extra value as a local path. A registry name is fetched (kind and method are
    checked); an existing path passes through unchecked; for kind "base" a hub id (org/name) is fetched
    into the Hugging Face cache. `kind` is "base", "weights" or a load option an extra serves (de_net)."""
    if value is None:
        return None
    if isinstance(value, Path) or looks_like_path(str(value)):
        return Path(value).expanduser()
    value = str(value)
    registry = _registry(registry)
    if value in registry.items or ("/" not in value and "." not in value):
        item = registry.get(value)  # unknown names end here, with the closest names suggested
        _check_use(item, kind, method)
        return fetch_item(item, offline=offline, progress=progress)
    if kind == "base" and value.count("/") == 1:
        return hub_base(value, offline=offline)
    return Path(value)


def _check_use(item: Item, kind: str, method: str | None) -> None:
    wanted = "base" if kind == "base" else "weights" if kind == "weights" else "extra"
    what = {"base": "a base model", "weights": "method weights", "extra": "an extra file"}
    if item.kind != wanted:
        raise WeightsError(f"'{item.name}' is {what[item.kind]} ({item.description}), not {what[wanted]}: "
                           f"it cannot be used as {'--base' if kind == 'base' else '--' + kind.replace('_', '-')}")
    if method and item.method and item.method != method:
        raise WeightsError(f"'{item.name}' is {item.method} {what[item.kind]} ({item.description}); "
                           f"{method} cannot use it")


@dataclass
class Resolved:
    base: Path
    weights: Path | None
    options: dict = field(default_factory=dict)


def resolve_method(method: str, base=None, weights=None, options: dict | None = None, default_base: str = "",
                   offline: bool | None = None, progress: bool = True, registry: Registry | None = None,
                   convert=None, unused_extras: frozenset = frozenset()) -> Resolved:
    """What `method` loads: the given base / weights (names, paths or hub ids), and where they are not given,
    the registry's defaults: the default weights of the method, the base those weights were trained on,
    and the extras they need (S3Diff's de_net, StableSR's CFW autoencoder) unless given in `options` or named
    in `unused_extras` (load options the given `options` leave unused).
    `convert`: the method's writer of safetensors copies of its pickled release (Upscaler.convert_weights)."""
    registry = _registry(registry)
    options = dict(options or {})
    item = None
    if weights is None:
        item = registry.default_weights(method)
    elif isinstance(weights, str) and weights in registry.items:
        item = registry.items[weights]
    from_registry = {}  # load option -> the registry item it came from (pickled releases load from a copy)
    if item is not None:
        _check_use(item, "weights", method)
        weights = fetch_item(item, offline=offline, progress=progress)
        from_registry["weights"] = item
        for option, extra in item.extras.items():
            if options.get(option) is None and option not in unused_extras:
                options[option] = resolve(extra, option, method, offline, progress, registry)
                from_registry[option] = registry.get(extra)
    else:
        weights = resolve(weights, "weights", method, offline, progress, registry)
    extra_options = {option for entry in registry.items.values() for option in entry.extras}
    for option in extra_options & set(options):  # --de-net / --cfw-weights may be registry names too
        if isinstance(options[option], str):
            if options[option] in registry.items:
                from_registry[option] = registry.items[options[option]]
            options[option] = resolve(options[option], option, method, offline, progress, registry)
    if base is None:
        base = item.base if item is not None and item.base else default_base
    base = resolve(base, "base", method, offline, progress, registry)
    for option, entry in from_registry.items():
        if entry.convert == "safetensors":
            from diffsr.weights.convert import converted_copy

            if option == "weights":
                weights = converted_copy(entry, weights, base, progress, convert)
            else:
                options[option] = converted_copy(entry, options[option], base, progress, convert)
    return Resolved(base, weights, options)


def needed_by(method: str, registry: Registry | None = None) -> list[str]:
    """The items `diffsr upscale --method M` uses when nothing is named: default weights, base, extras."""
    registry = _registry(registry)
    item = registry.default_weights(method)
    return [name for name in (item.base, item.name, *item.extras.values()) if name]


# The files a diffusers Stable Diffusion folder needs (model weights are chosen per part below).
_BASE_CONFIGS = ["model_index.json", "scheduler/*.json", "tokenizer/*", "unet/config.json", "vae/config.json",
                 "text_encoder/config.json"]
_BASE_WEIGHTS = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"]


def hub_base(repo_id: str, offline: bool | None = None) -> Path:
    """A user-named hub base (unchecked: the registry has no hashes for it) as a local folder in the Hugging
    Face cache: configs, tokenizer and one weights file per part (safetensors where the repo has them)."""
    return hub_folder(repo_id, _BASE_CONFIGS, _BASE_WEIGHTS, "the base model", BaseModelError, offline)


def hub_folder(repo_id: str, configs: list[str], weights: list[str], what: str, error_type: type = WeightsError,
               offline: bool | None = None) -> Path:
    """Hub repo `repo_id` (unchecked) as a local folder in the Hugging Face cache with `configs` and the
    `weights` files; where a repo has no such safetensors file, the pickled .bin beside it (read weights_only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from diffsr.errors import first_line

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=configs + weights, local_files_only=is_offline(offline)))
        missing = [p for p in weights if not (folder / p).is_file()]
        if missing and not is_offline(offline):  # older repos: pickled .bin weights
            bins = [f"{p.rpartition('/')[0]}/*.bin".lstrip("/") for p in missing]
            folder = Path(snapshot_download(repo_id, allow_patterns=configs + bins,
                                            ignore_patterns=["*fp16*", "*ema*"]))
    except LocalEntryNotFoundError:
        fetch = (f"`diffsr weights fetch --hub {repo_id}`, or use a registry name (diffsr weights list)"
                 if error_type is BaseModelError else f"`hf download {repo_id}`")
        raise error_type(f"{repo_id}: cannot load {what} (hub id): not in the Hugging Face cache and downloads "
                         f"are off (offline); on a connected machine run {fetch}") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise error_type(f"{repo_id}: cannot load {what} (hub id): {first_line(error)}") from None
    return folder
