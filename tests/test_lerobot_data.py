"""A LeRobot dataset directory as calibration data (`duquant.lerobot_data`): tiny datasets written here in the v2.1
and the v3.0 layout (parquet with pyarrow, mp4 with PyAV; every frame a solid colour, so the decoded frame is
checkable after lossy encoding), read back frame by frame, turned into observations, and used by `duquant quantize
--calib DIR` and `duquant report --calib DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

from duquant import lerobot_data as ld  # noqa: E402
from duquant.cli import main  # noqa: E402
from duquant.models import load_observations  # noqa: E402
from duquant.models.config import get_config  # noqa: E402
from duquant.models.tokenizer import load_tokenizer  # noqa: E402
from duquant.serve.policy import PolicySpec  # noqa: E402

FPS = 10
TASKS = ["pick up the red block", "open the top drawer"]
LENGTHS = [3, 4]  # frames of episode 0 and 1
EPISODE_TASK = [0, 1]
BASE, WRIST = "observation.images.image", "observation.images.wrist_image"
TOP = "observation.images.top"
SIZES = {BASE: (48, 64), WRIST: (64, 64), TOP: (64, 64)}  # (H, W): the base camera is not square (resize with pad)
CFG = get_config("pi0-tiny")
SPEC = PolicySpec(config="pi0-tiny", robot="generic")


def color(camera: str, position: int) -> np.ndarray:
    """The solid colour of the dataset's frame `position` (over all episodes) on `camera`: far apart per frame."""
    return np.array([20 + 30 * position, 230 - 28 * position, 40 if camera == BASE else 200], dtype=np.uint8)


def state(position: int) -> np.ndarray:
    return (np.arange(8, dtype=np.float32) * 0.1 + position).astype(np.float32)


def frames_of(episode: int) -> range:
    start = sum(LENGTHS[:episode])
    return range(start, start + LENGTHS[episode])


def write_video(path: Path, camera: str, positions, codec: str = "libx264") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = SIZES[camera]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for p in positions:
            frame = av.VideoFrame.from_ndarray(np.broadcast_to(color(camera, p), (h, w, 3)).copy(), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def png(camera: str, position: int) -> bytes:
    h, w = SIZES[camera]
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = w, h, "rgb24"
    frame = av.VideoFrame.from_ndarray(np.broadcast_to(color(camera, position), (h, w, 3)).copy(), format="rgb24")
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


def features(image_cameras=(), cameras=(BASE, WRIST)) -> dict:
    out = {"observation.state": {"dtype": "float32", "shape": [8], "names": None},
           "action": {"dtype": "float32", "shape": [7], "names": None}}
    for cam in cameras:
        h, w = SIZES[cam]
        out[cam] = {"dtype": "image" if cam in image_cameras else "video", "shape": [h, w, 3],
                    "names": ["height", "width", "channels"]}
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        out[name] = {"dtype": "float32" if name == "timestamp" else "int64", "shape": [1], "names": None}
    return out


def rows_table(episodes, image_cameras=()) -> pa.Table:
    cols: dict[str, list] = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index",
                                             "episode_index", "index", "task_index", *image_cameras)}
    for ep in episodes:
        for fi, p in enumerate(frames_of(ep)):
            cols["observation.state"].append(state(p).tolist())
            cols["action"].append([0.0] * 7)
            cols["timestamp"].append(fi / FPS)
            cols["frame_index"].append(fi)
            cols["episode_index"].append(ep)
            cols["index"].append(p)
            cols["task_index"].append(EPISODE_TASK[ep])
            for cam in image_cameras:
                cols[cam].append({"bytes": png(cam, p), "path": f"frame_{p:06d}.png"})
    arrays = {k: pa.array(v, type=pa.float32() if k == "timestamp" else None) for k, v in cols.items()}
    arrays["observation.state"] = pa.array(cols["observation.state"], type=pa.list_(pa.float32()))
    return pa.table(arrays)


