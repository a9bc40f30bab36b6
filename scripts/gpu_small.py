"""Small launches of every kernel, forward and backward, in fp32 and bf16: what compute-sanitizer
runs under on a GPU (scripts/gpu_check.sh); on CPU (its dry run) the C++ kernels."""
import torch

import umae

d = "cuda" if torch.cuda.is_available() else "cpu"
for dt in (torch.float32, torch.bfloat16):
    imgs = torch.randn(3, 3, 40, 24, device=d, dtype=dt)
    x = umae.patchify(imgs, 8).requires_grad_()
    umae.unpatchify(x, 8, (40, 24)).sum().backward()
    pred = torch.randn(3, 15, 192, device=d, dtype=dt, requires_grad=True)
    umae.mae_loss(pred, imgs.float(), (torch.rand(3, 15, device=d) < .75).float(), 8).backward()
    t = torch.randn(3, 49, 72, device=d, dtype=dt, requires_grad=True)
    xm, m, ids = umae.random_masking(t, 0.75, pos_embed=torch.randn(1, 49, 72, device=d, dtype=dt),
                                     cls_token=torch.randn(1, 1, 72, device=d, dtype=dt))
    umae.restore_tokens(xm, ids, torch.randn(1, 1, 72, device=d, dtype=dt, requires_grad=True)).sum().backward()
    f = torch.randn(70, 100, device=d, dtype=dt, requires_grad=True)
    umae.uniformity_loss(f, exclude_diagonal=True).backward()
if d == "cuda":
    torch.cuda.synchronize()
print("ok")
