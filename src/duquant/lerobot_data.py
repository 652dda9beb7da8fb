"""A LeRobot dataset directory as calibration observations for pi0 / pi0.5 (`duquant quantize --calib DIR`,
`duquant report --calib DIR`).

A directory holding `meta/info.json` is a LeRobot dataset; its `codebase_version` picks the layout:
  v2.0 / v2.1  one episode per file: `data/chunk-000/episode_000000.parquet`,
               `videos/chunk-000/<video_key>/episode_000000.mp4` (the `data_path` / `video_path` templates of
               info.json, chunk = episode_index // chunks_size); `meta/episodes.jsonl` (episode_index, tasks,
               length), `meta/tasks.jsonl` (task_index, task)
  v3.0         several episodes per file: `data/chunk-000/file-000.parquet`,
               `videos/<video_key>/chunk-000/file-000.mp4`;
               `meta/episodes/chunk-000/file-000.parquet` gives each episode its data and video files
               (`data/chunk_index`, `videos/<key>/file_index`, ...) and where it starts in each video
               (`videos/<key>/from_timestamp`); `meta/tasks.parquet` (task_index, task)
A frame is a parquet row (episode_index, frame_index, timestamp, task_index, the state, and for cameras of dtype
`image` the encoded picture); a camera of dtype `video` is the video frame nearest the row's timestamp (plus the
episode's from_timestamp in v3.0), decoded with PyAV. Parquet is read with pyarrow. Both come with the
`lerobot-data` extra; nothing else of LeRobot is needed.

Frames become model inputs exactly as `duquant record libero` makes them: the server's preprocessing
(`duquant.serve.policy.build_preprocessor`, a generic robot) normalises the state with the checkpoint's norm stats,
resizes the images with padding, writes the frame's task as the prompt with the model's tokenizer, and masks the
model cameras no dataset camera feeds. Which dataset camera feeds which model camera is `--camera-map`
(default, LIBERO-style: `observation.images.image` -> base_0_rgb, `observation.images.wrist_image` ->
left_wrist_0_rgb, or openpi's `image` / `wrist_image` names); `--calib-frames` frames are drawn from the whole
dataset, evenly spaced (default) or at random with the command's data seed.

Only the standard library and numpy are imported here at start-up (the CLI's parser reads `add_cli_args`).
"""

from __future__ import annotations

import argparse
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

EXTRA = "lerobot-data"
LAYOUTS = {"v2.0": 2, "v2.1": 2, "v3.0": 3}  # codebase_version -> layout
MODEL_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
CAMERA_ALIASES = {"base": "base_0_rgb", "left_wrist": "left_wrist_0_rgb", "right_wrist": "right_wrist_0_rgb"}
# LIBERO-style defaults: model camera <- the first of these dataset keys the dataset has (LeRobot's names, then
# the names of openpi's LIBERO conversion).
DEFAULT_CAMERAS = (("base_0_rgb", ("observation.images.image", "image")),
                   ("left_wrist_0_rgb", ("observation.images.wrist_image", "wrist_image")))
DEFAULT_STATE_KEYS = ("observation.state", "state")
SAMPLINGS = ("even", "random")
RESEEK_GAP_S = 1.0  # a query this far past the decoded position seeks again instead of decoding through


class DatasetError(ValueError):
    """A dataset directory or option that cannot be read as asked; the message names the fix."""


def is_dataset(path: str | Path) -> bool:
    return Path(path, "meta", "info.json").is_file()


def check_dataset_dir(path: str | Path) -> None:
    """DatasetError unless `path` is a LeRobot dataset directory (one holding meta/info.json)."""
    if not is_dataset(path):
        what = "does not exist" if not Path(path).exists() else "has no meta/info.json"
        raise DatasetError(f"{path} is not a LeRobot dataset ({what}); --calib takes a LeRobot dataset directory "
                           "(meta/info.json, data/, videos/) or an observation file (.safetensors / .npz, "
                           "docs/report.md)")


def _pyarrow():
    import pyarrow.parquet as pq

    return pq


def _av():
    import av

    return av


