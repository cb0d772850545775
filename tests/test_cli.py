"""`fastsce evaluate`: the numbers equal fastsce.evaluate on the same arrays for
.npy, .png and .tif inputs (a tiled BigTIFF streamed band by band); outputs;
and user errors (the rest of them are rows of tests/bad_inputs.py: one line
naming the file, its exit code, no output file)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

import fastsce
from fastsce.__main__ import main
from fastsce._cli import default_backend


def evaluate(*args, **kwargs):
    """fastsce.evaluate on the backend the command uses (the loss's float64 sums
    are taken in a different order by C and Numba: last bits differ)."""
    return fastsce.evaluate(*args, backend=default_backend(), **kwargs)


def masks(n=3, h=96, w=80, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, h, w)) * 2).astype(np.float32)
    z = rng.random((n, h, w)).astype(np.float32)
    return x, z


def run(capsys, *argv):
    code = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def scores(path):
    return {item["image"]: item for item in json.loads(path.read_text())["images"]}


def test_npy_png_tif_equal_evaluate(tmp_path, capsys):
    x, z = masks()
    codes = np.round(z * 65535).astype(np.uint16)
    (tmp_path / "p").mkdir()
    (tmp_path / "t").mkdir()
    np.save(tmp_path / "p/a.npy", x[0])
    np.save(tmp_path / "t/a.npy", z[0])
    np.save(tmp_path / "p/b.npy", x[1])
    Image.fromarray(codes[1]).save(tmp_path / "t/b.png")
    tifffile.imwrite(tmp_path / "p/c.tif", x[2], tile=(32, 32), compression="zlib")
    tifffile.imwrite(tmp_path / "t/c.tiff", z[2])
    code, out, err = run(capsys, tmp_path / "p", tmp_path / "t", "--json", tmp_path / "r.json",
                         "--csv", tmp_path / "r.csv")
    assert code == 0, err
    got = scores(tmp_path / "r.json")
    targets = {"a": z[0], "b": codes[1], "c": z[2]}
    for i, name in enumerate("abc"):
        ev = evaluate(x[i][None], targets[name][None])
        for key in ("cross_entropy", "kl_divergence", "target_entropy"):
            assert got[name][key] == getattr(ev, key)[0], (name, key)
        assert got[name]["valid"] == x[i].size
        assert name in out
    assert "3 images" in out and "worst by KL" in out
    assert (tmp_path / "r.csv").read_text().count("\n") == 4


def test_tiled_bigtiff_streams_bitwise(tmp_path, capsys):
    """A 64 MB tiled deflate BigTIFF, read band by band (--stream-above 1), with a
    mask and tiles: the numbers of one fastsce.evaluate call on the whole arrays."""
    rng = np.random.default_rng(1)
    h, w = 4096, 2048
    x = (rng.standard_normal((h, w)) * 2).astype(np.float32)
    z = rng.integers(0, 256, (h, w), dtype=np.uint8)
    m = rng.random((h, w)) < 0.9
    x[5, 7] = np.nan
    tifffile.imwrite(tmp_path / "x.tif", x, tile=(256, 256), compression="zlib", bigtiff=True)
    tifffile.imwrite(tmp_path / "z.tif", z, tile=(128, 512), bigtiff=True)
    np.save(tmp_path / "m.npy", m)
    code, _, err = run(capsys, tmp_path / "x.tif", tmp_path / "z.tif", "--mask",
                       tmp_path / "m.npy", "--tile", 512, 384, "--stream-above", 1,
                       "--json", tmp_path / "r.json")
    assert code == 0, err
    got = scores(tmp_path / "r.json")["x"]
    ev = evaluate(x[None], z[None], mask=m[None])
    tiles = evaluate(x[None], z[None], mask=m[None], tile_shape=(512, 384))
    for key in ("cross_entropy", "kl_divergence", "target_entropy", "valid", "nonfinite"):
        want = getattr(ev, key)[0].item()
        assert got[key] == want or got[key] is None and np.isnan(want), key
        np.testing.assert_array_equal(np.array(got["tiles"][key], np.float64),
                                      getattr(tiles, key)[0])


def test_multiclass_probabilities_and_options(tmp_path, capsys):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), (40, 30)).astype(np.float32)       # H, W, C
    target = rng.dirichlet(np.ones(3), (40, 30)).astype(np.float32)
    np.save(tmp_path / "p.npy", probs)
    np.save(tmp_path / "t.npy", target)
    weight = rng.random((40, 30)).astype(np.float32)
    np.save(tmp_path / "w.npy", weight)
    code, _, err = run(capsys, tmp_path / "p.npy", tmp_path / "t.npy", "--classes-axis", -1,
                       "--from-probs", "--weight", tmp_path / "w.npy", "--label-smoothing",
                       0.1, "--json", tmp_path / "r.json")
    assert code == 0, err
    ev = evaluate(probs[None], target[None], loss="softmax", axis=3, from_logits=False,
                          weight=weight[None], label_smoothing=0.1)
    assert scores(tmp_path / "r.json")["p"]["cross_entropy"] == ev.cross_entropy[0]


def test_pos_weight_reports_no_kl(tmp_path, capsys):
    x, z = masks(1)
    np.save(tmp_path / "p.npy", x[0])
    np.save(tmp_path / "t.npy", z[0])
    code, _, err = run(capsys, tmp_path / "p.npy", tmp_path / "t.npy", "--pos-weight", 3,
                       "--json", tmp_path / "r.json")
    assert code == 0, err
    got = scores(tmp_path / "r.json")["p"]
    want = fastsce.sigmoid_cross_entropy(x[0], z[0], pos_weight=3.0, grad=False).loss
    assert got["cross_entropy"] == pytest.approx(want, rel=1e-12)
    assert got["kl_divergence"] is None


def test_sample_writes_heatmaps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "--images", 2, "--size", 128)
    assert code == 0, err
    assert "sample_1" in out and "worst" in out
    maps = sorted(os.listdir(tmp_path / "fastsce-maps"))
    assert maps == [f"sample_{i}_{k}.png" for i in range(2) for k in ("grad", "loss", "tiles")]
    with Image.open(tmp_path / "fastsce-maps/sample_0_loss.png") as im:
        assert im.mode == "RGB" and im.size[0] > 128
        rgb = np.asarray(im)[24:24 + 128, :128].astype(int)
    # the loss is high (bright) somewhere: the wrong region and the soft borders
    assert rgb.sum(axis=2).max() > 500 and np.median(rgb.sum(axis=2)) < 100


def test_python_m_runs_the_sample(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastsce", "evaluate", "--images", "1",
                           "--size", "64"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "sample_0" in done.stdout and done.stderr == ""    # no progress in piped output


def test_uint8_predictions_need_from_probs(tmp_path, capsys):
    z = (np.random.default_rng(3).random((20, 20)) * 255).astype(np.uint8)
    Image.fromarray(z).save(tmp_path / "p.png")
    Image.fromarray(z).save(tmp_path / "t.png")
    code, _, err = run(capsys, tmp_path / "p.png", tmp_path / "t.png")
    assert code == 4 and "--from-probs" in err and "p.png" in err
    code, out, err = run(capsys, tmp_path / "p.png", tmp_path / "t.png", "--from-probs")
    assert code == 0, err
    ev = evaluate((z / np.float32(255)).astype(np.float32)[None], z[None],
                          from_logits=False)
    assert f"{ev.cross_entropy[0]:.6g}" in out


def test_missing_extra_says_which_pip_install(tmp_path):
    np.save(tmp_path / "p.npy", np.zeros((4, 4), np.float32))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "t.png")
    code = ("import sys; sys.modules['PIL'] = None; from fastsce.__main__ import main; "
            f"sys.exit(main(['evaluate', r'{tmp_path / 'p.npy'}', r'{tmp_path / 't.png'}']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert "pip install 'fastsce[cli]'" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.slow
def test_4gb_tiled_tiff_bounded_memory(tmp_path):
    """A 4 GiB float32 tiled BigTIFF (and a 1 GiB uint8 target) evaluated with under
    1 GB of anonymous memory (the peak RssAnon of the child process)."""
    side, t = 32768, 512
    rng = np.random.default_rng(0)
    pool_x = (rng.standard_normal((17, t, t)) * 2).astype(np.float32)
    pool_z = rng.integers(0, 256, (17, t, t), dtype=np.uint8)
    count = (side // t) ** 2
    # tiles from a small pool, so writing the file takes seconds, not a 4 GiB array
    tifffile.imwrite(tmp_path / "x.tif", (pool_x[i % 17] for i in range(count)),
                     shape=(side, side), dtype=np.float32, tile=(t, t), bigtiff=True)
    tifffile.imwrite(tmp_path / "z.tif", (pool_z[i % 13] for i in range(count)),
                     shape=(side, side), dtype=np.uint8, tile=(t, t), bigtiff=True)
    code = ("import sys, threading, time\n"
            "from fastsce.__main__ import main\n"
            "peak = [0]\n"
            "def watch():\n"
            "    while True:\n"
            "        for line in open('/proc/self/status'):\n"
            "            if line.startswith('RssAnon'):\n"
            "                peak[0] = max(peak[0], int(line.split()[1]))\n"
            "        time.sleep(0.05)\n"
            "threading.Thread(target=watch, daemon=True).start()\n"
            f"rc = main(['evaluate', r'{tmp_path / 'x.tif'}', r'{tmp_path / 'z.tif'}', "
            f"'--tile', '1024', '1024', '--save-maps', r'{tmp_path / 'maps'}'])\n"
            "print('PEAK_KB', peak[0])\n"
            "sys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.split("PEAK_KB")[1])
    print(done.stdout)
    assert peak < 1_000_000, peak
