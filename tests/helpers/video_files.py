"""What a saved video file holds, read back with PyAV (as a player would)."""
import torch


def read_video(path):
    """(frames, frame rate, video seconds, audio seconds, audio sample rate, decoded frames) of an MP4."""
    import av

    with av.open(str(path)) as c:
        v, a = c.streams.video[0], (c.streams.audio[0] if c.streams.audio else None)
        out = (v.frames, v.average_rate, float(v.duration * v.time_base),
               float(a.duration * a.time_base) if a else None, a.sample_rate if a else None)
        decoded = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)])
    return (*out, decoded)