def require_extra() -> None:
    """Import the extra's readers now: a missing one fails before any reading, naming the lerobot-data extra
    (`duquant.cli.missing_extra`), not the serve extra whose preprocessing the extra also installs."""
    _pyarrow(), _av()


@dataclass(frozen=True)
class Episode:
    index: int
    length: int
    tasks: tuple[str, ...]
    data_file: Path
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # video key -> (file, start in it, s)


@dataclass
class Frame:
    episode: int
    frame_index: int
    timestamp: float
    task: str
    state: np.ndarray
    images: dict[str, np.ndarray]  # dataset camera key -> (H, W, 3) uint8


class LeRobotDataset:
    """The metadata of a LeRobot dataset directory (v2.x or v3.0) and a reader of chosen frames."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        check_dataset_dir(self.root)
        info_path = self.root / "meta" / "info.json"
        try:
            self.info = json.loads(info_path.read_text())
        except ValueError as err:
            raise DatasetError(f"{info_path} is not valid JSON ({err})") from err
        self.version = str(self.info.get("codebase_version"))
        if self.version not in LAYOUTS:
            raise DatasetError(
                f"{self.root}: codebase_version {self.version!r} is not supported (readable: {sorted(LAYOUTS)}); "
                "convert the dataset with LeRobot's converters (lerobot.scripts.convert_dataset_v21_to_v30 "
                "writes v3.0)")
        self.layout = LAYOUTS[self.version]
        self.features: dict[str, dict] = self.info.get("features") or {}
        self.fps = float(self.info.get("fps") or 0)
        if self.fps <= 0 or not self.features:
            raise DatasetError(f"{info_path} lacks 'fps' or 'features'; it is not a LeRobot dataset's info.json")
        self.tasks = self._read_tasks()
        self.episodes = self._read_episodes_v2() if self.layout == 2 else self._read_episodes_v3()
        if not self.episodes:
            raise DatasetError(f"{self.root} holds no episodes (meta/episodes* is empty)")
        self._starts = np.cumsum([0] + [e.length for e in self.episodes])

    # ---- metadata ----------------------------------------------------------------------------------------------

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "video"]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "image"]

    @property
    def camera_keys(self) -> list[str]:
        return self.video_keys + self.image_keys

    @property
    def total_frames(self) -> int:
        return int(self._starts[-1])

    def _meta(self, name: str) -> Path:
        path = self.root / "meta" / name
        if not path.exists():
            raise DatasetError(f"{self.root}: codebase_version {self.version} needs meta/{name}, which is missing "
                               "(an incomplete download?)")
        return path

    def _read_tasks(self) -> dict[int, str]:
        if self.layout == 2:
            rows = _jsonl(self._meta("tasks.jsonl"))
            return {int(r["task_index"]): str(r["task"]) for r in rows}
        table = _pyarrow().read_table(self._meta("tasks.parquet"))
        names = table.column_names
        # pandas writes the task strings (the frame's index) as a column named by the index: "task", or
        # "__index_level_0__" when unnamed
        text = next((n for n in ("task", "__index_level_0__") if n in names), None)
        if "task_index" not in names or text is None:
            raise DatasetError(f"{self.root}/meta/tasks.parquet has columns {names}; expected task_index and task")
        return dict(zip((int(i) for i in table.column("task_index").to_pylist()),
                        (str(t) for t in table.column(text).to_pylist())))

    def _read_episodes_v2(self) -> list[Episode]:
        chunks = int(self.info.get("chunks_size") or 1000)
        data_path, video_path = self.info.get("data_path"), self.info.get("video_path")
        if not data_path:
            raise DatasetError(f"{self.root}/meta/info.json has no data_path template")
        out = []
        for r in sorted(_jsonl(self._meta("episodes.jsonl")), key=lambda r: int(r["episode_index"])):
            ep = int(r["episode_index"])
            fmt = {"episode_chunk": ep // chunks, "episode_index": ep}
            videos = {k: (self.root / video_path.format(video_key=k, **fmt), 0.0)
                      for k in self.video_keys} if video_path else {}
            out.append(Episode(ep, int(r["length"]), tuple(r.get("tasks") or ()),
                               self.root / data_path.format(**fmt), videos))
        return out

    def _read_episodes_v3(self) -> list[Episode]:
        pq = _pyarrow()
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DatasetError(f"{self.root}: codebase_version {self.version} needs "
                               "meta/episodes/chunk-*/file-*.parquet, which is missing (an incomplete download?)")
        data_path = self.info.get("data_path") or "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        video_path = self.info.get("video_path")
        out = []
        for f in files:
            names = pq.ParquetFile(f).schema_arrow.names
            wanted = [n for n in names if not n.startswith("stats/")]  # per-episode statistics: not needed
            for r in pq.read_table(f, columns=wanted).to_pylist():
                try:
                    data = self.root / data_path.format(chunk_index=r["data/chunk_index"],
                                                        file_index=r["data/file_index"])
                    videos = {k: (self.root / video_path.format(video_key=k, chunk_index=r[f"videos/{k}/chunk_index"],
                                                                file_index=r[f"videos/{k}/file_index"]),
                                  float(r[f"videos/{k}/from_timestamp"]))
                              for k in self.video_keys if f"videos/{k}/chunk_index" in r} if video_path else {}
                    out.append(Episode(int(r["episode_index"]), int(r["length"]), tuple(r.get("tasks") or ()),
                                       data, videos))
                except KeyError as err:
                    raise DatasetError(f"{f} lacks column {err.args[0]!r} (columns: {wanted})") from None
        return sorted(out, key=lambda e: e.index)

    # ---- choosing and reading frames -------------------------------------------------------------------------

    def sample(self, count: int, sampling: str = "even", seed: int = 0) -> list[tuple[int, int]]:
        """`count` frames as (episode_index, frame_index), in dataset order: the midpoints of `count` equal
        spans of all frames ("even"), or drawn without replacement with `seed` ("random"). Every frame when
        `count` is at least the dataset's."""
        if sampling not in SAMPLINGS:
            raise DatasetError(f"unknown frame sampling {sampling!r}; choose one of {list(SAMPLINGS)}")
        if count < 1:
            raise DatasetError(f"--calib-frames must be >= 1, got {count}")
        total = self.total_frames
        if count >= total:
            positions = np.arange(total)
        elif sampling == "even":
            positions = ((np.arange(count) + 0.5) * total / count).astype(np.int64)
        else:
            positions = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
        which = np.searchsorted(self._starts, positions, side="right") - 1
        return [(self.episodes[e].index, int(p - self._starts[e])) for e, p in zip(which, positions)]

    def state_key(self, key: str | None = None) -> str:
        """`key`, or the first of DEFAULT_STATE_KEYS the dataset has; DatasetError naming the candidates."""
        candidates = [key] if key else list(DEFAULT_STATE_KEYS)
        found = next((k for k in candidates if k in self.features and k not in self.camera_keys), None)
        if found is None:
            numeric = [k for k, f in self.features.items() if f.get("dtype") in ("float32", "float64")]
            raise DatasetError(f"{self.root} has no state feature {' or '.join(map(repr, candidates))}; its numeric "
                               f"features are {numeric}: pass --state-key NAME")
        return found

    def read(self, picks: list[tuple[int, int]], cameras: list[str], state_key: str) -> list[Frame]:
        """The frames `picks` names ((episode_index, frame_index) pairs), with the images of `cameras`."""
        unknown = [c for c in cameras if c not in self.camera_keys]
        if unknown:
            raise DatasetError(f"{self.root} has no camera {unknown}; its cameras are {self.camera_keys}")
        episodes = {e.index: e for e in self.episodes}
        frames: list[Frame | None] = [None] * len(picks)
        by_file: dict[Path, list[int]] = defaultdict(list)
        for i, (ep, _) in enumerate(picks):
            by_file[episodes[ep].data_file].append(i)
        image_cams = [c for c in cameras if c in self.image_keys]
        for path, items in by_file.items():
            rows = self._rows(path, [picks[i] for i in items], [state_key, *image_cams])
            for i, row in zip(items, rows):
                ep, fi = picks[i]
                episode = episodes[ep]
                task_index = row.get("task_index")
                task = self.tasks.get(int(task_index)) if task_index is not None else None
                if task is None:
                    if not episode.tasks:
                        raise DatasetError(f"{path}: frame {fi} of episode {ep} has task_index {task_index}, "
                                           "which meta/tasks* does not list, and the episode lists no task")
                    task = episode.tasks[0]
                ts = row.get("timestamp")
                frames[i] = Frame(ep, fi, float(ts) if ts is not None else fi / self.fps, task,
                                  np.asarray(row[state_key], dtype=np.float64),
                                  {c: self._image(row[c], c, path) for c in image_cams})
        self._decode_videos(frames, [c for c in cameras if c in self.video_keys], episodes)
        return frames  # type: ignore[return-value]

    def _rows(self, path: Path, picks: list[tuple[int, int]], columns: list[str]) -> list[dict]:
        if not path.is_file():
            raise DatasetError(f"data file {path} is missing (an incomplete download?)")
        pq = _pyarrow()
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in ("episode_index", "frame_index", *columns) if c not in names]
        if missing:
            raise DatasetError(f"{path} lacks column(s) {missing} (columns: {names})")
        extra = [c for c in ("timestamp", "task_index") if c in names]
        table = pq.read_table(path, columns=["episode_index", "frame_index", *extra, *columns])
        eps, fis = table.column("episode_index").to_numpy(), table.column("frame_index").to_numpy()
        out = []
        for ep, fi in picks:
            hit = np.flatnonzero((eps == ep) & (fis == fi))
            if hit.size == 0:
                raise DatasetError(f"{path} has no row for frame {fi} of episode {ep} (meta/episodes says the "
                                   "episode is in this file)")
            out.append(table.slice(int(hit[0]), 1).to_pylist()[0])
        return out

    def _image(self, value, camera: str, path: Path) -> np.ndarray:
        """A camera of dtype `image`: the row's encoded picture ({bytes, path}) decoded to (H, W, 3) uint8."""
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is None and value.get("path"):
                data = (self.root / value["path"]).read_bytes()
        else:
            data = value
        if not isinstance(data, (bytes, bytearray)):
            raise DatasetError(f"{path}: camera {camera!r} holds {type(value).__name__}, not an encoded image")
        with _av().open(io.BytesIO(data)) as container:
            return next(container.decode(video=0)).to_ndarray(format="rgb24")

    def _decode_videos(self, frames: list[Frame], cameras: list[str], episodes: dict[int, Episode]) -> None:
        queries: dict[Path, list[tuple[int, str, float]]] = defaultdict(list)
        for i, f in enumerate(frames):
            for cam in cameras:
                if cam not in episodes[f.episode].videos:
                    raise DatasetError(f"{self.root}: meta/episodes gives episode {f.episode} no file of video {cam!r} "
                                       "(no videos/<key>/chunk_index, file_index, from_timestamp columns, or no "
                                       "video_path in meta/info.json)")
                file, start = episodes[f.episode].videos[cam]
                queries[file].append((i, cam, start + f.timestamp))
        tolerance = 0.5 / self.fps  # the nearest frame, never a neighbour
        for file, qs in queries.items():
            if not file.is_file():
                raise DatasetError(f"video {file} is missing (an incomplete download?)")
            for (i, cam, _), image in zip(qs, decode_video_frames(file, [q[2] for q in qs], tolerance)):
                frames[i].images[cam] = image


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as err:
        raise DatasetError(f"{path} is not JSON lines ({err})") from err


