"""How an LTX-2 video latent is decoded in pieces (``video_decode`` runs it): VAEDecodeTiled's tiles along
time, height and width (``comfy/utils.py`` ``tiled_scale_multidim``'s positions and feathered masks), the
latent frames a decode step feeds, and the frame ranges a clip splits into for several workers. Pure
arithmetic: no model, no device.
"""
from __future__ import annotations

import dataclasses

TIME_SCALE, SPACE_SCALE = 8, 32  # an LTX latent frame is 8 video frames (the first one: 1), a latent pixel 32x32
STEP_BYTES = 64 << 20  # a decode step's uint8 output (all tiles), at most, when it is more than one latent frame


def out_frames(latent_frames: int) -> int:
    """Video frames of ``latent_frames`` LTX latent frames: 8 each, the first one 1."""
    return max(0, latent_frames * TIME_SCALE - (TIME_SCALE - 1))


def latent_of_frame(frame: int) -> int:
    """The latent frame a video frame comes from (frame 0: latent 0; frames 8j-7 .. 8j: latent j)."""
    return -(-frame // TIME_SCALE)


@dataclasses.dataclass(frozen=True)
class Axis:
    """One dimension of ``tiled_scale_multidim``'s tiling: the tiles' (start, length) in latent units, and
    the feather (output units) its masks ramp over at both ends of a tile (0: no ramp)."""

    size: int
    tiles: tuple[tuple[int, int], ...]
    feather: int

    @classmethod
    def of(cls, size: int, tile: int, overlap: int, scale) -> Axis:
        """As ``tiled_scale_multidim`` positions tiles along a dimension of ``size`` latent units."""
        if size > tile:
            starts = range(0, size - overlap, tile - overlap)
        else:
            starts = [0]
        tiles = []
        for it in starts:
            pos = max(0, min(size - overlap, it))
            tiles.append((pos, min(tile, size - pos)))
        return cls(size, tuple(tiles), round(scale(overlap)))

    def factors(self, length: int) -> list[tuple[int, float]]:
        """(index, factor) in the order the mask of a tile ``length`` output units long multiplies them
        (``tiled_scale_multidim``'s loop; none when the feather does not fit the tile)."""
        if self.feather >= length:
            return []
        out = []
        for t in range(self.feather):
            a = (t + 1) / self.feather
            out += [(t, a), (length - 1 - t, a)]
        return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a [1, 128, T, H, W] LTX latent is decoded: VAEDecodeTiled's tiles along time, height and width
    (``whole``: the latent fits one tile and is decoded plainly), the latent frames a decode step feeds,
    and the halo (latent frames of context) a frame range starts and ends with."""

    time: Axis
    rows: Axis
    cols: Axis
    whole: bool
    step: int
    halo: int

    @property
    def frames(self) -> int:
        return out_frames(self.time.size)

    @property
    def height(self) -> int:
        return self.rows.size * SPACE_SCALE

    @property
    def width(self) -> int:
        return self.cols.size * SPACE_SCALE

    @property
    def spatial_tiles(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """(row tile, column tile) in ``tiled_scale_multidim``'s order."""
        return [(r, c) for r in self.rows.tiles for c in self.cols.tiles]

    @classmethod
    def tiled(cls, latent_shape, tile_size: int = 0, overlap: int = 64, temporal_size: int = 0,
              temporal_overlap: int = 8, halo: int = 0, step: int = 0) -> Plan:
        """VAEDecodeTiled's tiles for a latent of shape [B, C, T, H, W] and its node inputs (pixels and video
        frames), converted as its ``decode`` converts them. ``tile_size`` 0: the whole frame (a tile as large
        as its longer side); ``temporal_size`` 0: the whole clip. Both 0: one tile, a plain decode."""
        t, h, w = (int(v) for v in latent_shape[-3:])
        tile_size = tile_size or SPACE_SCALE * max(h, w)
        temporal_size = temporal_size or TIME_SCALE * t
        # nodes.VAEDecodeTiled.decode, then VAE.decode_tiled (LTX: 8x temporal, 32x spatial compression)
        if tile_size < overlap * 4:
            overlap = tile_size // 4
        if temporal_size < temporal_overlap * 2:
            temporal_overlap = temporal_overlap // 2
        temporal_size = max(2, temporal_size // TIME_SCALE)
        temporal_overlap = max(1, min(temporal_size // 2, temporal_overlap // TIME_SCALE))
        tile, overlap = tile_size // SPACE_SCALE, overlap // SPACE_SCALE
        time = Axis.of(t, max(2, temporal_size), max(1, temporal_overlap), lambda a: max(0, a * 8 - 7))
        rows = Axis.of(h, tile, overlap, lambda a: SPACE_SCALE * a)
        cols = Axis.of(w, tile, overlap, lambda a: SPACE_SCALE * a)
        whole = t <= max(2, temporal_size) and h <= tile and w <= tile
        if not step:
            per_latent = TIME_SCALE * SPACE_SCALE * SPACE_SCALE * h * w * 3
            step = max(1, min(16, STEP_BYTES // per_latent))
        return cls(time, rows, cols, whole, step, halo)

    def tile_frames(self, k: int) -> tuple[int, int]:
        """The output frames [first, end) temporal tile ``k`` decodes."""
        p, n = self.time.tiles[k]
        return p * TIME_SCALE, p * TIME_SCALE + out_frames(n)

    def temporal_tiles(self, start: int, stop: int) -> list[int]:
        """The temporal tiles whose frames meet output frames [start, stop)."""
        out = []
        for k in range(len(self.time.tiles)):
            first, end = self.tile_frames(k)
            if first < stop and end > start:
                out.append(k)
        return out

    def tile_latents(self, k: int, start: int, stop: int) -> tuple[int, int]:
        """The latent frames [a, b) temporal tile ``k``'s decode is fed for output frames [start, stop): the
        tile's own, cut to the range with ``halo`` latent frames of context where the range cuts the tile."""
        p, n = self.time.tiles[k]
        first, end = self.tile_frames(k)
        lo, hi = max(start, first), min(stop, end)
        a = max(p, latent_of_frame(lo) - self.halo) if lo > first else p
        b = min(p + n, latent_of_frame(hi - 1) + self.halo + 1) if hi < end else p + n
        return a, b

    def latents_for(self, start: int, stop: int) -> tuple[int, int]:
        """The latent frames [a, b) that output frames [start, stop) are decoded from (every tile's, with
        the halo): what a worker decoding that range needs of the latent."""
        spans = [self.tile_latents(k, start, stop) for k in self.temporal_tiles(start, stop)]
        return min(a for a, _ in spans), max(b for _, b in spans)

    def split(self, parts: int) -> list[tuple[int, int]]:
        """``parts`` contiguous frame ranges (start, stop) covering the clip, about equal, cut at latent
        frame boundaries (every part at least one latent frame long; fewer parts for a short clip)."""
        latents = self.time.size
        parts = max(1, min(parts, latents))
        cuts = [0] + [out_frames(round(i * latents / parts)) for i in range(1, parts)] + [self.frames]
        return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
