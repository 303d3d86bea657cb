"""Show, Attend and Tell (Xu et al. 2015) for house numbers: a CNN's grid of annotation vectors
read by a GRU/LSTM that attends to one region per output symbol.

    encoder   conv stages (2x2 max pool between) -> a (B, L = h x w, D) grid of annotation
              vectors a_i, plus a learned position embedding (so the decoder can tell where a
              region lies, which it needs to read left to right)
    init      h_0 (and c_0) = tanh(W mean_i a_i)
    step t    alpha_t = softmax(v^T tanh(W_q h_{t-1} + W_k a_i))   the zoo's AdditiveScore
              soft  z_t = beta_t sum_i alpha_ti a_i, beta_t = sigmoid(W_b h_{t-1})  (the gate)
              hard  z_t = a_{s_t}, s_t ~ Multinoulli(alpha_t) in training, argmax at inference
              none  z_t = mean_i a_i (the zoo's FixedContext): the same vector every step
              h_t = RNN([E y_{t-1}; z_t], h_{t-1})
              logits = L_o(E y_{t-1} + L_h h_t + L_z z_t)              the deep output (eq. 7)

Soft and none train on the cross-entropy; soft adds the doubly stochastic penalty
lambda sum_i (1 - sum_t alpha_ti)^2. Hard maximises the variational lower bound with REINFORCE:
the reward is the log-likelihood under the sampled locations (the whole sequence's, as in the
paper, with hard_reward = "sequence"; by default the mean per-symbol log-likelihood from the
step on, "to_go"), minus a moving-average baseline, plus an entropy bonus; with probability
hard_expectation_p an image uses the expectation (soft) instead, which the paper found to
reduce the variance further.

Symbols: the shared special ids (pad 0, unk 1, bos 2, eos 3), then the digits 0-9 as 4-13.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnserve.decoding_rules import BOS_ID, EOS_ID, PAD_ID
from attnserve.model.attention import FixedContext, GlobalAttention, SCORES
from attnserve.model.base import EncoderDecoder, State
from attnserve.model.config import ModelConfig

DIGIT_OFFSET = 4
VOCAB_SIZE = DIGIT_OFFSET + 10
ATTENTIONS = ("soft", "hard", "none")
# The input normalisation, fixed so that the manifest and the server can state and apply it.
PIXEL_MEAN, PIXEL_STD = 127.5, 64.0


def encode_digits(text: str) -> list[int]:
    return [DIGIT_OFFSET + int(ch) for ch in text]


def decode_digits(ids) -> str:
    return "".join(str(i - DIGIT_OFFSET) for i in ids if DIGIT_OFFSET <= i < VOCAB_SIZE)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W), centred and scaled."""
    return (images.permute(0, 3, 1, 2).float() - PIXEL_MEAN) / PIXEL_STD


