"""An LTX-2 video latent decoded into frames a few latent frames at a time, in bounded memory, with
ComfyUI's own LTX video decoder and VAEDecodeTiled's tiling and blending rules.

ComfyUI's LTX-2 decoder (``comfy/ldm/lightricks/vae/causal_video_autoencoder.py``) already streams:
``Decoder.run_up`` splits its activations along time and every temporal convolution keeps the frames
it still needs in a cache (``temporal_cache_state``, per thread), so a tile's output comes out in time
order. ``Decoder.forward`` feeds it a whole tile at once and ends it; here the same steps (the latent's
``un_normalize``, ``conv_in``, ``run_up``) are fed one piece of the latent after another, the caches
kept between pieces (one set per tile: saved and put back around each piece), and only the last piece
ends the tile. Every frame is the same arithmetic as ComfyUI's decode of the whole tile: only where the
activations are cut differs (which ComfyUI's own chunking varies too).

Tiles and blending are ``comfy/utils.py`` ``tiled_scale_multidim``'s (what VAEDecodeTiled calls): the
same tile positions, the same feathered masks built by the same sequence of multiplications, the same
sum of ``ps * mask`` and of the masks in tile order, then the division, in float32; a latent that fits
one tile is decoded plainly, as there. Frames are blended and handed out in batches as soon as every
tile that covers them has produced them.

A range of output frames (one worker's share) is decoded exactly too: each tile's decode starts ``halo``
latent frames before the range (the decoder's temporal receptive radius, ``receptive_radius``) and ends
as far after it, and the frames outside the range are dropped. Where the tiles and steps fall is
``decode_plan``'s.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch

from .decode_plan import SPACE_SCALE, TIME_SCALE, Plan, out_frames

FRAME_BATCH = 16  # output frames blended and handed out at a time (at most) ...
BATCH_BYTES = 32 << 20  # ... and their uint8 bytes at most (a 1920x1088 frame is 6 MiB: 5 at a time)
_ABSENT = object()


def batch_frames(height: int, width: int) -> int:
    """Frames blended and handed out at a time for frames of height x width: FRAME_BATCH, fewer for large
    frames (the encoder's queue holds a few batches in host memory), at least one."""
    return max(1, min(FRAME_BATCH, BATCH_BYTES // (height * width * 3)))


def receptive_radius(vae) -> int:
    """Latent frames on each side that a decoded frame depends on (with margin): ComfyUI's LTX decoder's
    temporal convolutions, counted level by level through its temporal upsamplers. A frame range decoded
    with this much context on both sides is the same as the frames of the whole decode."""
    from comfy.ldm.lightricks.vae.causal_conv3d import CausalConv3d

    dec = decoder_of(vae)

    def spread(module) -> int:
        total = 0
        for m in module.modules():
            if isinstance(m, CausalConv3d):
                reach = (m.time_kernel_size - 1) * m.conv.dilation[0]
                total += reach if dec.causal else reach // 2
        return total

    r, scale = spread(dec.conv_in), 1
    for block in dec.up_blocks:
        r += spread(block)
        stride = getattr(block, "stride", (1,))[0]
        if stride > 1:  # a temporal upsampler (DepthToSpaceUpsample): after its convolution
            r, scale = r * stride + stride, scale * stride
    r += spread(dec.conv_out)
    return -(-r // scale) + 1


def decoder_of(vae):
    """The LTX video decoder inside a ComfyUI VAE; ValueError when the VAE is not one this module streams."""
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    model = getattr(vae, "first_stage_model", None)
    if not isinstance(model, VideoVAE):
        raise ValueError(f"not an LTX video VAE ({type(model).__name__})")
    if model.timestep_conditioning:
        raise ValueError("a timestep-conditioned LTX VAE (LTX-Video 0.9.x): its decode draws noise, it is not LTX-2's")
    dec = model.decoder
    for name in ("conv_in", "run_up", "up_blocks", "conv_out", "causal"):
        if not hasattr(dec, name):
            raise ValueError(f"ComfyUI's LTX decoder has no '{name}' here (this node follows ComfyUI 0.20's)")
    return dec


class _Sink:
    """What ``Decoder.run_up`` writes its frames into (``output_buffer[:, :, a:b].copy_(frames)``): keeps
    each piece as it comes, on the device, instead of a whole clip's buffer."""

    def __init__(self):
        self.pieces: list[torch.Tensor] = []

    def __getitem__(self, _index):
        return self

    def copy_(self, frames):
        self.pieces.append(frames)


class _Stream:
    """One tile's decode, fed latent frames [start, stop) a piece at a time. Its decoder caches live between
    pieces in ``state`` (ComfyUI keys them by thread: they are put back for each piece and taken after)."""

    def __init__(self, latent, start: int, stop: int, first_frame: int, latent_start: int = 0):
        self.latent, self.next, self.stop = latent, start, stop
        self.latent_start = latent_start  # the latent frame ``latent`` begins with (a worker's slice)
        self.frame = first_frame  # the absolute output frame of the next frame this stream produces
        self.state = None

    @property
    def done(self) -> bool:
        return self.next >= self.stop


class _Decoder:
    """ComfyUI's LTX decoder, run a piece at a time for several streams."""

    def __init__(self, vae):
        from comfy.ldm.lightricks.vae import causal_video_autoencoder as cva

        self.vae, self.cva = vae, cva
        self.model = vae.first_stage_model
        self.dec = decoder_of(vae)
        self.cached = [m for m in self.dec.modules() if hasattr(m, "temporal_cache_state")]

    def feed(self, stream: _Stream, n: int) -> list[tuple[int, torch.Tensor]]:
        """Feed the next ``n`` latent frames of ``stream``; its new output frames as (absolute first frame,
        [1, 3, t, h, w] in the VAE's dtype on its device)."""
        tid = threading.get_ident()
        for m, s in zip(self.cached, stream.state or [_ABSENT] * len(self.cached)):
            if s is _ABSENT:
                m.temporal_cache_state.pop(tid, None)
            else:
                m.temporal_cache_state[tid] = s
        sink = _Sink()
        try:
            j = stream.next
            last = j + n >= stream.stop
            # as VAE.decode_tiled's decode_fn, then VideoVAE.decode and Decoder.forward_orig
            i = j - stream.latent_start
            x = stream.latent[:, :, i:i + n].to(self.vae.vae_dtype).to(self.vae.device)
            x = self.model.per_channel_statistics.un_normalize(x)
            if last:
                self.cva.mark_conv3d_ended(self.dec.conv_in)
            x = self.dec.conv_in(x, causal=self.dec.causal)
            self.dec.run_up(0, [x], last, None, None, _identity, sink, [0],
                            self.cva.get_max_chunk_size(x.device))
            stream.next = j + n
        finally:
            stream.state = [m.temporal_cache_state.pop(tid, _ABSENT) for m in self.cached]
        if stream.done:
            stream.state = None
        out = []
        for piece in sink.pieces:
            out.append((stream.frame, piece))
            stream.frame += piece.shape[2]
        return out


def _identity(module):
    return module


def decode_chunks(vae, latent: torch.Tensor, plan: Plan, frames: tuple[int, int] | None = None,
                  as_uint8: bool = True, check: Callable[[], None] | None = None,
                  progress: Callable[[int], None] | None = None, latent_start: int = 0) -> Iterator[torch.Tensor]:
    """Decode output frames [start, stop) (default: all) of ``latent`` ([1, 128, T, H, W], an LTX-2 video
    latent as the samplers return it) with ``vae``, ComfyUI's VAE, and yield them in order as [n, H, W, 3]
    CPU tensors: uint8 as SaveVideo converts frames (``(x * 255).clamp(0, 255).byte()``), or float32 in
    [0, 1] as VAEDecodeTiled returns them. ``check()`` runs between steps (it raises to stop);
    ``progress(n)`` gets the frames handed out so far. ``latent_start``: ``latent`` is the clip's latent
    frames from this one on (at least ``plan.latents_for(start, stop)``: a worker's slice)."""
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise ValueError(f"expected a [1, 128, T, H, W] video latent, got {list(latent.shape)}")
    start, stop = frames or (0, plan.frames)
    if not 0 <= start < stop <= plan.frames:
        raise ValueError(f"frames {start}..{stop} outside the clip's {plan.frames}")
    need = plan.latents_for(start, stop)
    have = (latent_start, latent_start + latent.shape[2])
    if have[0] > need[0] or have[1] < need[1]:
        raise ValueError(f"frames {start}..{stop} need latent frames {need[0]}..{need[1] - 1}; "
                         f"the latent holds {have[0]}..{have[1] - 1}")
    run = _Run(_Decoder(vae), latent, plan, start, stop, as_uint8, latent_start)
    done = 0
    for tile in run.temporal_tiles():
        for batch in run.decode_tile(tile, check):
            done += batch.shape[0]
            if progress is not None:
                progress(done)
            yield batch
    for batch in run.finish():
        done += batch.shape[0]
        if progress is not None:
            progress(done)
        yield batch


class _Run:
    """One decode of frames [start, stop): the tiles' streams, the frames they produced and not yet handed
    out (per tile, in the VAE's dtype), and the blending of complete frames."""

    def __init__(self, decoder: _Decoder, latent, plan: Plan, start: int, stop: int, as_uint8: bool,
                 latent_start: int = 0):
        self.decoder, self.latent, self.plan, self.latent_start = decoder, latent, plan, latent_start
        self.start, self.stop, self.as_uint8 = start, stop, as_uint8
        self.emitted = start  # frames before this one have been handed out
        self.pending: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}  # (time tile, spatial tile)
        self.device = decoder.vae.device
        self.batch = batch_frames(plan.height, plan.width)

    def temporal_tiles(self) -> list[int]:
        return self.plan.temporal_tiles(self.start, self.stop)

    def decode_tile(self, k: int, check) -> Iterator[torch.Tensor]:
        plan = self.plan
        end = plan.tile_frames(k)[1]
        a, b = plan.tile_latents(k, self.start, self.stop)
        # frames from the next temporal tile's start on wait for its contribution
        nxt = plan.tile_frames(k + 1)[0] if k + 1 < len(plan.time.tiles) else end
        cap = min(self.stop, nxt)
        streams = []
        for s, ((y, h), (x, w)) in enumerate(plan.spatial_tiles):
            tile_latent = self.latent[:, :, :, y:y + h, x:x + w]
            streams.append((s, _Stream(tile_latent, a, b, a * TIME_SCALE, self.latent_start)))
        while not streams[0][1].done:
            if check is not None:
                check()
            for s, stream in streams:
                count = min(plan.step, stream.stop - stream.next)
                for frame, piece in self.decoder.feed(stream, count):
                    self.keep(k, s, frame, piece)
            produced = min(stream.frame for _, stream in streams)  # every tile has its frames before this one
            yield from self.blend_until(min(produced, cap))

    def finish(self) -> Iterator[torch.Tensor]:
        yield from self.blend_until(self.stop)
        self.pending.clear()

    def keep(self, k: int, s: int, frame: int, piece: torch.Tensor) -> None:
        """Keep the frames of ``piece`` that fall in [start, stop)."""
        t = piece.shape[2]
        lo, hi = max(frame, self.start), min(frame + t, self.stop)
        if hi > lo:
            self.pending.setdefault((k, s), []).append((lo, piece[:, :, lo - frame:hi - frame]))

    def blend_until(self, frontier: int) -> Iterator[torch.Tensor]:
        while self.emitted < frontier:
            f0, f1 = self.emitted, min(frontier, self.emitted + self.batch)
            yield self.blend(f0, f1)
            self.emitted = f1
            self.release(f1)

    def release(self, before: int) -> None:
        """Drop the kept frames before ``before``."""
        for key in list(self.pending):
            kept = []
            for lo, piece in self.pending[key]:
                t = piece.shape[2]
                if lo + t <= before:
                    continue
                if lo < before:
                    piece, lo = piece[:, :, before - lo:], before
                kept.append((lo, piece))
            if kept:
                self.pending[key] = kept
            else:
                del self.pending[key]

    def frames_of(self, key, f0: int, f1: int) -> tuple[int, torch.Tensor] | None:
        """The kept frames of tile ``key`` that fall in [f0, f1), as (first frame, [1, 3, t, h, w])."""
        parts, first = [], None
        for lo, piece in self.pending.get(key, []):
            a, b = max(lo, f0), min(lo + piece.shape[2], f1)
            if b > a:
                first = a if first is None else first
                parts.append(piece[:, :, a - lo:b - lo])
        if not parts:
            return None
        # as VAE.decode_tiled's decode_fn converts a tile's frames (float32 unless ComfyUI's intermediates differ)
        return first, (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).to(self.decoder.vae.vae_output_dtype())

    def blend(self, f0: int, f1: int) -> torch.Tensor:
        """Frames [f0, f1), blended from every tile that produced them, as tiled_scale_multidim does, then
        VAE.process_output, as [n, H, W, 3] on the CPU."""
        plan = self.plan
        n = f1 - f0
        if plan.whole:
            got = self.frames_of((0, 0), f0, f1)
            assert got is not None and got[0] == f0 and got[1].shape[2] == n, "frames missing from the decode"
            out = got[1]
        else:
            out = torch.zeros((1, 3, n, plan.height, plan.width), device=self.device)
            div = torch.zeros((1, 1, n, plan.height, plan.width), device=self.device)
            for k in range(len(plan.time.tiles)):
                for s, ((y, h), (x, w)) in enumerate(plan.spatial_tiles):
                    got = self.frames_of((k, s), f0, f1)
                    if got is None:
                        continue
                    lo, ps = got
                    mask = self.mask(k, y, h, x, w, lo, ps.shape[2])
                    region = (slice(None), slice(None), slice(lo - f0, lo - f0 + ps.shape[2]),
                              slice(y * SPACE_SCALE, (y + h) * SPACE_SCALE),
                              slice(x * SPACE_SCALE, (x + w) * SPACE_SCALE))
                    out[region].add_(ps * mask)
                    div[region].add_(mask)
            out.div_(div)
        out = self.decoder.vae.process_output(out)
        frames = out[0].movedim(0, -1)
        if self.as_uint8:
            frames = (frames * 255).clamp(0, 255).byte()  # as VideoFromComponents.save_to converts a frame
        return frames.cpu()

    def mask(self, k: int, y: int, h: int, x: int, w: int, first: int, t: int) -> torch.Tensor:
        """Tile (k, row y, column x)'s feathered mask for absolute frames [first, first + t), built by the same
        multiplications, in the same order, as ``tiled_scale_multidim`` builds the whole tile's."""
        plan = self.plan
        p, length = plan.time.tiles[k]
        i0 = first - p * TIME_SCALE
        mask = torch.ones((1, 1, t, h * SPACE_SCALE, w * SPACE_SCALE), device=self.device)
        dims = ((2, plan.time, out_frames(length), i0, t), (3, plan.rows, h * SPACE_SCALE, 0, h * SPACE_SCALE),
                (4, plan.cols, w * SPACE_SCALE, 0, w * SPACE_SCALE))
        for d, axis, size, lo, span in dims:
            for index, a in axis.factors(size):
                if lo <= index < lo + span:
                    mask.narrow(d, index - lo, 1).mul_(a)
        return mask