def decode_video_frames(path: str | Path, times: list[float], tolerance: float) -> list[np.ndarray]:
    """The frames of a video nearest each time (seconds, in the stream's own clock) as (H, W, 3) uint8, decoded
    with PyAV: seek to the keyframe at or before a time, decode forward. DatasetError when the nearest frame is
    more than `tolerance` away (the video does not match the parquet's timestamps)."""
    av = _av()
    order = sorted(range(len(times)), key=lambda i: times[i])
    out: list[np.ndarray | None] = [None] * len(times)

    def take(k: int, t: float, frame) -> None:
        q = times[order[k]]
        if abs(t - q) > tolerance:
            raise DatasetError(f"{path}: no frame within {tolerance * 1000:.1f} ms of {q:.4f} s (nearest at {t:.4f} "
                               "s); the video does not match the data's timestamps")
        out[order[k]] = frame.to_ndarray(format="rgb24")

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        k = 0
        while k < len(order):
            container.seek(max(0, int(times[order[k]] / stream.time_base)), stream=stream, backward=True)
            prev, start_k = None, k
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                t = frame.time
                while k < len(order) and t >= times[order[k]]:
                    q = times[order[k]]
                    if prev is not None and q - prev[0] < t - q:
                        take(k, *prev)
                    else:
                        take(k, t, frame)
                    k += 1
                if k == len(order) or (k > start_k and times[order[k]] - t > RESEEK_GAP_S):
                    break
                prev = (t, frame)
            else:  # the stream ended: what is left can only be its last frame
                if prev is None:
                    raise DatasetError(f"{path}: no frame decoded at or after {times[order[k]]:.4f} s")
                while k < len(order):
                    take(k, *prev)
                    k += 1
    return out  # type: ignore[return-value]


