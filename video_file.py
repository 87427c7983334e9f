"""An MP4 video file (H.264 video, AAC audio) written as the frames come, with PyAV, the way ComfyUI's
SaveVideo writes one (``VideoFromComponents.save_to``): the same codec choice and settings, frames
converted to yuv420p the same way, the audio trimmed to the video's length the same way, the workflow
in the file's metadata. Only a few frames are in memory at a time, and the audio is interleaved with
the video as it goes (SaveVideo writes it after the last frame).

The video comes either as frames (``add_frames``), encoded here, or as segments encoded elsewhere
(``add_segment``: an MP4 of consecutive frames a worker wrote with this class, ``Segments``), whose packets
are copied into this file one segment after the other, their times shifted to the segment's first frame.
"""
from __future__ import annotations

import io
import json
import math
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from fractions import Fraction

import torch

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}  # as VideoFromComponents.save_to names them (else stereo)
AUDIO_AHEAD_S = 1.0  # the audio is written up to the video's time every this many seconds of video


def frame_rate(fps: float) -> Fraction:
    """The frame rate SaveVideo writes for CreateVideo's ``fps`` (to the millisecond)."""
    return Fraction(round(Fraction(fps) * 1000), 1000)


def audio_samples(sample_rate: int, rate: Fraction, frames: int) -> int:
    """Audio samples SaveVideo keeps for ``frames`` video frames (the rest of the waveform is cut)."""
    return math.ceil((sample_rate / rate) * frames)


class VideoWriter:
    """An MP4 being written to ``target`` (a path or a BytesIO). ``audio``: {"waveform": [B, C, N],
    "sample_rate": int} as LTXVAudioVAEDecode returns it (its first batch item is written, cut to the
    video's length), or None. ``metadata``: {key: value} written as JSON strings, as SaveVideo does."""

    def __init__(self, target, fps: float, width: int, height: int, audio: dict | None = None,
                 metadata: dict | None = None, total_frames: int | None = None):
        self.target, self.rate = target, frame_rate(fps)
        self.width, self.height = width, height
        self.metadata = metadata
        self.container = None
        self.video = None  # the output video stream
        self.encoding = True  # frames are encoded here (False: packets copied from parts)
        self.frames = 0  # frames written so far
        self.audio = None
        self.audio_written = 0
        self.audio_until = 0.0  # video seconds up to which the audio is written
        if audio is not None:
            waveform = audio["waveform"][0]
            sr = int(audio["sample_rate"])
            if total_frames is not None:
                waveform = waveform[:, :audio_samples(sr, self.rate, total_frames)]
            self.audio = (waveform, sr, LAYOUTS.get(waveform.shape[0], "stereo"))
        self.total_frames = total_frames

    # -- container -----------------------------------------------------------
    def _open(self, template=None):
        import av

        kwargs = {"format": "mp4"} if isinstance(self.target, io.BytesIO) else {}
        self.container = av.open(self.target, mode="w", options={"movflags": "use_metadata_tags"}, **kwargs)
        for key, value in (self.metadata or {}).items():
            self.container.metadata[key] = json.dumps(value)
        if template is None:
            self.video = self.container.add_stream("h264", rate=self.rate)
            self.video.width, self.video.height = self.width, self.height
            self.video.pix_fmt = "yuv420p"
        else:
            self.video = self.container.add_stream_from_template(template=template, opaque=True)
            self.encoding = False
        if self.audio is not None:
            self.audio_stream = self.container.add_stream("aac", rate=self.audio[1], layout=self.audio[2])

    def _write_audio(self, until_s: float | None) -> None:
        """The audio up to ``until_s`` seconds of video (None: all of it)."""
        if self.audio is None:
            return
        import av

        waveform, sr, layout = self.audio
        stop = waveform.shape[1] if until_s is None else min(waveform.shape[1], math.ceil(until_s * sr))
        if stop <= self.audio_written:
            return
        chunk = waveform[:, self.audio_written:stop].float().cpu().contiguous().numpy()
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = sr, self.audio_written
        for packet in self.audio_stream.encode(frame):
            self.container.mux(packet)
        self.audio_written = stop

    def _advance(self) -> None:
        seconds = float(self.frames / self.rate)
        if seconds - self.audio_until >= AUDIO_AHEAD_S:
            self._write_audio(seconds)
            self.audio_until = seconds

    # -- video -----------------------------------------------------------------
    def add_frames(self, frames: torch.Tensor) -> None:
        """Encode [n, H, W, 3] uint8 frames (as SaveVideo converts and encodes each)."""
        import av

        if self.container is None:
            self._open()
        for img in frames.numpy():
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            for packet in self.video.encode(frame):
                self.container.mux(packet)
            self.frames += 1
        self._advance()

    def add_segment(self, data: bytes, first_frame: int) -> int:
        """Copy the video packets of an MP4 written by ``VideoWriter`` for frames from ``first_frame`` on;
        returns its frame count."""
        import av

        with av.open(io.BytesIO(data), mode="r") as part:
            stream = part.streams.video[0]
            if self.container is None:
                self._open(template=stream)
            shift = round(Fraction(first_frame) / self.rate / stream.time_base)
            count = 0
            for packet in part.demux(stream):
                if packet.dts is None:  # the demuxer's empty flush packet
                    continue
                packet.pts += shift
                packet.dts += shift
                packet.stream = self.video
                self.container.mux(packet)
                count += 1
            self.frames = first_frame + count
        self._advance()
        return count

    def close(self) -> None:
        if self.container is None:
            self._open()
        if self.encoding:
            for packet in self.video.encode(None):
                self.container.mux(packet)
        self._write_audio(None)
        if self.audio is not None:
            for packet in self.audio_stream.encode(None):
                self.container.mux(packet)
        self.container.close()

    def abort(self) -> None:
        """Close the file after an error (what is in it is not a whole video)."""
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # noqa: BLE001 - the error that led here is the one to report
                pass


