"""Robustness of reading artifacts: a planted pickle is never opened, a file that is a symbolic link
(pointing out of the artifact) is refused, tampered or missing files are named."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model, tokenizer_for

from unlearn_fast.api import unlearn
from unlearn_fast.cli import main
from unlearn_fast.errors import ArtifactError
from unlearn_fast.fusion.closed_form import fuse_artifacts
from unlearn_fast.io.artifacts import MANIFEST_FILE, WEIGHTS_FILE, load_layers, read_artifact
from unlearn_fast.model.layers import LayerConfig
from unlearn_fast.train.trainer import TrainConfig

FORGET = [{"prompt": "The code word is", "response": " pumpkin"}]
RETAIN = [{"prompt": "Bob plays", "response": " the violin"}]


class Payload:
    """Unpickling this writes a marker file: proof that something opened the pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifact")
    torch.manual_seed(0)
    unlearn(make_model("llama"), tokenizer_for("llama"), FORGET, RETAIN, out=root / "a",
            layers=LayerConfig(rank=4), training=TrainConfig(max_steps=1, progress=False), evaluate=False,
            log=lambda *a: None)
    return root / "a"


def copy_of(artifact: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(artifact, out)
    return out


def test_a_planted_pickle_is_never_opened(artifact, tmp_path, capsys):
    planted = copy_of(artifact, tmp_path)
    marker = tmp_path / "marker"
    for name in ("pytorch_model.bin", "layers.pkl", "optimizer.pt", "training_args.bin"):
        with open(planted / name, "wb") as f:
            pickle.dump(Payload(str(marker)), f)
    read_artifact(planted)
    load_layers(make_model("llama"), planted)
    fuse_artifacts([planted], tmp_path / "fused")
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    tokenizer_for("llama").save_pretrained(model_dir)
    code = main(["eval", "--model", str(model_dir), "--layers", str(planted), "--json",
                 "--forget", str(_jsonl(tmp_path / "f.jsonl", FORGET))])
    capsys.readouterr()
    assert code == 0
    assert not marker.exists(), "a pickle planted in the artifact was unpickled"


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", [WEIGHTS_FILE, MANIFEST_FILE])
def test_a_file_linked_out_of_the_artifact_is_refused(artifact, tmp_path, name):
    linked = copy_of(artifact, tmp_path)
    outside = tmp_path / f"outside-{name}"
    shutil.move(linked / name, outside)  # the same bytes: the checksum alone would accept them
    os.symlink(outside, linked / name)
    with pytest.raises(ArtifactError, match="symbolic link"):
        read_artifact(linked)
    with pytest.raises(ArtifactError, match="symbolic link"):
        load_layers(make_model("llama"), linked)


def test_a_linked_directory_inside_is_also_refused(artifact, tmp_path):
    linked = copy_of(artifact, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(linked / WEIGHTS_FILE, elsewhere / WEIGHTS_FILE)
    os.symlink(elsewhere / WEIGHTS_FILE, linked / WEIGHTS_FILE)
    with pytest.raises(ArtifactError, match=str(linked / WEIGHTS_FILE)):
        fuse_artifacts([linked], tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


def test_tampered_tensors_and_a_missing_manifest_are_named(artifact, tmp_path):
    tampered = copy_of(artifact, tmp_path)
    data = bytearray((tampered / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tampered / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{tampered / WEIGHTS_FILE}.*checksum"):
        load_layers(make_model("llama"), tampered)
    (tampered / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match=rf"{tampered / MANIFEST_FILE}.*manifest not found"):
        read_artifact(tampered)
