"""Checkpoint files in the Hugging Face layout of THUDM/chatglm2-6b: find them, check them, stream them, write them."""
import hashlib
import json
import shutil
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from chatglm2.atomic import atomic_directory, atomic_file, honour_umask, write_text_atomic
from chatglm2.errors import InputError
from chatglm2.hf_layout import EMBEDDING, chatglm_config, is_hf_config, tensor_sources

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")
# write_checkpoint's record of the files it wrote: only a folder holding nothing else may be replaced by it
MARKER = ".written_by_chatglm2.json"
FINGERPRINT_SPAN = 2 ** 20


def read_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise InputError(f"checkpoint directory {path} does not exist; pass --model_path the folder holding config.json")
    if not config_file.is_file():
        raise InputError(f"{config_file} is missing; a ChatGLM2 checkpoint folder needs config.json, tokenizer.model and the weights")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config_file} is not valid UTF-8 JSON ({error}); restore it from the original checkpoint") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_file} holds {json.dumps(config)[:40]}, not a JSON object of model settings; restore it "
                         f"from the original checkpoint")
    return chatglm_config(config) if is_hf_config(config) else config


def read_weight_map(index_file: Path) -> dict[str, str]:
    """The index's tensor name -> file name map, checked: an object of strings naming files inside the folder (an index
    must not make the loader read ../something or /etc/something)."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        index = None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index_file} has no valid 'weight_map' (an object mapping tensor names to file names); "
                         f"restore it from the original checkpoint")
    for file in sorted(set(weight_map.values())):
        if PurePosixPath(file).is_absolute() or ".." in PurePosixPath(file).parts:
            raise InputError(f"{index_file} names {file!r}, outside the checkpoint folder; an index may only name files "
                             f"inside it, restore it from the original checkpoint")
    return weight_map


def weight_parts(path: str | Path) -> dict[str, list[tuple[str, Path]]]:
    """Every tensor by THUDM's name -> the (stored name, file) pairs it is read from: itself, or in transformers'
    layout the projections it concatenates (hf_layout.py)."""
    stored = stored_weight_files(path)
    if EMBEDDING not in stored:
        return {name: [(name, file)] for name, file in stored.items()}
    return {name: [(part, stored[part]) for part in parts] for name, parts in tensor_sources(list(stored)).items()}


def weight_files(path: str | Path) -> dict[str, Path]:
    """Every tensor by THUDM's name -> the file holding it (its last part's, in transformers' layout)."""
    return {name: parts[-1][1] for name, parts in weight_parts(path).items()}