def info(version: str, image_cameras=(), cameras=(BASE, WRIST)) -> dict:
    v2 = version.startswith("v2")
    return {"codebase_version": version, "robot_type": "panda", "total_episodes": len(LENGTHS),
            "total_frames": sum(LENGTHS), "total_tasks": len(TASKS), "chunks_size": 1000, "fps": FPS,
            "splits": {"train": f"0:{len(LENGTHS)}"},
            "data_path": ("data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet" if v2
                          else "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"),
            "video_path": ("videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4" if v2
                           else "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"),
            "features": features(image_cameras, cameras)}


def write_v21(root: Path, image_cameras=(), cameras=(BASE, WRIST), codec="libx264") -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info("v2.1", image_cameras, cameras)))
    (root / "meta" / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                       for i, t in enumerate(TASKS)))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": ep, "tasks": [TASKS[EPISODE_TASK[ep]]], "length": n}) + "\n"
        for ep, n in enumerate(LENGTHS)))
    for ep in range(len(LENGTHS)):
        path = root / f"data/chunk-000/episode_{ep:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_table([ep], image_cameras), path)
        for cam in cameras:
            if cam not in image_cameras:
                write_video(root / f"videos/chunk-000/{cam}/episode_{ep:06d}.mp4", cam, frames_of(ep), codec)
    return root


def write_v30(root: Path, image_cameras=(), cameras=(BASE, WRIST), codec="libx264") -> Path:
    """Both episodes in one data file and one video file per camera (episode 1 starts at 0.3 s in it)."""
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info("v3.0", image_cameras, cameras)))
    # as pandas writes LeRobot's tasks DataFrame (index "task"): a task_index column and a "task" column
    pq.write_table(pa.table({"task_index": list(range(len(TASKS))), "task": TASKS}), root / "meta/tasks.parquet")
    path = root / "data/chunk-000/file-000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(rows_table(range(len(LENGTHS)), image_cameras), path)
    videos = [c for c in cameras if c not in image_cameras]
    for cam in videos:
        write_video(root / f"videos/{cam}/chunk-000/file-000.mp4", cam, range(sum(LENGTHS)), codec)
    eps: dict[str, list] = {"episode_index": [], "tasks": [], "length": [], "data/chunk_index": [],
                            "data/file_index": [], "dataset_from_index": [], "dataset_to_index": [],
                            "stats/observation.state/mean": []}
    for ep, n in enumerate(LENGTHS):
        start = sum(LENGTHS[:ep])
        for k, v in (("episode_index", ep), ("tasks", [TASKS[EPISODE_TASK[ep]]]), ("length", n),
                     ("data/chunk_index", 0), ("data/file_index", 0), ("dataset_from_index", start),
                     ("dataset_to_index", start + n), ("stats/observation.state/mean", [0.0] * 8)):
            eps[k].append(v)
        for cam in videos:
            for k, v in (("chunk_index", 0), ("file_index", 0), ("from_timestamp", start / FPS),
                         ("to_timestamp", (start + n) / FPS)):
                eps.setdefault(f"videos/{cam}/{k}", []).append(v)
    pq.write_table(pa.table(eps), root / "meta/episodes/chunk-000/file-000.parquet")
    return root


@pytest.fixture(params=["v2.1", "v3.0"])
def dataset(request, tmp_path) -> Path:
    return (write_v21 if request.param == "v2.1" else write_v30)(tmp_path / request.param)


def load(root, frames=100, batch_size=4, **kw) -> ld.LoadResult:
    return ld.load_calibration(root, CFG, SPEC, frames=frames, batch_size=batch_size, **kw)


def pixel(obs, camera: str, i: int) -> np.ndarray:
    """The centre pixel of observation row i, back in uint8."""
    x = obs.images[camera][i, :, 112, 112]
    return ((x + 1) / 2 * 255).numpy()


