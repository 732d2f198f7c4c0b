#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs into fuzz/seeds/<target>/ (committed; run this again
after a format change). Every seed is made here from scratch or from the project's own
configs/: none comes from the IMDB corpus. Standard library only."""

import gzip
import io
import json
import pathlib
import shutil
import struct
import tarfile

ROOT = pathlib.Path(__file__).resolve().parent
SEEDS = ROOT / "seeds"


def write(target, name, data):
    folder = SEEDS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def ring_wire():
    def hello(rank, world, token, version=1):
        return (b"TRNRING1" + struct.pack("<IBIII", version, 1, world, rank, len(token)) + token)

    def reply(status, rank, world, message=b""):
        return b"TRNRING1" + struct.pack("<BIII", status, rank, world, len(message)) + message

    def header(kind, seq, length, root):
        return b"RGOP" + bytes([kind, 0, 0, 0]) + struct.pack("<QQI", seq, length, root) + bytes(4)

    write("ring_wire", "hello", hello(0, 2, bytes(range(32))))
    write("ring_wire", "hello-no-token", hello(3, 4, b""))
    write("ring_wire", "reply-ok", reply(0, 1, 2))
    write("ring_wire", "reply-refused", reply(1, 1, 2, b"job token does not match"))
    write("ring_wire", "header-all-reduce", header(1, 3, 1000, 0))
    write("ring_wire", "header-broadcast", header(2, 0, 4099, 1))


def config_toml():
    for path in sorted((ROOT.parent / "configs").glob("*.toml")):
        shutil.copyfile(path, SEEDS / "config_toml" / path.name)
    write("config_toml", "bad-value.toml", b"[train]\nlr = -1\nbatch_size = 0\n")
    write("config_toml", "unknown-key.toml", b"[model]\nhiden = 3\n")


def tar_bytes(files, compress):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    # Drop the padding to tarfile's 10 KiB record: the two zero blocks that end an archive
    # are enough, and short seeds keep libFuzzer's input length small.
    data = buffer.getvalue().rstrip(b"\0")
    data += bytes(-len(data) % 512 + 1024)
    return gzip.compress(data, mtime=0) if compress else data


def corpus():
    words = ["good", "bad", "film", "plot", "great", "awful", "actor", "scene"]
    files = [("aclImdb/README", b"made by make_seeds.py")]
    for split in ["train", "test"]:
        for label, rating in [("pos", 8), ("neg", 3)]:
            for i in range(3):
                text = " ".join(words[(i * 3 + k) % len(words)] for k in range(3 + i)) + "!"
                files.append((f"aclImdb/{split}/{label}/{i}_{rating}.txt", text.encode()))
    odd = files + [
        ("aclImdb/train/pos/7_11.txt", b"rating out of range"),
        ("aclImdb/test/neg/8_2.txt", b"\xff\xfe not utf-8"),
        ("aclImdb/train/unsup/9_0.txt", b"unlabelled"),
    ]
    for target in ["corpus_tar", "corpus_folder"]:
        write(target, "small.tar", tar_bytes(files, False))
        write(target, "small.tar.gz", tar_bytes(files, True))
        write(target, "odd.tar", tar_bytes(odd, False))


def auth_metadata():
    write("auth_metadata", "bearer", b"Bearer fuzz-job-secret-0123")
    write("auth_metadata", "secret-file", b"fuzz-job-secret-0123\n")
    write("auth_metadata", "secret-file-crlf", b"fuzz-job-secret-0123\r\n")
    write("auth_metadata", "basic", b"Basic dXNlcjpwYXNz")


def checkpoint():
    """A checkpoint of a 1-layer model with 2-wide embeddings over 5 words, with Adam's
    moments, as worker::checkpoint writes one: safetensors with the state as JSON metadata."""
    shapes = {
        "embedding.weight": [5, 2],
        "lstm.weight_ih_l0": [8, 2],
        "lstm.weight_hh_l0": [8, 2],
        "lstm.bias_ih_l0": [8],
        "lstm.bias_hh_l0": [8],
        "fc.weight": [2, 2],
        "fc.bias": [2],
    }
    meta = {
        "format": "imdb-ddp-checkpoint/1",
        "position": {"epoch": 1, "step_in_epoch": 2, "global_step": 7},
        "optimizer_steps": 7,
        "rng": {"seed": 7, "scheme": "made by make_seeds.py"},
        "config": {"model": {"embed_dim": 2, "hidden": 2, "layers": 1}},
        "shape": {"vocab_size": 5, "embed_dim": 2, "hidden": 2, "layers": 1, "head": "last",
                  "bidirectional": False},
        "vocab_fingerprint": "v:1",
        "world_size": 2,
        "loop_state": {"best_val_accuracy": 0.5, "best_epoch": 0, "epochs_without_improvement": 0,
                       "epochs_completed": 1, "train_seconds": 1.5, "train_tokens": 100,
                       "stopped_early": False},
        "best_model_epoch": None,
    }
    header = {"__metadata__": {"imdb_ddp_checkpoint": json.dumps(meta)}}
    data = bytearray()
    for prefix in ["model.", "adam.exp_avg.", "adam.exp_avg_sq."]:
        for name, shape in shapes.items():
            count = 1
            for d in shape:
                count *= d
            values = struct.pack(f"<{count}f", *[(i % 7 - 3) / 8 for i in range(count)])
            header[prefix + name] = {"dtype": "F32", "shape": shape,
                                     "data_offsets": [len(data), len(data) + len(values)]}
            data += values
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    write("checkpoint", "tiny.safetensors", struct.pack("<Q", len(text)) + text + bytes(data))


if __name__ == "__main__":
    (SEEDS / "config_toml").mkdir(parents=True, exist_ok=True)
    ring_wire()
    config_toml()
    corpus()
    auth_metadata()
    checkpoint()
    print(f"seeds written to {SEEDS}")