def stored_weight_files(path: str | Path) -> dict[str, Path]:
    """Map every stored tensor name to the file holding it, after checking that every file exists."""
    path = Path(path)
    for index_name in INDEX_FILES:
        index_file = path / index_name
        if index_file.is_file():
            files = {name: path / file for name, file in read_weight_map(index_file).items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise InputError(f"{file.name} is named in {index_name} but missing from {path}; download it again")
            return files
    for single_name in SINGLE_FILES:
        if (path / single_name).is_file():
            return {name: path / single_name for name in tensor_names(path / single_name)}
    raise InputError(f"no weights in {path}: expected {' or '.join(INDEX_FILES + SINGLE_FILES)}")


def check_shape(name: str, source: Path, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """A checkpoint tensor must have the shape the model built from config.json gives it."""
    if tuple(tensor.shape) != tuple(expected):
        raise InputError(f"{name} in {source} has shape {tuple(tensor.shape)} but config.json implies "
                         f"{tuple(expected)}; the weights and config.json do not belong together")


def tensor_names(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        with open_safetensors(file) as f:
            return list(f.keys())
    return list(_load_bin(file).keys())


def open_safetensors(file: Path):
    """safe_open, whose header checks (valid JSON, offsets that cover the file exactly) catch a truncated or damaged
    file before any tensor is read."""
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as error:
        raise InputError(f"cannot read {file} as a safetensors file ({error}); it may be truncated or damaged, "
                         f"download it again") from None


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        shard = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        raise InputError(f"cannot read {file} as a PyTorch weights file ({error.__class__.__name__}); it may be truncated") from None
    if not isinstance(shard, dict):
        raise InputError(f"{file} holds a {type(shard).__name__}, not the dict of tensors of a checkpoint shard; "
                         f"download it again")
    for name, tensor in shard.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise InputError(f"{file} holds {name!r}: {type(tensor).__name__}, not a named tensor as a checkpoint shard "
                             f"does; download it again")
    return shard


def files_fingerprint(files: Iterable[Path]) -> str:
    """Identifies files by content, cheaply (a stale-output check): name, size and the sha256 of the first and last MiB,
    which hold a safetensors header and a .bin's zip directory, and the first and last tensors' bytes. Copies match
    their originals whatever their times; rewritten weights do not."""
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size};".encode())
        with open(file, "rb") as f:
            digest.update(f.read(FINGERPRINT_SPAN))
            f.seek(max(0, size - FINGERPRINT_SPAN))
            digest.update(f.read(FINGERPRINT_SPAN))
    return digest.hexdigest()[:16]


class CheckpointReader:
    """Tensors of a checkpoint by THUDM's name, without loading the rest (safetensors reads lazily; .bin shards are
    memory-mapped, the last one kept open since callers ask for layers in order)."""

    def __init__(self, path: str | Path):
        self.path, self.parts = Path(path), weight_parts(path)
        self._bin_file, self._bin = None, None

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.parts:
            raise InputError(f"{self.path} lacks tensor {name}; the checkpoint is incomplete")
        pieces = [self._stored(part, file) for part, file in self.parts[name]]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _stored(self, name: str, file: Path) -> torch.Tensor:
        if file.suffix == ".safetensors":
            with open_safetensors(file) as f:
                return f.get_tensor(name)
        if file != self._bin_file:
            self._bin_file, self._bin = file, _load_bin(file)
        if name not in self._bin:
            raise InputError(f"{file.name} lacks tensor {name} that the index places there; the shard is corrupt")
        return self._bin[name]


def iter_shards(path: str | Path, wanted: Iterable[str] | None = None) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Yield (file, {name: tensor}) one weight file at a time, so at most one shard is mapped at once. With `wanted`,
    only those tensors are read (safetensors reads lazily; a .bin shard is memory-mapped, so others stay on disk)."""
    read = CheckpointReader(path)
    files = weight_files(path)
    if wanted is not None:
        wanted = set(wanted)
        files = {name: file for name, file in files.items() if name in wanted}
    for file in sorted(set(files.values())):
        yield file, {name: read(name) for name, f in files.items() if f == file}


def iter_tensors(path: str | Path, wanted: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    for _, shard in iter_shards(path, wanted):
        yield from shard.items()


def shard_file_name(k: int, count: int, safetensors: bool) -> str:
    stem, suffix = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    return f"{stem}.{suffix}" if count == 1 else f"{stem}-{k:05d}-of-{count:05d}.{suffix}"


def save_shard(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    if file.suffix == ".safetensors":
        save_file(tensors, file, metadata={"format": "pt"})
    else:
        torch.save(tensors, file)
    honour_umask(file)


def write_index(directory: Path, weight_map: dict[str, str], total_size: int, safetensors: bool) -> None:
    name = INDEX_FILES[0] if safetensors else INDEX_FILES[1]
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_config_and_tokenizer(directory: Path, config: dict, tokenizer_dir: str | Path) -> None:
    """config.json and the tokenizer files, each written atomically (the folder may be one the user reads)."""
    write_text_atomic(directory / "config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            with atomic_file(directory / name) as tmp:
                shutil.copyfile(Path(tokenizer_dir) / name, tmp)


def check_replaceable(path: Path) -> None:
    """write_checkpoint may replace a folder only when it is empty or holds nothing but what write_checkpoint wrote
    there before (as listed in its marker file): never someone's own folder."""
    if not path.exists():
        return
    if not path.is_dir():
        raise InputError(f"{path} exists and is not a folder; choose another path")
    try:
        written = set(json.loads((path / MARKER).read_text(encoding="utf-8"))["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):  # no marker, or not one this function wrote
        written = set()
    foreign = sorted(p.name for p in path.iterdir() if p.name not in written)
    if foreign:
        raise InputError(f"{path} exists and holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, "
                         f"which this tool did not write; writing would replace the folder, so choose a new or empty "
                         f"one")


def write_checkpoint(path: str | Path, config: dict, shards: Iterable[dict[str, torch.Tensor]], num_shards: int,
                     tokenizer_dir: str | Path, safetensors: bool = False) -> None:
    """Write config, tokenizer and weight shards (with an index when there are several), all or nothing, into a new
    folder or over one that this function wrote (see check_replaceable).

    `shards` may be a generator, so only one shard need be in memory at a time.
    """
    check_replaceable(Path(path))
    with atomic_directory(path) as tmp:
        write_config_and_tokenizer(tmp, config, tokenizer_dir)
        weight_map, total_size = {}, 0
        for k, shard in enumerate(shards, start=1):
            file = shard_file_name(k, num_shards, safetensors)
            save_shard(tmp / file, shard)
            for name, tensor in shard.items():
                weight_map[name] = file
                total_size += tensor.numel() * tensor.element_size()
        if num_shards > 1:
            write_index(tmp, weight_map, total_size, safetensors)
        written = sorted(p.name for p in tmp.iterdir())
        write_text_atomic(tmp / MARKER, json.dumps({"written_by": "chatglm2.checkpoint.write_checkpoint",
                                                    "files": written}) + "\n")
