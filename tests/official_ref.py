"""An independent, test-only re-statement of the authors' modules, written from the papers, the issue text and the key
lists in ../shared/interop/*.json (not copied from their code and not importing seqdis_nb). Module names are fixed by
the official state_dict keys, so these classes load the authors' files directly with `load_state_dict(strict=True)`.

What it restates, at the Sprites settings (64x64 RGB, DCGAN widths 64-128-256-512):
- `Encoder`: c1..c4 = Conv(4, 2, 1) -> BN -> LeakyReLU(0.2), c5 = Conv(4, 1, 0) -> BN -> Tanh; frames -> (N, g).
- `DecoderConvT`: upc1 = ConvT(4, 1, 0) -> BN -> LeakyReLU(0.2); upc2..4 = ConvT(4, 2, 1) -> BN -> LeakyReLU(0.2);
  upc5 = ConvT(4, 2, 1) -> Sigmoid; input (B, T, dim) -> (B, T, C, 64, 64).
- `DBSE` (azencot-group/DBSE video/model/dbse_model.py): static from h_1 through Linear+Tanh (rnn) then f_mean /
  f_logvar; dynamics: slot 1 = a N(0, I) draw, slots 2..T = h_t - h_1, a 2-layer bidirectional LSTM of width z,
  z_mean / z_logvar on its 2z outputs; prior: two LSTMCells (z -> rnn -> rnn) fed the previous d, from zeros.
- `CDSVAE` (azencot-group/SPYL cdsvae/model.py): one bidirectional LSTM (width rnn) over h_{1:T}; s from
  [forward state at step `frames`, backward state at step 1]; d from a unidirectional tanh RNN over the bi-LSTM
  outputs; the same two-LSTMCell prior (d -> rnn -> rnn).
- `SpriteJudge` (C-DSVAE classifier_Sprite_all): encoder (g=128) -> bi-LSTM (256) -> the s-style summary ->
  five heads Linear(512, 256) -> ReLU -> Linear(256, K), returned in the order action, skin, pant, top, hair.

All randomness is passed in explicitly (`noise`, `eps_*`), so a test can feed both implementations the same draws.
"""
import torch
from torch import nn


def _gauss(mean, logvar, eps):
    return mean if eps is None else mean + torch.exp(0.5 * logvar) * eps


class _Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))

    def forward(self, x):
        return self.main(x)


class _Up(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.main = nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))

    def forward(self, x):
        return self.main(x)


class Encoder(nn.Module):
    def __init__(self, dim, nc=3, nf=64):
        super().__init__()
        self.dim = dim
        self.c1, self.c2 = _Down(nc, nf), _Down(nf, 2 * nf)
        self.c3, self.c4 = _Down(2 * nf, 4 * nf), _Down(4 * nf, 8 * nf)
        self.c5 = nn.Sequential(nn.Conv2d(8 * nf, dim, 4, 1, 0), nn.BatchNorm2d(dim), nn.Tanh())

    def forward(self, x):                       # (N, C, 64, 64) -> (N, dim)
        for m in (self.c1, self.c2, self.c3, self.c4, self.c5):
            x = m(x)
        return x.reshape(-1, self.dim)

    def frames(self, x):                        # (B, T, C, H, W) -> (B, T, dim)
        B, T = x.shape[:2]
        return self(x.reshape(B * T, *x.shape[2:])).reshape(B, T, self.dim)


class DecoderConvT(nn.Module):
    def __init__(self, dim, nc=3, nf=64):
        super().__init__()
        self.dim = dim
        self.upc1 = nn.Sequential(nn.ConvTranspose2d(dim, 8 * nf, 4, 1, 0), nn.BatchNorm2d(8 * nf), nn.LeakyReLU(0.2))
        self.upc2, self.upc3, self.upc4 = _Up(8 * nf, 4 * nf), _Up(4 * nf, 2 * nf), _Up(2 * nf, nf)
        self.upc5 = nn.Sequential(nn.ConvTranspose2d(nf, nc, 4, 2, 1), nn.Sigmoid())

    def forward(self, zf):                      # (B, T, dim) -> (B, T, C, 64, 64)
        B, T = zf.shape[:2]
        y = zf.reshape(B * T, self.dim, 1, 1)
        for m in (self.upc1, self.upc2, self.upc3, self.upc4, self.upc5):
            y = m(y)
        return y.reshape(B, T, *y.shape[1:])