# ---- frames -> model observations -----------------------------------------------------------------------------

def parse_camera_map(text: str | None, dataset: LeRobotDataset, model_cameras: tuple[str, ...] = MODEL_CAMERAS
                     ) -> dict[str, str]:
    """`KEY=CAMERA,...` (dataset camera key -> model camera; base / left_wrist / right_wrist are accepted for the
    model's names) or, with None, the LIBERO-style default. Model cameras nothing feeds are masked."""
    if text is None:
        mapping = {}
        for cam, keys in DEFAULT_CAMERAS:
            key = next((k for k in keys if k in dataset.camera_keys), None)
            if key is not None and cam in model_cameras:
                mapping[key] = cam
        if not mapping:
            wanted = [k for _, keys in DEFAULT_CAMERAS for k in keys]
            raise DatasetError(f"{dataset.root} has none of the default cameras {wanted}; its cameras are "
                               f"{dataset.camera_keys}: pass --camera-map KEY=base_0_rgb[,KEY=left_wrist_0_rgb,...]")
        return mapping
    mapping = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key, sep, cam = (s.strip() for s in item.rpartition("="))
        cam = CAMERA_ALIASES.get(cam, cam)
        if not sep or not key:
            raise DatasetError(f"--camera-map entry {item!r} is not DATASET_KEY=MODEL_CAMERA")
        if cam not in model_cameras:
            raise DatasetError(f"--camera-map {item!r}: {cam!r} is not a camera of the model {list(model_cameras)}")
        if key not in dataset.camera_keys:
            raise DatasetError(f"--camera-map {item!r}: {dataset.root} has no camera {key!r}; its cameras are "
                               f"{dataset.camera_keys}")
        if cam in mapping.values():
            raise DatasetError(f"--camera-map feeds {cam!r} twice")
        mapping[key] = cam
    if not mapping:
        raise DatasetError("--camera-map is empty; give at least one DATASET_KEY=MODEL_CAMERA")
    return mapping