def test_frames_map_to_episode_task_prompt_state_and_image(dataset):
    result = load(dataset)
    assert [(f.episode, f.frame_index) for f in result.frames] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
                                                                    (1, 2), (1, 3)]
    assert [f.task for f in result.frames] == [TASKS[0]] * 3 + [TASKS[1]] * 4
    obs = type(result.batches[0]).concat(result.batches)
    assert [o.batch_size for o in result.batches] == [4, 3]
    tok = load_tokenizer(None, max_len=CFG.max_token_len, vocab_size=CFG.llm.vocab_size)
    for p, f in enumerate(result.frames):
        tokens, mask = tok.tokenize(f.task)
        assert torch.equal(obs.tokenized_prompt[p], torch.from_numpy(tokens))
        assert torch.equal(obs.tokenized_prompt_mask[p], torch.from_numpy(mask))
        np.testing.assert_array_equal(obs.state[p, :8].numpy(), state(p))  # no norm stats: the raw state
        assert not obs.state[p, 8:].any()  # padded to the model's 32
        for cam, key in (("base_0_rgb", BASE), ("left_wrist_0_rgb", WRIST)):
            np.testing.assert_allclose(pixel(obs, cam, p), color(key, p), atol=8)
    # the other episode's frames are far away in colour: the right frame was decoded
    assert np.abs(pixel(obs, "base_0_rgb", 4) - color(BASE, 3)).max() > 20
    assert obs.image_masks["base_0_rgb"].all() and obs.image_masks["left_wrist_0_rgb"].all()
    assert not obs.image_masks["right_wrist_0_rgb"].any()  # no dataset camera feeds it: masked, black
    assert (obs.images["right_wrist_0_rgb"] == -1).all()
    assert (obs.images["base_0_rgb"][:, :, 0, :] == -1).all()  # 48x64 padded to 224x224: black bars on top
    assert "LeRobot" in result.source and "2 episodes" in result.source


def test_both_layouts_give_the_same_observations(tmp_path):
    a = load(write_v21(tmp_path / "v21"), batch_size=7).batches[0]
    b = load(write_v30(tmp_path / "v30"), batch_size=7).batches[0]
    for (name, x), (name_b, y) in zip(a.named_tensors(), b.named_tensors()):
        assert name == name_b
        if name.startswith("images."):
            assert (x - y).abs().max() <= 8 / 255 * 2, name  # separate lossy encodes of the same frames
        else:
            assert torch.equal(x, y), name


def test_camera_map_and_masking(dataset):
    obs = load(dataset, camera_map=f"{WRIST}=base").batches[0]
    np.testing.assert_allclose(pixel(obs, "base_0_rgb", 1), color(WRIST, 1), atol=8)
    assert obs.image_masks["base_0_rgb"].all()
    assert not obs.image_masks["left_wrist_0_rgb"].any() and not obs.image_masks["right_wrist_0_rgb"].any()

    obs = load(dataset, camera_map=f"{BASE}=right_wrist_0_rgb, {WRIST}=left_wrist").batches[0]
    np.testing.assert_allclose(pixel(obs, "right_wrist_0_rgb", 2), color(BASE, 2), atol=8)
    np.testing.assert_allclose(pixel(obs, "left_wrist_0_rgb", 2), color(WRIST, 2), atol=8)
    assert not obs.image_masks["base_0_rgb"].any() and obs.image_masks["right_wrist_0_rgb"].all()


def test_sampling_even_and_random(dataset):
    ds = ld.LeRobotDataset(dataset)
    assert ds.total_frames == 7
    assert ds.sample(3) == [(0, 1), (1, 0), (1, 2)]  # midpoints of 3 equal spans of the 7 frames
    assert len(ds.sample(100)) == 7
    r1, r2 = ds.sample(4, "random", seed=1), ds.sample(4, "random", seed=1)
    assert r1 == r2 and len(set(r1)) == 4
    assert any(ds.sample(4, "random", seed=s) != r1 for s in range(2, 6))
    result = load(dataset, frames=3, batch_size=2)
    assert [(f.episode, f.frame_index) for f in result.frames] == [(0, 1), (1, 0), (1, 2)]
    np.testing.assert_allclose(pixel(result.batches[1], "base_0_rgb", 0), color(BASE, 5), atol=8)