class _TwoCellPrior(nn.Module):
    "Shared by both models: cells `{p}_prior_lstm_ly1/2` and heads `{p}_prior_mean/logvar`, prefix p = 'z' or 'd'."
    def rollout(self, n, T, code, hidden, eps=None, teacher=None):
        cell1, cell2 = getattr(self, f'{code}_prior_lstm_ly1'), getattr(self, f'{code}_prior_lstm_ly2')
        head_m, head_v = getattr(self, f'{code}_prior_mean'), getattr(self, f'{code}_prior_logvar')
        p = next(self.parameters())
        prev = torch.zeros(n, cell1.input_size, dtype=p.dtype, device=p.device)
        s1 = (torch.zeros(n, hidden, dtype=p.dtype, device=p.device),) * 2
        s2 = s1
        means, logvars, draws = [], [], []
        for t in range(T):
            s1 = cell1(prev, s1)
            s2 = cell2(s1[0], s2)
            m, v = head_m(s2[0]), head_v(s2[0])
            d = _gauss(m, v, None if eps is None else eps[:, t])
            means.append(m), logvars.append(v), draws.append(d)
            prev = d if teacher is None else teacher[:, t]
        return torch.stack(means, 1), torch.stack(logvars, 1), torch.stack(draws, 1)


class DBSE(_TwoCellPrior):
    def __init__(self, f_dim=256, z_dim=256, g_dim=256, rnn_size=64, channels=3):
        super().__init__()
        self.f_dim, self.z_dim, self.g_dim, self.hidden = f_dim, z_dim, g_dim, rnn_size
        self.encoder = Encoder(g_dim, channels)
        self.decoder = DecoderConvT(f_dim + z_dim, channels)
        self.z_prior_lstm_ly1 = nn.LSTMCell(z_dim, rnn_size)
        self.z_prior_lstm_ly2 = nn.LSTMCell(rnn_size, rnn_size)
        self.z_prior_mean = nn.Linear(rnn_size, z_dim)
        self.z_prior_logvar = nn.Linear(rnn_size, z_dim)
        self.z_lstm = nn.LSTM(g_dim, z_dim, num_layers=2, bidirectional=True, batch_first=True)
        self.f_mean = nn.Linear(rnn_size, f_dim)
        self.f_logvar = nn.Linear(rnn_size, f_dim)
        self.z_mean = nn.Linear(2 * z_dim, z_dim)
        self.z_logvar = nn.Linear(2 * z_dim, z_dim)
        self.static_feature_extractor = nn.Sequential(nn.Linear(g_dim, rnn_size), nn.Tanh())

    def encode(self, x, noise, eps_f=None, eps_z=None):
        "x (B, T, 3, 64, 64), noise (B, g): the slot-1 draw. Returns f_mean, f_logvar, f, z_mean, z_logvar, z."
        h = self.encoder.frames(x)                                   # (B, T, g)
        u = self.static_feature_extractor(h[:, 0])                   # (B, rnn)
        f_mean, f_logvar = self.f_mean(u), self.f_logvar(u)
        seq = torch.cat([noise[:, None], h[:, 1:] - h[:, :1]], 1)    # (B, T, g)
        out = self.z_lstm(seq)[0]                                    # (B, T, 2z)
        z_mean, z_logvar = self.z_mean(out), self.z_logvar(out)
        return f_mean, f_logvar, _gauss(f_mean, f_logvar, eps_f), z_mean, z_logvar, _gauss(z_mean, z_logvar, eps_z)

    def decode(self, f, z):
        "f (B, f_dim), z (B, T, z_dim) -> (B, T, 3, 64, 64); the decoder reads [z_t, f]."
        return self.decoder(torch.cat([z, f[:, None].expand(-1, z.shape[1], -1)], 2))

    def prior(self, n, T, eps=None, teacher=None):
        return self.rollout(n, T, 'z', self.hidden, eps, teacher)