def to_observations(frames: list[Frame], camera_map: dict[str, str], spec, model_config, batch_size: int) -> list:
    """Frames -> model Observations in batches of `batch_size`, through the server's preprocessing for `spec` (a
    `duquant.serve.policy.PolicySpec`; its robot is taken as generic) and `model_config`: what `duquant record
    libero` does with its requests."""
    from duquant.serve.guards import InputError
    from duquant.serve.policy import build_preprocessor, spec_config

    _, info = spec_config(spec) if spec.checkpoint else (None, None)
    pre = build_preprocessor(replace(spec, robot="generic"), model_config, info)
    prepared = []
    for f in frames:
        request = {"image": {cam: f.images[key] for key, cam in camera_map.items()}, "state": f.state,
                   "prompt": f.task}
        try:
            prepared.append(pre.prepare(request))
        except InputError as err:
            raise DatasetError(f"frame {f.frame_index} of episode {f.episode}: {err}") from err
    return [pre.to_observation(prepared[i:i + batch_size]) for i in range(0, len(prepared), batch_size)]


@dataclass(frozen=True)
class LoadResult:
    batches: list
    source: str  # one line: the dataset, the frames, the cameras
    frames: list[Frame]
    camera_map: dict[str, str]


def load_calibration(path: str | Path, model_config, spec, *, frames: int, batch_size: int,
                     camera_map: str | None = None, state_key: str | None = None, sampling: str = "even",
                     seed: int = 0) -> LoadResult:
    """`frames` frames of the dataset at `path` as observation batches for `model_config` (see the module
    docstring)."""
    require_extra()
    dataset = LeRobotDataset(path)
    mapping = parse_camera_map(camera_map, dataset, tuple(model_config.image_keys))
    key = dataset.state_key(state_key)
    picks = dataset.sample(frames, sampling, seed)
    read = dataset.read(picks, list(mapping), key)
    batches = to_observations(read, mapping, spec, model_config, batch_size)
    cams = ", ".join(f"{k} -> {c}" for k, c in mapping.items())
    masked = [c for c in model_config.image_keys if c not in mapping.values()]
    source = (f"LeRobot {dataset.version} dataset {path} ({len(read)} frames of "
              f"{len({f.episode for f in read})} episodes, {sampling}"
              f"{f' seed {seed}' if sampling == 'random' else ''}; cameras {cams}"
              f"{'; masked ' + ', '.join(masked) if masked else ''}; state {key})")
    return LoadResult(batches, source, read, mapping)


