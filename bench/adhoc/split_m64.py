import torch
from bench.bench_gemm import GROUP, make_problem, n_sets, weight_bytes, wk
from bench.common import bench_us
for N, K in ((12288, 4096), (22016, 4096), (11008, 4096), (4096, 4096), (4096, 11008)):
    for M in (64, 48, 40):
        _, _, xq, wq = make_problem(M, N, K)
        x16 = wk.unpack_activations(xq[0], GROUP)
        G = x16.shape[1] // GROUP
        pw0 = wk.prepare_weight(*wq, GROUP)
        k = n_sets(weight_bytes(pw0))
        pws = [pw0] + [wk.prepare_weight(*(t.clone() for t in wq), GROUP) for _ in range(k - 1)]
        out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
        xs, xo, xos = xq[1].float(), xq[2], xq[3].reshape(M, 1).float()
        d = wk.pick_config(M, N, G)
        line = []
        for s in (1, 2, 3, 4, 6):
            cfg = wk.Config(block_n=64, block_m=64, split_k=s, num_stages=4)
            fns = [lambda p=p, c=cfg: wk._launch(x16, xs, xo, xos, p, None, out, c, x_given_unpacked=True) for p in pws]
            line.append(f"s{s} {bench_us(fns[0], rotate=fns):.2f}")
        print(f"{N}x{K} M={M} pick s{d.split_k}: " + ", ".join(line), flush=True)
