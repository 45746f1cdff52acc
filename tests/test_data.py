import cv2
import numpy as np
import pytest
import torch

from fercuda.data import DataError, augment, datasets, fer_input, kfold_assignments, load_faces

# fer2013.csv's label order, as published with the Kaggle challenge.
KAGGLE_LABELS = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


def random_faces(rng, n, size=48):
    return torch.randint(0, 256, (n, size, size), generator=rng, dtype=torch.uint8).numpy()


def write_csv(path, rows, header=("emotion", "pixels", "Usage")):
    """rows: (label, pixel string, usage). Column order follows header, matched by stripped name."""
    lines = [",".join(header)]
    for label, pixels, usage in rows:
        by_name = {"emotion": str(label), "pixels": f'"{pixels}"' if " " in pixels else pixels, "usage": usage}
        lines.append(",".join(by_name[h.strip().lower()] for h in header))
    path.write_text("\n".join(lines) + "\n")


def pixel_string(face):
    return " ".join(str(v) for v in face.reshape(-1))


def good_rows(rng, n):
    faces = random_faces(rng, n)
    labels = torch.randint(0, 7, (n,), generator=rng).tolist()
    usages = [("Training", "PublicTest", "PrivateTest")[i % 3] for i in range(n)]
    return faces, labels, usages


@pytest.mark.parametrize("header", [("emotion", "pixels", "Usage"), ("emotion", " Usage", " pixels")],
                         ids=["kaggle", "icml"])
def test_csv_formats(tmp_path, rng, header):
    faces, labels, usages = good_rows(rng, 9)
    path = tmp_path / "faces.csv"
    write_csv(path, [(y, pixel_string(f), u) for f, y, u in zip(faces, labels, usages)], header)
    data = load_faces(path, cache_dir=tmp_path / "cache")
    assert data.images.dtype == torch.uint8 and data.images.shape == (9, 1, 48, 48)
    assert data.labels.dtype == torch.int64
    assert np.array_equal(data.images[:, 0].numpy(), faces)
    assert data.labels.tolist() == labels
    assert data.splits.tolist() == usages
    assert [c.lower() for c in KAGGLE_LABELS] == list(data.classes)
    assert data.skipped == 0


BAD_CSV_ROWS = {
    "wrong pixel count": (3, "1 2 3", "Training"),
    "non-numeric": (3, " ".join(["7"] * 2303 + ["x"]), "Training"),
    "label out of range": (7, " ".join(["7"] * 2304), "Training"),
    "negative label": (-1, " ".join(["7"] * 2304), "Training"),
    "pixel above 255": (2, " ".join(["7"] * 2303 + ["256"]), "Training"),
    "unknown usage": (2, " ".join(["7"] * 2304), "Validation"),
}


@pytest.mark.parametrize("bad", list(BAD_CSV_ROWS))
def test_csv_bad_rows(tmp_path, rng, bad):
    faces, labels, usages = good_rows(rng, 3)
    rows = [(y, pixel_string(f), u) for f, y, u in zip(faces, labels, usages)]
    rows.insert(1, BAD_CSV_ROWS[bad])  # line 3 of the file
    path = tmp_path / "faces.csv"
    write_csv(path, rows)
    with pytest.raises(DataError, match=r"faces\.csv: row 3"):
        load_faces(path, on_error="raise", cache=False)
    data = load_faces(path, on_error="skip", cache=False)
    assert data.skipped == 1 and "row 3" in data.problems[0]
    assert data.labels.tolist() == labels
    assert np.array_equal(data.images[:, 0].numpy(), faces)