class CDSVAE(_TwoCellPrior):
    def __init__(self, s_dim=256, d_dim=32, g_dim=128, rnn_size=256, channels=3, frames=8):
        super().__init__()
        self.s_dim, self.d_dim, self.hidden, self.frames = s_dim, d_dim, rnn_size, frames
        self.encoder = Encoder(g_dim, channels)
        self.decoder = DecoderConvT(s_dim + d_dim, channels)
        self.d_prior_lstm_ly1 = nn.LSTMCell(d_dim, rnn_size)
        self.d_prior_lstm_ly2 = nn.LSTMCell(rnn_size, rnn_size)
        self.d_prior_mean = nn.Linear(rnn_size, d_dim)
        self.d_prior_logvar = nn.Linear(rnn_size, d_dim)
        self.d_lstm = nn.LSTM(g_dim, rnn_size, 1, bidirectional=True, batch_first=True)
        self.s_mean = nn.Linear(2 * rnn_size, s_dim)
        self.s_logvar = nn.Linear(2 * rnn_size, s_dim)
        self.d_rnn = nn.RNN(2 * rnn_size, rnn_size, batch_first=True)
        self.d_mean = nn.Linear(rnn_size, d_dim)
        self.d_logvar = nn.Linear(rnn_size, d_dim)

    def encode(self, x, eps_s=None, eps_d=None):
        h = self.encoder.frames(x)                                   # (B, T, g)
        out = self.d_lstm(h)[0]                                      # (B, T, 2 rnn)
        H = self.hidden
        summary = torch.cat([out[:, self.frames - 1, :H], out[:, 0, H:]], 1)   # (B, 2 rnn)
        s_mean, s_logvar = self.s_mean(summary), self.s_logvar(summary)
        feats = self.d_rnn(out)[0]                                   # (B, T, rnn)
        d_mean, d_logvar = self.d_mean(feats), self.d_logvar(feats)
        return s_mean, s_logvar, _gauss(s_mean, s_logvar, eps_s), d_mean, d_logvar, _gauss(d_mean, d_logvar, eps_d)

    def decode(self, s, d):
        return self.decoder(torch.cat([d, s[:, None].expand(-1, d.shape[1], -1)], 2))

    def prior(self, n, T, eps=None, teacher=None):
        return self.rollout(n, T, 'd', self.hidden, eps, teacher)


class SpriteJudge(nn.Module):
    HEADS = (('action', 9), ('skin', 6), ('pant', 6), ('top', 6), ('hair', 6))

    def __init__(self, g_dim=128, rnn_size=256, channels=3, frames=8):
        super().__init__()
        self.hidden, self.frames = rnn_size, frames
        self.encoder = Encoder(g_dim, channels)
        self.bilstm = nn.LSTM(g_dim, rnn_size, 1, bidirectional=True, batch_first=True)
        for name, k in self.HEADS:
            setattr(self, f'cls_{name}', nn.Sequential(nn.Linear(2 * rnn_size, rnn_size), nn.ReLU(),
                                                       nn.Linear(rnn_size, k)))

    def forward(self, x):
        "x (B, T, 3, 64, 64) scaled as the authors' loader scales it (uint8 / 256) -> logits per head."
        out = self.bilstm(self.encoder.frames(x))[0]
        H = self.hidden
        summary = torch.cat([out[:, self.frames - 1, :H], out[:, 0, H:]], 1)
        return tuple(getattr(self, f'cls_{name}')(summary) for name, _ in self.HEADS)


def calibrated(module, seed=0, batch=2, frames=4):
    """`module` with weights that behave like trained ones, for output comparisons: default init under `seed`,
    BatchNorm affine parameters spread around (1, 0), and running statistics measured on random frames (and, for
    the decoders, random codes), so every layer works at unit scale and the outputs depend on the input."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for m in module.modules():      # re-draw every parameter with its layer's default init
            if hasattr(m, 'reset_parameters') and m is not module: m.reset_parameters()
        bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:
            bn.momentum = None          # cumulative average: the running stats are those of the calibration batch
            nn.init.normal_(bn.weight, 1.0, 0.1), nn.init.normal_(bn.bias, 0.0, 0.1)
        module.train()
        with torch.no_grad():
            module.encoder.frames(torch.rand(batch, frames, 3, 64, 64))
            if hasattr(module, 'decoder'): module.decoder(torch.randn(batch, frames, module.decoder.dim))
        for bn in bns: bn.momentum = 0.1
    return module.eval()