class Segments:
    """Frames from ``first_frame`` on, written as consecutive standalone MP4s in memory, each a ``VideoWriter``
    on a BytesIO (so each begins with a keyframe): a new one once the current one's bytes reach ``limit``,
    checked after each batch (``add_frames``, which may run in another thread than ``take``). The finished
    ones wait, in order, for ``take``."""

    def __init__(self, fps: float, width: int, height: int, first_frame: int, limit: int):
        self.fps, self.width, self.height, self.limit = fps, width, height, limit
        self.frames = first_frame  # the number of the next frame
        self.first = first_frame  # the current segment's first frame
        self.writer: VideoWriter | None = None
        self.buffer: io.BytesIO | None = None
        self.finished: deque = deque()  # (first frame, MP4 bytes)

    def add_frames(self, frames: torch.Tensor) -> None:
        if self.writer is None:
            self.buffer, self.first = io.BytesIO(), self.frames
            self.writer = VideoWriter(self.buffer, self.fps, self.width, self.height)
        self.writer.add_frames(frames)
        self.frames += frames.shape[0]
        if self.buffer.getbuffer().nbytes >= self.limit:
            self.close()

    def close(self) -> None:
        """Finish the current segment (if any)."""
        if self.writer is not None:
            self.writer.close()
            self.finished.append((self.first, self.buffer.getvalue()))
            self.writer = self.buffer = None

    def abort(self) -> None:
        """Drop the current segment after an error."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = self.buffer = None

    def take(self) -> list[tuple[int, bytes]]:
        """The segments finished since the last call: (first frame, MP4 bytes), in order."""
        out = []
        while self.finished:
            out.append(self.finished.popleft())
        return out


def encode_in_background(writer: VideoWriter, batches: Iterable[torch.Tensor], depth: int = 2) -> int:
    """Write ``batches`` of uint8 frames with ``writer`` in a thread of its own (PyAV encodes without the
    GIL), so the next batch is decoded meanwhile; at most ``depth`` batches wait. Returns the frames
    written; an error on either side ends both."""
    for _ in encoding(writer, batches, depth):
        pass
    return writer.frames


def encoding(writer: VideoWriter | Segments, batches: Iterable[torch.Tensor], depth: int = 2) -> Iterator[None]:
    """``encode_in_background`` a batch at a time: it yields each time a batch is handed to the encoder
    thread, so the caller can act in between (take ``Segments``' finished segments); when it ends, the
    thread has written every batch. Closing it early ends the thread too."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    failed: list[BaseException] = []
    stop = object()

    def work():
        try:
            while True:
                item = q.get()
                if item is stop:
                    return
                if not failed:
                    writer.add_frames(item)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            failed.append(e)
            while q.get() is not stop:  # let the producer finish putting
                pass

    t = threading.Thread(target=work, name="ltxav-video-encode", daemon=True)
    t.start()
    try:
        for batch in batches:
            if failed:
                break
            q.put(batch)
            yield
    finally:
        q.put(stop)
        t.join()
    if failed:
        raise failed[0]
