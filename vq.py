"""
A learned image tokenizer: a small VQ-VAE (van den Oord et al. 2017, arXiv:1711.00937), the kind
of tokenizer unified models use (Chameleon, LlamaGen, Janus), written out whole.

    image (24, 24, 3) -> conv encoder, down by f -> (g, g, D) vectors -> nearest of K codes -> g*g tokens
    tokens -> the codes' vectors -> conv decoder, up by f -> image

f = 8 gives 9 tokens (3x3), f = 4 gives 36 (6x6), f = 3 gives 64 (8x8): at f = 3 a token covers
3x3 pixels of an 8x8 cell, so no token lines up with an object, and drawing one object means
emitting several tokens that agree with each other.

Training (train_vq) minimises, per batch,
    ||x - decoder(z_q)||^2  +  ||sg[z_e] - e||^2  +  beta ||z_e - sg[e]||^2
(reconstruction, codebook, commitment; sg = stop-gradient, beta = 0.25 as in the paper). z_q is z_e
with the quantisation error added as a constant (z_e + sg[e - z_e]): the forward pass sees the code
e, the backward pass hands the decoder's gradient straight to the encoder ("straight-through").
The codebook learns from its own loss term rather than from an EMA of the vectors assigned to it:
one more term to read, no extra state, and the same fixed point (each code at the mean of its
vectors). Two things keep a small VQ-VAE from collapsing onto a few codes: the codebook starts as
k-means of the first batch's encoder outputs (random codes sit far from every output and are never
picked), and a code unused for `restart_every` steps is moved onto a random encoder output of the
current batch ("dead code restart", as in Jukebox, arXiv:2005.00341).

The tokenizer has the interface of model.PatchTokenizer (encode, decode, grid, canvas, codebook),
so the model, the tasks and every stage use it unchanged.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.net(x)


def kmeans(x, k, iters=10, generator=None):
    """(N, D) -> (k, D) centres: k of the points as the start, then Lloyd steps; a centre that loses
    all its points stays where it was."""
    start = (torch.randperm(len(x), generator=generator, device=x.device)[:k] if len(x) >= k else
             torch.randint(len(x), (k,), generator=generator, device=x.device))    # (too few points: repeats)
    centres = x[start].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)                        # (N,)
        total = torch.zeros_like(centres).index_add_(0, assign, x)
        n = torch.zeros(k, device=x.device).index_add_(0, assign, torch.ones_like(assign, dtype=x.dtype))
        centres = torch.where(n[:, None] > 0, total / n.clamp(min=1)[:, None], centres)
    return centres


class VQVAE(nn.Module):

    def __init__(self, n_codes=512, f=3, canvas=24, dim=32, hidden=64, beta=0.25, restart_every=100):
        super().__init__()
        if canvas % f:
            raise ValueError(f"the downsampling factor {f} does not divide the canvas side {canvas}")
        self.n_codes, self.f, self.canvas, self.grid = n_codes, f, canvas, canvas // f
        self.patch = f                                                     # pixels a token spans, as PatchTokenizer
        self.dim, self.hidden, self.beta, self.restart_every = dim, hidden, beta, restart_every
        self.encoder = nn.Sequential(
            nn.Conv2d(3, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, f, stride=f),                          # down by f: one vector a token
            ResBlock(hidden), ResBlock(hidden), nn.ReLU(), nn.Conv2d(hidden, dim, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1), ResBlock(hidden), ResBlock(hidden), nn.ReLU(),
            nn.ConvTranspose2d(hidden, hidden, f, stride=f), nn.ReLU(),     # up by f
            nn.Conv2d(hidden, 3, 3, padding=1))
        self.codebook = nn.Parameter(torch.zeros(n_codes, dim))            # (K, D): the codes' vectors
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("idle", torch.zeros(n_codes, dtype=torch.long))   # steps since each code was used

    def config(self):
        return dict(n_codes=self.n_codes, f=self.f, canvas=self.canvas, dim=self.dim, hidden=self.hidden,
                    beta=self.beta, restart_every=self.restart_every)

    def pixels(self, imgs):
        """(B, H, W, 3) uint8 (array or tensor) -> (B, 3, H, W) float in [0, 1] on the codebook's device."""
        imgs = torch.as_tensor(imgs, device=self.codebook.device)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != (self.canvas, self.canvas, 3):
            raise ValueError(f"expected images of shape (B, {self.canvas}, {self.canvas}, 3), got {tuple(imgs.shape)}")
        return imgs.permute(0, 3, 1, 2).float().div(255)

    def quantize(self, z):
        """z_e (N, D) -> (indices (N,), z_q (N, D) with the straight-through gradient, codebook loss,
        commitment loss). The nearest code by squared distance, ||z||^2 - 2 z.e + ||e||^2."""
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t() + self.codebook.pow(2).sum(1)[None]
        idx = d.argmin(1)
        e = self.codebook[idx]                                             # (N, D)
        codebook_loss = F.mse_loss(e, z.detach())                          # moves the codes
        commitment_loss = self.beta * F.mse_loss(z, e.detach())             # keeps the encoder near them
        return idx, z + (e - z).detach(), codebook_loss, commitment_loss

    def encode_vectors(self, imgs):
        """(B, H, W, 3) uint8 -> z_e (B*g*g, D), rows in row-major token order."""
        z = self.encoder(self.pixels(imgs))                               # (B, D, g, g)
        return z.permute(0, 2, 3, 1).reshape(-1, self.dim)

    def decode_vectors(self, zq, B):
        """(B*g*g, D) -> (B, 3, H, W) reconstruction (unbounded; the image is its clamp)."""
        return self.decoder(zq.view(B, self.grid, self.grid, self.dim).permute(0, 3, 1, 2))

    def forward(self, imgs):
        """One training pass: (loss, metrics dict). Initialises the codebook by k-means on the first
        call in training mode, and counts how long each code has been idle."""
        x = self.pixels(imgs)
        z = self.encode_vectors(imgs)
        if self.training and not self.initialised:
            with torch.no_grad():
                self.codebook.copy_(kmeans(z.detach(), self.n_codes))
            self.initialised.fill_(True)
        idx, zq, codebook_loss, commitment_loss = self.quantize(z)
        recon = F.mse_loss(self.decode_vectors(zq, x.size(0)), x)
        counts = torch.bincount(idx, minlength=self.n_codes)
        if self.training:
            self.idle.add_(1).masked_fill_(counts > 0, 0)
        p = counts.float() / counts.sum()
        perplexity = torch.exp(-(p * p.clamp(min=1e-12).log()).sum())      # effective codes in use
        loss = recon + codebook_loss + commitment_loss
        return loss, {"recon": recon, "codebook": codebook_loss, "commitment": commitment_loss,
                      "perplexity": perplexity, "used": (counts > 0).sum(), "z": z.detach()}

    @torch.no_grad()
    def restart_dead_codes(self, z, generator=None):
        """Move every code idle for restart_every steps onto a random row of z (this batch's encoder
        outputs); returns how many moved."""
        dead = (self.idle >= self.restart_every).nonzero().squeeze(1)
        if len(dead):
            pick = torch.randint(len(z), (len(dead),), generator=generator, device=z.device)
            self.codebook[dead] = z[pick]
            self.idle[dead] = 0
        return len(dead)

    @torch.no_grad()
    def encode(self, imgs):
        """(B, H, W, 3) uint8 -> (B, g*g) long codes."""
        z = self.encode_vectors(imgs)
        return self.quantize(z)[0].view(-1, self.grid * self.grid)

    @torch.no_grad()
    def decode(self, codes):
        """(B, g*g) long -> (B, H, W, 3) uint8."""
        codes = torch.as_tensor(codes, device=self.codebook.device)
        x = self.decode_vectors(self.codebook[codes.reshape(-1)], codes.size(0))
        return x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
