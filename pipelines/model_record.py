"""Model records: the small JSON file through which later stages find a trained network.

A finished training writes `<run>/models/<stage>.json` naming its last checkpoint, the sha256 of
the weights in it, the class list, the architecture, the config hash and the final metrics.
Later stages (AffinityNet training, labeling) load the network from the record's URI, local or
s3://. Loading checks the digest and uses `torch.load(..., weights_only=True)`: a checkpoint is
data, never code.
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torch import nn

from pipelines import storage
from pipelines.config import RunConfig
from wsss.networks import NETWORKS, build_network

# A trained network's name: a key of `wsss.networks.NETWORKS` (a record's is checked against it).
Stage = str
# Files of a training checkpoint folder.
WEIGHTS_FILE = "model.pt"  # the network's state dict
TRAIN_STATE_FILE = "train_state.pt"  # optimizer state and step count, for resuming
META_FILE = "meta.json"  # epoch, classes, architecture, config, metrics


class ModelRecord(BaseModel):
    """What a later stage needs to rebuild a trained network and to say which one it used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Stage
    checkpoint_uri: str
    weights_uri: str
    weights_sha256: str
    classes: list[str]
    backbone: str
    model: dict[str, Any]  # the ClassifierParams / AffinityNetParams the network was built with
    epochs: int
    config_hash: str
    metrics: dict[str, float]
    skipped_examples: list[str]  # a few unreadable rows training skipped ("id (uri): reason")
    created_at: str
    # The seeds the classifier's CAM method kept while it trained (OAA's), merged per image
    # (`pipelines.train.kept_seeds`); None for the methods that keep none.
    kept_seeds_uri: str | None = None

    @field_validator("stage")
    @classmethod
    def _known_network(cls, stage: str) -> str:
        if stage not in NETWORKS:
            raise ValueError(f"unknown network {stage!r}; known: {sorted(NETWORKS)}")
        return stage


def record_uris(cfg: RunConfig, given: dict[str, str | None] | None = None) -> dict[str, str]:
    """The model record of each network labeling needs (`RunConfig.networks`): the one `given`
    for it, else this run's."""
    return {name: (given or {}).get(name) or cfg.layout.record(name) for name in cfg.networks}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_record(record: ModelRecord, uri: str, cfg: RunConfig) -> None:
    storage.write_bytes(uri, record.model_dump_json(indent=2).encode(), cfg.storage)


def read_record(uri: str, cfg: RunConfig) -> ModelRecord:
    """The record at `uri`; a ValueError names the URI and what is wrong with it."""
    try:
        data = json.loads(storage.read_bytes(uri, cfg.storage))
    except OSError as exc:
        raise FileNotFoundError(f"model record {uri}: cannot read it: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"model record {uri}: not JSON: {exc}") from None
    try:
        return ModelRecord.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"model record {uri}: {problems}") from None


def load_weights(record: ModelRecord, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The state dict the record names, after checking its sha256."""
    data = storage.read_bytes(record.weights_uri, cfg.storage)
    digest = sha256_hex(data)
    if digest != record.weights_sha256:
        raise ValueError(
            f"{record.weights_uri}: sha256 {digest} does not match the record's "
            f"{record.weights_sha256} (the checkpoint changed after the record was written)"
        )
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_network(source: str | ModelRecord, cfg: RunConfig, stage: Stage) -> nn.Module:
    """The network of `stage`, on the CPU, in eval mode, from its model record: the record at the
    URI `source`, or a record a driver read once and handed to its actors and workers. Either
    way the weights must hash to the record's sha256, so a record or weights replaced while a
    job runs fail the loading instead of mixing two models under one version."""
    record = read_record(source, cfg) if isinstance(source, str) else source
    if record.stage != stage:
        where = source if isinstance(source, str) else record.checkpoint_uri
        raise ValueError(f"model record {where} is for the {record.stage}, not the {stage}")
    model = build_network(stage, record.model, len(record.classes) - 1)
    model.load_state_dict(load_weights(record, cfg))
    return model.eval()


def save_model(model: nn.Module, classes: list[str], cfg: RunConfig, folder: str) -> ModelRecord:
    """Store a network trained outside `wsss train-*` (in process, or imported) as weights in
    `folder` and a model record where this run keeps it (`RunLayout.record`), so later stages
    load it like one Ray Train produced."""
    stage = next(
        name for name, kind in NETWORKS.items() if isinstance(model.params, kind.params_type)
    )
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    weights = buffer.getvalue()
    weights_uri = storage.join(folder, WEIGHTS_FILE)
    storage.write_bytes(weights_uri, weights, cfg.storage)
    record = ModelRecord(
        stage=stage,
        checkpoint_uri=folder,
        weights_uri=weights_uri,
        weights_sha256=sha256_hex(weights),
        classes=classes,
        backbone=model.params.backbone.name,
        model=model.params.model_dump(mode="json"),
        epochs=0,
        config_hash=cfg.hash(),
        metrics={},
        skipped_examples=[],
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_record(record, cfg.layout.record(stage), cfg)
    return record