def test_image_features_in_parquet(tmp_path):
    """Cameras of dtype image (encoded pictures in the parquet rows) next to video cameras, both layouts."""
    for write in (write_v21, write_v30):
        root = write(tmp_path / write.__name__, image_cameras=(WRIST,))
        obs = load(root).batches[1]
        np.testing.assert_array_equal(pixel(obs, "left_wrist_0_rgb", 2).round(), color(WRIST, 6))  # PNG: lossless
        np.testing.assert_allclose(pixel(obs, "base_0_rgb", 2), color(BASE, 6), atol=8)


def test_av1_video(tmp_path):
    """LeRobot encodes with SVT-AV1 by default."""
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this PyAV build has no AV1 encoder")
    obs = load(write_v30(tmp_path / "av1", codec="libsvtav1"), frames=2).batches[0]
    np.testing.assert_allclose(pixel(obs, "base_0_rgb", 1), color(BASE, 5), atol=10)


def test_clear_errors(tmp_path, dataset):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ld.DatasetError, match="not a LeRobot dataset.*meta/info.json"):
        load(tmp_path / "plain")
    with pytest.raises(ld.DatasetError, match="does not exist"):
        load(tmp_path / "nowhere")

    old = write_v21(tmp_path / "old")
    meta = json.loads((old / "meta/info.json").read_text())
    (old / "meta/info.json").write_text(json.dumps({**meta, "codebase_version": "v1.6"}))
    with pytest.raises(ld.DatasetError, match=r"'v1.6' is not supported.*v2.1.*v3.0.*convert"):
        load(old)

    with pytest.raises(ld.DatasetError, match=r"no camera 'observation.images.top'.*observation.images.image"):
        load(dataset, camera_map="observation.images.top=base")
    with pytest.raises(ld.DatasetError, match="not a camera of the model"):
        load(dataset, camera_map=f"{BASE}=top_0_rgb")
    with pytest.raises(ld.DatasetError, match="not DATASET_KEY=MODEL_CAMERA"):
        load(dataset, camera_map=BASE)
    with pytest.raises(ld.DatasetError, match="feeds 'base_0_rgb' twice"):
        load(dataset, camera_map=f"{BASE}=base,{WRIST}=base")
    with pytest.raises(ld.DatasetError, match=r"no state feature 'joints'.*observation.state.*--state-key"):
        load(dataset, state_key="joints")
    with pytest.raises(ld.DatasetError, match="unknown frame sampling"):
        load(dataset, sampling="first")

    top = write_v30(tmp_path / "top", cameras=(TOP,))
    with pytest.raises(ld.DatasetError, match=r"none of the default cameras.*'observation.images.top'.*--camera-map"):
        load(top)


def test_missing_files_and_bad_video_times(tmp_path):
    root = write_v21(tmp_path / "v21")
    (root / f"videos/chunk-000/{WRIST}/episode_000001.mp4").unlink()
    with pytest.raises(ld.DatasetError, match="episode_000001.mp4 is missing"):
        load(root)
    video = root / f"videos/chunk-000/{BASE}/episode_000000.mp4"
    frames = ld.decode_video_frames(video, [0.2, 0.0, 0.1], tolerance=0.05)
    for got, p in zip(frames, (2, 0, 1)):
        np.testing.assert_allclose(got[10, 10], color(BASE, p), atol=8)
    with pytest.raises(ld.DatasetError, match="no frame within 50.0 ms of 2.0000 s"):
        ld.decode_video_frames(video, [2.0], tolerance=0.05)


