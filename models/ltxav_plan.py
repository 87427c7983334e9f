"""LTX-2 / LTX-2.3 audio-video's numbers for the memory planner (``memory_plan``): its per-token costs and
its latent's geometry.

Per-token costs count *hidden vectors* (one token's ``video_dim`` activations in the compute dtype; 8 KB
for LTX-2 in bf16). They were measured with ``bench/sequence_parallel.py`` (H200, bf16, ComfyUI 0.20.1:
stock forward, Ulysses and ring degrees, three sizes; ``bench/results/2026-11-28-h200x*-sequence_parallel.jsonl``)
and checked against the fp8, 48-layer, 24 GB runs of ``bench/long_video.py``:

* attention phase: 8.5 vectors per local video token on one GPU (x, its norm, v, the normed q and k,
  RoPE's output and temporary, the RoPE tables, the attention output); 8.0 with W > 1 (the output
  goes into a q/k/v buffer, so the peak moves to RoPE), +1.0 with a ring degree (xfuser's float32
  accumulators), and 0.06 per token of the *whole* sequence (fitted; it was a head group's gathered
  q/k/v, which q/k/v's own buffers now receive, and the measured peaks did not change);
* FFN phase: 3.5 vectors per local token kept, plus one FFN chunk's two 4x-wide tensors;
* per-token timesteps (image-to-video, guides): 0.5 more (the per-token adaLN values);
* audio tokens cost the same number of vectors of ``audio_dim``.
"""
from __future__ import annotations

from .. import memory_plan

COEFFICIENTS = memory_plan.Coefficients(
    attention=8.5,
    attention_out_in_place=0.5,  # sequence parallel: the attention output goes into a q/k/v buffer
    ring=1.0,
    full_sequence=0.06,
    ffn_kept=3.5,
    per_token_timestep=0.5,
    fixed_bytes=int(0.055 * memory_plan.GIB),  # context, connector, kernels' workspaces
    # the lean attention (lean_attention.py): no rotary tables; norms, rotation, attention output and the square
    # output projections in place. Measured in ComfyUI's process on one H100 (8 layers fp8, 24 GiB emulated,
    # 2026-12-06, bench/results/2026-12-06-h100-comfy_long_video-lean-*): at 8,301 frames 768x512 it ran out of
    # memory making video self-attention's v, with x, its norm, q and k alive (the allocator's live blocks), so
    # the attention phase holds x, its norm, q, k and v of the local tokens ...
    lean_attention=5.0,
    # ... and with gated attention (LTX-2.3) the gated output, a new tensor ComfyUI makes (not measured) ...
    lean_gated=1.0,
    # ... and over several ranks Ulysses' exchange (the send buffer, the other ranks' blocks): two workers sharing
    # one H100 (24 and 16 GiB each, fp8 and bf16, 768x512 and 1920x1088, 2 layers; 2026-12-06,
    # bench/results/2026-12-06-h100-comfy_long_video-lean-workers2-*) peaked 0.8 of a hidden vector per local
    # token above the one-card terms; planned as 1.0 (those peaks +1.7 to +3.1 %), where the exchange still goes
    # through a send buffer (memory_plan.exchange_in_place: not for 2, 4 or 8 ranks whose tokens divide them) ...
    lean_exchange=1.0,
    # ... and one range's temporaries (a query range's output and its reshaped copy; the rotary rows and
    # rotation of a range are smaller): two hidden vectors of up to memory_plan.LEAN_RANGE_TOKENS local tokens
    lean_range=2.0,
    # the allocator's pool beyond PyTorch's peak: with the lean attention a clip's largest tensors are whole
    # hidden states, and the pool must find room for one more while the others are live. 7,401 frames ran and
    # 7,801 ran out of memory making v (PyTorch's peak 19.18 GiB and >= 19.88 GiB, 23.41 GiB free, comfy-aimdo
    # 0.85): the plans leave 2.66 and 1.76 GiB, 0.98 and 0.62 of a hidden vector; counted as 0.75 of one.
    # Planned only with the lean attention, whose longest clips lie far beyond stock's, so it refuses nothing
    # stock runs
    lean_pool=0.75,
    # with self-attention's value written into the normed hidden state's buffer (lean_attention.value_in_input),
    # the moment that ran out of memory above (making v beside x, its norm, q and k) holds four hidden states and
    # a range: one hidden vector less. Derived from those live blocks, then measured (H100, 2026-12-07,
    # bench/results/2026-12-07-h100-comfy_long_video-lean-*value-*): 8,301 frames ran, the plan 1.6 % under
    # PyTorch's peak; two workers at 2,577 frames +2.6 % (without this term +14 % and +20 %)
    lean_value=1.0,
)

# LTX-2's VAE: 8x time (plus the first frame), 32x space; audio ~25 latents a second. The sampler's latent
# is video [B, 128, F, H, W] and audio [B, 8, T, 16]: 128 elements a token each, packed
GEOMETRY = memory_plan.LatentGeometry(time_stride=8, space_stride=32, audio_per_second=25.0,
                                      video_elements=128, audio_elements=128)