class ConvEncoder(nn.Module):
    """Conv-BN-ReLU stages; a 2x2 max pool between stages; two convs in each stage but the first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        channels = cfg.image_channels
        for stage, out in enumerate(cfg.conv_channels):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(1 if stage == 0 else 2):
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        self.net = nn.Sequential(*layers)
        shrink = 2 ** (len(cfg.conv_channels) - 1)
        if cfg.image_height % shrink or cfg.image_width % shrink:
            raise ValueError(f"image size {cfg.image_height}x{cfg.image_width} is not divisible by the encoder's {shrink}")
        self.grid = (cfg.image_height // shrink, cfg.image_width // shrink)  # (h, w)
        self.dim = channels
        self.position = nn.Parameter(torch.zeros(self.grid[0] * self.grid[1], channels))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels (B, C, H, W) normalised
        features = self.net(pixels)  # (B, D, h, w)
        return features.flatten(2).transpose(1, 2) + self.position  # (B, L, D), row-major over the grid


class HardAttention(GlobalAttention):
    """Stochastic hard attention over the zoo's additive score: the weights are the additive
    attention's, the context is one sampled annotation vector (training) or the most likely
    one (inference). `forward` returns the sampled one-hot too, for the REINFORCE term."""

    def forward(self, query, keys, memory, mask, src_len=None, sample: bool = False, expectation=None):
        weights = torch.softmax(self.score(query, keys).masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1)  # (B, 1, L)
        if sample:
            chosen = torch.multinomial(weights.squeeze(1).detach(), 1)  # (B, 1)
        else:
            chosen = weights.squeeze(1).argmax(-1, keepdim=True)
        one_hot = F.one_hot(chosen.squeeze(1), weights.size(-1)).to(weights.dtype).unsqueeze(1)  # (B, 1, L)
        if expectation is not None:  # (B,) bool: these images use the soft expectation instead
            one_hot = torch.where(expectation.view(-1, 1, 1), weights, one_hot)
        return one_hot @ memory, weights, one_hot  # (B, 1, D), (B, 1, L), (B, 1, L)


@dataclasses.dataclass
class ReaderLoss:
    """Sums over the batch; `objective` is what backward() sees, `nll` the symbol log-loss."""

    objective: torch.Tensor
    nll: torch.Tensor
    symbols: int


class ImageReader(EncoderDecoder):
    """The encoder-decoder interface of the zoo over images: encode(pixels) -> state;
    decode_step(prev, state) -> logits (B, V), state, attention (B, L)."""

    def __init__(self, cfg: ModelConfig):
        if cfg.attention not in ATTENTIONS:
            raise ValueError(f"reader attention must be one of {ATTENTIONS}, got {cfg.attention!r}")
        if cfg.vocab_size != VOCAB_SIZE:
            raise ValueError(f"a reader's vocabulary is the {VOCAB_SIZE} special ids and digits, got vocab_size={cfg.vocab_size}")
        super().__init__(cfg)
        self.encoder = ConvEncoder(cfg)
        D, H, E = self.encoder.dim, cfg.hidden, cfg.d_model
        self.lstm = cfg.cell == "lstm"
        self.init_h = nn.Linear(D, H)
        self.init_c = nn.Linear(D, H) if self.lstm else None
        if cfg.attention == "none":
            self.attention: nn.Module = FixedContext()
        else:
            if cfg.score not in SCORES:
                raise ValueError(f"unknown attention score {cfg.score!r}")
            score = SCORES[cfg.score](H, D, cfg.attn_dim)
            self.attention = HardAttention(score) if cfg.attention == "hard" else GlobalAttention(score)
        self.gate = nn.Linear(H, 1) if cfg.attention == "soft" else None  # beta_t
        self.cell = nn.LSTMCell(E + D, H) if self.lstm else nn.GRUCell(E + D, H)
        self.out_h = nn.Linear(H, E)
        self.out_z = nn.Linear(D, E, bias=False)
        self.out = nn.Linear(E, cfg.vocab_size)
        # The moving-average baseline of hard attention's reward: a buffer, so it is
        # checkpointed and a resumed run continues from the same value.
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_ready", torch.zeros((), dtype=torch.bool))
        if cfg.attention == "hard":  # updates seen by loss(), for the expectation schedule; a buffer too
            self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    # -- the zoo's interface -------------------------------------------------------------

    def encode(self, pixels: torch.Tensor) -> State:
        """pixels (B, C, H, W), normalised -> the initial decoder state."""
        memory = self.encoder(pixels)  # (B, L, D)
        mean = memory.mean(1)  # (B, D)
        state = {"hidden": torch.tanh(self.init_h(mean)), "memory": memory,
                 "keys": self.attention.project_keys(memory)}
        if self.lstm:
            state["cell"] = torch.tanh(self.init_c(mean))
        return state

    def _step(self, y_prev: torch.Tensor, state: State, sample: bool = False, expectation=None):
        # y_prev (B, E) embedded previous symbol
        memory = state["memory"]
        mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)  # (B, L): no padding in a grid
        query = state["hidden"].unsqueeze(1)  # (B, 1, H)
        chosen = None
        if isinstance(self.attention, HardAttention):
            z, weights, chosen = self.attention(query, state["keys"], memory, mask, sample=sample, expectation=expectation)
        else:
            z, weights = self.attention(query, state["keys"], memory, mask)
        z, weights = z.squeeze(1), weights.squeeze(1)  # (B, D), (B, L)
        if self.gate is not None:
            z = torch.sigmoid(self.gate(state["hidden"])) * z  # beta_t: how much the image matters now
        x = torch.cat([y_prev, z], dim=-1)
        if self.lstm:
            h, c = self.cell(x, (state["hidden"], state["cell"]))
            state = {**state, "hidden": h, "cell": c}
        else:
            h = self.cell(x, state["hidden"])
            state = {**state, "hidden": h}
        logits = self.out(self.dropout(y_prev + self.out_h(h) + self.out_z(z)))  # (B, V)
        return logits, state, weights, chosen

    def decode_step(self, prev: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        logits, state, weights, _ = self._step(self.embedding(prev), state)
        return logits, state, weights

    def forward(self, pixels: torch.Tensor, tgt_in: torch.Tensor, return_attention: bool = False):
        """Teacher forcing: pixels (B, C, H, W), tgt_in (B, T) from BOS -> logits (B, T, V)
        [and attention (B, T, L)]; deterministic (hard attention takes the argmax)."""
        state = self.encode(pixels)
        inputs = self.embedding(tgt_in)  # (B, T, E)
        logits, attns = [], []
        for t in range(tgt_in.size(1)):
            out, state, weights, _ = self._step(inputs[:, t], state)
            logits.append(out)
            attns.append(weights)
        logits = torch.stack(logits, 1)
        return (logits, torch.stack(attns, 1)) if return_attention else logits

    # -- training ------------------------------------------------------------------------

    def expectation_share(self) -> float:
        """Hard attention: the share of images trained on the soft expectation at this update,
        1 -> hard_expectation_p over hard_expectation_warmup updates, then constant."""
        cfg = self.config
        warmup = cfg.hard_expectation_warmup
        progress = min(int(self.updates) / warmup, 1.0) if warmup > 0 else 1.0
        return 1.0 + (cfg.hard_expectation_p - 1.0) * progress

    def loss(self, pixels: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor) -> ReaderLoss:
        """The training objective of the configured attention, summed over the batch."""
        cfg = self.config
        hard = cfg.attention == "hard"
        state = self.encode(pixels)
        inputs = self.dropout(self.embedding(tgt_in))  # (B, T, E)
        B, T = tgt_in.shape
        expectation = None
        if hard:
            expectation = torch.rand(B, device=pixels.device) < self.expectation_share()  # (B,)
            if self.training:
                self.updates += 1
        logits, attns, chosen = [], [], []
        for t in range(T):
            out, state, weights, pick = self._step(inputs[:, t], state, sample=hard, expectation=expectation)
            logits.append(out)
            attns.append(weights)
            chosen.append(pick)
        logits = torch.stack(logits, 1)  # (B, T, V)
        alpha = torch.stack(attns, 1)  # (B, T, L)
        valid = tgt_out != PAD_ID  # (B, T)
        token_nll = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD_ID,
                                    reduction="none").view(B, T)
        nll = token_nll.sum()
        objective = nll
        if cfg.attention == "soft" and cfg.alpha_reg:
            coverage = (alpha * valid.unsqueeze(-1)).sum(1)  # (B, L): sum_t alpha_ti
            objective = objective + cfg.alpha_reg * (1 - coverage).pow(2).sum()
        if hard:
            picked = torch.stack([c.squeeze(1) for c in chosen], 1)  # (B, T, L) one-hot (or alpha)
            log_alpha = torch.log(alpha.clamp_min(1e-12))
            log_p_location = (picked * log_alpha).sum(-1) * valid  # (B, T)  log p(s_t | a)
            sampled = ~expectation  # only sampled images have a REINFORCE term
            r = -token_nll.detach() * valid  # (B, T) log p(y_t | s, a): the lower bound's integrand, per step
            if cfg.hard_reward == "sequence":  # Xu et al.: log p(y | s, a) for every step's location
                reward = r.sum(1, keepdim=True).expand(B, T)
                batch_value = r.sum(1)[sampled].mean() if sampled.any() else None
            elif cfg.hard_reward == "to_go":  # mean log p(y_t' | s, a) over t' >= t
                remaining = valid.flip(1).cumsum(1).flip(1).clamp_min(1)  # (B, T)
                reward = r.flip(1).cumsum(1).flip(1) / remaining
                batch_value = r[sampled].sum() / valid[sampled].sum() if sampled.any() else None
            else:
                raise ValueError(f"unknown hard_reward {cfg.hard_reward!r}; choose sequence or to_go")
            with torch.no_grad():
                if batch_value is not None:
                    decay = cfg.baseline_decay
                    self.baseline.copy_(torch.where(self.baseline_ready, decay * self.baseline + (1 - decay) * batch_value,
                                                    batch_value))
                    self.baseline_ready.fill_(True)
            advantage = (reward - self.baseline) * valid * sampled.unsqueeze(1)  # (B, T)
            reinforce = -(advantage * log_p_location).sum()
            entropy = -(alpha * log_alpha).sum(-1) * valid  # (B, T)
            objective = objective + reinforce - cfg.entropy_bonus * entropy.sum()
        return ReaderLoss(objective, nll.detach(), int(valid.sum()))


@torch.inference_mode()
def greedy_read(model: ImageReader, pixels: torch.Tensor, max_symbols: int | None = None):
    """Greedy decoding: pixels (B, C, H, W) -> (ids per image without EOS, summed log-prob
    (B,), attention (B, T, L) of every emitted symbol, EOS included, zero after it)."""
    max_symbols = max_symbols or model.config.max_len
    state = model.encode(pixels)
    B = pixels.size(0)
    prev = torch.full((B,), BOS_ID, dtype=torch.long, device=pixels.device)
    done = torch.zeros(B, dtype=torch.bool, device=pixels.device)
    scores = torch.zeros(B, device=pixels.device)
    ids, attns = [], []
    for _ in range(max_symbols):
        logits, state, weights = model.decode_step(prev, state)
        logp = torch.log_softmax(logits.float(), -1)
        best = logp.argmax(-1)
        scores += torch.where(done, 0.0, logp.gather(1, best[:, None]).squeeze(1))
        attns.append(torch.where(done[:, None], 0.0, weights))
        ids.append(torch.where(done, PAD_ID, best))
        done = done | (best == EOS_ID)
        prev = best
        if done.all():
            break
    ids_t = torch.stack(ids, 1)  # (B, T)
    out = []
    for row in ids_t.tolist():
        out.append([i for i in row[: row.index(EOS_ID)]] if EOS_ID in row else [i for i in row if i != PAD_ID])
    return out, scores, torch.stack(attns, 1)