def test_decode_seeks_through_a_long_video(tmp_path):
    """Frames far apart in a 12 s video with a keyframe every 12 frames: each query seeks, in any order."""
    path = tmp_path / "long.mp4"
    paint = lambda i: np.array([(i % 8) * 32 + 8, (i // 8) * 16 + 8, 128], dtype=np.uint8)  # noqa: E731
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"g": "12"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(120):
            frame = av.VideoFrame.from_ndarray(np.broadcast_to(paint(i), (32, 32, 3)).copy(), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    wanted = [95, 3, 40, 41, 119, 0, 77, 12]
    got = ld.decode_video_frames(path, [i / FPS + 0.01 for i in wanted], tolerance=0.05)
    for i, image in zip(wanted, got):
        np.testing.assert_allclose(image[16, 16], paint(i), atol=6)


def test_quantize_cli_calibrates_on_the_dataset(tmp_path, capsys):
    root = write_v30(tmp_path / "ds")
    common = ["quantize", "--config", "pi0-tiny", "--preset", "dit", "--rotation-steps", "4", "--block-size", "32",
              "--batch-size", "2", "--calib-steps", "2"]
    assert main([*common, "--calib", str(root), "--packdir", str(tmp_path / "p1"),
                 "--out", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert f"calibration: 4 observations from LeRobot v3.0 dataset {root} (4 frames of 2 episodes, even" in out
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["data"]["calib_observations"] == 4 and a["data"]["calibration"].startswith("LeRobot v3.0 dataset")

    # the same frames as an observation file calibrate to the same quantized model; synthetic data does not
    same = load(root, frames=4, batch_size=2)
    from duquant.models import save_observations

    obs_file = save_observations(tmp_path / "same.safetensors", type(same.batches[0]).concat(same.batches))
    assert torch.equal(load_observations(obs_file).state, torch.cat([b.state for b in same.batches]))
    assert main([*common, "--calib", str(obs_file), "--packdir", str(tmp_path / "p2"),
                 "--out", str(tmp_path / "b.json")]) == 0
    assert main([*common, "--packdir", str(tmp_path / "p3"), "--out", str(tmp_path / "c.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    c = json.loads((tmp_path / "c.json").read_text())
    assert a["action_rel_mse"] == b["action_rel_mse"] != c["action_rel_mse"]

    # --calib-frames, random sampling, a camera map, through the flags
    assert main([*common, "--calib", str(root), "--packdir", str(tmp_path / "p4"), "--calib-frames", "3",
                 "--frame-sampling", "random", "--data-seed", "5", "--camera-map", f"{WRIST}=base", "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "3 frames of" in out and "random seed 5" in out and f"cameras {WRIST} -> base_0_rgb" in out
    assert "masked left_wrist_0_rgb, right_wrist_0_rgb" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    args = ["quantize", "--config", "pi0-tiny", "--preset", "dit", "--no-eval", "--packdir", str(tmp_path / "p")]
    assert main([*args, "--calib", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a LeRobot dataset" in err[0]
    root = write_v21(tmp_path / "ds")
    assert main([*args, "--calib", str(root), "--camera-map", "observation.images.top=base"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its cameras are ['observation.images.image', 'observation.images.wrist_image']" in err[0]


def test_report_cli_calibrates_on_the_dataset(tmp_path):
    root = write_v21(tmp_path / "ds")
    out = tmp_path / "rep"
    assert main(["report", "--config", "pi0-tiny", "--parts", "dit", "--methods", "rtn", "--calib", str(root),
                 "--calib-batches", "1", "--eval-batches", "1", "--batch-size", "2", "--no-plot", "--quiet",
                 "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())["data"]
    assert data["calibration"].startswith(f"LeRobot v2.1 dataset {root} (2 frames of 2 episodes")
    assert data["calib_batches"] == 1
