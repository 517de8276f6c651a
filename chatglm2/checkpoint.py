"""Checkpoint files in the Hugging Face layout of THUDM/chatglm2-6b: find them, check them, stream them, write them."""
import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chatglm2.atomic import atomic_directory, atomic_file, write_text_atomic
from chatglm2.errors import InputError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")


def read_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise InputError(f"checkpoint directory {path} does not exist; pass --model_path the folder holding config.json")
    if not config_file.is_file():
        raise InputError(f"{config_file} is missing; a ChatGLM2 checkpoint folder needs config.json, tokenizer.model and the weights")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{config_file} is not valid JSON ({error}); restore it from the original checkpoint") from None


def weight_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name to the file holding it, after checking that every file exists."""
    path = Path(path)
    for index_name in INDEX_FILES:
        index_file = path / index_name
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise InputError(f"{index_file} has no valid 'weight_map'; restore it from the original checkpoint") from None
            files = {name: path / file for name, file in weight_map.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise InputError(f"{file.name} is named in {index_name} but missing from {path}; download it again")
            return files
    for single_name in SINGLE_FILES:
        if (path / single_name).is_file():
            return {name: path / single_name for name in tensor_names(path / single_name)}
    raise InputError(f"no weights in {path}: expected {' or '.join(INDEX_FILES + SINGLE_FILES)}")


def tensor_names(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    return list(_load_bin(file).keys())


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        raise InputError(f"cannot read {file} as a PyTorch weights file ({error.__class__.__name__}); it may be truncated") from None


def files_fingerprint(files: Iterable[Path]) -> str:
    """Identifies files by name, size and modification time, without reading them (a stale-output check)."""
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


class CheckpointReader:
    """Tensors of a checkpoint by name, without loading the rest (safetensors reads lazily; .bin shards are
    memory-mapped, the last one kept open since callers ask for layers in order)."""

    def __init__(self, path: str | Path):
        self.path, self.files = Path(path), weight_files(path)
        self._bin_file, self._bin = None, None

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise InputError(f"{self.path} lacks tensor {name}; the checkpoint is incomplete")
        file = self.files[name]
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(name)
        if file != self._bin_file:
            self._bin_file, self._bin = file, _load_bin(file)
        return self._bin[name]


def iter_shards(path: str | Path, wanted: Iterable[str] | None = None) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Yield (file, {name: tensor}) one weight file at a time, so at most one shard is mapped at once. With `wanted`,
    only those tensors are read (safetensors reads lazily; a .bin shard is memory-mapped, so others stay on disk)."""
    files = weight_files(path)
    if wanted is not None:
        wanted = set(wanted)
        files = {name: file for name, file in files.items() if name in wanted}
    for file in sorted(set(files.values())):
        names = [name for name, f in files.items() if f == file]
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                yield file, {name: f.get_tensor(name) for name in names}
            continue
        shard = _load_bin(file)
        missing = [name for name in names if name not in shard]
        if missing:
            raise InputError(f"{file.name} lacks tensor {missing[0]} that the index places there; the shard is corrupt")
        yield file, {name: shard[name] for name in names}


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


def write_checkpoint(path: str | Path, config: dict, shards: Iterable[dict[str, torch.Tensor]], num_shards: int,
                     tokenizer_dir: str | Path, safetensors: bool = False) -> None:
    """Write config, tokenizer and weight shards (with an index when there are several), all or nothing.

    `shards` may be a generator, so only one shard need be in memory at a time.
    """
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
