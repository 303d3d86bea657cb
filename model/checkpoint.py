"""Run directories and checkpoints. Nothing here unpickles arbitrary objects: weights are
safetensors, trainer state is loaded with torch.load(weights_only=True), config is JSON.

    RUN/config.json                        the full Config, plus the checkpoint format version
    RUN/spm.model                          the SentencePiece model
    RUN/log.jsonl                          one JSON per line: a start record per (re)start with
                                           the hardware and precision, train and dev metrics
    RUN/checkpoints/{last,best}/model.safetensors
    RUN/checkpoints/last/trainer.pt        optimiser, scheduler, RNG (each rank's), data position
    RUN/checkpoints/{last,best}/meta.json  step, epoch, dev BLEU
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from attnserve.model.base import EncoderDecoder
from attnserve.model.config import Config
from attnserve.model.tokenizer import Tokenizer
from attnserve.model.zoo import build_model

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A run directory or checkpoint is missing, incomplete or from an incompatible version."""


def write_config(run_dir: Path, config: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **config.to_dict()}
    (run_dir / "config.json").write_text(json.dumps(payload, indent=2) + "\n")


def read_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {run_dir}: not a training run directory")
    raw = json.loads(path.read_text())
    version = raw.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version}, this version reads {FORMAT_VERSION}")
    return Config.from_dict(raw)


def save_checkpoint(directory: Path, model: EncoderDecoder, meta: dict[str, Any], trainer: dict[str, Any] | None = None) -> None:
    """Write atomically: into a temporary directory that then replaces the old one."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    if trainer is not None:
        torch.save(trainer, tmp / "trainer.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / "trainer.pt", weights_only=True, map_location="cpu")


def weights_path(source: Path | str, which: str = "best") -> Path:
    """A run directory's `which` checkpoint weights, or `source` itself if it is a weights file."""
    source = Path(source)
    weights = source / "checkpoints" / which / "model.safetensors" if source.is_dir() else source
    if not weights.is_file():
        raise CheckpointError(f"no {which} checkpoint in {source}" if source.is_dir() else f"no weights file {source}")
    return weights


def load_weights(model: EncoderDecoder, weights: Path, device: str = "cpu") -> None:
    """Load safetensors weights into a model of the same architecture, names and shapes."""
    missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False, device=device)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match the {model.config.arch} config: missing {missing}, unexpected {unexpected}")


def load_model(run_dir: Path | str, which: str = "best", device: str = "cpu") -> tuple[EncoderDecoder, Tokenizer, Config]:
    """Model (in eval mode), tokenizer and config of a run; `which` is best or last."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights = weights_path(run_dir, which)
    model = build_model(config.model)
    load_weights(model, weights, device)
    return model.to(device).eval(), Tokenizer(run_dir / "spm.model"), config


def _inference_fields(model: Any) -> tuple:
    """What must agree for two checkpoints to be one model: the architecture's label (kind,
    depth, width, cell, attention), the fields that shape no tensor (heads, positions) and the
    vocabulary; every other size is checked on the tensors' shapes. Training-only fields
    (dropout) and other architectures' fields (an old config's image-reader defaults) may differ."""
    return model.label, model.n_heads, model.max_len, model.vocab_size, model.window


STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def average_checkpoints(sources: list[Path | str], out_dir: Path | str, which: str = "best",
                        dtype: str = "fp32") -> Path:
    """A run directory whose best weights are the element-wise mean of `sources`' `which`
    weights (run directories or weights files of one lineage: the same architecture and
    tokenizer), as in Vaswani et al. (2017), who average the last checkpoints of a run. The
    mean is taken in fp32 and stored as `dtype` (bf16 or fp16 halve a checkpoint kept in the
    repository; loading casts back to the model's fp32). The first source that is a run
    directory gives the config and the tokenizer; the others must match them."""
    if dtype not in STORAGE_DTYPES:
        raise CheckpointError(f"unknown storage dtype {dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    if len(sources) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    runs = [Path(s) for s in sources if Path(s).is_dir()]
    if not runs:
        raise CheckpointError("at least one source must be a run directory (for its config and tokenizer)")
    config, tokenizer = read_config(runs[0]), (runs[0] / "spm.model").read_bytes()
    for run in runs[1:]:
        if _inference_fields(read_config(run).model) != _inference_fields(config.model):
            raise CheckpointError(f"{run}: its model config differs from {runs[0]}'s; only one architecture averages")
        if (run / "spm.model").read_bytes() != tokenizer:
            raise CheckpointError(f"{run}: its tokenizer differs from {runs[0]}'s")
    total: dict[str, torch.Tensor] = {}
    for source in sources:
        tensors = safetensors.torch.load_file(str(weights_path(source, which)))
        if total and tensors.keys() != total.keys():
            raise CheckpointError(f"{source}: its tensors differ from the first checkpoint's")
        for name, tensor in tensors.items():
            if name not in total:
                total[name] = tensor.float().clone()
            elif tensor.shape != total[name].shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, not {tuple(total[name].shape)}")
            else:
                total[name] += tensor.float()
    model = build_model(config.model)
    mean = {name: value / len(sources) for name, value in total.items()}
    missing, unexpected = model.load_state_dict(mean, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"the averaged weights do not match the config: missing {missing}, unexpected {unexpected}")
    out_dir = Path(out_dir)
    write_config(out_dir, config)
    (out_dir / "spm.model").write_bytes(tokenizer)
    save_checkpoint(out_dir / "checkpoints" / "best", model.to(STORAGE_DTYPES[dtype]),
                    {"averaged_from": [str(s) for s in sources], "which": which, "dtype": dtype})
    return out_dir