def test_csv_without_needed_columns(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("label,values\n1,2\n")
    with pytest.raises(DataError, match="emotion and pixels"):
        load_faces(path, cache=False)


def write_image(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def test_folder_layout_maps_class_names_explicitly(tmp_path, rng):
    # Folder names as various copies of FER2013 spell them, and the Kaggle label each must get.
    kaggle = KAGGLE_LABELS.index
    folders = {"Angry": kaggle("Angry"), "disgusted": kaggle("Disgust"), "scared": kaggle("Fear"),
               "happiness": kaggle("Happy"), "sad": kaggle("Sad"), "surprised": kaggle("Surprise"),
               "neutral": kaggle("Neutral")}
    expected = {}
    faces = random_faces(rng, 3 * len(folders))
    i = 0
    for name, label in folders.items():
        for top, prefix in (("train", "Training"), ("test", "PublicTest"), ("test", "PrivateTest")):
            path = tmp_path / "fer" / top / name / f"{prefix}_{1000 + i}.png"
            write_image(path, faces[i])
            expected[faces[i].tobytes()] = (label, prefix)
            i += 1
    data = load_faces(tmp_path / "fer", cache=False)
    assert len(data) == len(expected)
    for image, label, split in zip(data.images, data.labels, data.splits):
        assert expected[image[0].numpy().tobytes()] == (int(label), str(split))


@pytest.mark.parametrize("bad", ["corrupt", "wrong size", "unknown class"])
def test_folder_bad_files(tmp_path, rng, bad):
    root = tmp_path / "fer"
    faces = random_faces(rng, 2)
    write_image(root / "train" / "happy" / "Training_1.png", faces[0])
    write_image(root / "test" / "sad" / "PrivateTest_2.png", faces[1])
    if bad == "corrupt":
        culprit = root / "train" / "happy" / "Training_3.png"
        culprit.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(torch.randint(0, 256, (64,), generator=rng).tolist()))
    elif bad == "wrong size":
        culprit = root / "train" / "happy" / "Training_4.png"
        write_image(culprit, random_faces(rng, 1, size=64)[0])
    else:
        culprit = root / "train" / "bored"
        write_image(culprit / "Training_5.png", faces[0])
    with pytest.raises(DataError, match=culprit.name):
        load_faces(root, on_error="raise", cache=False)
    data = load_faces(root, on_error="skip", cache=False)
    assert data.skipped == 1 and culprit.name in data.problems[0]
    assert sorted(data.labels.tolist()) == [3, 4]


def make_ckplus(root, rng, subjects=12):
    classes = ["anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise"]
    for s in range(subjects):
        for k in range(1 + s % 3):
            cls = classes[(s + k) % len(classes)]
            for frame in range(3):
                write_image(root / cls / f"S{100 + s:03d}_{k + 1:03d}_{frame:08d}.png", random_faces(rng, 1)[0])
    return classes


def test_ckplus_folds_keep_subjects_together(tmp_path, rng):
    classes = make_ckplus(tmp_path / "ck", rng)
    data = load_faces(tmp_path / "ck", cache=False)
    assert list(data.classes) == classes
    assert data.images.shape[1:] == (1, 48, 48)
    assert set(data.subjects.tolist()) == {f"S{100 + s:03d}" for s in range(12)}
    assert data.labels.min() >= 0 and data.labels.max() < 7
    folds = kfold_assignments(len(data), 5, seed=int(torch.randint(0, 1000, (1,), generator=rng)),
                              groups=data.subjects)
    assert set(folds.tolist()) == set(range(5))
    for subject in set(data.subjects.tolist()):
        assert len(set(folds[data.subjects == subject].tolist())) == 1, subject


def test_ckplus_bad_names(tmp_path, rng):
    make_ckplus(tmp_path / "ck", rng, subjects=3)
    write_image(tmp_path / "ck" / "happy" / "frame_1.png", random_faces(rng, 1)[0])
    with pytest.raises(DataError, match="frame_1.png"):
        load_faces(tmp_path / "ck", format="ckplus", cache=False)
    assert load_faces(tmp_path / "ck", format="ckplus", on_error="skip", cache=False).skipped == 1


def test_stratified_folds_cover_every_sample_once(rng):
    labels = torch.randint(0, 7, (200,), generator=rng).numpy()
    folds = kfold_assignments(200, 10, seed=3, labels=labels)
    sizes = np.bincount(folds, minlength=10)
    assert sizes.sum() == 200 and sizes.min() >= 15


def test_cache_is_used_on_second_load(tmp_path, rng, monkeypatch):
    faces, labels, usages = good_rows(rng, 4)
    path = tmp_path / "faces.csv"
    write_csv(path, [(y, pixel_string(f), u) for f, y, u in zip(faces, labels, usages)])
    first = load_faces(path, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def must_not_decode(*args):
        raise AssertionError("the source was decoded again")

    monkeypatch.setitem(datasets._DECODERS, "csv", must_not_decode)
    second = load_faces(path, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.splits.tolist() == usages
    # A changed source is decoded afresh.
    with open(path, "a") as f:
        f.write(f'0,"{pixel_string(faces[0])}",Training\n')
    with pytest.raises(AssertionError, match="decoded again"):
        load_faces(path, cache_dir=tmp_path / "cache")


def test_fer_input_is_canny_and_image(rng):
    batch = torch.randint(0, 256, (5, 1, 48, 48), generator=rng, dtype=torch.uint8)
    batch[:, :, 10:30, 12:36] = 200  # a block, so there are edges
    m = fer_input(batch)
    assert m.shape == (5, 3, 48, 48) and m.dtype == torch.float32
    for i in range(5):
        img = batch[i, 0].numpy()
        edges = cv2.Canny(cv2.GaussianBlur(img, (5, 5), 0), 50, 150)
        assert np.array_equal(((m[i, 0].numpy() + 1) * 127.5).round(), edges.astype(np.float64))
    expected = batch[:, 0].float() / 127.5 - 1
    torch.testing.assert_close(m[:, 1], expected)
    torch.testing.assert_close(m[:, 2], expected)
    with pytest.raises(ValueError, match="uint8"):
        fer_input(batch.float())


def test_augment_flip_only_is_a_flip(rng):
    batch = torch.randint(0, 256, (16, 1, 48, 48), generator=rng, dtype=torch.uint8)
    out = augment(batch, rng, max_shift=0, max_degrees=0, flip=True)
    flipped = 0
    for a, b in zip(out, batch):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
        flipped += not torch.equal(a, b)
    assert 0 < flipped < 16  # chance of failing: 2 * 2**-16
    assert torch.equal(augment(batch, rng, max_shift=0, max_degrees=0, flip=False), batch)


def test_augment_shifts_and_rotates(rng):
    batch = torch.randint(0, 256, (8, 1, 48, 48), generator=rng, dtype=torch.uint8)
    out = augment(batch, rng)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert not torch.equal(out, batch)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        augment(batch[:, 0])