# ---- command line -----------------------------------------------------------------------------------------------

def add_cli_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(f"--calib DIR: a LeRobot dataset (v2.x / v3.0; needs the {EXTRA} extra)")
    g.add_argument("--camera-map", help="dataset camera -> model camera, KEY=CAMERA comma-separated (cameras: "
                   "base_0_rgb|base, left_wrist_0_rgb|left_wrist, right_wrist_0_rgb|right_wrist; the others are "
                   "masked); default observation.images.image=base_0_rgb,observation.images.wrist_image="
                   "left_wrist_0_rgb (or openpi's image / wrist_image)")
    g.add_argument("--state-key", help="state feature (default observation.state, or state)")
    g.add_argument("--calib-frames", type=int, help="frames to read (default: as many as calibration uses)")
    g.add_argument("--frame-sampling", choices=SAMPLINGS, default="even",
                   help="evenly spaced over all frames, or random with the data seed (default %(default)s)")
    g.add_argument("--tokenizer", help="paligemma_tokenizer.model for the prompts (full-size models; "
                   "'fallback' for tiny ones)")
    g.add_argument("--norm-stats", help="norm_stats.json for the state (default: from the checkpoint)")
    g.add_argument("--asset-id", help="the checkpoint's assets/<asset_id> holding the norm stats")
    g.add_argument("--norm", choices=("auto", "zscore", "quantile", "none"), default="auto",
                   help="state normalisation (default %(default)s: the model's)")


def load_from_args(args, model_config, *, batches: int, seed: int) -> LoadResult:
    """`load_calibration` as `add_cli_args`' flags and the command's model flags (--config, --checkpoint) say;
    `batches` batches of --batch-size unless --calib-frames is given."""
    check_dataset_dir(args.calib)
    require_extra()
    from duquant.serve.policy import PolicySpec

    spec = PolicySpec(config=args.config, checkpoint=args.checkpoint, robot="generic", norm_stats=args.norm_stats,
                      asset_id=args.asset_id, norm=args.norm, tokenizer=args.tokenizer)
    return load_calibration(args.calib, model_config, spec, frames=args.calib_frames or batches * args.batch_size,
                            batch_size=args.batch_size, camera_map=args.camera_map, state_key=args.state_key,
                            sampling=args.frame_sampling, seed=seed)


__all__ = ["DatasetError", "Episode", "Frame", "LeRobotDataset", "LoadResult", "add_cli_args", "check_dataset_dir",
           "decode_video_frames", "is_dataset", "load_calibration", "load_from_args", "parse_camera_map",
           "require_extra", "to_observations"]
