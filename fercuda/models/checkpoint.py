"""The FERNet trained on FER2013 that ships inside the package, and the checkpoint reader that
`fercuda eval`, `fercuda predict`, `fercuda export` and fercuda.recognition share.

    model = fercuda.models.pretrained()           # eval mode, on the CPU, fused blocks
    model.metadata["classes"], model.metadata["private_test_accuracy"]
    model = fercuda.models.load("runs/fer2013")   # a run folder's best model, or a .pt file; None: the shipped one

The weights file holds tensors and plain values only and loads with weights_only=True.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fercuda.models.fernet import FERNet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PRETRAINED_FILE = WEIGHTS_DIR / "fernet_fer2013.pt"
# What every file written by fercuda train or export_pretrained holds.
REQUIRED_KEYS = ("model", "model_config", "classes")


class CheckpointError(ValueError):
    """A file that is not a fercuda checkpoint, or one that does not fit the network asked for."""


def read_checkpoint(path) -> dict:
    """The dict saved in `path` (best.pt, last.pt or a shipped weights file), checked for the keys
    a FERNet needs. Errors name the file and say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code from a file
    except Exception as e:  # truncated files, other formats, pickles that hold code
        raise CheckpointError(f"{path}: cannot be read as a fercuda checkpoint (truncated, or not a torch "
                              f"file written by fercuda): {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        got = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a fercuda checkpoint: expected the keys {list(REQUIRED_KEYS)}, got {got}")
    return ckpt


def model_from_checkpoint(ckpt: dict, path, fused: bool = True) -> FERNet:
    """A FERNet built from the checkpoint's own configuration, its weights loaded strictly."""
    config = ckpt["model_config"]
    if not isinstance(config, dict) or not {"num_classes", "width_mult"} <= set(config):
        raise CheckpointError(f"{path}: model_config must hold num_classes and width_mult, got {config!r}")
    if len(ckpt["classes"]) != config["num_classes"]:
        raise CheckpointError(f"{path}: {len(ckpt['classes'])} class names {list(ckpt['classes'])} for a network "
                              f"of {config['num_classes']} outputs")
    model = FERNet(**config, fused=fused)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit FERNet({config}): "
                              f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from e
    return model


def resolve_checkpoint(checkpoint) -> Path:
    """The file a checkpoint argument names: the shipped weights for None, a run folder's best
    model (official/best.pt, best.pt, then last.pt), or the file itself."""
    path = PRETRAINED_FILE if checkpoint is None else Path(checkpoint)
    if path.is_dir():
        candidates = [path / "official" / "best.pt", path / "best.pt", path / "official" / "last.pt", path / "last.pt"]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise FileNotFoundError(f"checkpoint {path}: no best.pt or last.pt in this run folder")
        path = found[0]
    return path


def load(checkpoint=None, fused: bool = True, device="cpu") -> FERNet:
    """A FERNet in eval mode from a checkpoint written by fercuda train (a .pt file or a run
    folder), or the shipped one for None. `model.metadata` holds the checkpoint's classes (in
    output order), model_config, the file read ("checkpoint") and, for the shipped model, the
    rest of pretrained()'s metadata."""
    if checkpoint is None:
        model = pretrained(fused=fused, device=device)
        model.metadata = {**model.metadata, "checkpoint": str(PRETRAINED_FILE)}
        return model
    path = resolve_checkpoint(checkpoint)
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, path, fused=fused)
    model.metadata = {"classes": list(ckpt["classes"]), "model_config": dict(ckpt["model_config"]),
                      "checkpoint": str(path)}
    return model.to(device).eval()


def pretrained(fused: bool = True, device="cpu") -> FERNet:
    """The shipped FERNet, in eval mode, with its metadata as `model.metadata` (classes in output
    order, input size, width, accuracies, the training command, the fercuda version)."""
    if not PRETRAINED_FILE.is_file():
        raise FileNotFoundError(f"the pretrained weights {PRETRAINED_FILE} are missing from this installation")
    ckpt = read_checkpoint(PRETRAINED_FILE)
    model = model_from_checkpoint(ckpt, PRETRAINED_FILE, fused=fused)
    model.metadata = pretrained_metadata(ckpt)
    return model.to(device).eval()


def pretrained_metadata(ckpt: dict | None = None) -> dict:
    ckpt = read_checkpoint(PRETRAINED_FILE) if ckpt is None else ckpt
    return {k: v for k, v in ckpt.items() if k != "model"}


def export_pretrained(run_dir, data, dest=PRETRAINED_FILE, batch_size: int | None = None) -> dict:
    """Write the best checkpoint of a `fercuda train` run (official split) as a weights file:
    float32 weights, no optimizer, and the metadata `pretrained()` returns. The accuracies stored
    are measured here, on `data`'s PublicTest and PrivateTest images, in float32 with the fused
    and the plain network (both must agree, or nothing is written)."""
    import json

    import fercuda
    from fercuda.data import load_faces
    from fercuda.evaluation import predict_logits

    run_dir = Path(run_dir)
    best = run_dir / "official" / "best.pt"
    ckpt = read_checkpoint(best)
    args = json.loads((run_dir / "args.json").read_text())
    faces = load_faces(data)
    if list(faces.classes) != list(ckpt["classes"]):
        raise CheckpointError(f"{data}: classes {list(faces.classes)} differ from {best}'s {list(ckpt['classes'])}")
    accuracy = {}
    for split in ("PublicTest", "PrivateTest"):
        idx = faces.indices(split)
        if len(idx) == 0:
            raise ValueError(f"{data}: no {split} images; the official split is needed to export a model")
        for fused in (True, False):
            model = model_from_checkpoint(ckpt, best, fused=fused).eval()
            pred = predict_logits(model, faces.images[idx], torch.device("cpu"), batch_size=batch_size).argmax(1)
            correct = int((pred == faces.labels[idx]).sum())
            accuracy.setdefault(split, set()).add((correct, len(idx)))
        if len(accuracy[split]) != 1:
            raise RuntimeError(f"{best}: the fused and plain networks disagree on {split}: {accuracy[split]}")
    (pub_correct, pub_n), = accuracy["PublicTest"]
    (priv_correct, priv_n), = accuracy["PrivateTest"]
    history = json.loads((run_dir / "official" / "metrics.json").read_text())
    meta = {
        "model": {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()},
        "model_config": dict(ckpt["model_config"]),
        "classes": list(ckpt["classes"]),
        "input_size": 48,
        "input": "uint8 grayscale faces (N, 1, 48, 48); the network sees fercuda.data.fer_input(x) = [canny(x), x, x]",
        "width_mult": ckpt["model_config"]["width_mult"],
        "dataset": "FER2013 (official split: trained on Training, selected on PublicTest, reported on PrivateTest)",
        "public_test_correct": pub_correct, "public_test_images": pub_n,
        "public_test_accuracy": pub_correct / pub_n,
        "private_test_correct": priv_correct, "private_test_images": priv_n,
        "private_test_accuracy": priv_correct / priv_n,
        "epoch": int(ckpt["epoch"]), "epochs_run": len(history),
        "training_minutes": round(sum(h["epoch_seconds"] for h in history) / 60, 1),
        "training_args": {k: args[k] for k in sorted(args) if k not in ("data", "out", "cache_dir", "resume")},
        "training_command": args.get("command_line"),
        "fercuda_version": fercuda.__version__,
        "torch_version": str(torch.__version__),  # a TorchVersion would not load with weights_only
    }
    from fercuda.runfiles import save_checkpoint

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dest, meta)
    return {k: v for k, v in meta.items() if k != "model"}
